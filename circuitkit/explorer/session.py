"""What the live explorer computes, independent of HTTP: a model's sites and named positions, one input's
tokens, predictions and attention patterns, and the ε-preimage of one activation (decoder samples, or exact
pool preimages without a decoder), with the case run's verdicts for that site and position.

Every bad request raises ``CircuitkitError`` with a message naming what was wrong and what is valid; the
server turns those into 4xx answers.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from circuitkit.errors import CircuitkitError, choices_hint
from circuitkit.models.checkpoint import ProbedModel
from circuitkit.sites import Site, all_sites, check_site, parse_site
from circuitkit.tasks.registry import task_record

#: most samples one preimage request may ask for (the paper shows 1,024 per query)
MAX_SAMPLES = 4096
#: pool inputs used for exact preimages when there is no decoder
POOL_SIZE = 20000
#: closest samples shown, as in the report panels
SHOWN = 100


class Explorer:
    """A probed model, optionally its decoder and a case run's verdicts, and the queries the page asks."""

    def __init__(self, model: ProbedModel, decoder: Any = None, case_dir: str | Path | None = None,
                 pool_size: int = POOL_SIZE, seed: int = 0) -> None:
        self.model = model
        self.decoder = decoder
        self.seed = seed
        self.pool_size = pool_size
        self._pool: Any = None
        self._torch = threading.Lock()  # one forward pass at a time: torch already uses every core
        self.case = _read_case(Path(case_dir)) if case_dir is not None else None

    # ---- what the page needs first -------------------------------------------------------
    def sites(self) -> list[str]:
        """Sites a preimage can be asked for: the decoder's, else every head, MLP and residual site."""
        if self.decoder is not None:
            return [str(s) for s in self.decoder.sites]
        return [s.node for s in all_sites(self.model.n_layers, self.model.n_heads)
                if s.kind in ("head", "mlp_out", "attn_out", "resid_pre", "resid_mid", "resid_post")]

    def info(self) -> dict[str, Any]:
        task = self.model.task
        return {"task": task.name, "task_ref": task_record(task), "model": str(self.model.path), "n_layers": self.model.n_layers,
                "n_heads": self.model.n_heads, "sites": self.sites(), "positions": list(task.position_names),
                "example": task.split("test")[0], "examples": list(task.split("test")[:12]),
                "format": task.format_hint,
                "source": "decoder" if self.decoder is not None else "pool",
                "source_note": ("InversionView decoder samples over the paper's temperature/noise grid"
                                if self.decoder is not None else
                                f"no decoder: exact ε-preimages over {self.pool_size:,} task inputs (the pool)"),
                "case": None if self.case is None else self.case["name"]}

    # ---- one input ------------------------------------------------------------------------
    def check_text(self, text: Any) -> str:
        if not isinstance(text, str):
            raise CircuitkitError("the input must be a string")
        self.model.task.check_input(text, "input")
        return text

    def analyse(self, text: Any) -> dict[str, Any]:
        """Tokens, their named positions, the model's prediction at each answer, and every head's pattern."""
        text = self.check_text(text)
        task = self.model.task
        toks = task.tokens(text)
        ids = task.encode([text])
        names = [f"blocks.{L}.attn.hook_pattern" for L in range(self.model.n_layers)]
        with self._torch, torch.no_grad():
            logits, cache = self.model.runner.run(ids.to(self.model.device), cache=names)
        probs = logits[0].float().softmax(-1).cpu()
        preds = []
        # a model with its own output vocabulary (a tracr program) names its answers with the task's answer_text
        label = getattr(task, "answer_text", lambda i: task.vocab.tokens[i])
        for t in task.targets(toks):
            p = probs[t.position]
            top = int(p.argmax())
            preds.append({"target": t.name, "position": t.position, "predicted": label(top),
                          "p_predicted": round(float(p[top]), 4), "correct": label(t.token),
                          "p_correct": round(float(p[t.token]), 4)})
        n = len(task.tokens(text, pad=False))
        patterns = [[cache[name][0, h, :n, :n].cpu().tolist() for h in range(self.model.n_heads)] for name in names]
        named = {str(i): name for name, i in task.positions(toks).items()}
        return {"input": text, "tokens": toks[:n], "named_positions": named, "predictions": preds,
                "patterns": patterns}

    # ---- one preimage ---------------------------------------------------------------------
    def parse_query(self, site: Any, position: Any, text: Any) -> tuple[Site, str, int]:
        text = self.check_text(text)
        if not isinstance(site, str) or not site:
            raise CircuitkitError(f"choose a site; valid: {choices_hint(self.sites(), 12)}")
        s = parse_site(site)
        if s.position is not None:
            raise CircuitkitError(f"give the site without a position ({s.node!r}) and the position separately")
        check_site(s, self.model.n_layers, self.model.n_heads)
        if s.node not in self.sites():
            raise CircuitkitError(f"site {site!r} is not available here; valid: {choices_hint(self.sites(), 12)}")
        n = len(self.model.task.tokens(text, pad=False))
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < n:
            raise CircuitkitError(f"position must be a token index 0..{n - 1} of this input, got {position!r}")
        return s.at(position), text, position

    def preimage(self, site: Any, position: Any, text: Any, n_samples: Any = 1024,
                 progress: dict[str, Any] | None = None) -> dict[str, Any]:
        """The closest ``SHOWN`` members of the ε-preimage of ``site`` at ``position`` on ``text``."""
        s, text, pos = self.parse_query(site, position, text)
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or not 1 <= n_samples <= MAX_SAMPLES:
            raise CircuitkitError(f"samples must be an integer 1..{MAX_SAMPLES}, got {n_samples!r}")
        progress = progress if progress is not None else {}
        with self._torch, torch.no_grad():
            if self.decoder is not None:
                inv = self._decoder_inversion(s, text, n_samples, progress)
            else:
                inv = self._pool_inversion(s, text, progress)
        rows = inv.display(SHOWN)
        colours = self._colours(inv, rows, s) if self.decoder is not None else None
        tok, pad = self.model.task.tokenizer, self.model.task.vocab.pad
        for r in rows:
            toks = tok.id_tokens(inv.ids[r["index"]].tolist())
            n = next((i for i, t in enumerate(toks) if i > 0 and t == pad), len(toks))  # padding is not shown
            r["tokens"] = toks[:n]
            if colours is not None:
                r["colours"] = [round(c, 4) for c in colours[r["index"]].tolist()[:n]]
        position_name = next((k for k, v in self.model.task.positions(self.model.task.tokens(text)).items()
                              if v == pos), None)
        return {"site": s.node, "position": pos, "position_name": position_name, "input": text, "eps": inv.eps,
                "metric": inv.metric, "n_samples": len(inv.texts), "n_in_eps": int(inv.in_eps.sum()),
                "source": "decoder" if self.decoder is not None else "pool", "samples": rows,
                "verdicts": self.verdicts(s.node, position_name)}

    def _decoder_inversion(self, s: Site, text: str, n_samples: int, progress: dict[str, Any]):
        from circuitkit.inversion.preimage import PAPER_GRID, invert_text

        progress["phase"] = f"sampling {n_samples} inputs from the decoder and re-running them"
        per_cell = max(1, -(-n_samples // len(PAPER_GRID)))
        return invert_text(self.decoder, s, text, n_per_cell=per_cell, seed=self.seed)

    def _pool_inversion(self, s: Site, text: str, progress: dict[str, Any]):
        from circuitkit.hypotheses.preimage_sources import PoolPreimage
        from circuitkit.inversion.preimage import invert_pool

        if self._pool is None:
            progress["phase"] = f"generating a pool of {self.pool_size:,} task inputs"
            self._pool = PoolPreimage(self.model, pool_size=self.pool_size, seed=self.seed)
        progress["phase"] = "computing the pool's activations and distances"
        return invert_pool(self.model, self._pool, s, text)

    def _colours(self, inv, rows: list[dict], s: Site) -> torch.Tensor:
        from circuitkit.inversion.colour import token_colours

        shown = torch.tensor([r["index"] for r in rows], dtype=torch.long)
        colours = torch.zeros(inv.ids.shape, dtype=torch.float)
        with torch.no_grad():
            colours[shown] = token_colours(self.decoder, s.at(inv.site.position), inv.ids[shown], inv.query)
        return colours

    def export_panel(self, result: dict[str, Any]) -> str:
        """The preimage ``result`` as the report's self-contained HTML panel."""
        from circuitkit.inversion.render import render_rows_html

        return render_rows_html(f"{result['site']}@{result['position_name'] or result['position']}", result["eps"],
                                result["input"], result["samples"], self.model.task.vocab.pad)

    # ---- the case run ---------------------------------------------------------------------
    def verdicts(self, node: str, position_name: str | None) -> list[dict[str, Any]]:
        """What the case run found at this site and named position: verified nodes (features, IIA, CI) and
        accepted hypotheses."""
        if self.case is None or position_name is None:
            return []
        site = f"{node}@{position_name}"
        out = [{"kind": "verified" if n.get("features") != ["unexplained"] else "in circuit, unexplained",
                "features": n.get("features", []), "iia": n.get("iia"), "iia_ci": n.get("iia_ci"),
                "effect": n.get("effect"), "architectural": n.get("architectural", False),
                "link": f"/case/circuit.svg#{site}"}
               for n in self.case["nodes"] if n.get("site", n.get("id")) == site]
        out += [{"kind": "accepted hypothesis", "features": [h["feature"]], "kappa": h.get("kappa"),
                 "q_value": h.get("q_value")} for h in self.case["hypotheses"] if h.get("site") == site]
        return out


def _read_case(path: Path) -> dict[str, Any]:
    """A case run's findings: ``circuit.json`` (a report directory or a work directory's ``circuit`` stage),
    with ``verification.json`` and ``hypotheses.json`` when present (they carry the CIs).  A bare case name
    means ``runs/NAME/circuit`` if that run exists here, else ``reports/NAME``."""
    from circuitkit.validate import read_json

    if not path.exists() and len(path.parts) == 1:
        for candidate in (Path("runs") / path.name / "circuit", Path("reports") / path.name):
            if (candidate / "circuit.json").is_file():
                path = candidate
                break
    if not (path / "circuit.json").is_file():
        raise CircuitkitError(f"--case {str(path)!r} has no circuit.json; pass a report directory (reports/CASE) or "
                              "a run's circuit stage (runs/CASE/circuit)")
    circuit = read_json(path / "circuit.json", "circuit")
    nodes = [dict(n) for n in circuit.get("nodes", []) if n.get("kind") == "site"]
    if (path / "verification.json").is_file():
        ver = read_json(path / "verification.json", "verification report")
        by_site = {n["site"]: n for n in ver.get("nodes", [])}
        for n in nodes:
            if n["id"] in by_site:
                n.update({"site": n["id"], **by_site[n["id"]]})
    hyps = []
    if (path / "hypotheses.json").is_file():
        hyps = [h for h in read_json(path / "hypotheses.json", "hypotheses").get("hypotheses", []) if h.get("accepted")]
    svg = path / "circuit.svg"
    return {"name": path.name if path.name != "circuit" else path.parent.name, "nodes": nodes, "hypotheses": hyps,
            "svg": svg if svg.is_file() else None}
