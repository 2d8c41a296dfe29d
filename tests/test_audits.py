"""Audits on the server (SQLite, through the ASGI app): thresholds judged on a real report of a
small model trained here, the regression rule against a baseline audit (a model made worse on
purpose fails it), idempotent submits, validation, ownership, and the JSON/Markdown/JUnit reports.

Evaluation jobs run in this process: the dispatcher records them and ``run_jobs`` hands them to
the worker's runner, exactly as a Celery task would."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.settings import Settings, get_settings
from app.db.migrate import upgrade
from app.db.session import dispose_engines
from app.main import create_app
from app.schemas.audits import Threshold
from app.services import audits
from worker import runner

API = "/api/v1"
OTHER = {"X-API-Key": "someone-else"}
CLASSES = ["bcc", "mel", "nv"]
THREAT = {"eps_list": [0, 1, 2], "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 3}]}


# ============================================================================ pure rules
def _report(**over: Any) -> dict[str, Any]:
    clean: dict[str, Any] = {"accuracy": 0.8, "balanced_accuracy": 0.7, "map": 0.75, "auroc": None}
    clean["recall"] = {"mel": 0.5, "nv": 0.9}
    robust2: dict[str, Any] = {
        "eps": 2.0,
        "accuracy": 0.4,
        "balanced_accuracy": 0.3,
        "map": 0.5,
        "auroc": 0.6,
    }
    robust2["recall"] = {"mel": 0.2, "nv": 0.5}
    report = {
        "clean": clean,
        "robust": {"0": {"eps": 0.0, **clean}, "2": robust2},
        "curve_auc": 0.55,
        "verdict": "warn",
        "dataset": {"manifest_sha256": "a" * 64, "split": "test"},
        "threat_model": {"attacks": [{"name": "fgsm"}]},
    }
    report.update(over)
    return report


def _rule(metric: str, value: Any, eps: float | None = None, op: str = ">=") -> dict[str, Any]:
    return {"metric": metric, "eps": eps, "op": op, "value": value}


def test_thresholds_are_judged_on_the_reports_numbers() -> None:
    rules = [
        _rule("accuracy", 0.4, eps=2),  # exactly at the bound: passes
        _rule("accuracy", 0.41, eps=2),
        _rule("balanced_accuracy", 0.6),
        _rule("recall.mel", 0.5, eps=2),
        _rule("recall.mel", 0.3, eps=2, op="<="),
        _rule("auroc", 0.5),  # undefined in the report: fails, never passes by default
        _rule("curve_auc", 0.5),
        _rule("verdict", "fail", op="!="),
        _rule("verdict", "pass", op="=="),
        _rule("map", 0.5, eps=1),  # no eps 1 in the report
    ]
    results = audits.evaluate_thresholds(_report(), rules)
    got = {r["name"]: (r["observed"], r["passed"]) for r in results}
    assert got == {
        "accuracy@2 >= 0.4": (0.4, True),
        "accuracy@2 >= 0.41": (0.4, False),
        "balanced_accuracy >= 0.6": (0.7, True),
        "recall.mel@2 >= 0.5": (0.2, False),
        "recall.mel@2 <= 0.3": (0.2, True),
        "auroc >= 0.5": (None, False),
        "curve_auc >= 0.5": (0.55, True),
        "verdict != fail": ("warn", True),
        "verdict == pass": ("warn", False),
        "map@1 >= 0.5": (None, False),
    }
    failed = {r["name"]: r["detail"] for r in results if not r["passed"]}
    assert failed["accuracy@2 >= 0.41"] == "observed 0.4000, required >= 0.4100"
    assert "no value of auroc (clean)" in failed["auroc >= 0.5"]


def test_thresholds_on_the_interval_bound_are_conservative() -> None:
    """use_interval: >= is judged on the lower bound, <= on the upper one; a report without
    intervals fails the rule instead of passing it on the estimate."""
    report = _report()
    report["robust"]["2"]["intervals"] = {
        "accuracy": {"n": 300, "low": 0.345, "high": 0.457, "method": "wilson"},
        "recall": {"mel": {"n": 40, "low": 0.105, "high": 0.349, "method": "wilson"}},
    }
    rules = [
        {**_rule("accuracy", 0.35, eps=2), "use_interval": True},  # estimate 0.4 would pass
        {**_rule("accuracy", 0.34, eps=2), "use_interval": True},
        {**_rule("recall.mel", 0.3, eps=2, op="<="), "use_interval": True},  # upper 0.349
        {**_rule("balanced_accuracy", 0.5), "use_interval": True},  # no interval in the report
    ]
    got = {
        r["name"]: (r["observed"], r["passed"]) for r in audits.evaluate_thresholds(report, rules)
    }
    assert got == {
        "accuracy@2 >= 0.35 (95% bound)": (0.345, False),
        "accuracy@2 >= 0.34 (95% bound)": (0.345, True),
        "recall.mel@2 <= 0.3 (95% bound)": (0.349, False),
        "balanced_accuracy >= 0.5 (95% bound)": (None, False),
    }
    with pytest.raises(ValueError, match="no interval"):
        Threshold(metric="verdict", op="!=", value="fail", use_interval=True)


def test_regression_rule_and_comparability() -> None:
    rules = [
        _rule("accuracy", 0.0, eps=2),
        _rule("balanced_accuracy", 0.0),
        _rule("accuracy", 0.1, 2),
    ]
    base = _report()
    worse = _report(clean={**base["clean"], "balanced_accuracy": 0.67})
    worse["robust"] = {**base["robust"], "2": {**base["robust"]["2"], "accuracy": 0.37}}
    results = audits.evaluate_regression(worse, base, rules, max_drop=0.02)
    assert [(r["name"], r["passed"]) for r in results] == [
        ("accuracy@2 no worse than baseline - 0.02", False),  # 0.37 < 0.40 - 0.02
        ("balanced_accuracy no worse than baseline - 0.02", False),  # 0.67 < 0.70 - 0.02
    ], "each metric and eps is compared once"
    assert results[0]["baseline"] == 0.4 and results[0]["required"] == pytest.approx(0.38)
    assert all(r["passed"] for r in audits.evaluate_regression(worse, base, rules, 0.05))
    # Another split, or other attacks: the numbers cannot be compared, so the gate fails.
    other = _report(dataset={"manifest_sha256": "b" * 64, "split": "test"})
    results = audits.evaluate_regression(other, base, rules, max_drop=1.0)
    assert not any(r["passed"] for r in results)
    assert "manifest_sha256 differs" in results[0]["detail"]
    assert not audits.evaluate_regression(base, None, rules, 1.0)[0]["passed"]


# ============================================================================ the service
@dataclass
class Service:
    client: TestClient
    settings: Settings
    sent: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    dataset_id: str = ""
    weights: bytes = b""  # the trained model's safetensors (unspoiled)

    def run_jobs(self) -> None:
        """Run every evaluation job sent so far, as the worker would."""
        while self.sent:
            assert runner.run_evaluate_job(self.sent.pop(0), "test-worker") in (
                "succeeded",
                "skipped",
            )

    def audit(self, body: dict[str, Any], **kw: Any) -> Any:
        return self.client.post(f"{API}/audits", json=body, **kw)

    def get(self, audit_id: str, **kw: Any) -> dict[str, Any]:
        r = self.client.get(f"{API}/audits/{audit_id}", **kw)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body


def write_dataset(root: Path, n: int = 90) -> None:
    """A learnable 3-class image folder (generated blobs, 32 px PNGs; class 'mel' included)."""
    from models.data import synthetic_dataset

    ds = synthetic_dataset(n=n, size=32, num_classes=3, seed=1)
    for i, label in enumerate(ds.labels.tolist()):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"img{i:03d}.png")


def safetensors_of(checkpoint: Path, spoil: bool = False) -> bytes:
    """The trained classifier's weights as safetensors; ``spoil`` zeroes its last layer (a model
    made worse on purpose: constant predictions)."""
    import torch
    from safetensors.torch import save

    from models.api import load_model

    model = load_model(checkpoint).model
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if spoil:
        last = [k for k in state if k.endswith(".weight") and state[k].ndim == 2][-1]
        state[last] = torch.zeros_like(state[last])
    return save(state)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One embedded-style deployment for the module: SQLite, a registered dataset, a small CNN
    trained on it (uploaded as "derm-cnn") and the same model spoiled ("derm-cnn-v2")."""
    from app.services import datasets as datasets_service
    from models.api import train

    tmp = tmp_path_factory.mktemp("audits")
    data_root = tmp / "server-data"
    write_dataset(data_root / "derm")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("BROKER_URL", "DPAAT_BROKER_URL", "DATABASE_URL"):
            mp.delenv(name, raising=False)
        mp.setenv("DPAAT_DATABASE_URL", f"sqlite:///{tmp / 'dpaat.db'}")
        mp.setenv("DPAAT_ARTIFACT_DIR", str(tmp / "artifacts"))
        mp.setenv("DPAAT_DATA_ROOTS", json.dumps([str(data_root)]))
        get_settings.cache_clear()
        dispose_engines()
        settings = get_settings()
        upgrade(settings.database_url)
        app = create_app(settings)
        with TestClient(app) as client:
            svc = Service(client, settings)
            app.state.dispatcher = lambda job_id, kind: svc.sent.append(job_id)
            r = client.post(f"{API}/datasets/register", json={"path": str(data_root / "derm")})
            assert r.status_code == 201, r.text
            svc.dataset_id = r.json()["id"]
            with app.state.sessionmaker() as s:
                row = datasets_service.get_dataset(s, svc.dataset_id)
                root = datasets_service.dataset_root(row, app.state.store)
                manifest = datasets_service.manifest_path(row, app.state.store)
            config = {
                "data_root": str(root),
                "manifest": str(manifest),
                "image_size": 32,
                "method": "standard",
                "epochs": 6,
                "batch_size": 16,
                "augment": False,
            }
            result = train(config, tmp / "train")
            svc.weights = safetensors_of(Path(result.checkpoint))
            description = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32}
            for name, spoil in (("derm-cnn", False), ("derm-cnn-v2", True)):
                r = client.post(
                    f"{API}/models",
                    files={
                        "weights": ("w.safetensors", safetensors_of(Path(result.checkpoint), spoil))
                    },
                    data={"description": json.dumps({**description, "name": name})},
                )
                assert r.status_code == 201, r.text
                svc.models[name] = r.json()["id"]
            yield svc
        dispose_engines()
    get_settings.cache_clear()


def body_for(svc: Service, model: str, thresholds: list[dict[str, Any]], **extra: Any) -> dict:
    return {
        "model_id": svc.models[model],
        "dataset_id": svc.dataset_id,
        "gradcam": False,
        **THREAT,
        "thresholds": thresholds,
        **extra,
    }


LOOSE = [
    _rule("balanced_accuracy", 0.6),
    _rule("accuracy", 0.4, eps=2),
    _rule("recall.mel", 0.5, eps=1),
    _rule("verdict", "fail", op="!="),
]
MAP_IS_ZERO = _rule("map", 0.0, eps=2, op="<=")  # mAP is > 0: this rule must fail


def finished_audit(svc: Service, body: dict[str, Any]) -> dict[str, Any]:
    r = svc.audit(body)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["status"] == "queued" and created["outcome"] == "pending"
    assert created["passed"] is None and created["threshold_results"] == []
    assert r.headers["Location"] == f"{API}/audits/{created['id']}"
    # Before the job ran there is no report to read.
    assert svc.client.get(f"{API}/audits/{created['id']}/report").status_code == 409
    svc.run_jobs()
    return svc.get(created["id"])


@pytest.fixture(scope="module")
def judged(service: Service) -> dict[str, Any]:
    """A finished audit of the trained model: LOOSE (met) plus one rule that cannot be met."""
    return finished_audit(service, body_for(service, "derm-cnn", [*LOOSE, MAP_IS_ZERO]))


@pytest.fixture(scope="module")
def baseline(service: Service) -> dict[str, Any]:
    """A passing audit of the trained model (the 'production' baseline)."""
    return finished_audit(service, body_for(service, "derm-cnn", LOOSE))


def test_an_audit_judges_its_thresholds_on_the_stored_report(
    service: Service, judged: dict[str, Any]
) -> None:
    assert judged["status"] == "succeeded" and judged["outcome"] == "failed"
    assert judged["passed"] is False
    report = service.client.get(f"{API}/audits/{judged['id']}/report").json()
    robust, clean = report["robust"], report["clean"]
    expected = [
        clean["balanced_accuracy"],
        robust["2"]["accuracy"],
        robust["1"]["recall"]["mel"],
        report["verdict"],
        robust["2"]["map"],
    ]
    results = judged["threshold_results"]
    assert [t["observed"] for t in results] == expected
    assert [t["passed"] for t in results] == [
        expected[0] >= 0.6,
        expected[1] >= 0.4,
        expected[2] >= 0.5,
        expected[3] != "fail",
        False,
    ]
    assert all(results[i]["passed"] for i in range(4)), "the trained model meets LOOSE"
    assert judged["verdict"] == report["verdict"]
    assert judged["report_url"] == f"{API}/audits/{judged['id']}/report"
    # The JSON report is the evaluation report (the contract) plus the audit section.
    for key in ("model", "dataset", "threat_model", "clean", "robust", "curve_auc", "checks"):
        assert key in report
    for key in ("lesion_focus", "verdict", "versions", "timings"):
        assert key in report
    assert report["audit"]["thresholds"] == results and report["audit"]["passed"] is False
    assert report["model"]["classes"] == CLASSES and report["threat_model"]["eps"] == [0, 1, 2]


def test_reports_in_markdown_junit_and_the_curve(service: Service, judged: dict[str, Any]) -> None:
    url = f"{API}/audits/{judged['id']}"
    xml = service.client.get(f"{url}/report", params={"format": "junit"})
    assert xml.status_code == 200 and xml.headers["content-type"].startswith("application/xml")
    suite = ET.fromstring(xml.text).find("testsuite")
    assert suite is not None and suite.get("tests") == "5" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [t["name"] for t in judged["threshold_results"]]
    failure = cases[-1].find("failure")
    observed = judged["threshold_results"][-1]["observed"]
    assert failure is not None
    assert failure.get("message") == f"observed {observed:.4f} > required 0.0000"
    assert all(c.find("failure") is None for c in cases[:-1])
    md = service.client.get(f"{url}/report", params={"format": "md"}).text
    assert "Robustness audit FAILED" in md and "| map@2 <= 0 |" in md and "❌ FAIL" in md
    assert f"![Robustness curve]({url}/figures/robustness_curve.png)" in md
    assert f"![Recall per class and eps]({url}/figures/class_recall.png)" in md
    png = service.client.get(f"{url}/curve.png")
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    width, height = Image.open(io.BytesIO(png.content)).size
    assert width >= 400 and height >= 300


def test_a_worse_model_fails_against_the_baseline_and_rereads_the_same(
    service: Service, baseline: dict[str, Any], judged: dict[str, Any]
) -> None:
    assert baseline["passed"] is True
    # A baseline must have finished before another audit can be pinned to it.
    pending = service.audit(body_for(service, "derm-cnn", LOOSE)).json()["id"]
    r = service.audit(body_for(service, "derm-cnn-v2", LOOSE, baseline={"audit_id": pending}))
    assert r.status_code == 409 and "not finished" in r.json()["detail"]
    service.client.post(f"{API}/audits/{pending}/cancel")
    service.run_jobs()

    by_name = {"model_name": "derm-cnn", "max_drop": 0.02}
    r = service.audit(body_for(service, "derm-cnn-v2", LOOSE, baseline=by_name))
    assert r.status_code == 201, r.text
    assert r.json()["baseline"]["audit_id"] == baseline["id"], "the latest passing audit"
    service.run_jobs()
    worse = service.get(r.json()["id"])
    assert worse["passed"] is False and worse["outcome"] == "failed"
    regression = {x["metric"]: x for x in worse["regression_results"]}
    assert set(regression) == {"balanced_accuracy", "accuracy", "recall.mel"}
    base_report = service.client.get(f"{API}/audits/{baseline['id']}/report").json()
    bacc = regression["balanced_accuracy"]
    assert bacc["baseline"] == base_report["clean"]["balanced_accuracy"]
    assert bacc["observed"] == pytest.approx(1 / 3), "constant predictions"
    assert not bacc["passed"] and "below the baseline" in bacc["detail"]
    # Re-reading gives the same answer, and the report carries the same results.
    assert service.get(worse["id"]) == worse
    doc = service.client.get(f"{API}/audits/{worse['id']}/report").json()
    assert doc["audit"]["regression"] == worse["regression_results"]
    v2 = service.models["derm-cnn-v2"]
    listing = service.client.get(f"{API}/audits", params={"model_id": v2}).json()
    assert worse["id"] in [a["id"] for a in listing["items"]]
    assert all(a["model_id"] == v2 for a in listing["items"])
    # The same model evaluated twice is no regression: the evaluation is deterministic.
    judged_report = service.client.get(f"{API}/audits/{judged['id']}/report").json()
    same = audits.evaluate_regression(judged_report, base_report, LOOSE, max_drop=0.0)
    assert same and all(x["passed"] for x in same)


def test_idempotent_submit(service: Service) -> None:
    body = body_for(service, "derm-cnn", LOOSE)
    key = {"Idempotency-Key": "ci-run-42"}
    first = service.audit(body, headers=key)
    again = service.audit(body, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert (
        again.json()["id"] == first.json()["id"]
        and again.json()["job_id"] == first.json()["job_id"]
    )
    assert len(service.sent) == 1, "a replayed submit sends no second job"
    other = service.audit({**body, "eps_list": [0, 1, 2, 4]}, headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    # The same key belongs to another owner independently.
    assert service.audit(body, headers={**key, **OTHER}).status_code == 404
    service.client.post(f"{API}/audits/{first.json()['id']}/cancel")
    service.run_jobs()


def test_cancelled_audit_ends_in_error_without_a_report(service: Service) -> None:
    audit_id = service.audit(body_for(service, "derm-cnn", LOOSE)).json()["id"]
    r = service.client.post(f"{API}/audits/{audit_id}/cancel")
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    service.run_jobs()  # the queued message finds nothing to claim
    audit = service.get(audit_id)
    assert audit["outcome"] == "error" and audit["passed"] is None
    r = service.client.get(f"{API}/audits/{audit_id}/report")
    assert r.status_code == 409 and "cancelled" in r.json()["detail"]
    assert service.get(audit_id) == audit


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"thresholds": [_rule("accuracy", 0.5, eps=4)]}, "not in eps_list"),
        ({"thresholds": [_rule("accuracy", 1.5)]}, "[0, 1]"),
        ({"thresholds": [_rule("verdict", "fail", op=">=")]}, "verdict"),
        ({"thresholds": [_rule("f1", 0.5)]}, "pattern"),
        ({"thresholds": []}, "at least 1"),
        ({"baseline": {"audit_id": "x", "model_name": "y"}}, "exactly one"),
        ({"thresholds": [_rule("recall.melanoma", 0.5)]}, "no such class"),
        ({"baseline": {"model_name": "never-audited"}}, "no passing audit"),
    ],
)
def test_invalid_audits_are_refused(service: Service, patch: dict, message: str) -> None:
    r = service.audit({**body_for(service, "derm-cnn", LOOSE), **patch})
    assert r.status_code == 422, r.text
    assert message in json.dumps(r.json()["detail"])
    assert service.sent == []


def test_audits_are_private_to_their_owner(service: Service) -> None:
    audit_id = service.audit(body_for(service, "derm-cnn", LOOSE)).json()["id"]
    assert service.client.get(f"{API}/audits/{audit_id}", headers=OTHER).status_code == 404
    assert service.client.get(f"{API}/audits", headers=OTHER).json()["total"] == 0
    r = service.client.get(f"{API}/audits/{audit_id}/report", headers=OTHER)
    assert r.status_code == 404
    assert service.client.post(f"{API}/audits/{audit_id}/cancel", headers=OTHER).status_code == 404
    # Another key cannot audit this key's model either.
    assert service.audit(body_for(service, "derm-cnn", LOOSE), headers=OTHER).status_code == 404
    service.client.post(f"{API}/audits/{audit_id}/cancel")
    service.run_jobs()


# ============================================================================ figures
def png_size(content: bytes) -> tuple[int, int]:
    """The size of a valid PNG (decoded whole: a truncated file fails here)."""
    assert content.startswith(b"\x89PNG\r\n\x1a\n"), content[:16]
    image = Image.open(io.BytesIO(content))
    image.load()
    assert image.format == "PNG"
    width, height = image.size
    return width, height


def _figure(svc: Service, link: str) -> bytes:
    r = svc.client.get(link)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    width, height = png_size(r.content)
    assert 400 <= width <= 3000 and 250 <= height <= 3000, (link, width, height)
    return r.content


def test_the_figures_of_an_audit_show_its_reports_numbers(
    service: Service, judged: dict[str, Any], tmp_path: Path
) -> None:
    from models import plots

    url = f"{API}/audits/{judged['id']}"
    # An uploaded model audited without Grad-CAM: no montage, no training history.
    assert judged["figures"] == {
        "robustness_curve": f"{url}/figures/robustness_curve.png",
        "class_recall": f"{url}/figures/class_recall.png",
    }
    pngs = {name: _figure(service, link) for name, link in judged["figures"].items()}
    assert _figure(service, f"{url}/figures/class_recall.png") == pngs["class_recall"], "kept"
    assert _figure(service, f"{url}/curve.png") == pngs["robustness_curve"]
    for missing in ("gradcam_montage", "dpaat_tau", "no_such_figure"):
        r = service.client.get(f"{url}/figures/{missing}.png")
        assert r.status_code == 404 and missing in r.json()["detail"]
    assert service.client.get(f"{url}/figures/class_recall.png", headers=OTHER).status_code == 404
    # What the figures draw is the report's numbers.
    report = service.client.get(f"{url}/report").json()
    recall = plots.plot_class_recall(report, tmp_path / "recall.png")
    assert recall["classes"] == CLASSES and recall["columns"] == ["clean", "1", "2"]
    for row, cls in zip(recall["recall"], CLASSES, strict=True):
        sections = [report["clean"], report["robust"]["1"], report["robust"]["2"]]
        assert row == [s["recall"][cls] for s in sections]
    curve = plots.plot_curve(report, tmp_path / "curve.png", labels=["m"])["m"]
    assert curve["eps"] == [0, 1, 2]
    assert curve["accuracy"] == [report["robust"][e]["accuracy"] for e in ("0", "1", "2")]
    # The model's own report links the same figures by their API URLs.
    model_id = service.models["derm-cnn"]
    md = service.client.get(f"{API}/models/{model_id}/report", params={"format": "md"}).text
    base = f"{API}/models/{model_id}/figures"
    assert f"({base}/robustness_curve.png)" in md and f"({base}/class_recall.png)" in md
    assert "](robustness_curve.png)" not in md
    _figure(service, f"{base}/class_recall.png")


def test_plots_of_a_dpaat_training_run_and_of_a_montage(tmp_path: Path) -> None:
    """The eps histogram and tau history draw the epoch records; the montage draws three rows
    (images, clean, adversarial) with the lesion outline when there are masks."""
    from models import plots
    from models.data import synthetic_dataset
    from models.evaluation.montage import write_montage
    from models.nets import build_model

    epochs = [
        {"epoch": e, "tau": t, "broken_frac": b, "eps_mean": m,
         "eps_hist": {"edges": [0, 4, 8], "counts": c}}
        for e, t, b, m, c in [(1, None, 0.5, 1.0, [9, 1]), (2, 0.7, 0.3, 2.0, [5, 5]),
                              (3, 0.6, 0.2, 3.5, [2, 8])]
    ]  # fmt: skip
    hist = plots.plot_eps_histogram(epochs, tmp_path / "hist.png")
    assert hist["epochs"] == [1, 2, 3] and hist["edges"][0] == [0, 4, 8]
    assert hist["shares"] == [[0.9, 0.1], [0.5, 0.5], [0.2, 0.8]]
    tau = plots.plot_tau_history(epochs, tmp_path / "tau.png")
    assert tau["epoch"] == [1, 2, 3] and tau["broken_frac"] == [0.5, 0.3, 0.2]
    assert tau["tau"][1:] == [0.7, 0.6] and tau["tau"][0] != tau["tau"][0], "no tau yet: NaN"
    with pytest.raises(ValueError, match="not a DPAAT run"):
        plots.plot_eps_histogram([{"epoch": 1, "loss": 1.0}], tmp_path / "x.png")
    for name in ("hist.png", "tau.png"):
        assert png_size((tmp_path / name).read_bytes())[0] >= 400

    ds = synthetic_dataset(n=24, size=32, num_classes=3, seed=0)
    assert ds.masks is not None
    model = build_model("small_cnn", 3).eval()
    drawn = write_montage(
        model, ds, [{"name": "fgsm"}, {"name": "pgd", "steps": 2}], [0, 2], tmp_path / "m.png",
        n_images=4,
    )  # fmt: skip
    assert drawn is not None and (drawn["rows"], drawn["columns"]) == (3, 4)
    assert drawn["outlines"] is True and drawn["eps"] == 2.0
    assert len(set(ds.labels[drawn["images"]].tolist())) == 3, "one image per class first"
    assert png_size((tmp_path / "m.png").read_bytes()) >= (400, 300)
    assert write_montage(model, ds, [{"name": "fgsm"}], [0], tmp_path / "none.png") is None


def test_a_dpaat_model_trained_here_has_its_training_figures(
    service: Service, tmp_path: Path
) -> None:
    from app.db.tables import JobEpoch
    from models import plots

    r = service.client.post(
        f"{API}/jobs/train",
        json={
            "dataset_id": service.dataset_id,
            "name": "dpaat-here",
            "config": {"method": "dpaat", "epochs": 2, "image_size": 32, "batch_size": 16,
                       "pgd_steps": 2, "bisection_steps": 2},
        },
    )  # fmt: skip
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    service.sent.remove(job_id)
    assert runner.run_train_job(job_id, "test-worker") == "succeeded"
    model_id = service.client.get(f"{API}/jobs/{job_id}").json()["result"]["model_id"]
    base = f"{API}/models/{model_id}/figures"
    for name in ("dpaat_eps_hist", "dpaat_tau"):
        _figure(service, f"{base}/{name}.png")
    app = service.client.app
    with app.state.sessionmaker() as s:  # type: ignore[attr-defined]
        rows = s.query(JobEpoch).filter_by(job_id=job_id).order_by(JobEpoch.epoch).all()
        records = [dict(row.metrics, epoch=row.epoch) for row in rows]
    assert len(records) == 2 and all("eps_hist" in x for x in records)
    last = records[-1]["eps_hist"]
    drawn = plots.plot_eps_histogram(records, tmp_path / "h.png")
    assert drawn["shares"][-1] == [c / sum(last["counts"]) for c in last["counts"]]
    # An audit of that model lists them with the report's figures.
    audit = finished_audit(service, {**body_for(service, "derm-cnn", LOOSE), "model_id": model_id})
    assert {"dpaat_eps_hist", "dpaat_tau", "robustness_curve"} <= set(audit["figures"])
    _figure(service, audit["figures"]["dpaat_tau"])


def test_the_web_process_draws_figures_without_torch(tmp_path: Path) -> None:
    """Routers and the figure service import no torch; drawing a report's figure needs none."""
    import subprocess
    import sys

    report = _report(model={"classes": ["mel", "nv"]})
    code = (
        "import json, sys; import app.api.routes.audits, app.api.routes.compare, "
        "app.api.routes.models, app.services.figures; from models import plots; "
        f"plots.plot_class_recall(json.loads(sys.argv[1]), {str(tmp_path / 'r.png')!r}); "
        f"plots.plot_curve(json.loads(sys.argv[1]), {str(tmp_path / 'c.png')!r}); "
        "print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(report)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    assert png_size((tmp_path / "r.png").read_bytes())[0] >= 400


# ============================================================================ upload in the request
def upload_audit(
    svc: Service,
    weights: bytes,
    spec: dict[str, Any],
    description: dict[str, Any] | None = None,
    **kw: Any,
) -> Any:
    desc = description or {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32}
    return svc.client.post(
        f"{API}/audits",
        files={"weights": ("model.safetensors", weights, "application/octet-stream")},
        data={"description": json.dumps(desc), "audit": json.dumps(spec)},
        **kw,
    )


def spec_for(svc: Service, thresholds: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"dataset_id": svc.dataset_id, "gradcam": False, **THREAT, "thresholds": thresholds,
            **extra}  # fmt: skip


def _stored(svc: Service) -> tuple[int, int]:
    """(models of this key, files in the artifact store's blobs)."""
    models = svc.client.get(f"{API}/models").json()["total"]
    blobs = Path(svc.settings.artifact_dir) / "blobs"
    return models, sum(1 for p in blobs.rglob("*") if p.is_file())


def test_a_model_uploaded_in_the_audit_request_is_registered_and_audited(
    service: Service,
) -> None:
    before = _stored(service)
    desc = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32, "name": "in-audit"}
    spec = spec_for(service, LOOSE, gradcam=True)
    key = {"Idempotency-Key": "upload-1"}
    r = upload_audit(service, service.weights, spec, desc, headers=key)
    assert r.status_code == 201, r.text
    created = r.json()
    model = service.client.get(f"{API}/models/{created['model_id']}").json()
    assert model["name"] == "in-audit" and model["source"] == "uploaded"
    assert model["classes"] == CLASSES and model["info"]["parameters"] > 0
    assert (
        service.client.get(f"{API}/models/{created['model_id']}", headers=OTHER).status_code == 404
    )
    assert _stored(service) == (before[0] + 1, before[1] + 1)
    # A retry of the same request (same key, same file) is the same audit and no second model.
    again = upload_audit(service, service.weights, spec, desc, headers=key)
    assert again.status_code == 200 and again.json()["id"] == created["id"]
    spoiled = bytearray(service.weights)
    spoiled[-4:] = b"\x00\x00\x80\x7f"  # another file under the same key
    other = upload_audit(service, bytes(spoiled), spec, desc, headers=key)
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    assert _stored(service) == (before[0] + 1, before[1] + 1), "nothing kept from the replays"
    assert service.sent == [created["job_id"]]
    service.run_jobs()
    audit = service.get(created["id"])
    assert audit["passed"] is True and audit["model_id"] == created["model_id"]
    assert list(audit["figures"]) == ["robustness_curve", "class_recall", "gradcam_montage"]
    _figure(service, audit["figures"]["gradcam_montage"])
    md = service.client.get(f"{API}/audits/{audit['id']}/report", params={"format": "md"}).text
    assert f"![Grad-CAM, clean vs adversarial]({audit['figures']['gradcam_montage']})" in md


def test_bad_uploads_in_the_audit_request_store_nothing(service: Service) -> None:
    before = _stored(service)
    weights = service.weights
    spec = spec_for(service, LOOSE)
    desc = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32}
    cases: list[tuple[Any, int, str]] = [
        (upload_audit(service, b"PK\x03\x04 not safetensors", spec), 415, "safetensors"),
        (upload_audit(service, weights[:-64], spec), 422, "truncated"),
        (upload_audit(service, weights, spec, {**desc, "classes": [*CLASSES, "df"]}), 422,
         "class count"),
        (upload_audit(service, weights, spec, {**desc, "architecture": "vgg"}), 422,
         "architecture"),
        (upload_audit(service, weights, {**spec, "dataset_id": None}), 422, "dataset_id"),
        (upload_audit(service, weights, {**spec, "dataset_id": "0" * 32}), 404, "not found"),
        (upload_audit(service, weights, {**spec, "model_id": "x"}), 422, "model_id"),
        (upload_audit(service, weights, spec_for(service, [_rule("recall.df", 0.5)])), 422,
         "no such class"),
        (upload_audit(service, weights, {**spec, "eps_list": [0, 1]}), 422, "not in eps_list"),
        (upload_audit(service, weights, spec, {**desc, "classes": ["nv", "mel", "bcc"]}), 422,
         "differ"),
        (upload_audit(service, weights, spec_for(service, LOOSE, baseline={
            "model_name": "never-audited"})), 422, "no passing audit"),
        (service.client.post(f"{API}/audits", files={"weights": ("w", weights)},
                             data={"description": "{not json", "audit": json.dumps(spec)}), 422,
         "description"),
        (service.client.post(f"{API}/audits", files={"description": ("d.json", json.dumps(desc))},
                             data={"audit": json.dumps(spec)}), 422, "weights"),
        (service.client.post(f"{API}/audits", content=b"model_id=x",
                             headers={"content-type": "text/plain"}), 415, "multipart"),
    ]  # fmt: skip
    for r, status, message in cases:
        assert r.status_code == status, r.text
        assert message in json.dumps(r.json()["detail"]), r.text
    assert _stored(service) == before and service.sent == []


# ============================================================================ comparison
@pytest.fixture(scope="module")
def worse(service: Service) -> dict[str, Any]:
    """A finished audit of the spoiled model (constant predictions)."""
    return finished_audit(service, body_for(service, "derm-cnn-v2", LOOSE))


def test_compare_audits_side_by_side(
    service: Service, judged: dict[str, Any], worse: dict[str, Any], tmp_path: Path
) -> None:
    from models import plots

    query = f"audit={judged['id']}&audit={worse['id']}"
    r = service.client.get(f"{API}/compare?{query}")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert [i["label"] for i in doc["items"]] == ["derm-cnn", "derm-cnn-v2"]
    assert [i["passed"] for i in doc["items"]] == [False, False]  # judged has a failing rule
    assert doc["eps"] == [0, 1, 2] and doc["comparable"] is True and doc["notes"] == []
    assert doc["curve_url"] == f"{API}/compare/curve.png?{query}"
    reports = [service.client.get(f"{API}/audits/{a['id']}/report").json() for a in (judged, worse)]
    for item, report in zip(doc["items"], reports, strict=True):
        assert item["clean"]["balanced_accuracy"] == report["clean"]["balanced_accuracy"]
        assert item["robust"]["2"]["accuracy"] == report["robust"]["2"]["accuracy"]
        assert item["curve_auc"] == report["curve_auc"]
    assert doc["items"][1]["clean"]["balanced_accuracy"] == pytest.approx(1 / 3)
    md = service.client.get(f"{API}/compare?{query}&format=md").text
    # every figure carries its 95 % interval, here and in the Markdown
    ivs = [x["robust"]["2"]["intervals"]["accuracy"] for x in doc["items"]]
    assert all(iv["n"] == x["robust"]["2"]["n"] for iv, x in zip(ivs, doc["items"], strict=True))
    a2 = [
        f"{x['robust']['2']['accuracy']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
        for x, iv in zip(doc["items"], ivs, strict=True)
    ]
    assert (
        "| metric | derm-cnn | derm-cnn-v2 |" in md
        and f"| accuracy @ 2/255 | {a2[0]} | {a2[1]} |" in md
    )
    assert f"![Robustness curves]({doc['curve_url']})" in md
    _figure(service, doc["curve_url"])
    drawn = plots.plot_curve(reports, tmp_path / "c.png", labels=["a", "b"])
    for label, item in zip("ab", doc["items"], strict=True):
        assert drawn[label]["accuracy"][-1] == item["robust"]["2"]["accuracy"]
    # Models' latest reports, and the same model twice (labels stay distinct).
    models = service.models
    by_model = service.client.get(
        f"{API}/compare", params=[("model", models["derm-cnn"]), ("model", models["derm-cnn-v2"])]
    ).json()
    assert [i["audit_id"] for i in by_model["items"]] == [None, None]
    twice = service.client.get(
        f"{API}/compare", params=[("audit", judged["id"]), ("model", models["derm-cnn"])]
    ).json()
    assert len({i["label"] for i in twice["items"]}) == 2


def test_compare_refuses_what_it_cannot_compare(
    service: Service, judged: dict[str, Any], worse: dict[str, Any]
) -> None:
    one = service.client.get(f"{API}/compare", params={"audit": judged["id"]})
    assert one.status_code == 422 and "2 to 8" in one.json()["detail"]
    pending = service.audit(body_for(service, "derm-cnn", LOOSE)).json()["id"]
    r = service.client.get(f"{API}/compare", params=[("audit", judged["id"]), ("audit", pending)])
    assert r.status_code == 409 and "not finished" in r.json()["detail"]
    service.client.post(f"{API}/audits/{pending}/cancel")
    service.run_jobs()
    theirs = service.client.get(
        f"{API}/compare", params=[("audit", judged["id"]), ("audit", worse["id"])], headers=OTHER
    )
    assert theirs.status_code == 404
    r = service.client.get(f"{API}/compare/curve.png", params=[("audit", judged["id"])])
    assert r.status_code == 422


# ============================================================================ both databases
@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'settle.db'}"
        upgrade(url)
        yield url
        return
    from app.db.testing import fresh_postgres_database

    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        upgrade(url)
        yield url


def test_settling_is_stored_once_on_both_databases(database_url: str, tmp_path: Path) -> None:
    """The service layer without a model run: a hand-made report is registered the way the
    worker does it; two sessions settle the audit and read the same stored result."""
    from app.db.session import make_engine, make_sessionmaker
    from app.db.tables import Audit, Dataset
    from app.schemas.audits import AuditRequest
    from app.services import jobs, models_registry
    from app.services.storage import ArtifactRef, ArtifactStore

    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    try:
        with factory() as s:
            ds = Dataset(
                owner="o", name="d", source="upload", layout="class_folders", root="x",
                manifest_uri="x", manifest_sha256="a" * 64, classes=["mel", "nv"],
                class_counts={}, num_samples=2, has_masks=False,
            )  # fmt: skip
            s.add(ds)
            s.commit()
            model = models_registry.register_uploaded_model(
                s,
                owner="o",
                ref=ArtifactRef("artifact://w", 1, "b" * 64),
                description={
                    "architecture": "small_cnn",
                    "classes": ["mel", "nv"],
                    "image_size": 32,
                },
            )
            request = AuditRequest.model_validate(
                {
                    "model_id": model.id,
                    "dataset_id": ds.id,
                    "eps_list": [0, 2],
                    "thresholds": [_rule("accuracy", 0.4, eps=2), _rule("recall.mel", 0.6)],
                }
            )
            audit, created = audits.create_audit(
                s,
                lambda job_id, kind: None,
                owner="o",
                request=request.model_dump(mode="json"),
                evaluation_params=request.evaluation_params(),
                idempotency_key="k",
            )
            assert created and audits.get_audit(s, audit.id).outcome == "pending"
            again, created = audits.create_audit(
                s,
                lambda job_id, kind: None,
                owner="o",
                request=request.model_dump(mode="json"),
                evaluation_params=request.evaluation_params(),
                idempotency_key="k",
            )
            assert not created and again.id == audit.id
            job = jobs.claim_job(s, audit.job_id or "", "w", 60)
            assert job is not None
            models_registry.register_evaluation(
                s, job, model.id, _report(), store=ArtifactStore(tmp_path / "artifacts")
            )
            assert jobs.finish_job(s, job.id, "w", {})
        with factory() as a, factory() as b:
            first = audits.get_audit(a, audit.id)
            second = audits.get_audit(b, audit.id)
            assert first.outcome == second.outcome == "failed"  # mel recall 0.5 < 0.6
            assert first.result == second.result and first.finished_at == second.finished_at
            assert first.result is not None
            assert [t["passed"] for t in first.result["thresholds"]] == [True, False]
        with factory() as s:
            row = s.get(Audit, audit.id)
            assert row is not None and row.passed is False
    finally:
        engine.dispose()
