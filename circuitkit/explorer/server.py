"""The explorer's HTTP server (standard library only; loopback by default; nothing loads from the network).

Routes:
    GET  /                    the page (page.html)
    GET  /api/info            model, task, sites, positions, example input, preimage source
    POST /api/analyse         {"input"} -> tokens, named positions, predictions, attention patterns
    POST /api/preimage        {"input", "site", "position", "samples"} -> 202 {"job"}; sampling runs in the background
    GET  /api/jobs/ID         {"state": running|done|error, "phase", "elapsed_s", "result" | "error"}
    GET  /api/jobs/ID/panel   the finished preimage as the report's self-contained HTML panel (a download)
    GET  /case/circuit.svg    the case run's circuit picture (with --case)
Bad requests get 4xx with {"error": message}; work in flight is bounded (429 when full); an unexpected failure
is a 500 naming the error type, never a traceback.  Every request first passes ``access.AccessPolicy`` (Host,
Origin, launch token): a web page the user visits cannot drive the explorer (403).
"""
from __future__ import annotations

import json
import socket
import sys
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from typing import Any

from circuitkit.errors import CircuitkitError
from circuitkit.explorer.access import AccessPolicy
from circuitkit.explorer.session import Explorer

#: preimage jobs that may run or wait at once; more get 429
MAX_JOBS = 2
#: short requests (analyse) in flight at once; more get 429
MAX_SHORT = 8
#: finished jobs kept for their results and panels
KEEP_JOBS = 64
MAX_BODY = 64 * 1024


class _Reject(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class ExplorerServer(ThreadingHTTPServer):
    daemon_threads = True
    #: connections the kernel queues before accept (the default 5 resets clients of a busy page: 20 at once)
    request_queue_size = 128

    def __init__(self, explorer: Explorer, host: str = "127.0.0.1", port: int = 0, quiet: bool = True,
                 token: str | None = None) -> None:
        if ":" in host:  # an IPv6 address
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.access = AccessPolicy(host, self.server_address[1], **({"token": token} if token else {}))
        self.explorer = explorer
        self.quiet = quiet
        self.jobs: dict[str, dict[str, Any]] = {}
        self.jobs_lock = threading.Lock()
        self.job_slots = threading.BoundedSemaphore(MAX_JOBS)
        self.short_slots = threading.BoundedSemaphore(MAX_SHORT)
        self.page = files("circuitkit.explorer").joinpath("page.html").read_text(encoding="utf-8")

    @property
    def url(self) -> str:
        """The address to open, launch token included."""
        return self.access.url()

    # ---- jobs ------------------------------------------------------------------------------
    def start_job(self, body: dict[str, Any]) -> str:
        ex = self.explorer
        ex.parse_query(body.get("site"), body.get("position"), body.get("input"))  # 400 now, not in the job
        if not self.job_slots.acquire(blocking=False):
            raise _Reject(HTTPStatus.TOO_MANY_REQUESTS, f"{MAX_JOBS} preimages are already being sampled; "
                                                        "wait for one to finish")
        job_id = uuid.uuid4().hex[:12]
        job: dict[str, Any] = {"state": "running", "phase": "queued", "started": time.monotonic()}
        with self.jobs_lock:
            self.jobs[job_id] = job
            for old in list(self.jobs)[:-KEEP_JOBS]:
                if self.jobs[old]["state"] != "running":
                    del self.jobs[old]

        def work() -> None:
            try:
                job["result"] = ex.preimage(body.get("site"), body.get("position"), body.get("input"),
                                            body.get("samples", 1024), progress=job)
                job["state"] = "done"
            except CircuitkitError as e:
                job["state"], job["error"] = "error", str(e)
            except Exception as e:  # noqa: BLE001 - reported to the page by type; details to the server log
                job["state"], job["error"] = "error", f"internal error ({type(e).__name__}); see the server log"
                print(f"circuitkit serve: job {job_id} failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                job["elapsed_s"] = round(time.monotonic() - job["started"], 2)
                self.job_slots.release()

        threading.Thread(target=work, daemon=True).start()
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        with self.jobs_lock:
            job = self.jobs.get(job_id)
        if job is None:
            raise _Reject(HTTPStatus.NOT_FOUND, f"no job {job_id!r} (finished jobs are kept for the last {KEEP_JOBS})")
        out = {k: v for k, v in job.items() if k != "started"}
        if job["state"] == "running":
            out["elapsed_s"] = round(time.monotonic() - job["started"], 2)
        return out


class _Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet unless asked
        if not self.server.quiet:
            super().log_message(fmt, *args)

    # ---- plumbing ----------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _body(self) -> dict[str, Any]:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise _Reject(HTTPStatus.BAD_REQUEST, "Content-Length is not a number") from None
        if n > MAX_BODY:
            raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _Reject(HTTPStatus.BAD_REQUEST, f"the request body is not JSON ({e})") from None
        if not isinstance(body, dict):
            raise _Reject(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return body

    def _dispatch(self, method: str) -> None:
        why = self.server.access.refusal(method, self.path, self.headers)
        if why is not None:
            if method == "POST":
                self.close_connection = True  # its body is left unread
            return self._json(HTTPStatus.FORBIDDEN, {"error": why})
        try:
            self._route(method, self.path.split("?", 1)[0])
        except _Reject as e:
            self._json(e.status, {"error": str(e)})
        except CircuitkitError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - never a traceback to the client
            print(f"circuitkit serve: {method} {self.path} failed: {type(e).__name__}: {e}", file=sys.stderr)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(e).__name__})"})

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    # ---- routes ------------------------------------------------------------------------------
    def _route(self, method: str, path: str) -> None:
        srv, ex = self.server, self.server.explorer
        if method == "GET" and path in ("/", "/index.html"):
            cookie = srv.access.cookie_for(self.path)
            return self._send(HTTPStatus.OK, srv.page.encode(), "text/html; charset=utf-8",
                              {"Set-Cookie": cookie} if cookie else None)
        if method == "GET" and path == "/api/info":
            return self._json(HTTPStatus.OK, ex.info())
        if method == "POST" and path == "/api/analyse":
            body = self._body()
            if not srv.short_slots.acquire(blocking=False):
                raise _Reject(HTTPStatus.TOO_MANY_REQUESTS, "too many requests in flight; try again")
            try:
                return self._json(HTTPStatus.OK, ex.analyse(body.get("input")))
            finally:
                srv.short_slots.release()
        if method == "POST" and path == "/api/preimage":
            return self._json(HTTPStatus.ACCEPTED, {"job": srv.start_job(self._body())})
        if method == "GET" and path.startswith("/api/jobs/"):
            job_id, _, rest = path[len("/api/jobs/"):].partition("/")
            job = srv.job(job_id)
            if rest == "":
                return self._json(HTTPStatus.OK, job)
            if rest == "panel":
                if job["state"] != "done":
                    raise _Reject(HTTPStatus.CONFLICT, f"job {job_id} is {job['state']}; export it once it is done")
                r = job["result"]
                name = f"inversionview_{r['site']}_{r['position']}.html".replace("/", "_")
                return self._send(HTTPStatus.OK, ex.export_panel(r).encode(), "text/html; charset=utf-8",
                                  {"Content-Disposition": f'attachment; filename="{name}"'})
        if method == "GET" and path == "/case/circuit.svg" and ex.case is not None and ex.case["svg"] is not None:
            return self._send(HTTPStatus.OK, ex.case["svg"].read_bytes(), "image/svg+xml")
        if path in ("/", "/index.html", "/api/info", "/api/analyse", "/api/preimage"):
            raise _Reject(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not allowed on {path}")
        raise _Reject(HTTPStatus.NOT_FOUND, f"no such page {path!r}")
