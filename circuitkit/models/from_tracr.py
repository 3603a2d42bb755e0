"""tracr-compiled transformers as native models, with the ground truth the compiler knows.

tracr (``pip install circuitkit[tracr]``) compiles a RASP program into weights whose residual stream has one
named direction per value of every program variable (``tokens:a``, ``frac_prevs``).  ``from_tracr``
compiles a program, converts its weights to a native directory (``models/native.py``), checks the converted
model against tracr's own output on every input up to ``max_seq_len`` (or a seeded sample of 10,000), and
writes beside the weights:

* ``ground_truth.json``: for every head (``aL.H``) and MLP (``mL``) the variables it reads (its input weights'
  non-zero rows; a head's query, key and value separately) and writes (its output weights' non-zero columns),
  and the edges between components (A → B when B reads a variable A writes, A earlier), plus ``emb`` → the
  components reading ``tokens`` / ``indices`` / ``one`` and the writers of the program's output → ``out``;
* ``tracr.json``: the program, its vocabularies and encodings, and the check's result.

A numerical program (``frac_prevs``: one value per position, no softmax) is read as the nearest of the values the
program outputs on the checked inputs, c_1 < ... < c_K: output unit i is s · (2 c_i v − c_i²), v the compiled
model's output value.  That is −s (v − c_i)² up to a term common to every unit, so argmax is the nearest value,
the readout stays an affine unembedding (every engine runs it unchanged), and a logit difference between values a
and b, 2 s (c_a − c_b) v − s (c_a² − c_b²), is an output-value difference scaled: the scalar metric the numerical
program needs.  s puts the two closest values ``READOUT_MARGIN`` logits apart at either's exact value.

Only compiling needs jax; loading a converted model needs nothing beyond circuitkit's core.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from circuitkit.errors import CircuitkitError
from circuitkit.models.native import NativeConfig, NativeTransformer, save_native

#: residual-stream variables that the embeddings write (tracr's primitives)
EMBEDDED = ("tokens", "indices", "one")
MAX_CHECKED = 10_000
#: logits between the two closest output values of a numerical program, at either value (its readout's sharpness)
READOUT_MARGIN = 10.0


def _tracr() -> Any:
    try:
        from tracr.compiler import compiling
    except ImportError:
        raise CircuitkitError("compiling a RASP program needs tracr: pip install 'circuitkit[tracr]' (tracr-pypi, "
                              "with jax); loading a converted model does not") from None
    return compiling


def load_spec(ref: str) -> dict[str, Any]:
    """Call ``FILE.py:NAME`` (a file the user named) and check the dict it returns: ``program`` (a RASP SOp),
    ``vocab`` (a set), ``max_seq_len`` (an int), optional ``compiler_bos`` and ``causal``."""
    fn = _load_function(ref)
    if not callable(fn):
        raise CircuitkitError(f"{ref} is not a function; it must return {{'program': SOp, 'vocab': set, "
                              "'max_seq_len': int}")
    spec = fn()
    missing = [k for k in ("program", "vocab", "max_seq_len") if not isinstance(spec, dict) or k not in spec]
    if missing:
        raise CircuitkitError(f"{ref}() must return a dict with 'program', 'vocab' and 'max_seq_len'; missing {missing}")
    unknown = sorted(set(spec) - {"program", "vocab", "max_seq_len", "compiler_bos", "causal"})
    if unknown:
        raise CircuitkitError(f"{ref}() returned unknown key(s) {unknown}; valid: program, vocab, max_seq_len, "
                              "compiler_bos, causal")
    if not isinstance(spec["max_seq_len"], int) or spec["max_seq_len"] < 1:
        raise CircuitkitError(f"{ref}(): max_seq_len must be a positive integer, got {spec['max_seq_len']!r}")
    return spec


def _load_function(ref: str) -> Any:
    """``FILE.py:NAME`` (a file the user named on the command line: it runs) or ``package.module:NAME``."""
    import importlib
    import importlib.util

    target, _, name = ref.rpartition(":")
    if not target or not name.isidentifier():
        raise CircuitkitError(f"{ref!r} must look like FILE.py:NAME or package.module:NAME")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise CircuitkitError(f"program file {str(path)!r} does not exist (from {ref!r})")
        spec = importlib.util.spec_from_file_location(f"circuitkit_rasp_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        try:
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:  # noqa: BLE001 - a user's file may raise anything on import
            raise CircuitkitError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CircuitkitError(f"cannot import {target!r} (from {ref!r}): {e}") from None
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise CircuitkitError(f"{target} has no {name!r}; functions there: {', '.join(found) or 'none'}")
    return getattr(module, name)


def _variable(label: str) -> str:
    """The program variable a residual direction belongs to (``tokens:a`` -> ``tokens``)."""
    return label.split(":", 1)[0]


def _output_rows(assembled: Any, labels: list[str], out_label: str) -> tuple[list[int], list[Any], str]:
    """(residual index of each output unit, the output values in order, "categorical" | "numerical")."""
    enc = assembled.output_encoder
    mapping = getattr(enc, "encoding_map", None)
    if mapping:
        values = sorted(mapping, key=mapping.__getitem__)
        return [labels.index(f"{out_label}:{v}") for v in values], values, "categorical"
    return [labels.index(out_label)], [out_label], "numerical"


def convert(assembled: Any, program: Any, causal: bool) -> tuple[NativeTransformer, dict[str, Any]]:
    """The compiled model as a native model, and what reading it needs (encodings, output values)."""
    p = {k: {kk: np.asarray(vv) for kk, vv in v.items()} for k, v in assembled.params.items()}
    mc = assembled.model_config
    labels = [str(x) for x in assembled.residual_labels]
    rows, values, kind = _output_rows(assembled, labels, program.label)
    layer = lambda L, part: p[f"transformer/layer_{L}/{part}"]  # noqa: E731
    q0, m0 = layer(0, "attn/query")["w"], layer(0, "mlp/linear_1")["w"]
    d_model = q0.shape[0]
    config = NativeConfig(n_layers=mc.num_layers, d_model=d_model, n_heads=mc.num_heads, d_head=mc.key_size,
                          d_mlp=m0.shape[1], d_vocab=p["token_embed"]["embeddings"].shape[0], d_vocab_out=len(rows),
                          n_ctx=p["pos_embed"]["embeddings"].shape[0], act_fn="relu",
                          attention_dir="causal" if causal else "bidirectional", output=kind)
    model = NativeTransformer(config)
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    state = {"embed.weight": t(p["token_embed"]["embeddings"]), "pos_embed.weight": t(p["pos_embed"]["embeddings"])}
    for L in range(mc.num_layers):
        for ours, theirs in (("attn.q", "attn/query"), ("attn.k", "attn/key"), ("attn.v", "attn/value"),
                             ("attn.o", "attn/linear"), ("mlp.in", "mlp/linear_1"), ("mlp.out", "mlp/linear_2")):
            state[f"blocks.{L}.{ours}.weight"] = t(layer(L, theirs)["w"]).T  # haiku: x @ w; torch: x @ W.T
            state[f"blocks.{L}.{ours}.bias"] = t(layer(L, theirs)["b"])
    unembed = torch.zeros(len(rows), d_model)
    unembed[torch.arange(len(rows)), torch.tensor(rows)] = 1.0  # tracr reads the output variable's directions
    state["unembed.weight"], state["unembed.bias"] = unembed, torch.zeros(len(rows))
    model.load_state_dict(state)
    info = {"residual_labels": labels, "input_encoding": {str(k): v for k, v in
                                                         assembled.input_encoder.encoding_map.items()},
            "output_values": [v if isinstance(v, (int, float, str)) else str(v) for v in values], "output": kind,
            "output_variable": program.label}
    return model.eval(), info


def _inputs(vocab: list[Any], max_len: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """Every input of 1..max_len tokens over ``vocab``, or a seeded sample of ``MAX_CHECKED`` when there are more."""
    total = sum(len(vocab) ** n for n in range(1, max_len + 1))
    if total <= MAX_CHECKED:
        return [x for n in range(1, max_len + 1) for x in itertools.product(vocab, repeat=n)]
    rng = random.Random(seed)
    return [tuple(rng.choice(vocab) for _ in range(rng.randint(1, max_len))) for _ in range(MAX_CHECKED)]


@torch.no_grad()
def check_against_tracr(assembled: Any, model: NativeTransformer, info: dict[str, Any], vocab: list[Any],
                        max_len: int, bos: str, outputs: dict[tuple[Any, ...], list[Any]] | None = None,
                        pad: str | None = None, truth: dict[tuple[Any, ...], list[Any]] | None = None
                        ) -> dict[str, Any]:
    """Run both models on every input (``_inputs``): categorical outputs (and a numerical program's nearest-value
    readout) must decode to the same values (``truth``, when given, instead of tracr's decoded output), a numerical
    output value agree within 1e-4; with ``pad``, also with the input right-padded to ``max_len`` (circuitkit
    runs inputs of several lengths in one padded batch).  Returns counts and the first mismatches; tracr's
    decoded output of every input goes into ``outputs`` when given (the task's answer table)."""
    from circuitkit.models.runner import ModelRunner

    runner, enc = ModelRunner(model), info["input_encoding"]
    bad, worst, worst_pad = [], 0.0, 0.0
    inputs = _inputs(vocab, max_len)
    for x in inputs:
        theirs = assembled.apply([bos, *x])
        if outputs is not None:
            outputs[x] = list(theirs.decoded[1:])
        ids = [enc[str(tok)] for tok in (bos, *x)]
        rows = [ids] + ([ids + [enc[pad]] * (max_len - len(x))] if pad is not None and len(x) < max_len else [])
        out = [runner.logits(torch.tensor([r]))[0, 1:len(x) + 1] for r in rows]  # [len(x), d_vocab_out]; 0 is BOS
        expected = truth[x] if truth is not None else list(theirs.decoded[1:])
        for r, o in enumerate(out):
            if o.shape[-1] > 1 or info["output"] == "categorical":
                ok = all(_same(info["output_values"][i], v) for i, v in zip(o.argmax(-1).tolist(), expected,
                                                                            strict=True))
            else:
                diff = float(np.max(np.abs(o[:, 0].numpy() - np.asarray(theirs.unembedded[0, 1:], dtype=float))))
                worst, ok = (worst, diff <= 1e-4) if r else (max(worst, diff), diff <= 1e-4)
            if r:
                worst_pad = max(worst_pad, float((o - out[0]).abs().max()))
            if not ok:
                bad.append([str(t) for t in x] + (["(padded)"] if r else []))
    return {"inputs_checked": len(inputs), "exhaustive": len(inputs) < MAX_CHECKED, "mismatches": len(bad),
            "first_mismatches": bad[:5], "max_abs_diff_numerical": worst, "padded_checked": pad is not None,
            "max_abs_diff_padded": worst_pad}


def _same(a: Any, b: Any) -> bool:
    """Two output values equal: numbers within 1e-6, anything else by its text."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-6
    return str(a) == str(b)


def program_values(program: Any, inputs: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], list[Any]]:
    """The RASP interpreter's output of ``program`` on every input (exact values, where a numerical model's output
    is approximate)."""
    from tracr.rasp import rasp

    return {x: [_json_value(v) for v in rasp.evaluate(program, list(x))] for x in inputs}


def readout_scale(values: list[float]) -> float:
    """s of the nearest-value readout: the two closest values ``READOUT_MARGIN`` logits apart at either value."""
    return READOUT_MARGIN / min(b - a for a, b in zip(values, values[1:])) ** 2


def nearest_value_readout(model: NativeTransformer, values: list[float]) -> NativeTransformer:
    """The numerical model with its one output value read as the nearest of ``values`` (module docstring): a copy
    whose unembedding has one unit per value, s · (2 c_i v − c_i²)."""
    if len(values) < 2:
        raise CircuitkitError(f"the program outputs the one value {values} on every checked input: there is no "
                              "answer to explain")
    c = torch.tensor(values, dtype=torch.float32)  # [K]
    s = readout_scale(values)
    config = NativeConfig(**{**model.config.to_dict(), "d_vocab_out": len(values)})
    out = NativeTransformer(config)
    state = dict(model.state_dict())
    w, b = state.pop("unembed.weight")[0], state.pop("unembed.bias")[0]  # [d_model], []: v = w · x + b
    state["unembed.weight"] = s * 2 * c[:, None] * w[None, :]  # [K, d_model]
    state["unembed.bias"] = s * (2 * c * b - c ** 2)  # [K]
    out.load_state_dict(state)
    return out.eval()


def _touched(matrix: torch.Tensor, labels: list[str], axis: int) -> list[str]:
    """The variables whose residual directions have a non-zero weight along ``axis`` of ``matrix``."""
    nz = (matrix.abs() > 1e-9).any(dim=1 - axis) if matrix.ndim == 2 else matrix.abs() > 1e-9
    return sorted({_variable(labels[i]) for i in nz.nonzero().flatten().tolist()})


def ground_truth(model: NativeTransformer, info: dict[str, Any]) -> dict[str, Any]:
    """What every head and MLP reads and writes (from the weights' non-zero pattern), and the edges between them."""
    from circuitkit.models.runner import ModelRunner

    r, labels = ModelRunner(model), info["residual_labels"]
    comps: dict[str, dict[str, Any]] = {}
    for L, w in enumerate(r.layers):
        for H in range(r.n_heads):
            reads = {x: _touched(getattr(w, f"W_{x.upper()}")[H], labels, 0) for x in ("q", "k", "v")}
            writes = _touched(w.W_O[H], labels, 1)
            if writes:  # a head that writes nothing is padding (tracr gives every layer the same head count)
                comps[f"a{L}.{H}"] = {"layer": L, "kind": "head", "reads": sorted(set(sum(reads.values(), []))),
                                      "reads_by_input": reads, "writes": writes}
        writes = _touched(w.W_out, labels, 1)
        if writes:
            comps[f"m{L}"] = {"layer": L, "kind": "mlp", "reads": _touched(w.W_in, labels, 0), "writes": writes}
    return {"components": comps, "edges": _edges(comps, info["output_variable"]),
            "output_variable": info["output_variable"]}


def _order(name: str, c: dict[str, Any]) -> tuple[int, int]:
    return (c["layer"], 0 if c["kind"] == "head" else 1)


def _edges(comps: dict[str, dict[str, Any]], output: str) -> list[dict[str, Any]]:
    """sender -> receiver with the variables that flow: ``emb`` for the embedded primitives, ``out`` for the output."""
    edges = []
    for b, cb in comps.items():
        embedded = sorted(set(cb["reads"]) & set(EMBEDDED))
        if embedded:
            edges.append({"sender": "emb", "receiver": b, "variables": embedded})
        for a, ca in comps.items():
            shared = sorted(set(ca["writes"]) & set(cb["reads"]))
            if shared and _order(a, ca) < _order(b, cb):
                edges.append({"sender": a, "receiver": b, "variables": shared})
        if output in cb["writes"]:
            edges.append({"sender": b, "receiver": "out", "variables": [output]})
    return sorted(edges, key=lambda e: (e["sender"], e["receiver"]))


def from_tracr(ref: str, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compile ``FILE.py:NAME``, convert, check against tracr, and write the native model with its ground truth."""
    from circuitkit.io_utils import atomic_dir, atomic_write_json

    compiling = _tracr()
    spec = load_spec(ref)
    program, vocab, max_len = spec["program"], spec["vocab"], spec["max_seq_len"]
    bos, causal = spec.get("compiler_bos", "BOS"), bool(spec.get("causal", False))
    log(f"compiling {ref} (max_seq_len {max_len}, vocab {sorted(map(str, vocab))}) ...")
    assembled = compiling.compile_rasp_to_model(program, vocab=set(vocab), max_seq_len=max_len, compiler_bos=bos,
                                                causal=causal)
    model, info = convert(assembled, program, causal)
    ordered = sorted(vocab, key=str)
    pad = _pad_token(info, bos, ordered)
    outputs: dict[tuple[Any, ...], list[Any]] = {}
    check = check_against_tracr(assembled, model, info, ordered, max_len, bos, outputs, pad)
    _refuse_mismatches(check)
    if info["output"] == "numerical":
        outputs = {x: [None if v is None else float(v) for v in out]  # the interpreter gives a 1-long mean as a bool
                   for x, out in program_values(program, list(outputs)).items()}
        values = sorted({round(v, 6) for out in outputs.values() for v in out if v is not None})
        model = nearest_value_readout(model, values)
        info = {**info, "output_values": values, "readout": "nearest value: unit i = s (2 c_i v - c_i^2)",
                "readout_scale": readout_scale(values)}
        readout = check_against_tracr(assembled, model, info, ordered, max_len, bos, None, pad, truth=outputs)
        _refuse_mismatches(readout, "its nearest-value readout differs from the RASP program's output")
        check["readout_mismatches"] = 0
    truth = ground_truth(model, info)
    record = {"program": ref, "program_label": program.label, "vocab": [str(v) for v in ordered],
              "max_seq_len": max_len, "compiler_bos": bos, "causal": causal, "check": check,
              **{k: v for k, v in info.items() if k != "residual_labels"}, "residual_labels": info["residual_labels"]}
    name = f"tracr_{ref.rpartition(':')[2]}"
    task = task_spec(name, ref, program, info, (bos, pad), max_len, outputs, check["exhaustive"])
    with atomic_dir(Path(out_dir), keep_existing=False) as tmp:
        save_native(model, tmp)
        atomic_write_json(tmp / "tracr.json", record)
        atomic_write_json(tmp / "ground_truth.json", truth)
        write_task(tmp, task)
    log(f"matches tracr on {check['inputs_checked']} inputs; {len(truth['components'])} components, "
        f"{len(truth['edges'])} edges of ground truth; wrote {out_dir}")
    return {"out": str(out_dir), "check": check, "components": len(truth["components"]), "edges": len(truth["edges"])}


def _refuse_mismatches(check: dict[str, Any], what: str = "the converted model differs from tracr's") -> None:
    """Stop, writing nothing, when a check found an input the converted model gets wrong."""
    if check["mismatches"]:
        raise CircuitkitError(f"{what} on {check['mismatches']} of {check['inputs_checked']} inputs (e.g. "
                              f"{check['first_mismatches'][0]}); nothing written")


def _pad_token(info: dict[str, Any], bos: str, vocab: list[Any]) -> str:
    """tracr's pad token: the input encoding's one token that is neither BOS nor a program token."""
    extra = [t for t in info["input_encoding"] if t != str(bos) and t not in {str(v) for v in vocab}]
    if len(extra) != 1:
        raise CircuitkitError(f"tracr's input encoding {sorted(info['input_encoding'])} should hold the program's "
                              f"tokens, BOS and one pad token; found {extra or 'no'} other token(s)")
    return extra[0]


def _json_value(v: Any) -> Any:
    """A RASP value as JSON holds it (numbers, strings, booleans, null; anything else as its text)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, (np.integer, np.floating)):
        return _json_value(v.item())
    return str(v)


def rasp_variables(program: Any) -> list[Any]:
    """Every sequence (SOp) the program computes, from ``tokens`` and ``indices`` up to its output, each once."""
    from tracr.rasp import rasp

    seen: dict[str, Any] = {}
    todo = [program]
    while todo:
        expr = todo.pop()
        if isinstance(expr, rasp.SOp) and expr.label not in seen:
            seen[expr.label] = expr
        todo.extend(getattr(expr, "children", ()))
    return sorted(seen.values(), key=lambda e: (e.label not in ("tokens", "indices"), e.label))


def task_spec(name: str, ref: str, program: Any, info: dict[str, Any], specials: tuple[str, str], max_len: int,
              outputs: dict[tuple[Any, ...], list[Any]], exhaustive: bool) -> dict[str, Any]:
    """The data ``tasks/tracr.py: TracrTask`` reads (``task.json``): vocabularies, lengths, the program's answer on
    every checked input (indices into the output values; a numerical program's too, into its readout's values) and
    every RASP variable's value there."""
    from tracr.rasp import rasp

    from circuitkit.tasks.tracr import FORMAT

    key = lambda x: " ".join(str(t) for t in x)  # noqa: E731
    values = [str(v) for v in info["output_values"]]
    answers: dict[str, list[Any]] = {}
    for x, out in outputs.items():
        index = [next((i for i, c in enumerate(info["output_values"]) if _same(c, v)), None) for v in out]
        if None not in index:  # an input where the program outputs None has no answer
            answers[key(x)] = index
    variables = {sop.label: {key(x): [_json_value(v) for v in rasp.evaluate(sop, list(x))] for x in outputs}
                 for sop in rasp_variables(program)}
    tokens = sorted(info["input_encoding"], key=info["input_encoding"].__getitem__)
    return {"format": FORMAT, "name": name, "program": ref, "output": info["output"],
            "output_variable": info["output_variable"], **({"readout": info["readout"]} if "readout" in info else {}),
            "input_tokens": tokens, "bos": specials[0], "pad": specials[1],
            "output_tokens": values, "min_len": 1, "max_len": max_len, "exhaustive": exhaustive,
            "inputs_without_answer": len(outputs) - len(answers), "answers": answers, "variables": variables}


def write_task(out: Path, task: dict[str, Any]) -> None:
    """``task.json`` and the checkpoint's ``circuitkit.json`` naming it (``tracr:``: the task in this directory,
    with its sha256), so every verb finds the task with no flag."""
    import json

    from circuitkit.io_utils import atomic_write_json, atomic_write_text
    from circuitkit.models.checkpoint import META_FILE
    from circuitkit.tasks.tracr import PREFIX, TASK_FILE, spec_sha256

    atomic_write_text(out / TASK_FILE, json.dumps(task, separators=(",", ":")) + "\n")  # compact: a table per input
    spec = {"name": task["name"], "seq_len": task["max_len"] + 1, "vocab": task["input_tokens"], "bos": task["bos"],
            "eos": task["pad"], "pad": task["pad"], "output": task["output"], "output_tokens": task["output_tokens"]}
    atomic_write_json(out / META_FILE, {"task": task["name"], "task_ref": {"spec": PREFIX, "task_sha256":
                                                                          spec_sha256(out)}, "task_spec": spec})


__all__ = ["check_against_tracr", "convert", "from_tracr", "ground_truth", "load_spec", "rasp_variables", "task_spec",
           "write_task"]
