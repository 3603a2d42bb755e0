"""Case-study configuration: one TOML file describes a whole run (task, model, decoder, patching).

``--quick`` replaces each ``quick_*`` value for its plain counterpart, so one file serves both
the minutes-long smoke run and the full run.  A budget the file leaves out altogether (neither ``key`` nor
``quick_key``) takes its quick default under ``--quick`` (``QUICK_DEFAULTS``), so a short file of one's own still
gets a smoke run, not an hour of decoder training.  Unknown keys are errors: a typo in a config
must not silently fall back to a default.
"""
from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from circuitkit.errors import CircuitkitError, choices_hint

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout (reports show paths relative to it)


def repo_relative(path: str | Path) -> str:
    """A path inside the checkout relative to its root, any other path as given: what a run records and a report
    shows (reports are shared, and where a clone or a snapshot of it lies is noise)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def case_dir() -> Path:
    """The built-in case configs and probed models: ``circuitkit/case_studies`` in an installed wheel
    (package data), else the checkout's top-level ``case_studies/``."""
    installed = Path(__file__).resolve().parents[1] / "case_studies"
    return installed if installed.is_dir() else REPO_ROOT / "case_studies"


CASE_DIR = case_dir()


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
    eval_per_cell: int = 256  # samples per cell in that evaluation (4 cells x 256 = 1024 per query, the paper's)
    n_per_cell: int = 256  # samples per (temperature, noise) cell: 4 cells x 256 = 1024 per query
    # a decoder trained elsewhere for this model (``circuitkit decoder train``, the benchmark): used as
    # is, not retrained; its hit rate is still evaluated here
    path: str = ""
    d_model: int = 0  # 0 = the paper's decoder width (256; conditioning MLP 512); else conditioning MLP 2 x d_model
    batch_size: int = 0  # 0 = the decoder trainer's default
    lr: float = 0.0  # peak learning rate; 0 = the decoder trainer's default (1e-3)
    n_slots: int = 1  # activation slots per decoder layer (the paper: 1)
    mixed_sites: bool = False  # a site per training input rather than per batch (the paper: per batch)
    # least share of training batches a site keeps when batches are rebalanced towards low-hit-rate sites
    rebalance_floor: float = 0.1
    # the running hit-rate estimates that rebalancing uses: every ``rebalance_every`` steps, ``rebalance_queries``
    # held-out queries per site at ``rebalance_per_cell`` samples per cell, pooled over the last
    # ``rebalance_window`` estimates, each on fresh queries (0 = the trainer's 200 / 16 / 4 / 1)
    rebalance_every: int = 0
    rebalance_queries: int = 0
    rebalance_per_cell: int = 0
    rebalance_window: int = 0
    compile: bool = False  # torch.compile the training step (needs a C++ compiler; saved nothing on 2 CPU cores)
    # training rows of similar length run together, each group trimmed to its longest row (1: one group); the
    # gradients are the whole batch's (0 = the trainer's 2)
    length_groups: int = 0


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
    # zero-ablation pass for components and paths no same-layout source moves (circuit/structural.py)
    structural: bool = False
    split_inputs: bool = False  # test each kept edge into a head through its query, key and value apart


@dataclass
class PatchingSection:
    examples: int = 300
    contrasts: list[str] = field(default_factory=lambda: ["random", "minimal"])
    target: str = ""  # task target to read (default: the task's default target)
    groups: list[list[str]] = field(default_factory=list)  # cumulative group patching, in forward order


def _default_methods() -> list[str]:
    from circuitkit.discovery.harness import DEFAULT_METHODS

    return list(DEFAULT_METHODS)


@dataclass
class ComparisonSection:
    """The side-by-side with the field's discovery methods (``circuitkit discover`` / ``compare`` as a stage)."""

    methods: list[str] = field(default_factory=_default_methods)  # empty: no comparison stage
    n: int = 100  # aligned pairs the methods score edges on; the next seed's n pairs judge every circuit
    ablation: str = "resample"  # resample (aligned source), mean or zero
    sources: str = "same-layout"  # resample sources: same-layout, or any-layout (positions lined up; tracr lengths)


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
    comparison: ComparisonSection = field(default_factory=ComparisonSection)
    paper_claims: list[dict[str, Any]] = field(default_factory=list)
    quick: bool = False

    #: the folder of the toml this config came from: relative paths in it resolve against it (set by
    #: ``load_case``; internal: never read from the toml, and not part of the recorded config)
    base_dir: Path = field(default=Path("."), compare=False, repr=False, metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in fields(self):
            if f.metadata.get("internal"):
                del d[f.name]
        return d

    def load_task(self) -> Any:
        """The case's Task (``task =`` is a built-in or installed name, ``file.py:Class`` relative to the
        toml's folder, or ``package.module:Class``), built once per config: validation and the run share it."""
        from circuitkit.tasks.registry import load_task

        model_dir = self.resolve(self.model.path) if self.model.source == "path" and self.model.path else None
        spec = (self.task, str(self.base_dir), str(model_dir))
        cached = self.__dict__.get("_task")  # not a field: never in to_dict(), asdict() or equality
        if cached is None or cached[0] != spec:
            self.__dict__["_task"] = cached = (spec, load_task(self.task, self.base_dir, model_dir))
        return cached[1]

    def resolve(self, path: str) -> Path:
        """A path written in the case toml: ``~`` expanded, a relative one taken from the toml's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


_SECTIONS = {"model": ModelSection, "decoder": DecoderSection, "inversion": InversionSection,
             "hypotheses": HypothesisSection, "circuit": CircuitSection, "patching": PatchingSection,
             "comparison": ComparisonSection}

#: ``--quick`` budgets for keys a file sets in neither form (the built-in cases' own quick values, about a minute each)
QUICK_DEFAULTS: dict[type, dict[str, Any]] = {
    DecoderSection: {"minutes": 5.0, "steps": 60, "eval_queries": 10, "eval_per_cell": 16, "n_per_cell": 8},
    HypothesisSection: {"queries": 20, "pool": 2000, "pairs": 60, "verify_inputs": 600, "eval_inputs": 300,
                        "screen_examples": 100},
    PatchingSection: {"examples": 60},
    CircuitSection: {"edge_pairs": 40},
    ComparisonSection: {"n": 40},
}

#: numeric ranges of case-config values: (section or "" for the top level, key) -> (low, high, low excluded)
_RANGES: dict[tuple[str, str], tuple[float | None, float | None, bool]] = {
    ("", "seed"): (0, 2**32 - 1, False),
    **{("model", k): (0, None, False) for k in ("steps", "n_layer", "n_head", "d_model", "batch_size", "lr")},
    ("decoder", "minutes"): (0, None, True),
    **{("decoder", k): (0, None, False) for k in ("steps", "eval_queries", "d_model", "batch_size", "lr")},
    ("decoder", "eval_per_cell"): (1, 16384, False),
    ("decoder", "n_slots"): (1, 64, False),
    ("decoder", "rebalance_floor"): (0, 1, True),
    **{("decoder", k): (0, 100000, False)
       for k in ("rebalance_every", "rebalance_queries", "rebalance_per_cell", "rebalance_window")},
    ("decoder", "n_per_cell"): (1, 16384, False),
    ("decoder", "length_groups"): (0, 64, False),
    ("hypotheses", "screen_threshold"): (0, 1, False),
    ("hypotheses", "screen_examples"): (10, None, False),
    ("hypotheses", "queries"): (1, None, False),
    ("hypotheses", "n_per_cell"): (0, 16384, False),
    ("hypotheses", "pool"): (1, None, False),
    ("hypotheses", "pairs"): (10, None, False),
    ("hypotheses", "verify_inputs"): (100, None, False),
    ("hypotheses", "eval_inputs"): (10, None, False),
    ("circuit", "target"): (0, 1, True),
    ("circuit", "min_edge"): (0, None, False),
    ("circuit", "edge_pairs"): (10, None, False),
    ("circuit", "completeness_subsets"): (0, None, False),
    ("patching", "examples"): (1, None, False),
    ("comparison", "n"): (10, 100000, False),
}
#: range texts clearer than the bare interval
_RANGE_TEXT = {("hypotheses", "n_per_cell"): ">= 1, or 0 for [decoder] n_per_cell (at most 16384)"}
_CLAIM_KINDS = ("verified", "finding", "circuit")


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` (from TOML) is not of the dataclass type ``hint``, or None when it is."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "expected true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return "expected a number"
        return None if math.isfinite(value) else "expected a finite number"
    if hint is str:
        return None if isinstance(value, str) else "expected a string"
    if origin is list:
        if not isinstance(value, list):
            return f"expected a list ({_describe(args[0])})"
        for i, item in enumerate(value):
            problem = _type_problem(item, args[0])
            if problem:
                return f"item {i + 1} ({item!r}): {problem}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else "expected a table"
    return None


def _describe(hint: Any) -> str:
    names = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
    if get_origin(hint) is list:
        return f"lists of {_describe(get_args(hint)[0])}"
    return names.get(hint, "tables")


def _shown(value: Any) -> str:
    kind = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text[:60] + '...' if len(text) > 60 else text} ({kind})"


def _build(cls: type, data: Any, where: str, quick: bool, errors: list[str]) -> Any:
    """An instance of ``cls`` from a TOML table; every unknown key or mistyped value is added to
    ``errors`` (and left at its default) instead of stopping at the first."""
    if not isinstance(data, dict):
        errors.append(f"{where or 'the file'} must be a table ([{where.strip('[]')}] with key = value lines), got {_shown(data)}")
        return cls() if cls is not CaseConfig else None
    hints = get_type_hints(cls)
    valid = {f.name for f in fields(cls) if not f.metadata.get("internal")}
    plain = {k: v for k, v in data.items() if not k.startswith("quick_")}
    quick_vals = {k[len("quick_"):]: v for k, v in data.items() if k.startswith("quick_")}
    good: dict[str, Any] = {}
    for vals, prefix in ((plain, ""), (quick_vals, "quick_")):
        for k, v in vals.items():
            if k not in valid:
                errors.append(f"{where or 'top level'}: unknown key {prefix + k!r}; valid keys: "
                              f"{choices_hint(sorted(valid))}")
                continue
            if isinstance(hints[k], type) and hints[k] in _SECTIONS.values():
                good[k] = v  # a section object built by the caller
                continue
            problem = _type_problem(v, hints[k])
            if problem:
                errors.append(f"{where} {prefix + k}: {problem}, got {_shown(v)}")
            elif prefix == "" or quick:
                good[k] = v
    if quick:
        good.update({k: v for k, v in QUICK_DEFAULTS.get(cls, {}).items() if k not in plain and k not in quick_vals})
    if cls is CaseConfig:
        for k in ("name", "task"):
            if k not in good and not any(e.startswith(f"{where} {k}:") for e in errors):
                errors.append(f"{k} = \"...\" is missing at the top level")
        if "name" not in good or "task" not in good:
            return None
    return cls(**good)


def _check_ranges(cfg: CaseConfig, where: str, errors: list[str]) -> None:
    for (section, key), (lo, hi, lo_open) in _RANGES.items():
        obj = getattr(cfg, section) if section else cfg
        v = getattr(obj, key)
        below = lo is not None and (v <= lo if lo_open else v < lo)
        if below or (hi is not None and v > hi):
            rng = _RANGE_TEXT.get((section, key)) or (f"{'>' if lo_open else '>='} {lo}" if hi is None else
                                                      f"in {'(' if lo_open else '['}{lo}, {hi}]")
            label = f"[{section}] {key}" if section else key
            errors.append(f"{where} {label} must be {rng}, got {v}")


def _check_sites(texts: list[str], label: str, task: Any, errors: list[str], need_position: bool = False) -> None:
    from circuitkit.sites import parse_site

    for t in texts:
        try:
            site = parse_site(t)
        except CircuitkitError as e:
            errors.append(f"{label}: {e}")
            continue
        if need_position and site.position is None:
            errors.append(f"{label}: site {t!r} needs a position, e.g. {t}@{task.position_names[-1]}")
        elif isinstance(site.position, str) and site.position not in task.position_names:
            errors.append(f"{label}: site {t!r}: unknown position {site.position!r}; valid: "
                          f"{choices_hint(task.position_names)} or an integer index")


def _check_comparison(c: ComparisonSection, where: str, errors: list[str]) -> None:
    """[comparison]: known discovery methods, each once, and a known ablation."""
    from circuitkit.discovery.methods import METHODS
    from circuitkit.discovery.problem import ABLATIONS, SOURCES

    bad = [m for m in c.methods if m not in METHODS]
    if bad:
        errors.append(f"{where} [comparison] methods: unknown {bad}; valid: {', '.join(METHODS)}")
    if len(set(c.methods)) < len(c.methods):
        errors.append(f"{where} [comparison] methods: each method once, got {c.methods}")
    if c.ablation not in ABLATIONS:
        errors.append(f"{where} [comparison] ablation must be one of {', '.join(ABLATIONS)}, got {c.ablation!r}")
    if c.sources not in SOURCES:
        errors.append(f"{where} [comparison] sources must be one of {', '.join(SOURCES)}, got {c.sources!r}")


def _check_semantics(cfg: CaseConfig, where: str, errors: list[str]) -> None:
    """What the types cannot say: names that must be valid choices, sites, inputs, claims, paths."""
    if not cfg.name.strip() or "/" in cfg.name or "\\" in cfg.name:
        errors.append(f"{where} name must be a non-empty name without slashes (it names the report folder), "
                      f"got {cfg.name!r}")
    if cfg.model.source not in ("train", "path", "gpt2"):
        errors.append(f"{where} [model] source must be 'train', 'path' or 'gpt2', got {cfg.model.source!r}")
    if cfg.model.source == "path" and not cfg.model.path:
        errors.append(f"{where} [model] source = 'path' needs path = '<checkpoint dir>'")
    if cfg.hypotheses.source not in ("decoder", "pool"):
        errors.append(f"{where} [hypotheses] source must be 'decoder' or 'pool', got {cfg.hypotheses.source!r}")
    from circuitkit.tasks.base import CONTRASTS

    bad = [c for c in cfg.patching.contrasts if c not in CONTRASTS]
    if bad:
        errors.append(f"{where} [patching] contrasts: unknown {bad}; valid: {', '.join(CONTRASTS)}")
    _check_comparison(cfg.comparison, where, errors)
    _check_claims(cfg.paper_claims, f"{where} [[paper_claims]]", errors)
    try:
        task = cfg.load_task()
    except CircuitkitError as e:
        errors.append(f"{where} task: {e}")
        return
    _check_sites(cfg.decoder.sites, f"{where} [decoder] sites", task, errors)
    _check_sites(cfg.hypotheses.sites, f"{where} [hypotheses] sites", task, errors)
    for p in cfg.hypotheses.positions:
        if p not in task.position_names and not p.lstrip("-").isdigit():
            errors.append(f"{where} [hypotheses] positions: unknown position {p!r}; valid: "
                          f"{choices_hint(task.position_names)} or an integer index")
    for group in cfg.patching.groups:
        _check_sites(group, f"{where} [patching] groups", task, errors)
    if cfg.patching.target:
        valid = [t.name for t in task.targets(task.tokens(task.example()))]
        if cfg.patching.target not in valid:
            errors.append(f"{where} [patching] target: unknown target {cfg.patching.target!r} for {task.name}; "
                          f"valid: {choices_hint(valid)}")
    for q in cfg.inversion.queries:
        site, sep, text = q.partition("|")
        if not sep:
            errors.append(f"{where} [inversion] queries: entries look like 'SITE@POS|TEXT', got {q!r}")
            continue
        _check_sites([site], f"{where} [inversion] queries", task, errors, need_position=True)
        try:
            task.check_input(text, f"query {q!r}: the text")
        except CircuitkitError as e:
            errors.append(f"{where} [inversion] queries: {e}")


def _check_claims(claims: list[dict[str, Any]], where: str, errors: list[str]) -> None:
    """Each ``[[paper_claims]]`` table: a claim text, a kind, and what that kind reads."""
    for i, c in enumerate(claims):
        label = f"{where} {i + 1}"
        if not isinstance(c.get("claim"), str):
            errors.append(f"{label}: claim = \"...\" (a string) is missing")
        kind = c.get("kind")
        if kind not in _CLAIM_KINDS:
            errors.append(f"{label}: kind must be one of {', '.join(_CLAIM_KINDS)}, got {kind!r}")
        elif kind == "verified":
            for key in ("site", "feature"):
                v = c.get(key)
                if not (isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))):
                    errors.append(f"{label}: {key} must be a string or a list of strings, got {v!r}")
        else:
            path = c.get("path")
            if not (isinstance(path, str) or (isinstance(path, list) and path and all(isinstance(x, str)
                                                                                     for x in path))):
                errors.append(f"{label}: kind = {kind!r} needs path = \"a/b/c\" (a string, or a list of them)")
            for key in ("min", "max"):
                v = c.get(key)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    errors.append(f"{label}: {key} must be a number, got {v!r}")
        for key in ("min_iia",):
            v = c.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                errors.append(f"{label}: {key} must be a number in [0, 1], got {v!r}")


def available_cases() -> list[str]:
    return sorted(p.stem for p in CASE_DIR.glob("*.toml"))


def load_case(name_or_path: str, quick: bool = False) -> CaseConfig:
    """Load ``case_studies/NAME.toml`` (or a path to a TOML file).

    Every value is type- and range-checked, and names, sites, inputs and claims are checked against
    the task, all before any stage runs; every problem found is reported at once (one line, ``;``
    between problems), so a user fixes a config in one pass."""
    from circuitkit.validate import read_text

    path = Path(name_or_path)
    if not path.suffix:
        path = CASE_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise CircuitkitError(f"no case study {name_or_path!r}; available: {choices_hint(available_cases())} "
                              f"(or a path to a .toml file)")
    try:
        raw = tomllib.loads(read_text(path, "case config"))
    except tomllib.TOMLDecodeError as e:
        raise CircuitkitError(f"{path}: invalid TOML: {e}") from None
    base_dir = path.resolve().parent
    cfg, errors = _parse(raw, quick, base_dir)
    # quick_* values are checked on every run, not only with --quick (with the task already built)
    other, other_errors = _parse(raw, not quick, base_dir, share_task=cfg)
    seen = set(errors)
    tag = "(without --quick) " if quick else "(with --quick) "
    errors += [tag + e for e in other_errors if e not in seen]
    if errors:
        n = len(errors)
        raise CircuitkitError(f"{path.name}: {n} problem{'s' if n > 1 else ''}: " + "; ".join(errors))
    assert cfg is not None
    return cfg


def _parse(raw: dict[str, Any], quick: bool, base_dir: Path,
           share_task: CaseConfig | None = None) -> tuple[CaseConfig | None, list[str]]:
    """The config for one setting of ``--quick`` and every problem found in it (``share_task``: a config of the
    same file whose task it reuses rather than builds again)."""
    errors: list[str] = []
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    sections = {k: _build(cls, raw.get(k, {}), f"[{k}]", quick, errors) for k, cls in _SECTIONS.items()}
    cfg = _build(CaseConfig, {**top, **sections}, "", quick, errors)
    if cfg is not None:
        cfg.quick = quick
        cfg.base_dir = base_dir
        if share_task is not None and "_task" in share_task.__dict__:
            cfg.__dict__["_task"] = share_task.__dict__["_task"]  # load_task rebuilds it if the spec differs
        _check_ranges(cfg, "", errors)  # mistyped values were left at their defaults: these checks still hold
        _check_semantics(cfg, "", errors)
    return cfg, [e.strip() for e in errors]
