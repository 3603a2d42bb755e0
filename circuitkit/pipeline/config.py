"""Case-study configuration: one TOML file describes a whole run (task, model, decoder, patching).

``--quick`` replaces each ``quick_*`` value for its plain counterpart, so one file serves both
the minutes-long smoke run and the full run.  Unknown keys are errors: a typo in a config
must not silently fall back to a default.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from circuitkit.errors import CircuitkitError, choices_hint

CASE_DIR = Path(__file__).resolve().parents[2] / "case_studies"


@dataclass
class ModelSection:
    source: str = "train"  # "train" here; "path" (a local HF GPT-2 checkpoint directory); "gpt2" (GPT-2 small
    # if it is on this machine, else train here)
    path: str = ""
    # source = "gpt2" without GPT-2 small on this machine: use this checkpoint trained here (if set),
    # else train one
    fallback_path: str = ""
    steps: int = 0  # 0 = the task's default training budget
    n_layer: int = 0
    n_head: int = 0
    d_model: int = 0
    batch_size: int = 0
    lr: float = 0.0


@dataclass
class DecoderSection:
    sites: list[str] = field(default_factory=list)  # empty = the paper's sites for this model
    minutes: float = 60.0
    steps: int = 0  # 0 = bounded by minutes only
    eval_queries: int = 200  # held-out queries per site in the final hit-rate evaluation
    eval_per_cell: int = 16  # samples per cell in that evaluation (4 cells x 16 = 64 per query)
    n_per_cell: int = 256  # samples per (temperature, noise) cell: 4 cells x 256 = 1024 per query
    # a decoder trained elsewhere for this model (``circuitkit decoder train``, the benchmark): used as
    # is, not retrained; its hit rate is still evaluated here
    path: str = ""
    d_model: int = 0  # 0 = the paper's decoder width (256; conditioning MLP 512); else conditioning MLP 2 x d_model
    batch_size: int = 0  # 0 = the decoder trainer's default


@dataclass
class InversionSection:
    queries: list[str] = field(default_factory=list)  # "SITE|TEXT" panels to show in the report


@dataclass
class HypothesisSection:
    # sites with positions, e.g. "a1.0@:"; empty = every decoder site at every named position (or at
    # ``positions``) where aligned resample patching changes the answer at least ``screen_threshold``
    sites: list[str] = field(default_factory=list)
    positions: list[str] = field(default_factory=list)  # the screen's positions (empty = every named one)
    screen_threshold: float = 0.05  # change rate of the downstream answers under aligned resampling
    screen_examples: int = 300
    source: str = "decoder"  # where ε-preimages come from: "decoder" (InversionView) or "pool" (exact search)
    queries: int = 100
    # decoder samples per (temperature, noise) cell for each hypothesis query; 0 = [decoder] n_per_cell.
    # Fewer than the panels' 1024 per query keeps sites x queries affordable on a CPU.
    n_per_cell: int = 0
    pool: int = 20000  # pool size for source = "pool" (and the random baseline)
    pairs: int = 200  # interchange pairs per verification test
    verify_inputs: int = 3000  # task inputs the verifier draws bases from (and reads answer models off)
    eval_inputs: int = 1000  # inputs for faithfulness / completeness / minimality


@dataclass
class CircuitSection:
    target: float = 0.9  # grow the circuit until normalised faithfulness (logit difference) reaches this
    min_edge: float = 0.1  # keep a path-patching edge when its effect's CI low is at least this
    edge_pairs: int = 150  # pairs per edge test
    completeness_subsets: int = 20  # random subsets K of the circuit for Wang et al.'s completeness


@dataclass
class PatchingSection:
    examples: int = 300
    contrasts: list[str] = field(default_factory=lambda: ["random", "minimal"])
    target: str = ""  # task target to read (default: the task's default target)
    groups: list[list[str]] = field(default_factory=list)  # cumulative group patching, in forward order


@dataclass
class CaseConfig:
    name: str
    task: str
    seed: int = 0
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    decoder: DecoderSection = field(default_factory=DecoderSection)
    inversion: InversionSection = field(default_factory=InversionSection)
    hypotheses: HypothesisSection = field(default_factory=HypothesisSection)
    circuit: CircuitSection = field(default_factory=CircuitSection)
    patching: PatchingSection = field(default_factory=PatchingSection)
    paper_claims: list[dict[str, str]] = field(default_factory=list)
    quick: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SECTIONS = {"model": ModelSection, "decoder": DecoderSection, "inversion": InversionSection,
             "hypotheses": HypothesisSection, "circuit": CircuitSection, "patching": PatchingSection}


def _build(cls, data: dict[str, Any], where: str, quick: bool):
    valid = {f.name for f in fields(cls)}
    plain = {k: v for k, v in data.items() if not k.startswith("quick_")}
    quick_vals = {k[len("quick_"):]: v for k, v in data.items() if k.startswith("quick_")}
    for k in list(plain) + list(quick_vals):
        if k not in valid:
            raise CircuitkitError(f"{where}: unknown key {k!r}; valid keys: {choices_hint(sorted(valid))}")
    if quick:
        plain.update(quick_vals)
    try:
        return cls(**plain)
    except TypeError as e:
        raise CircuitkitError(f"{where}: {e}") from None


def available_cases() -> list[str]:
    return sorted(p.stem for p in CASE_DIR.glob("*.toml"))


def load_case(name_or_path: str, quick: bool = False) -> CaseConfig:
    """Load ``case_studies/NAME.toml`` (or a path to a TOML file)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CASE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise CircuitkitError(f"no case study {name_or_path!r}; available: {choices_hint(available_cases())} "
                              f"(or a path to a .toml file)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise CircuitkitError(f"{path}: invalid TOML: {e}") from None
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    sections = {k: _build(cls, raw.get(k, {}), f"{path.name} [{k}]", quick) for k, cls in _SECTIONS.items()}
    cfg = _build(CaseConfig, {**top, **sections}, path.name, quick)
    cfg.quick = quick
    from circuitkit.tasks import TASKS

    if cfg.task not in TASKS:
        raise CircuitkitError(f"{path.name}: unknown task {cfg.task!r}; valid: {choices_hint(TASKS)}")
    if cfg.model.source not in ("train", "path", "gpt2"):
        raise CircuitkitError(f"{path.name} [model]: source must be 'train', 'path' or 'gpt2', got {cfg.model.source!r}")
    if cfg.hypotheses.source not in ("decoder", "pool"):
        raise CircuitkitError(f"{path.name} [hypotheses]: source must be 'decoder' or 'pool', got {cfg.hypotheses.source!r}")
    if cfg.hypotheses.n_per_cell < 0:
        raise CircuitkitError(f"{path.name} [hypotheses]: n_per_cell must be >= 1, or 0 for [decoder] n_per_cell; "
                              f"got {cfg.hypotheses.n_per_cell}")
    h, c = cfg.hypotheses, cfg.circuit
    if not 0 <= h.screen_threshold <= 1:
        raise CircuitkitError(f"{path.name} [hypotheses]: screen_threshold is a change rate in [0, 1], got "
                              f"{h.screen_threshold}")
    if h.verify_inputs < 100 or h.pairs < 10:
        raise CircuitkitError(f"{path.name} [hypotheses]: verify_inputs must be >= 100 and pairs >= 10, got "
                              f"{h.verify_inputs} and {h.pairs}")
    if h.screen_examples < 10:
        raise CircuitkitError(f"{path.name} [hypotheses]: screen_examples must be >= 10, got {h.screen_examples}")
    if not 0 < c.target <= 1:
        raise CircuitkitError(f"{path.name} [circuit]: target is a normalised faithfulness in (0, 1], got {c.target}")
    if c.edge_pairs < 10 or c.completeness_subsets < 0:
        raise CircuitkitError(f"{path.name} [circuit]: edge_pairs must be >= 10 and completeness_subsets >= 0")
    if cfg.model.source == "path" and not cfg.model.path:
        raise CircuitkitError(f"{path.name} [model]: source = 'path' needs path = '<checkpoint dir>'")
    return cfg
