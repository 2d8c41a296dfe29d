"""`dpaat audit`, the CI client, against a real running `dpaat serve` (embedded worker, SQLite):
exit codes 0/1/2/3/4, the three files it writes (JUnit parsed back, audit.json with the report's
sections), Idempotency-Key reuse within a CI run, and the client running with torch, FastAPI,
SQLAlchemy and Celery made unimportable (what a CI image with only `dpaat[client]` has)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_audits import CLASSES, safetensors_of, write_dataset

from app.client.audit import ci_idempotency_key, parse_attacks
from app.client.thresholds import parse_threshold

ROOT = Path(__file__).resolve().parents[1]
KEY = "ci-key"
# Runs `dpaat` with the server and ML packages blocked, then lists any that got imported anyway.
BLOCKED_MAIN = """
import importlib.abc, sys
BLOCKED = {"torch", "torchvision", "fastapi", "sqlalchemy", "celery", "numpy", "starlette"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the CI client must not need it")
        return None
sys.meta_path.insert(0, Block())
from app.cli import cli
try:
    cli(sys.argv[1:], prog_name="dpaat")
finally:
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("imported:", leaked, file=sys.stderr)
"""
# 40 attack runs of 200 steps: long enough to cancel, and a cancel is seen after the current run.
SLOW = ",".join(["pgd:200"] * 8)
SLOW_EPS = "0,1,2,4,8,16"
LOOSE = ["balanced_accuracy>=0.6", "accuracy@2>=0.4", "recall.mel@1>=0.5", "verdict!=fail"]


def test_threshold_and_attack_syntax() -> None:
    assert parse_threshold("accuracy@2>=0.4") == {
        "metric": "accuracy",
        "eps": 2.0,
        "op": ">=",
        "value": 0.4,
    }
    assert parse_threshold(" recall.mel@0.5 >= 0.5 ")["eps"] == 0.5
    assert parse_threshold("balanced_accuracy>=0.6")["eps"] is None
    assert parse_threshold("verdict!=fail") == {
        "metric": "verdict",
        "eps": None,
        "op": "!=",
        "value": "fail",
    }
    for bad in ("accuracy>>0.4", "accuracy>=high", "@2>=0.4", ""):
        with pytest.raises(ValueError):
            parse_threshold(bad)
    assert parse_attacks("fgsm, pgd:10,square:300") == [
        {"name": "fgsm"},
        {"name": "pgd", "steps": 10},
        {"name": "square", "n_queries": 300},
    ]
    # presets expand without torch: AutoAttack's budgets with our attacks, or the reference
    full = parse_attacks("full")
    assert {"name": "apgd-t", "steps": 100} in full and {
        "name": "square",
        "n_queries": 5000,
    } in full
    assert parse_attacks("autoattack") == [{"name": "autoattack"}]


def test_idempotency_key_follows_the_ci_run() -> None:
    body = {"model_id": "m", "thresholds": [parse_threshold("accuracy>=0.5")]}
    run = {"GITHUB_RUN_ID": "7", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": "audit"}
    key = ci_idempotency_key(body, run)
    assert key == ci_idempotency_key(body, dict(run)) and len(key) <= 200
    assert key != ci_idempotency_key(body, {**run, "GITHUB_RUN_ATTEMPT": "2"}), "a re-run"
    assert key != ci_idempotency_key({**body, "model_id": "n"}, run), "other arguments"
    gitlab = {"CI_PIPELINE_ID": "9", "CI_JOB_ID": "11", "CI_JOB_NAME": "audit"}
    assert ci_idempotency_key(body, gitlab) == ci_idempotency_key(body, dict(gitlab))
    assert ci_idempotency_key(body, {}) != ci_idempotency_key(body, {}), "outside CI: random"


def test_the_cli_imports_no_server_or_ml_package() -> None:
    """`from app.cli import cli` (what the `dpaat` script runs) pulls in none of them, and
    `dpaat audit --help` works when they cannot be imported at all."""
    code = (
        "import sys; from app.cli import cli; import app.client.audit; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'fastapi', 'sqlalchemy', 'celery', 'numpy', 'starlette'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout
    result = run_client(["audit", "--help"])
    assert result.returncode == 0 and "--threshold" in result.stdout
    assert "imported: []" in result.stderr


def test_ml_commands_without_torch_say_which_extra_to_install() -> None:
    """A client-only install (no torch) lists `dpaat train`; running it: one error line, exit 2."""
    code = (
        "import importlib.abc, sys\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "sys.argv = ['dpaat', 'train', '--limit', '16']\n"
        "from app.cli import main\n"
        "main()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'dpaat[server]'" in out.stderr and "Traceback" not in out.stderr


def test_ci_examples_install_the_client_run_the_audit_and_keep_the_files() -> None:
    import yaml

    github = yaml.safe_load((ROOT / "docs/ci/github-actions.yml").read_text())
    steps = github["jobs"]["audit"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    assert 'pip install "dpaat[client]"' in runs and "dpaat audit" in runs
    upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and upload["with"]["path"] == "audit/"
    audit_step = next(s for s in steps if "dpaat audit" in s.get("run", ""))
    assert "continue-on-error" not in audit_step, "a failed audit must fail the workflow"
    gitlab = yaml.safe_load((ROOT / "docs/ci/gitlab-ci.yml").read_text())["robustness-audit"]
    assert any("dpaat[client]" in line for line in gitlab["before_script"])
    assert any("dpaat audit" in line for line in gitlab["script"])
    assert "allow_failure" not in gitlab
    assert gitlab["artifacts"]["when"] == "always" and "audit/" in gitlab["artifacts"]["paths"]
    assert gitlab["artifacts"]["reports"]["junit"] == "audit/audit.xml"
    for text in (runs, "\n".join(gitlab["script"])):
        for rule in ("balanced_accuracy>=0.60", "accuracy@2>=0.40", "recall.mel@1>=0.50"):
            assert parse_threshold(rule) and rule in text


# ============================================================================ a real server
@dataclass
class Server:
    url: str
    models: dict[str, str]
    dataset_id: str
    http: httpx.Client
    weights: Path  # the trained model as safetensors, for --weights
    info: Path  # its description, for --model-info

    def audits(self, model: str) -> list[dict[str, Any]]:
        r = self.http.get("/api/v1/audits", params={"model_id": self.models[model]})
        items: list[dict[str, Any]] = r.json()["items"]
        return items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _clean_env() -> dict[str, str]:
    """This process's environment without CI run variables or service settings."""
    skip = ("DPAAT_", "GITHUB_", "CI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    for name in ("DATABASE_URL", "BROKER_URL", "CI"):
        env.pop(name, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dpaat serve` on a free port with a registered dataset, a small CNN trained here and the
    same CNN spoiled, both uploaded by the API key ``KEY``."""
    from models.api import train

    tmp = tmp_path_factory.mktemp("audit-client")
    data_root = tmp / "server-data"
    write_dataset(data_root / "derm")
    port = _free_port()
    env = _clean_env()
    env.update(
        DPAAT_DATABASE_URL=f"sqlite:///{tmp / 'dpaat.db'}",
        DPAAT_ARTIFACT_DIR=str(tmp / "artifacts"),
        DPAAT_DATA_ROOTS=json.dumps([str(data_root)]),
    )
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"],
        cwd=tmp,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=60)
    try:
        # Train while the service starts.
        from models.data import build_manifest, load_samples, write_manifest

        split = build_manifest(load_samples(data_root / "derm"), seed=0)
        manifest = write_manifest(split, tmp / "split.json")
        config = {
            "data_root": str(data_root / "derm"),
            "manifest": str(manifest),
            "image_size": 32,
            "method": "standard",
            "epochs": 5,
            "batch_size": 16,
            "augment": False,
        }
        checkpoint = Path(train(config, tmp / "train").checkpoint)
        weights, info = tmp / "model.safetensors", tmp / "model.json"
        weights.write_bytes(safetensors_of(checkpoint))
        desc = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32, "name": "ci"}
        info.write_text(json.dumps(desc))

        def up() -> bool:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            try:
                return http.get("/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 120, "dpaat serve")
        r = http.post("/api/v1/datasets/register", json={"path": str(data_root / "derm")})
        assert r.status_code == 201, r.text
        models = {}
        for name, spoil in (("derm-cnn", False), ("derm-cnn-v2", True)):
            desc = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 32, "name": name}
            r = http.post(
                "/api/v1/models",
                files={"weights": ("w.safetensors", safetensors_of(checkpoint, spoil))},
                data={"description": json.dumps(desc)},
            )
            assert r.status_code == 201, r.text
            models[name] = r.json()["id"]
        yield Server(url, models, _dataset_id(http), http, weights, info)
    finally:
        http.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def _dataset_id(http: httpx.Client) -> str:
    items = http.get("/api/v1/datasets").json()["items"]
    return str(items[0]["id"])


def audit_args(
    srv: Server, model: str, out: Path, *rules: str, extra: tuple[str, ...] = ()
) -> list[str]:
    args = ["audit", "--server", srv.url, "--model", srv.models[model], "--dataset", srv.dataset_id]
    args += ["--eps", "0,1,2", "--no-gradcam", "--poll", "0.3", "--out", str(out)]
    for rule in rules:
        args += ["--threshold", rule]
    return args + list(extra)


def run_client(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    full_env = {**_clean_env(), "DPAAT_API_KEY": KEY, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", BLOCKED_MAIN, *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_client(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", BLOCKED_MAIN, *args],
        cwd=ROOT,
        env={**_clean_env(), "DPAAT_API_KEY": KEY},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


def junit(path: Path) -> ET.Element:
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    return suite


CI_RUN = {"GITHUB_RUN_ID": "1234", "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": "robustness"}


@pytest.fixture(scope="module")
def loose(server: Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("loose")
    result = run_client(
        audit_args(server, "derm-cnn", out, *LOOSE, extra=("--attacks", "fgsm,pgd:3")), CI_RUN
    )
    return out, result


def test_loose_thresholds_pass_with_exit_0_and_three_files(
    server: Server, loose: tuple[Path, Any]
) -> None:
    out, result = loose
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stderr, "the client imported a server or ML package"
    doc = json.loads((out / "audit.json").read_text())
    for key in ("model", "dataset", "threat_model", "clean", "robust", "curve_auc", "checks"):
        assert key in doc
    assert doc["verdict"] in ("pass", "warn", "fail") and set(doc["robust"]) == {"0", "1", "2"}
    assert doc["audit"]["passed"] is True
    assert [t["name"] for t in doc["audit"]["thresholds"]] == [
        "balanced_accuracy >= 0.6",
        "accuracy@2 >= 0.4",
        "recall.mel@1 >= 0.5",
        "verdict != fail",
    ]
    assert doc["audit"]["thresholds"][1]["observed"] == doc["robust"]["2"]["accuracy"]
    suite = junit(out / "audit.xml")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "0", "0")
    assert len(suite.findall("testcase")) == 4
    md = (out / "audit.md").read_text()
    assert "Robustness audit passed" in md and "![Robustness curve](robustness_curve.png)" in md
    assert "![Recall per class and eps](class_recall.png)" in md, "figures linked beside it"
    for name in ("robustness_curve.png", "class_recall.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    at2 = doc["robust"]["2"]
    iv = at2["intervals"]["accuracy"]
    cell = f"| 2 | {at2['accuracy']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] |"
    assert cell in md, "the curve's numbers, with their 95 % intervals"


def test_the_same_ci_run_reuses_its_audit(server: Server, loose: tuple[Path, Any]) -> None:
    out, _ = loose
    first = json.loads((out / "audit.json").read_text())["audit"]["id"]
    before = len(server.audits("derm-cnn"))
    args = audit_args(server, "derm-cnn", out, *LOOSE, extra=("--attacks", "fgsm,pgd:3"))
    result = run_client(args, CI_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "audit.json").read_text())["audit"]["id"] == first
    assert len(server.audits("derm-cnn")) == before, "no second audit for the same CI run"


def test_strict_thresholds_and_regression_fail_with_exit_1(
    server: Server, loose: tuple[Path, Any], tmp_path: Path
) -> None:
    assert loose[1].returncode == 0  # the passing audit of "derm-cnn" is the baseline
    extra = ("--attacks", "fgsm,pgd:3", "--baseline-model", "derm-cnn", "--max-drop", "0.02")
    args = audit_args(server, "derm-cnn-v2", tmp_path, "balanced_accuracy>=0.6", extra=extra)
    result = run_client(args)
    assert result.returncode == 1, result.stderr[-3000:]
    doc = json.loads((tmp_path / "audit.json").read_text())
    observed = doc["clean"]["balanced_accuracy"]
    assert doc["audit"]["passed"] is False and observed < 0.6
    suite = junit(tmp_path / "audit.xml")
    assert (suite.get("tests"), suite.get("failures")) == ("2", "2")
    threshold, regression = suite.findall("testcase")
    failure = threshold.find("failure")
    assert failure is not None
    assert failure.get("message") == f"observed {observed:.4f} < required 0.6000"
    assert regression.get("classname") == "dpaat.audit.regression"
    message = regression.find("failure").get("message")  # type: ignore[union-attr]
    assert message is not None and message.startswith(f"observed {observed:.4f}, baseline ")
    md = (tmp_path / "audit.md").read_text()
    assert "Robustness audit FAILED" in md and "### Regression against audit" in md


def test_a_cancelled_job_gives_exit_2(server: Server, tmp_path: Path) -> None:
    before = {a["id"] for a in server.audits("derm-cnn")}
    args = audit_args(server, "derm-cnn", tmp_path, *LOOSE, extra=("--attacks", SLOW))
    proc = start_client([*args, "--eps", SLOW_EPS, "--timeout", "300"], tmp_path / "client.log")
    try:
        new: list[str] = []

        def submitted() -> bool:
            new[:] = [a["id"] for a in server.audits("derm-cnn") if a["id"] not in before]
            return bool(new)

        _wait(submitted, 60, "the audit")
        r = server.http.post(f"/api/v1/audits/{new[0]}/cancel")
        assert r.status_code == 202, r.text
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 2, (tmp_path / "client.log").read_text()[-3000:]
    suite = junit(tmp_path / "audit.xml")
    assert (suite.get("tests"), suite.get("errors")) == ("1", "1")
    assert json.loads((tmp_path / "audit.json").read_text())["audit"]["status"] == "cancelled"


def test_an_interrupted_client_cancels_its_audit(server: Server, tmp_path: Path) -> None:
    """CI cancelling the pipeline (SIGTERM) must not leave the evaluation running."""
    before = {a["id"] for a in server.audits("derm-cnn")}
    args = audit_args(server, "derm-cnn", tmp_path, *LOOSE, extra=("--attacks", SLOW))
    proc = start_client([*args, "--eps", SLOW_EPS, "--timeout", "300"], tmp_path / "client.log")
    try:
        _wait(lambda: bool({a["id"] for a in server.audits("derm-cnn")} - before), 60, "the audit")
        time.sleep(1.0)  # the client is polling now
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 2, (tmp_path / "client.log").read_text()[-3000:]
    (new,) = {a["id"] for a in server.audits("derm-cnn")} - before
    _wait(
        lambda: server.http.get(f"/api/v1/audits/{new}").json()["status"] == "cancelled",
        120,
        "the cancellation",
    )


def test_timing_out_gives_exit_3(server: Server, tmp_path: Path) -> None:
    # A job of minutes; the worker is freed by cancelling it afterwards.
    args = audit_args(server, "derm-cnn", tmp_path, *LOOSE, extra=("--attacks", SLOW))
    started = time.monotonic()
    result = run_client([*args, "--eps", SLOW_EPS, "--timeout", "1"])
    assert result.returncode == 3, result.stderr[-3000:]
    assert time.monotonic() - started < 60
    assert "timed out" in result.stderr
    # issue 14: the files say the audit did not finish, so a CI JUnit step has an error to show
    doc = json.loads((tmp_path / "audit.json").read_text())
    assert doc["finished"] is False and "timed out after 1 s" in doc["reason"]
    error = ET.parse(tmp_path / "audit.xml").getroot().find(".//testcase/error")
    assert error is not None and error.get("type") == "timeout"
    assert "did not finish" in (tmp_path / "audit.md").read_text()
    found = re.search(r"audit ([0-9a-f]{32}) is still running", result.stderr.replace("\n", " "))
    assert found is not None, result.stderr
    url = f"/api/v1/audits/{found.group(1)}"
    server.http.post(f"{url}/cancel")  # free the worker (409 when it has just finished)
    _wait(
        lambda: server.http.get(url).json()["status"] in ("cancelled", "succeeded"),
        120,
        "the end of the timed-out audit",
    )


def test_usage_connection_and_key_errors_give_exit_4(server: Server, tmp_path: Path) -> None:
    args = audit_args(server, "derm-cnn", tmp_path, *LOOSE)
    unreachable = [*args]
    unreachable[unreachable.index("--server") + 1] = f"http://127.0.0.1:{_free_port()}"
    result = run_client(unreachable)
    assert result.returncode == 4 and "cannot reach" in result.stderr, result.stderr[-2000:]
    result = run_client(args, {"DPAAT_API_KEY": "a-key-that-owns-nothing"})
    assert result.returncode == 4 and "404" in result.stderr, result.stderr[-2000:]
    result = run_client(audit_args(server, "derm-cnn", tmp_path, "accuracy>>0.4"))
    assert result.returncode == 4 and "cannot read threshold" in result.stderr
    result = run_client([a for a in args if a != "--server" and a != server.url])
    assert result.returncode == 4 and "--server" in result.stderr
    result = run_client(audit_args(server, "derm-cnn", tmp_path, "accuracy@4>=0.4"))
    assert result.returncode == 4 and "not in eps_list" in result.stderr
    assert not (tmp_path / "audit.json").exists()


def test_a_model_file_is_uploaded_audited_and_compared(
    server: Server, loose: tuple[Path, Any], tmp_path: Path
) -> None:
    """`--weights --model-info`: the CI step starts from a model file; then `dpaat compare`."""
    out = tmp_path / "audit"
    args = audit_args(server, "derm-cnn", out, *LOOSE, extra=("--attacks", "fgsm,pgd:3"))
    at = args.index("--model")
    upload = [*args[:at], "--weights", str(server.weights), "--model-info", str(server.info)]
    upload += args[at + 2 :]
    result = run_client(upload, CI_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stderr and "uploaded model.safetensors" in result.stderr
    doc = json.loads((out / "audit.json").read_text())
    model_id = doc["audit"]["model_id"]
    assert model_id not in server.models.values()
    assert server.http.get(f"/api/v1/models/{model_id}").json()["name"] == "ci"
    # The same CI step retried: the same audit, no second model.
    models_before = server.http.get("/api/v1/models").json()["total"]
    again = run_client(upload, CI_RUN)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "audit.json").read_text())["audit"]["id"] == doc["audit"]["id"]
    assert server.http.get("/api/v1/models").json()["total"] == models_before

    # Side by side with the registered model's audit: same weights, same numbers.
    first = json.loads((loose[0] / "audit.json").read_text())["audit"]["id"]
    cmp_out = tmp_path / "compare"
    cmp = run_client(["compare", first, doc["audit"]["id"], "--server", server.url,
                      "--out", str(cmp_out)])  # fmt: skip
    assert cmp.returncode == 0, cmp.stderr[-3000:]
    assert "imported: []" in cmp.stderr
    comparison = json.loads((cmp_out / "compare.json").read_text())
    assert [i["label"] for i in comparison["items"]] == ["derm-cnn", "ci"]
    a, b = comparison["items"]
    assert a["robust"]["2"]["accuracy"] == b["robust"]["2"]["accuracy"], "same weights"
    md = (cmp_out / "compare.md").read_text()
    assert "![Robustness curves](compare_curve.png)" in md and "| metric | derm-cnn | ci |" in md
    assert (cmp_out / "compare_curve.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Usage errors: one id, an unknown id, --weights without --model-info, --model and --weights.
    for bad, needle in (
        (["compare", first, "--server", server.url], "2 to 8"),
        (["compare", first, "0" * 32, "--server", server.url], "404"),
        ([*upload[: upload.index("--model-info")], *upload[upload.index("--model-info") + 2 :]],
         "--model-info"),
        ([*upload, "--model", server.models["derm-cnn"]], "--model ID, or --weights"),
    ):  # fmt: skip
        r = run_client(bad)
        assert r.returncode == 4 and needle in r.stderr, r.stderr[-2000:]
