"""`dpaat audit` the way a CI job runs it, against the full deployment (Postgres, Redis, `dpaat
serve`, a `dpaat worker`): a tiny DPAAT model trained on real HAM10000 images, then the client as
a subprocess with torch, FastAPI, SQLAlchemy and Celery made unimportable. Loose thresholds exit
0 and write audit.json/.xml/.md with the figures beside them; strict ones exit 1 with one JUnit
failure per unmet threshold. Sized for 2 CPU cores (90 images at 32 px, 2 epochs, 2 PGD steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack_support import ROOT, Stack, ham_archive, running_stack, submit_train
from test_audit_client import BLOCKED_MAIN
from test_audits import png_size

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]

LOOSE = ["balanced_accuracy>=0.0", "accuracy@1>=0.0", "recall.mel@1>=0.0"]
STRICT = ["balanced_accuracy>=0.99", "accuracy@1>=0.99", "recall.mel@1>=0.0"]
CI_RUN = {"GITHUB_RUN_ID": "77", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": "robustness"}


@pytest.fixture(scope="module")
def stack(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # No prediction worker: audits never predict (one less torch process on the CI box).
    with running_stack(
        postgres_url, redis_url, tmp_path_factory.mktemp("audit-fs"), predict_workers=0
    ) as s:
        yield s


@pytest.fixture(scope="module")
def trained(stack: Stack, ham_root: Path) -> tuple[str, str]:
    """(dataset id, model id): real images uploaded, a tiny DPAAT model trained by the worker."""
    r = stack.http.post(
        stack.url("/datasets"),
        files={"file": ("ham.zip", ham_archive(ham_root), "application/zip")},
        data={"name": "ham subset"},
    )
    assert r.status_code == 201, r.text
    dataset_id = str(r.json()["id"])
    job = stack.wait_status(submit_train(stack, dataset_id)["id"], {"succeeded", "failed"}, 240)
    assert job["status"] == "succeeded", job["error"]
    return dataset_id, str(job["result"]["model_id"])


def client(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`dpaat ...` with only the client's dependencies importable, configured by environment
    variables the way a CI job passes its secrets."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DPAAT_", "GITHUB_", "CI"))}
    for name in ("DATABASE_URL", "BROKER_URL"):
        clean.pop(name, None)
    clean.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_MAIN, *args],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )


def audit(stack: Stack, trained: tuple[str, str], out: Path, rules: list[str]) -> list[str]:
    dataset_id, model_id = trained
    args = ["audit", "--model", model_id, "--dataset", dataset_id, "--eps", "0,1"]
    args += ["--attacks", "fgsm,pgd:2", "--poll", "0.5", "--timeout", "240", "--out", str(out)]
    for rule in rules:
        args += ["--threshold", rule]
    return args


def _env(stack: Stack, **extra: str) -> dict[str, str]:
    return {"DPAAT_SERVER": stack.base_url, "DPAAT_API_KEY": getattr(stack, "api_key", ""), **extra}


def _suite(path: Path) -> ET.Element:
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None
    return suite


def test_loose_thresholds_exit_0_with_the_files_and_figures(
    stack: Stack, trained: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    result = client(audit(stack, trained, out, LOOSE), _env(stack, **CI_RUN))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stderr, "the client needed a server or ML package"
    doc: dict[str, Any] = json.loads((out / "audit.json").read_text())
    assert doc["audit"]["passed"] is True and doc["audit"]["model_id"] == trained[1]
    assert doc["model"]["method"] == "dpaat" and set(doc["robust"]) == {"0", "1"}
    assert [t["observed"] for t in doc["audit"]["thresholds"]] == [
        doc["clean"]["balanced_accuracy"],
        doc["robust"]["1"]["accuracy"],
        doc["robust"]["1"]["recall"]["mel"],
    ]
    suite = _suite(out / "audit.xml")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "0", "0")
    assert len(suite.findall("testcase")) == 3 and not suite.findall("testcase/failure")
    md = (out / "audit.md").read_text()
    assert "Robustness audit passed" in md
    for name, caption in (
        ("robustness_curve", "Robustness curve"),
        ("class_recall", "Recall per class and eps"),
        ("gradcam_montage", "Grad-CAM, clean vs adversarial"),
        ("dpaat_eps_hist", "DPAAT per-sample eps during training"),
        ("dpaat_tau", "DPAAT tau history during training"),
    ):
        assert f"![{caption}]({name}.png)" in md, name
        width, height = png_size((out / f"{name}.png").read_bytes())
        assert 400 <= width <= 3000 and 250 <= height <= 3000, (name, width, height)


def test_strict_thresholds_exit_1_with_one_failure_per_unmet_rule(
    stack: Stack, trained: tuple[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    result = client(audit(stack, trained, out, STRICT), _env(stack))
    assert result.returncode == 1, result.stderr[-3000:]
    doc = json.loads((out / "audit.json").read_text())
    assert doc["audit"]["passed"] is False
    observed = [doc["clean"]["balanced_accuracy"], doc["robust"]["1"]["accuracy"]]
    assert all(v < 0.99 for v in observed), "a 2-epoch model on 90 images is not that good"
    suite = _suite(out / "audit.xml")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "2", "0")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "balanced_accuracy >= 0.99",
        "accuracy@1 >= 0.99",
        "recall.mel@1 >= 0",
    ]
    messages = [c.find("failure").get("message") for c in cases[:2]]  # type: ignore[union-attr]
    assert messages == [f"observed {v:.4f} < required 0.9900" for v in observed]
    assert cases[2].find("failure") is None
    md = (out / "audit.md").read_text()
    assert "Robustness audit FAILED" in md and "❌ FAIL" in md
    assert (out / "gradcam_montage.png").is_file() and "(gradcam_montage.png)" in md
