"""Property-based fuzzing of what users and browsers hand circuitkit that ``test_bad_inputs.py`` does not
already generate: prompt-pairs JSONL lines, and the explorer's HTTP bodies, paths and query strings.  The
property: a clear ``CircuitkitError`` (a 4xx with a message, over HTTP) or a valid result; never another
exception or a 5xx, and no example past its deadline.

The example budget is fixed for CI; ``CIRCUITKIT_FUZZ_SCALE=20 pytest tests/test_fuzz.py`` runs 20 times as
many (the longer budget the README documents).  Examples are derandomised, so a failure reproduces.
"""
from __future__ import annotations

import json
import os
import string
import threading
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitkit.errors import CircuitkitError

SCALE = max(1, int(os.environ.get("CIRCUITKIT_FUZZ_SCALE", "1")))
REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "case_studies" / "models" / "addition"


def _budget(n: int) -> settings:
    return settings(max_examples=n * SCALE, deadline=20_000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=30),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                    max_leaves=12)

# ---- prompt-pairs JSONL lines ---------------------------------------------------------------------------------

GOOD_ROW = {"prompt": "When [IO:Mary] and [S:John] went to the [PLACE:park], [S2:John] gave a [OBJ:ball] to",
            "answer": " Mary",
            "counterfactual": "When [IO:Mary] and [S:John] went to the [PLACE:park], [S2:Mary] gave a [OBJ:ball] to",
            "counterfactual_answer": " John"}
ROW_TEXT = st.text(alphabet=string.ascii_letters + " []:,_" + "éß\u200b\x00", max_size=60)


def _mutated_row() -> st.SearchStrategy:
    def mutate(key: str, value: object, drop: bool) -> dict:
        row = dict(GOOD_ROW)
        if drop:
            row.pop(key)
        else:
            row[key] = value
        return row

    return st.builds(mutate, st.sampled_from(sorted(GOOD_ROW)), JSON | ROW_TEXT, st.booleans())


LINE = st.one_of(
    _mutated_row().map(json.dumps),
    JSON.map(json.dumps),
    st.text(max_size=80),  # not JSON at all
)


@_budget(60)
@given(lines=st.lists(LINE, min_size=1, max_size=3))
def test_fuzzed_prompt_pairs_lines_are_named_or_loaded(pairs_model, tmp_path_factory, lines):
    from circuitkit.tasks.prompt_pairs import PromptPairsTask

    model_dir, good_file = pairs_model
    good = good_file.read_text().splitlines()[:12]
    f = tmp_path_factory.mktemp("fuzz") / "pairs.jsonl"
    f.write_text("\n".join(good + [ln.replace("\n", " ") for ln in lines]) + "\n", encoding="utf-8")
    try:
        task = PromptPairsTask(f, model_dir)
    except CircuitkitError as e:
        assert str(e) and "Traceback" not in str(e)
        return
    for text in task.split("test")[:4]:  # a file that loads gives usable examples
        toks = task.tokens(text)
        assert task.targets(toks) and "END" in task.positions(toks)


# ---- the explorer's HTTP surface -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def explorer_url():
    from circuitkit.explorer.server import ExplorerServer
    from circuitkit.explorer.session import Explorer
    from circuitkit.models.checkpoint import load_probed

    srv = ExplorerServer(Explorer(load_probed(MODEL), None, pool_size=300), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _request(base: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
    import http.client

    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Origin": base} if method == "POST" else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data, r.headers.get("Content-Type", "")


def _check(status: int, data: bytes, ctype: str) -> None:
    assert status < 500, (status, data[:300])
    if status >= 400:
        assert ctype == "application/json" and json.loads(data)["error"], data[:300]


@_budget(80)
@given(route=st.sampled_from(["/api/analyse", "/api/preimage"]),
       body=st.one_of(JSON.map(lambda x: json.dumps(x).encode()),
                      st.fixed_dictionaries({"input": st.text(alphabet="0123456789B+=EP", max_size=16),
                                             "site": st.sampled_from(["a1.1", "a0.0", "x0.pre", "m1", "zz", ""]),
                                             "position": st.integers(-3, 20) | st.text(max_size=3),
                                             "samples": st.integers(-5, 40)}).map(lambda d: json.dumps(d).encode()),
                      st.binary(max_size=80)))
def test_fuzzed_explorer_bodies_get_an_answer_or_a_4xx_with_a_message(explorer_url, route, body):
    _check(*_request(explorer_url, "POST", route, body))


@_budget(80)
@given(path=st.sampled_from(["/", "/api/info", "/api/jobs/", "/api/jobs/x/panel", "/case/circuit.svg", "/nope"]),
       suffix=st.text(alphabet=string.ascii_letters + string.digits + "/%.-_", max_size=20),
       query=st.dictionaries(st.text(alphabet=string.ascii_letters, min_size=1, max_size=8), st.text(max_size=16),
                             max_size=3))
def test_fuzzed_explorer_paths_and_query_strings_never_fail_inside(explorer_url, path, suffix, query):
    full = urllib.parse.quote(path + suffix, safe="/%") + ("?" + urllib.parse.urlencode(query) if query else "")
    _check(*_request(explorer_url, "GET", full))
