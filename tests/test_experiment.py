"""The experiment runner on a tiny generated-data config: result files appear, a re-run skips
finished units, a corrupted or stale result is detected and recomputed, results are published."""

from __future__ import annotations

import json
import math
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from models.experiment import (
    RESULT_FILE,
    Experiment,
    ExperimentError,
    load_experiment,
    parse_experiment,
    read_result,
    run_experiment,
    unit_dir,
)
from models.training import TrainConfig, TrainResult

TINY = """
name = "tiny"
description = "Two methods, one epoch, 64 generated images."
data = "synthetic"
methods = ["standard", "dpaat"]
seeds = [0]

[train]
image_size = 32
limit = 32
epochs = 1
batch_size = 16
pgd_steps = 2
bisection_steps = 2

[eval]
eps = [0, 2, 8]
gradcam = true
attacks = [{ name = "fgsm" }, { name = "pgd", steps = 3 }]

[eval.reference]
attacks = [{ name = "pgd", steps = 2 }]
eps = [0, 2]
limit = 8
"""


def _load(tmp: Path, text: str = TINY) -> Experiment:
    cfg = tmp / "tiny.toml"
    cfg.write_text(text)
    return load_experiment(cfg, out=tmp / "runs")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread: on a shared 2-core machine two threads spin against other processes and
    run several times slower; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One complete tiny run; tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("experiment")
    exp = _load(root)
    outcomes = run_experiment(exp, log=lambda _: None)
    assert [(o.unit.key, o.status) for o in outcomes] == [
        ("standard-seed0", "done"),
        ("dpaat-seed0", "done"),
    ]
    return root


def _copy(finished: Path, tmp_path: Path) -> Experiment:
    shutil.copytree(finished, tmp_path / "copy")
    return _load(tmp_path / "copy")


def test_result_files_hold_report_history_and_hash(finished: Path) -> None:
    exp = _load(finished)
    for unit in exp.units():
        body, why = read_result(unit_dir(exp, unit) / RESULT_FILE)
        assert why == "ok" and body is not None
        assert body["method"] == unit.method and body["seed"] == 0
        assert 0.0 <= body["report"]["clean"]["accuracy"] <= 1.0
        assert len(body["history"]) == 1 and body["timings"]["epoch_seconds_mean"] > 0
        assert (unit_dir(exp, unit) / "checkpoint.pt").is_file()
        ref = body["reference_report"]  # the second evaluation, on a subset of the test images
        assert ref["dataset"]["samples"] == 8 and set(ref["robust"]) == {"0", "2"}
        assert ref["model"]["checkpoint_sha256"] == body["checkpoint_sha256"]
    dpaat = read_result(unit_dir(exp, exp.units()[1]) / RESULT_FILE)[0]
    assert dpaat is not None and "tau" in dpaat["history"][0] and "eps_hist" in dpaat["history"][0]


def test_second_run_skips_finished_units(finished: Path, tmp_path: Path) -> None:
    exp = _copy(finished, tmp_path)
    files = [unit_dir(exp, u) / RESULT_FILE for u in exp.units()]
    before = [f.read_bytes() for f in files]
    outcomes = run_experiment(exp, log=lambda _: None)
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert [f.read_bytes() for f in files] == before


def test_a_published_result_counts_as_finished_in_a_new_run_directory(
    finished: Path, tmp_path: Path
) -> None:
    """A later session has only what was committed: the published copy of a unit is restored
    into the fresh run directory instead of training again; an edited copy is not."""
    exp = _copy(finished, tmp_path)
    published = tmp_path / "units"
    published.mkdir()
    for unit in exp.units():
        shutil.copyfile(unit_dir(exp, unit) / RESULT_FILE, published / f"{unit.key}.json")
    shutil.rmtree(exp.run_dir)
    outcomes = run_experiment(exp, log=lambda _: None, published=published)
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    for unit in exp.units():
        restored = (unit_dir(exp, unit) / RESULT_FILE).read_bytes()
        assert restored == (published / f"{unit.key}.json").read_bytes()
    shutil.rmtree(exp.run_dir)
    edited = json.loads((published / "dpaat-seed0.json").read_text())
    edited["body"]["seed"] = 7
    (published / "dpaat-seed0.json").write_text(json.dumps(edited))
    outcomes = run_experiment(exp, only=["dpaat"], log=lambda _: None, published=published)
    assert [o.status for o in outcomes] == ["done"]


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_corrupted_result_is_detected_and_recomputed(
    finished: Path, tmp_path: Path, damage: str
) -> None:
    exp = _copy(finished, tmp_path)
    _, dpaat = exp.units()
    path = unit_dir(exp, dpaat) / RESULT_FILE
    text = path.read_text()
    if damage == "truncate":  # a write cut short
        path.write_text(text[: len(text) // 2])
    else:  # valid JSON whose numbers no longer match the checksum
        doc = json.loads(text)
        doc["body"]["report"]["clean"]["accuracy"] = (
            1.0 - doc["body"]["report"]["clean"]["accuracy"] + 0.5
        )
        path.write_text(json.dumps(doc))
    assert read_result(path)[0] is None
    logs: list[str] = []
    outcomes = run_experiment(exp, log=logs.append)
    assert [o.status for o in outcomes] == ["skipped", "done"]
    assert any("recomputing" in line for line in logs)
    body, why = read_result(path)
    assert why == "ok" and body is not None
    # the checkpoint was complete, so only the evaluation ran again: same model, same numbers
    original = read_result(unit_dir(_load(finished), dpaat) / RESULT_FILE)[0]
    assert original is not None and body["checkpoint_sha256"] == original["checkpoint_sha256"]
    assert body["report"]["clean"] == original["report"]["clean"]


def test_changed_settings_make_a_result_stale(finished: Path, tmp_path: Path) -> None:
    exp = _copy(finished, tmp_path)
    changed = _load(tmp_path / "copy", TINY + "\n[method.dpaat]\nz = 1.0\n")
    outcomes = run_experiment(changed, log=lambda _: None)
    assert [o.status for o in outcomes] == ["skipped", "done"]
    body = read_result(unit_dir(changed, changed.units()[1]) / RESULT_FILE)[0]
    assert body is not None and body["train_config"]["z"] == 1.0
    # the old run (whose checkpoint must not be resumed under new settings) is kept aside
    assert len(list(exp.run_dir.glob("dpaat-seed0.stale-*"))) == 1


def test_summarize_publishes_tables_and_plots(finished: Path, tmp_path: Path) -> None:
    from models.experiment_report import summarize

    exp = _load(finished)
    readme = summarize(exp, tmp_path / "results", log=lambda _: None)
    text = readme.read_text()
    assert "| `standard` |" in text and "| `dpaat` |" in text
    for name in (
        "curves.png",
        "dpaat_eps_hist.png",
        "dpaat_tau.png",
        "gradcam_montage.png",
        "summary.json",
    ):
        assert (tmp_path / "results" / name).stat().st_size > 0, name
    copies = sorted(p.name for p in (tmp_path / "results" / "units").iterdir())
    assert copies == ["dpaat-seed0.json", "standard-seed0.json"]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["units_missing"] == []
    assert summary["aggregates"]["dpaat"]["n"] == 1


def test_summary_keeps_published_results_when_run_directories_are_gone(
    finished: Path, tmp_path: Path
) -> None:
    """Run directories (checkpoints) are not in git: a later summary must keep what was
    published, drop a published copy that fails its checks, and say which code made what."""
    from models.experiment import code_fingerprint
    from models.experiment_report import summarize

    exp = _copy(finished, tmp_path)
    results = tmp_path / "results"
    summarize(exp, results, gradcam=True, log=lambda _: None)
    montage = (results / "gradcam_montage.png").read_bytes()
    shutil.rmtree(exp.run_dir)
    # the published copy of standard is edited: its self-check fails, so it is not used
    copy = results / "units" / "standard-seed0.json"
    doc = json.loads(copy.read_text())
    doc["body"]["report"]["clean"]["accuracy"] = 0.99
    copy.write_text(json.dumps(doc))
    logs: list[str] = []
    text = summarize(exp, results, log=logs.append).read_text()
    assert sorted(p.name for p in (results / "units").iterdir()) == ["dpaat-seed0.json"]
    summary = json.loads((results / "summary.json").read_text())
    assert summary["units_missing"] == ["standard-seed0"]
    assert summary["aggregates"]["dpaat"]["n"] == 1
    assert "| `dpaat` |" in text and "| `standard` |" not in text
    assert any("1 result(s) kept" in line for line in logs)
    # no checkpoint left to draw from: the earlier montage stays, labelled as earlier
    assert (results / "gradcam_montage.png").read_bytes() == montage
    assert "drawn by an earlier summary" in text
    # the code version of each result, marked when it is the code present now
    assert f"`{code_fingerprint()[:12]}` for every result (the code present now)" in text
    assert not (results / ".units.new").exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"methods": ["standard", "madry"]}, "unknown method"),
        ({"method": {"dpaat": {"image_size": 64}}}, "same data"),
        ({"train": {"epochs": 1, "seed": 3}}, "may not set"),
        ({"train": {"epochs": 0}}, "epochs must be >= 1"),
        ({"eval": {"eps": [2, 4]}}, "include 0"),
        ({"evaluation": {}}, "unknown keys"),
        ({"variant": [{"name": "dpaat", "method": "dpaat"}]}, "differ"),
    ],
)
def test_invalid_experiment_files_are_refused(patch: dict, message: str) -> None:
    body = {"name": "x", "data": "synthetic", "methods": ["standard", "dpaat"], **patch}
    with pytest.raises(ExperimentError, match=message):
        parse_experiment(body)


def test_variants_and_seeds_expand_in_run_order() -> None:
    exp = parse_experiment(
        {
            "name": "x",
            "data": "synthetic",
            "methods": ["dpaat", "amat_external", "standard"],
            "seeds": [0, 1],
            "variant": [
                {"name": "dpaat-z1", "method": "dpaat", "group": "ablation", "set": {"z": 1.0}}
            ],
        }
    )
    keys = [u.key for u in exp.units()]
    # standard first: amat_external reuses its checkpoint as the reference model
    assert keys == [
        "standard-seed0",
        "dpaat-seed0",
        "amat_external-seed0",
        "standard-seed1",
        "dpaat-seed1",
        "amat_external-seed1",
        "dpaat-z1-seed0",
    ]
    assert exp.units()[-1].settings["z"] == 1.0


def test_repo_presets_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    files = sorted(root.glob("*.toml"))
    assert {"cpu.toml", "gpu-resnet50.toml", "gpu-densenet121.toml"} <= {f.name for f in files}
    for f in files:
        body = tomllib.loads(f.read_text())
        exp = parse_experiment({**body, "data": "synthetic"})
        if f.name.startswith("pilot-"):  # a pilot compares recipes, not the methods
            continue
        assert set(exp.methods) == {
            "standard",
            "pgd_at",
            "trades",
            "dpaat",
            "amat_external",
            "iaat_flip",
        }


def test_a_failing_unit_is_recorded_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models.training

    real_train = models.training.train

    def flaky(cfg: TrainConfig, out_dir: Path, hooks: Any = None, data: Any = None) -> TrainResult:
        if cfg.method == "standard":
            raise FloatingPointError("loss nan at epoch 1")
        return real_train(cfg, out_dir, hooks=hooks, data=data)

    monkeypatch.setattr(models.training, "train", flaky)
    exp = _load(tmp_path)
    outcomes = run_experiment(exp, log=lambda _: None)
    assert [o.status for o in outcomes] == ["failed", "done"]
    assert "loss nan" in outcomes[0].detail
    assert "FloatingPointError" in (unit_dir(exp, exp.units()[0]) / "error.txt").read_text()
    assert not (unit_dir(exp, exp.units()[0]) / RESULT_FILE).exists()


def test_claim_check_decides_by_the_intervals() -> None:
    from models.experiment_report import claim_check

    def agg(**m: tuple[float, float, float] | float) -> dict:
        """figure=(mean, low, high) with an interval, or figure=mean without one"""
        mean = {k: v[0] if isinstance(v, tuple) else v for k, v in m.items()}
        interval = {k: v[1:] for k, v in m.items() if isinstance(v, tuple)}
        return {"mean": mean, "spread": {}, "interval": interval, "n": 1}

    aggs = {
        "standard": agg(
            clean_acc=(0.70, 0.68, 0.72),
            clean_bacc=(0.55, 0.50, 0.60),
            clean_map=(0.50, 0.45, 0.55),
            focus_clean=0.5,
            focus_adv=0.5,
            **{"rob_acc@1": (0.30, 0.28, 0.32), "rob_acc@2": (0.10, 0.08, 0.12)},
        ),
        "pgd_at": agg(
            clean_acc=(0.60, 0.58, 0.62),
            clean_bacc=(0.45, 0.40, 0.50),
            clean_map=(0.45, 0.40, 0.50),
            focus_clean=0.4,
            focus_adv=0.5,
            **{"rob_acc@1": (0.45, 0.43, 0.47), "rob_acc@2": (0.40, 0.38, 0.42)},
        ),
        "dpaat": agg(
            # 4 points below standard but the intervals overlap: close; above pgd_at's interval
            clean_acc=(0.66, 0.64, 0.68),
            # wholly below standard's interval: not close
            clean_bacc=(0.47, 0.45, 0.495),
            # above standard even; overlaps pgd_at's interval: "above pgd_at" undecided
            clean_map=(0.52, 0.47, 0.57),
            focus_clean=0.6,
            focus_adv=0.5,
            # far above standard, overlapping pgd_at (not below it)
            **{"rob_acc@1": (0.44, 0.42, 0.46)},
            # above standard, but wholly below pgd_at
            **{"rob_acc@2": (0.30, 0.28, 0.32)},
        ),
    }
    items = claim_check(aggs)

    def verdict(start: str) -> str:
        (item,) = [c for c in items if c["claim"].startswith(start)]
        return item["verdict"]

    assert verdict("clean accuracy close") == "holds"
    assert verdict("clean balanced accuracy close") == "does not hold"
    assert verdict("clean mAP close") == "undecided"
    assert verdict("robust accuracy at ε=1/255") == "holds"
    assert verdict("robust accuracy at ε=2/255") == "does not hold"
    assert verdict("higher lesion-focus score (clean)") == "holds"  # means: no interval
    assert verdict("higher lesion-focus score (adversarial)") == "does not hold"  # a tie
    assert all(c["verdict"] == "not measured" for c in items if "amat_external" in c["claim"])

    # lesion focus from a map with fewer than 3 cells a side compares nothing: not testable
    focus_claim = "higher lesion-focus score (clean)"
    for a in aggs.values():
        a["mean"]["cam_grid"] = 2.0
    (item,) = [c for c in claim_check(aggs) if c["claim"].startswith(focus_claim)]
    assert item["verdict"] == "not testable" and "2 cells a side" in item["numbers"]
    # with a fine map and intervals (newer reports), decided by the intervals like the rest
    for a, iv in zip(aggs.values(), ((0.48, 0.52), (0.38, 0.42), (0.49, 0.71)), strict=True):
        a["mean"]["cam_grid"] = 7.0
        a["interval"]["focus_clean"] = iv
    (item,) = [c for c in claim_check(aggs) if c["claim"].startswith(focus_claim)]
    assert item["verdict"] == "undecided"  # dpaat 0.6 [0.49, 0.71] overlaps standard's interval
    # the numbers shown carry the intervals the verdict was made from
    (item,) = [c for c in items if c["claim"].startswith("clean balanced accuracy close")]
    assert (
        "dpaat 47.0 [45.0, 49.5]" in item["numbers"]
        and "standard 55.0 [50.0, 60.0]" in item["numbers"]
    )


def test_lesion_focus_measures_carry_their_interval_and_the_cam_grid() -> None:
    """A report written before lesion focus had an interval and a map size (the cpu64 units) gets
    its map size measured on a fresh model of the same architecture and input size."""
    from models.experiment_report import measures_of

    model = {"architecture": "resnet18", "classes": list("abcdefg"), "input_size": 64}
    old = {"clean": 0.266, "adversarial": 0.265, "eps": 2.0}
    result = {"eval": {"eps": [0]}, "timings": {}, "report": {"lesion_focus": old, "model": model}}
    values, intervals = measures_of(result)
    assert values["cam_grid"] == 2.0 and "focus_clean" not in intervals
    assert values["focus_clean"] == 0.266 and math.isnan(values["focus_uniform"])
    iv = {"low": 0.30, "high": 0.34, "n": 1784, "method": "normal"}
    new = {**old, "intervals": {"clean": iv}, "uniform_map": 0.267, "cam_grid": [7, 7]}
    values, intervals = measures_of({**result, "report": {"lesion_focus": new, "model": model}})
    assert values["cam_grid"] == 7.0 and intervals["focus_clean"] == (0.30, 0.34)
    assert values["focus_uniform"] == 0.267
    # no masks, no lesion focus: no map size either
    values, _ = measures_of({**result, "report": {"lesion_focus": None, "model": model}})
    assert math.isnan(values["cam_grid"])


def test_intervals_over_seeds_are_the_envelope_and_reach_every_table() -> None:
    from models.experiment_report import aggregate, main_tables

    def result(seed: int, acc: float, lo: float, hi: float) -> dict:
        iv = {"low": lo, "high": hi, "method": "wilson", "n": 100}
        robust = {
            "accuracy": acc / 2,
            "intervals": {"accuracy": {**iv, "low": lo / 2, "high": hi / 2}},
        }
        return {
            "unit": "standard", "method": "standard", "group": "main", "seed": seed,
            "train_config": {}, "eval": {"eps": [0, 1]}, "timings": {},
            "report": {
                "clean": {"accuracy": acc, "intervals": {"accuracy": iv}}, "robust": {"1": robust}
            },
            "reference_report": {"dataset": {"samples": 64}, "robust": {"1": robust}},
        }  # fmt: skip

    aggs = aggregate([result(0, 0.70, 0.60, 0.78), result(1, 0.74, 0.65, 0.82)])
    std = aggs["standard"]
    assert std["interval"]["clean_acc"] == (0.60, 0.82)
    assert std["interval"]["aa_acc@1"] == (0.30, 0.41) and std["mean"]["aa_n"] == 64
    text = main_tables(aggs, ["standard"], ["1"])
    assert "72.0 ± 2.8 [60.0, 82.0]" in text  # clean accuracy: mean, sd over seeds, envelope
    assert "AutoAttack ε=1 (n=64)" in text and "36.0 ± 1.4 [30.0, 41.0]" in text


def test_only_with_an_unknown_unit_is_refused_before_any_work(tmp_path: Path) -> None:
    exp = _load(tmp_path)
    with pytest.raises(ExperimentError, match="no such unit"):
        run_experiment(exp, only=["dpat"], log=lambda _: None)
    assert not exp.run_dir.exists()
