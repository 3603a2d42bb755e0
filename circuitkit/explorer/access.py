"""Who may drive the explorer: its user, and no web page they happen to visit.

A server on loopback is still reachable from the user's browser, so any page open there can send it requests.
Three checks, as Jupyter's server makes them:
- **Host.** The ``Host`` header must name an address the server answers to (``127.0.0.1``, ``localhost``,
  ``[::1]`` or ``--host``, with the port): a DNS-rebinding page reaches the server under its own name and is
  refused.
- **Origin.** A state-changing request (POST) must come from the server's own origin (browsers send
  ``Origin`` on every cross-origin POST), or carry the launch token (scripts that send no ``Origin``).
- **Token.** Each launch draws a random token and prints it in the URL.  Bound to anything but loopback
  (which needs ``--allow-remote``), every request must carry it: ``?token=`` once (the page then gets an
  HttpOnly, SameSite=Strict cookie), the cookie, or ``Authorization: token ...``.
"""
from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qs, urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
COOKIE = "circuitkit_token"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass
class AccessPolicy:
    """The checks of the module docstring for a server bound to ``host``:``port``."""

    host: str
    port: int
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def token_required(self) -> bool:
        return not is_loopback(self.host)

    @property
    def wildcard(self) -> bool:
        """Bound to every interface: the Host a client uses cannot be known, the token stands in for it."""
        return self.host in ("0.0.0.0", "::", "")

    def hosts(self) -> set[str]:
        names = {*(LOOPBACK_NAMES if is_loopback(self.host) else ()), self.host}
        return {f"{_bracket(h).lower()}:{self.port}" for h in names} | {
            _bracket(h).lower() for h in names if self.port == 80}

    def origins(self) -> set[str]:
        return {f"http://{h}" for h in self.hosts()}

    def url(self, display_host: str | None = None) -> str:
        host = _bracket(display_host or ("127.0.0.1" if self.wildcard else self.host))
        return f"http://{host}:{self.port}/?token={self.token}"

    def _has_token(self, path: str, headers) -> bool:
        given = parse_qs(urlsplit(path).query).get("token", [])
        auth = headers.get("Authorization") or ""
        if auth.lower().startswith("token "):
            given.append(auth[6:].strip())
        try:
            jar = SimpleCookie(headers.get("Cookie") or "")
        except CookieError:
            jar = SimpleCookie()
        if COOKIE in jar:
            given.append(jar[COOKIE].value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    def refusal(self, method: str, path: str, headers) -> str | None:
        """Why this request is refused (a 403 message), or None when it may go on."""
        host = (headers.get("Host") or "").strip().lower()
        if not self.wildcard and host not in self.hosts():
            return (f"Host {host or '(none)'!r} is not an address this explorer answers to "
                    f"({', '.join(sorted(self.hosts()))}); open the URL that 'circuitkit serve' printed")
        token = self._has_token(path, headers)
        if self.token_required and not token:
            return ("this explorer listens beyond loopback and needs its launch token: open the URL that "
                    "'circuitkit serve' printed (it carries ?token=...)")
        if method == "POST" and not token:
            origin = (headers.get("Origin") or "").strip().lower()
            if origin not in self.origins():
                return (f"Origin {origin or '(none)'!r} may not change anything here; requests must come from the "
                        f"explorer's own page ({', '.join(sorted(self.origins()))}) or carry its token")
        return None

    def cookie_for(self, path: str) -> str | None:
        """A Set-Cookie value when the request brought the token in its URL (so the page's own calls carry it)."""
        given = parse_qs(urlsplit(path).query).get("token", [])
        if any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given):
            return f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
        return None


__all__ = ["AccessPolicy", "is_loopback", "COOKIE", "LOOPBACK_NAMES"]
