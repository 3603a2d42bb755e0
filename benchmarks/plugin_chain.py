"""The InversionView chain on a task that does not ship with circuitkit (``tests/user_tasks/first_digit.py``),
verb by verb through the command line, as the README's plug-in section shows it: model train -> decoder train
-> decoder eval -> invert -> hypothesize --source decoder -> verify -> circuit, with no --task after training
→ benchmarks/results/plugin_chain.json (each verb's figures and wall time).

    .venv/bin/python benchmarks/plugin_chain.py

Runs in a temporary folder with its own trusted-task list.  The load average before and after is recorded
(``circuitkit.machine_load``); when another job shared the cores the times are kept but marked as such.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK_FILE = ROOT / "tests" / "user_tasks" / "first_digit.py"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--decoder-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "plugin_chain.json"))
    args = p.parse_args()

    from circuitkit.cli import main as cli
    from circuitkit.io_utils import atomic_write_json
    from circuitkit.machine_load import LoadWatch
    from circuitkit.manifest import git_commit, package_versions

    work = Path(tempfile.mkdtemp(prefix="circuitkit-plugin-chain-"))
    os.environ["CIRCUITKIT_CACHE_DIR"] = str(work / "cache")  # this run's own trusted list
    shutil.copy(TASK_FILE, work / "first_digit.py")
    model, dec, hyp, ver = work / "model", work / "decoder", work / "hyp.json", work / "ver.json"
    threads = ["--threads", str(args.threads)]
    steps = [
        ("model train", ["model", "train", f"{work / 'first_digit.py'}:FirstDigitTask", "--out", str(model), "--quiet",
                         *threads]),
        ("decoder train", ["decoder", "train", str(model), "--out", str(dec), "--steps", str(args.decoder_steps),
                           "--d-model", "64", "--final-eval-queries", "0", "--quiet", *threads]),
        ("decoder eval", ["decoder", "eval", str(dec), "--queries", "50", "--per-cell", "64", *threads]),
        ("invert", ["invert", str(dec), "--site", "a0.0@=", "--input", "B31402=3E", "--show", "100", *threads]),
        ("hypothesize", ["hypothesize", str(model), "--source", "decoder", "--decoder", str(dec), "--sites",
                         "a0.0,a0.1", "--positions", "=", "--queries", "20", "--out", str(hyp)]),
        ("verify", ["verify", str(model), "--hypotheses", str(hyp), "--inputs", "600", "--pairs", "50", "--out",
                    str(ver), "--threads", str(args.threads)]),
        ("circuit", ["circuit", str(model), "--verified", str(ver), "--out", str(work / "circuit"), "--inputs", "600",
                     "--eval-inputs", "200", "--no-picture", *threads]),
    ]
    watch = LoadWatch(threads=args.threads)
    out: dict[str, dict] = {}
    for name, argv in steps:
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            rc = cli([*argv, "--json"])
        if rc != 0:
            raise SystemExit(f"{name} failed (exit {rc}): {' '.join(argv)}")
        text = buf.getvalue()
        out[name] = {"seconds": round(time.perf_counter() - t0, 1),
                     "result": json.loads(text[text.index("{"):])}
    watch.stop()
    ev, inv = out["decoder eval"]["result"], out["invert"]["result"]
    hyps, verdicts = out["hypothesize"]["result"], out["verify"]["result"]
    circuit = out["circuit"]["result"]
    record = {
        "what": "the InversionView chain on a user's task file, no --task after model train",
        "task": str(TASK_FILE.relative_to(ROOT)), "decoder_steps": args.decoder_steps, "threads": args.threads,
        "seed": 0, "seconds": {k: v["seconds"] for k, v in out.items()},
        "model_heldout_accuracy": out["model train"]["result"].get("accuracy"),
        "decoder_eval": {r["site"]: {"hit_rate": round(r["hit_rate"], 3), "in_eps_fraction":
                                     round(r["in_eps_fraction"], 3)} for r in ev["sites"]},
        "invert_a0.0@=": {"samples": inv["n_samples"], "within_eps": round(inv["in_eps_fraction"] * inv["n_samples"]),
                          "closest_distance": inv["samples"][0]["distance"]},
        "accepted": [{"site": h["site"], "feature": h["feature"], "kappa": h["kappa"], "q": h["q_value"]}
                     for h in hyps["hypotheses"] if h["accepted"]],
        "verified": [{"site": v["site"], "features": v["features"], "split": v["split"],
                      "iia": [round(v["targets"][0]["iia"][k], 3) for k in ("mean", "ci_low", "ci_high")]}
                     for v in verdicts["verdicts"] if v["verified"]],
        "faithfulness_normalized_all": round(circuit["evaluation"]["faithfulness_normalized"]["all"], 3),
        "explained_share": circuit.get("explained_share"),
        "circuit_nodes": {n["id"]: n["features"] for n in circuit.get("nodes", [])},
        "versions": package_versions(), "git_commit": git_commit(), **watch.record("time"),
    }
    atomic_write_json(args.out, record)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: record[k] for k in ("seconds", "accepted", "verified", "faithfulness_normalized_all")},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
