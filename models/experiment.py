"""Experiment runner: every method trained and evaluated under one protocol, resumable.

An experiment is a TOML file (``experiments/*.toml``): the data, the shared training settings, the
methods, the seeds, the evaluation protocol, and optional *variants* (a method with a few settings
changed: the eps_max sweep, the DPAAT ablations). Each (unit, seed) trains into its own directory
``<out>/<name>/<unit>-seed<k>/`` and writes ``result.json`` (evaluation report, training history,
timings, config hash) atomically as soon as it finishes. The file carries a sha256 of its own body,
so a truncated or edited file is detected and recomputed; a re-run skips units whose result is valid
and was made by the same settings. Checkpoints stay in the run directory (never in git).

Every epsilon is in 1/255 units, as everywhere in the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import tomllib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.training import TrainConfig

METHODS = ("standard", "pgd_at", "trades", "dpaat", "amat_external", "iaat_flip")
# Settings that define the data every unit sees: one protocol, so units may not override them.
DATA_FIELDS = frozenset({"data_root", "manifest", "image_size", "limit"})
RESULT_SCHEMA = 1
RESULT_FILE = "result.json"
UNIT_FILE = "unit.json"

Log = Callable[[str], None]


class ExperimentError(ValueError):
    """An experiment file is invalid or its run directory is inconsistent."""


@dataclass(frozen=True)
class EvalSpec:
    """The evaluation protocol every unit is measured with."""

    limit: int | None = None  # test images (class-stratified subset of the test split); None = all
    eps: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    attacks: tuple[dict[str, Any], ...] = ({"name": "fgsm"}, {"name": "pgd", "steps": 20})
    gradcam: bool = True
    batch_size: int = 128
    # a second evaluation with a reference implementation (e.g. AutoAttack at 1 and 2/255) on a
    # class-stratified subset of the same test split: {"attacks", "eps", "limit"}
    reference: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "limit": self.limit,
            "eps": list(self.eps),
            "attacks": [dict(a) for a in self.attacks],
            "gradcam": self.gradcam,
            "batch_size": self.batch_size,
        }
        if self.reference is not None:  # absent, not null: older result hashes stay valid
            out["reference"] = dict(self.reference)
        return out


@dataclass(frozen=True)
class Unit:
    """One training run of the experiment: a method (or a variant of one) with one seed."""

    name: str  # the method name, or the variant name
    method: str
    seed: int
    group: str  # "main" for the compared methods, else the variant's group (sweep, ablation...)
    settings: dict[str, Any]  # TrainConfig fields (without paths)

    @property
    def key(self) -> str:
        return f"{self.name}-seed{self.seed}"


@dataclass
class Experiment:
    """A parsed experiment file."""

    name: str
    out: Path
    data: str  # "auto", "synthetic", or a dataset folder
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    train: dict[str, Any]
    method_overrides: dict[str, dict[str, Any]]
    variants: list[dict[str, Any]]
    eval: EvalSpec
    description: str = ""  # what was cut and why: shown in the published results
    source: Path | None = None
    source_sha256: str = ""

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    def units(self) -> list[Unit]:
        """Every unit, in run order: the compared methods for each seed (``standard`` first, since
        ``amat_external`` reuses its checkpoint as the reference model), then the variants."""
        order = sorted(self.methods, key=lambda m: (m != "standard", METHODS.index(m)))
        units = [
            Unit(
                m,
                m,
                s,
                "main",
                {**self.train, **self.method_overrides.get(m, {}), "method": m, "seed": s},
            )
            for s in self.seeds
            for m in order
        ]
        for v in self.variants:
            base = {**self.train, **self.method_overrides.get(v["method"], {})}
            for s in v["seeds"]:
                settings = {**base, **v["set"], "method": v["method"], "seed": s}
                units.append(Unit(v["name"], v["method"], s, v["group"], settings))
        return units

    def data_root(self) -> str | None:
        """The dataset folder, or None for generated data."""
        if self.data == "synthetic":
            return None
        if self.data == "auto":
            from models.data import default_data_root

            root = default_data_root()
            if root is None:
                raise ExperimentError(
                    "data = 'auto' but HAM10000 was not found: set DPAAT_DATA_ROOT or give a path"
                )
            return str(root)
        return self.data


# --------------------------------------------------------------------------- loading
_TOP_KEYS = {
    "name",
    "description",
    "out",
    "data",
    "methods",
    "seeds",
    "train",
    "method",
    "variant",
    "eval",
}
_EVAL_KEYS = {"limit", "eps", "attacks", "gradcam", "batch_size", "reference"}
_REFERENCE_KEYS = {"attacks", "eps", "limit"}
_VARIANT_KEYS = {"name", "method", "group", "seeds", "set"}


def load_experiment(path: str | Path, out: str | Path | None = None) -> Experiment:
    """Parse and check an experiment TOML file (every unit's TrainConfig is validated here, so a
    typo fails before hours of training rather than in the middle)."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        body = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        raise ExperimentError(f"{path}: not valid TOML ({e})") from None
    exp = parse_experiment(body, base_dir=Path.cwd())
    exp.source, exp.source_sha256 = path, hashlib.sha256(raw).hexdigest()
    if out is not None:
        exp.out = Path(out)
    return exp


def parse_experiment(body: dict[str, Any], base_dir: Path | None = None) -> Experiment:
    """An :class:`Experiment` from the dict of a TOML file."""
    _no_unknown(body, _TOP_KEYS, "experiment")
    name = str(body.get("name") or "")
    if not name or "/" in name or name.startswith("."):
        raise ExperimentError("experiment needs a plain `name` (used as the run directory)")
    methods = tuple(body.get("methods", METHODS))
    for m in methods:
        if m not in METHODS:
            raise ExperimentError(f"unknown method {m!r}; choose from {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ExperimentError("methods are listed twice")
    seeds = tuple(int(s) for s in body.get("seeds", (0,)))
    if not seeds or len(set(seeds)) != len(seeds):
        raise ExperimentError("seeds must be a non-empty list of distinct integers")
    train = dict(body.get("train", {}))
    for forbidden in ("method", "seed", "data_root", "manifest", "reference_checkpoint"):
        if forbidden in train:
            raise ExperimentError(
                f"[train] may not set {forbidden!r}: the experiment sets it (methods, seeds, data)"
            )
    overrides = {k: dict(v) for k, v in body.get("method", {}).items()}
    for m, o in overrides.items():
        if m not in METHODS:
            raise ExperimentError(f"[method.{m}]: unknown method")
        _no_data_fields(o, f"[method.{m}]")
    variants = [_parse_variant(v, seeds) for v in body.get("variant", [])]
    names = [*methods, *(v["name"] for v in variants)]
    if len(set(names)) != len(names):
        raise ExperimentError("variant names must differ from each other and from the methods")
    ev = dict(body.get("eval", {}))
    _no_unknown(ev, _EVAL_KEYS, "[eval]")
    spec = EvalSpec(
        limit=ev.get("limit"),
        eps=tuple(float(e) for e in ev.get("eps", EvalSpec.eps)),
        attacks=tuple(dict(a) for a in ev.get("attacks", EvalSpec.attacks)),
        gradcam=bool(ev.get("gradcam", True)),
        batch_size=int(ev.get("batch_size", 128)),
        reference=_parse_reference(ev.get("reference")),
    )
    if any(e < 0 for e in spec.eps) or 0.0 not in spec.eps:
        raise ExperimentError("[eval] eps must be >= 0 and include 0 (clean)")
    out = Path(body.get("out", "runs/experiments"))
    if base_dir is not None and not out.is_absolute():
        out = base_dir / out
    exp = Experiment(
        name=name,
        out=out,
        data=str(body.get("data", "auto")),
        methods=methods,
        seeds=seeds,
        train=train,
        method_overrides=overrides,
        variants=variants,
        eval=spec,
        description=str(body.get("description", "")),
    )
    for unit in exp.units():
        train_config(unit, data_root=None, manifest=None)  # validates every unit's settings
    return exp


def _parse_reference(ref: Any) -> dict[str, Any] | None:
    if ref is None:
        return None
    if not isinstance(ref, dict):
        raise ExperimentError("[eval.reference] must be a table")
    _no_unknown(ref, _REFERENCE_KEYS, "[eval.reference]")
    eps = [float(e) for e in ref.get("eps", (0.0, 1.0, 2.0))]
    attacks = [dict(a) for a in ref.get("attacks", ({"name": "autoattack"},))]
    if not attacks or any(e < 0 for e in eps) or 0.0 not in eps:
        raise ExperimentError("[eval.reference] needs attacks and eps >= 0 including 0")
    limit = ref.get("limit")
    return {"attacks": attacks, "eps": eps, "limit": None if limit is None else int(limit)}


def _parse_variant(v: dict[str, Any], default_seeds: tuple[int, ...]) -> dict[str, Any]:
    _no_unknown(v, _VARIANT_KEYS, "[[variant]]")
    if not v.get("name") or v.get("method") not in METHODS:
        raise ExperimentError(f"[[variant]] needs a name and a known method, got {v}")
    settings = dict(v.get("set", {}))
    _no_data_fields(settings, f"variant {v['name']}")
    return {
        "name": str(v["name"]),
        "method": v["method"],
        "group": str(v.get("group", "variant")),
        "seeds": tuple(int(s) for s in v.get("seeds", default_seeds[:1])),
        "set": settings,
    }


def _no_unknown(d: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ExperimentError(f"{where}: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")


def _no_data_fields(d: dict[str, Any], where: str) -> None:
    bad = DATA_FIELDS & set(d)
    if bad:
        raise ExperimentError(
            f"{where} may not change {sorted(bad)}: every unit sees the same data"
        )


def train_config(
    unit: Unit, data_root: str | None, manifest: str | None, reference: str | None = None
) -> TrainConfig:
    """The validated TrainConfig of a unit."""
    from models.training import TrainConfig

    fields = {**unit.settings, "data_root": data_root, "manifest": manifest}
    if unit.method == "amat_external":
        fields["reference_checkpoint"] = reference
    try:
        cfg = TrainConfig.from_dict(fields)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ExperimentError(f"unit {unit.key}: {e}") from None
    return cfg


def unit_hash(exp: Experiment, unit: Unit) -> str:
    """What makes a unit's result reusable: its training settings, the data and the protocol."""
    body = {"data": exp.data, "train": unit.settings, "eval": exp.eval.to_dict()}
    return _sha256_json(body)


# --------------------------------------------------------------------------- result files
def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file, fsync it, then rename over ``path``: a reader sees the old
    file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def write_result(path: Path, body: dict[str, Any]) -> None:
    """A result file: the body and the sha256 of its canonical JSON (a self-check)."""
    write_json_atomic(path, {"schema": RESULT_SCHEMA, "sha256": _sha256_json(body), "body": body})


def read_result(path: Path, expected_hash: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """``(body, "ok")`` for a valid result file, else ``(None, why)``: missing, unreadable,
    checksum mismatch (corrupted or edited), or made by other settings (stale)."""
    if not path.is_file():
        return None, "missing"
    try:
        doc = json.loads(path.read_text())
        body, digest = doc["body"], doc["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"unreadable ({type(e).__name__})"
    if doc.get("schema") != RESULT_SCHEMA:
        return None, f"schema {doc.get('schema')!r} is not {RESULT_SCHEMA}"
    if _sha256_json(body) != digest:
        return None, "checksum mismatch (corrupted or edited)"
    if expected_hash is not None and body.get("config_hash") != expected_hash:
        return None, "stale (made by other settings)"
    return body, "ok"


# --------------------------------------------------------------------------- running
@dataclass
class Outcome:
    """What happened to one unit in this run."""

    unit: Unit
    status: str  # "done" | "skipped" | "failed"
    path: Path
    detail: str = ""
    seconds: float = 0.0


@dataclass
class _Context:
    exp: Experiment
    log: Log
    data_root: str | None
    manifest: str | None
    code_sha256: str = ""  # taken when the run starts: the code this process has loaded
    published: Path | None = None  # <results>/units: result files committed by earlier sessions
    bundle: Any = None
    test: Any = None
    outcomes: list[Outcome] = field(default_factory=list)


def run_experiment(
    exp: Experiment,
    *,
    only: Sequence[str] = (),
    seeds: Sequence[int] = (),
    log: Log = print,
    published: Path | None = None,
) -> list[Outcome]:
    """Train and evaluate every unit that has no valid result yet; return what happened to each.

    ``only`` restricts to units by name or group, ``seeds`` to some seeds. A failing unit is
    recorded (``error.txt`` in its directory) and the run goes on with the next. A valid copy in
    ``published`` (``<results>/units/<unit>.json``, committed by an earlier session whose run
    directories are gone) counts as finished and is restored into the run directory.
    """
    known = {u.name for u in exp.units()} | {u.group for u in exp.units()}
    unknown = sorted(set(only) - known)
    if unknown:
        raise ExperimentError(f"--only {unknown}: no such unit or group; known: {sorted(known)}")
    units = [
        u
        for u in exp.units()
        if (not only or u.name in only or u.group in only) and (not seeds or u.seed in seeds)
    ]
    if not units:
        raise ExperimentError(f"no unit matches only={list(only)} seeds={list(seeds)}")
    exp.run_dir.mkdir(parents=True, exist_ok=True)
    data_root = exp.data_root()
    manifest = str(exp.run_dir / "split.json") if data_root is not None else None
    ctx = _Context(exp, log, data_root, manifest, code_fingerprint(), published)
    if exp.source is not None:
        (exp.run_dir / "experiment.toml").write_bytes(exp.source.read_bytes())
    log(f"experiment {exp.name}: {len(units)} units -> {exp.run_dir}")
    for unit in units:
        ctx.outcomes.append(_run_unit(ctx, unit))
    done = sum(o.status == "done" for o in ctx.outcomes)
    skipped = sum(o.status == "skipped" for o in ctx.outcomes)
    failed = [o.unit.key for o in ctx.outcomes if o.status == "failed"]
    log(f"experiment {exp.name}: {done} done, {skipped} skipped, {len(failed)} failed {failed}")
    return ctx.outcomes


def unit_dir(exp: Experiment, unit: Unit) -> Path:
    return exp.run_dir / unit.key


def _run_unit(ctx: _Context, unit: Unit) -> Outcome:
    exp, log = ctx.exp, ctx.log
    path = unit_dir(exp, unit)
    digest = unit_hash(exp, unit)
    body, why = read_result(path / RESULT_FILE, digest)
    if body is not None:
        log(f"[{unit.key}] skipped: valid result ({digest[:12]})")
        return Outcome(unit, "skipped", path)
    copy = None if ctx.published is None else ctx.published / f"{unit.key}.json"
    if copy is not None and read_result(copy, digest)[0] is not None:
        path.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copy, path / RESULT_FILE)
        log(f"[{unit.key}] skipped: valid published result {copy}")
        return Outcome(unit, "skipped", path)
    if why != "missing":
        log(f"[{unit.key}] result {why}: recomputing")
    _claim_dir(path, unit, digest, log)
    start = time.perf_counter()
    try:
        result = _train_and_evaluate(ctx, unit, path, digest)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a failing unit must not cost the others: record it and go on
        (path / "error.txt").write_text(traceback.format_exc())
        log(f"[{unit.key}] FAILED: {type(e).__name__}: {e} (traceback in {path / 'error.txt'})")
        return Outcome(
            unit, "failed", path, f"{type(e).__name__}: {e}", time.perf_counter() - start
        )
    write_result(path / RESULT_FILE, result)
    (path / "error.txt").unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    log(f"[{unit.key}] done in {seconds:.0f} s: {_headline(result['report'])}")
    return Outcome(unit, "done", path, seconds=seconds)


def _claim_dir(path: Path, unit: Unit, digest: str, log: Log) -> None:
    """Make ``path`` this unit's directory. A directory left by other settings (its checkpoint
    would resume the wrong run) is moved aside, not deleted."""
    marker = path / UNIT_FILE
    if marker.is_file():
        try:
            old = json.loads(marker.read_text()).get("config_hash")
        except (OSError, ValueError):
            old = None
        if old != digest:
            aside = path.with_name(f"{path.name}.stale-{str(old)[:8]}-{int(time.time())}")
            path.rename(aside)
            log(f"[{unit.key}] settings changed: old run moved to {aside.name}")
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, {"unit": unit.key, "config_hash": digest, "settings": unit.settings})


def _load_data(ctx: _Context) -> None:
    """Load the datasets once per experiment: every unit reads the same images (and shares
    their decoded-image cache)."""
    if ctx.bundle is not None:
        return
    from models.data import load_bundle

    exp = ctx.exp
    t = time.perf_counter()
    size, limit = int(exp.train.get("image_size", 64)), exp.train.get("limit")
    # generated data is one draw sized by `limit`: its test part comes with the training part
    same_test = ctx.data_root is None or exp.eval.limit == limit
    parts = ("train", "val", "test") if same_test else ("train", "val")
    ctx.bundle = load_bundle(ctx.data_root, size, ctx.manifest, seed=0, limit=limit, parts=parts)
    if same_test:
        ctx.test = ctx.bundle.test
    else:  # the evaluation subset is drawn from the full test split, not the training-sized one
        ctx.test = load_bundle(
            ctx.data_root, size, ctx.manifest, seed=0, limit=exp.eval.limit, parts=("test",)
        ).test
    b = ctx.bundle
    ctx.log(
        f"data {b.name}: train {len(b.train)}, val {len(b.val)}, test {len(ctx.test)} images at "
        f"{size} px (split {b.manifest_sha256[:12]}) in {time.perf_counter() - t:.0f} s"
    )


def _train_and_evaluate(ctx: _Context, unit: Unit, path: Path, digest: str) -> dict[str, Any]:
    from models.evaluation import evaluate_model, write_report
    from models.training import TrainingHooks, load_trained_model
    from models.training import train as train_model

    exp, log = ctx.exp, ctx.log
    _load_data(ctx)
    reference = None
    if unit.method == "amat_external":
        ref = exp.run_dir / f"standard-seed{unit.seed}" / "checkpoint.pt"
        ref_ok = read_result(ref.parent / RESULT_FILE)[0] is not None and ref.is_file()
        reference = str(ref) if ref_ok else None
        log(f"[{unit.key}] reference model: {reference or 'none finished; the trainer trains one'}")
    cfg = train_config(unit, ctx.data_root, ctx.manifest, reference)

    class EpochLog(TrainingHooks):
        def on_epoch_end(self, epoch: int, record: dict) -> None:
            keys = (
                "loss",
                "train_acc",
                "val_acc",
                "val_bacc",
                "tau",
                "broken_frac",
                "eps_mean",
                "seconds",
            )
            shown = " ".join(
                f"{k}={record[k]:.4g}" for k in keys if isinstance(record.get(k), float | int)
            )
            log(f"[{unit.key}] epoch {epoch}: {shown}")

    log(f"[{unit.key}] training {unit.method} ({cfg.epochs} epochs)")
    t0 = time.perf_counter()
    trained = train_model(cfg, path, hooks=EpochLog(), data=ctx.bundle)
    train_s = time.perf_counter() - t0
    if trained.status != "completed":
        raise RuntimeError(f"training ended with status {trained.status!r}")

    model, info = load_trained_model(trained.best_checkpoint)
    log(f"[{unit.key}] evaluating epoch {trained.best_epoch} (best by {trained.best_by})")
    log(f"[{unit.key}] evaluating on {len(ctx.test)} test images")
    last: dict[str, int] = {}

    def progress(stage: str, fraction: float) -> None:
        quarter = int(fraction * 4)
        if last.get(stage) != quarter:
            last[stage] = quarter
            log(f"[{unit.key}]   {stage}: {25 * quarter}%")

    t1 = time.perf_counter()
    b = ctx.bundle
    report = evaluate_model(
        model,
        ctx.test,
        eps_list=exp.eval.eps,
        attacks=exp.eval.attacks,
        batch_size=exp.eval.batch_size,
        gradcam=exp.eval.gradcam,
        model_info={**info, "checkpoint_sha256": trained.best_checkpoint_sha256},
        dataset_info={
            "name": b.name,
            "split": "test",
            "manifest_sha256": b.manifest_sha256,
            "manifest": ctx.manifest,
            "samples": len(ctx.test),
            "limit": exp.eval.limit,
        },
        progress=progress,
    )
    eval_s = time.perf_counter() - t1
    write_report(report, path)
    ref_report, ref_s = None, 0.0
    if exp.eval.reference is not None:
        spec = exp.eval.reference
        subset = _reference_test(ctx, spec["limit"])
        log(f"[{unit.key}] reference evaluation ({spec['attacks']}) on {len(subset)} test images")
        t2 = time.perf_counter()
        ref_report = evaluate_model(
            model,
            subset,
            eps_list=spec["eps"],
            attacks=spec["attacks"],
            batch_size=exp.eval.batch_size,
            gradcam=False,
            model_info={**info, "checkpoint_sha256": trained.best_checkpoint_sha256},
            dataset_info={
                "name": b.name,
                "split": "test",
                "manifest_sha256": b.manifest_sha256,
                "samples": len(subset),
                "limit": spec["limit"],
            },
        )
        ref_s = time.perf_counter() - t2
    epoch_seconds = [float(h["seconds"]) for h in trained.history if "seconds" in h]
    return {
        "experiment": exp.name,
        "experiment_file": str(exp.source) if exp.source else None,
        "experiment_sha256": exp.source_sha256,
        "unit": unit.name,
        "method": unit.method,
        "group": unit.group,
        "seed": unit.seed,
        "config_hash": digest,
        "train_config": cfg.to_dict(),
        "eval": exp.eval.to_dict(),
        "checkpoint_sha256": trained.best_checkpoint_sha256,
        "best_epoch": trained.best_epoch,
        "best_by": trained.best_by,
        "reference_checkpoint": reference,
        "history": trained.history,
        "timings": {
            "train_seconds": round(train_s, 2),
            "eval_seconds": round(eval_s, 2),
            "reference_seconds": round(ref_s, 2),
            "epoch_seconds": epoch_seconds,
            "epoch_seconds_mean": sum(epoch_seconds) / len(epoch_seconds)
            if epoch_seconds
            else None,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "code_sha256": ctx.code_sha256,
        "torch_threads": _torch_threads(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "report": report,
        "reference_report": ref_report,
    }


def _reference_test(ctx: _Context, limit: int | None) -> Any:
    """The reference evaluation's images: a class-stratified subset of the same test images."""
    if limit is None or limit >= len(ctx.test):
        return ctx.test
    from models.training.validation import stratified_subset

    return ctx.test.subset(stratified_subset(ctx.test.labels, limit))


def code_fingerprint() -> str:
    """sha256 over the sources that make the numbers (data, nets, attacks, training, evaluation):
    recorded with each result, not part of the settings hash, so the page can flag results made
    by different code."""
    root = Path(__file__).resolve().parent
    files = [root / n for n in ("data.py", "formats.py", "streaming.py", "nets.py")]
    for sub in ("attacks", "training", "evaluation"):
        files += sorted((root / sub).glob("*.py"))
    h = hashlib.sha256()
    for path in files:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _headline(report: dict[str, Any]) -> str:
    clean = report.get("clean", {})
    robust = report.get("robust", {})
    acc = " ".join(f"{k}:{v.get('accuracy', float('nan')):.3f}" for k, v in robust.items())
    return (
        f"clean acc {clean.get('accuracy', float('nan')):.3f} "
        f"bacc {clean.get('balanced_accuracy', float('nan')):.3f}; robust acc {acc}; "
        f"verdict {report.get('verdict')}"
    )


def collect_results(exp: Experiment) -> list[dict[str, Any]]:
    """The valid, current result bodies of an experiment's units, in unit order."""
    out = []
    for unit in exp.units():
        body, _ = read_result(unit_dir(exp, unit) / RESULT_FILE, unit_hash(exp, unit))
        if body is not None:
            out.append(body)
    return out
