"""The worker in-process on SQLite: Celery configuration, claim-once, heartbeats and progress,
cancellation, the reaper, and the embedded runtime running real (tiny) training and evaluation.
The same code against Postgres + Redis with a separate worker process: tests/test_fullstack.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from app.core.settings import Settings, get_settings
from app.db.migrate import upgrade
from app.db.session import dispose_engines, session_scope
from app.db.tables import Artifact, Evaluation, Job, Model
from app.services import jobs
from app.services.storage import sha256_file
from worker import reaper, runner
from worker.celery_app import EVALUATE_TASK, REAP_TASK, TRAIN_TASK, celery_app, configure

ROOT = Path(__file__).resolve().parents[1]
# Small enough for 2 shared CPU cores: generated images, 32 px, 2 PGD steps.
TINY = {
    "image_size": 32,
    "limit": 48,
    "epochs": 2,
    "batch_size": 32,
    "pgd_steps": 2,
    "bisection_steps": 2,
    "method": "dpaat",
}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A private embedded deployment: SQLite and artifacts under tmp_path, short leases."""
    for name in ("BROKER_URL", "DPAAT_BROKER_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DPAAT_DATABASE_URL", f"sqlite:///{tmp_path / 'dpaat.db'}")
    monkeypatch.setenv("DPAAT_ARTIFACT_DIR", str(tmp_path / "artifacts"))
    monkeypatch.setenv("DPAAT_LEASE_SECONDS", "3")
    monkeypatch.setenv("DPAAT_HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("DPAAT_REAP_INTERVAL_SECONDS", "1")
    monkeypatch.setenv("DPAAT_LOST_WORKER_CONFIRM_SECONDS", "0.05")
    get_settings.cache_clear()
    dispose_engines()
    current = get_settings()
    upgrade(current.database_url)
    configure(celery_app, current)
    yield current
    dispose_engines()
    get_settings.cache_clear()


def _create(kind: str, params: dict[str, Any], owner: str = "alice") -> str:
    with session_scope() as session:
        return jobs.create_job(session, owner=owner, kind=kind, params=params).id


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return jobs.get_job(session, job_id)


def _epochs(job_id: str) -> list[int]:
    with session_scope() as session:
        return [e.epoch for e in jobs.epochs_of(session, job_id)]


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _count(model: Any, **where: Any) -> int:
    with session_scope() as session:
        conditions = [getattr(model, k) == v for k, v in where.items()]
        return int(session.scalar(select(func.count()).select_from(model).where(*conditions)) or 0)


# ---------------------------------------------------------------------------- configuration
def test_celery_configuration(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    conf = celery_app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True and conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True and not conf.result_backend
    assert conf.broker_url.startswith("memory://"), "no broker configured -> embedded transport"
    assert conf.beat_schedule["reap-jobs"]["task"] == REAP_TASK
    assert conf.beat_schedule["reap-jobs"]["schedule"] == settings.reap_interval_seconds
    # The train queue is configurable (a GPU pool): routing follows the settings.
    monkeypatch.setenv("DPAAT_TRAIN_QUEUE", "gpu")
    configure(celery_app, Settings())
    routes = celery_app.conf.task_routes
    assert routes[TRAIN_TASK]["queue"] == "gpu"
    assert routes[EVALUATE_TASK]["queue"] == "evaluate"
    assert routes[REAP_TASK]["queue"] == "default"
    import worker.tasks  # what a worker imports through the app's include list

    assert celery_app.conf.include == ["worker.tasks"] or "worker.tasks" in celery_app.conf.include
    assert {worker.tasks.train_task.name, worker.tasks.reap_task.name} <= set(celery_app.tasks)
    assert set(celery_app.tasks) >= {TRAIN_TASK, EVALUATE_TASK, REAP_TASK}


def test_switching_brokers_back_and_forth_still_sends(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    """A process that reconfigures Celery for another broker and back (the tests, a reload) must
    not pick up the pool it closed: kombu keeps pools in a global registry by broker."""
    memory = celery_app.conf.broker_url
    celery_app.send_task(REAP_TASK)  # a pool for the in-memory broker now exists
    monkeypatch.setenv("DPAAT_BROKER_URL", "memory://elsewhere")
    configure(celery_app, Settings())
    celery_app.send_task(REAP_TASK)
    monkeypatch.delenv("DPAAT_BROKER_URL")
    configure(celery_app, settings)
    assert celery_app.conf.broker_url == memory
    celery_app.send_task(REAP_TASK)  # raised "Acquire on closed pool" before the fix
    assert celery_app.control.purge() >= 1


def test_worker_parent_never_imports_torch() -> None:
    """The prefork parent imports the task modules; torch (and CUDA) belong to the children."""
    code = "import sys, worker.tasks, app.services.dispatch; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_worker_command_needs_a_broker(settings: Settings) -> None:
    from app.cli import cli

    result = CliRunner().invoke(cli, ["worker"])
    assert result.exit_code == 2
    assert "BROKER_URL" in result.output


def test_dispatch_survives_a_dead_broker(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    from app.services.dispatch import dispatch

    monkeypatch.setenv("BROKER_URL", "redis://127.0.0.1:9/0")  # nothing listens on port 9
    configure(celery_app, Settings())
    job_id = _create("train", {"config": TINY})
    start = time.monotonic()
    dispatch(job_id, "train")  # logged, not raised: the reaper re-sends queued jobs
    assert time.monotonic() - start < 15
    assert _job(job_id).status == "queued"
    with pytest.raises(ValueError, match="unknown job kind"):
        dispatch(job_id, "bake")
    configure(celery_app, settings)


# ---------------------------------------------------------------------------- hooks
def test_progress_writes_are_rate_bounded(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    from worker.hooks import JobHooks

    job_id = _create("train", {"config": TINY})
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "w1", 30) is not None
    writes: list[dict[str, Any]] = []
    original = jobs.record_progress

    def counting(session: Any, jid: str, progress: Any) -> bool:
        writes.append(dict(progress))
        return original(session, jid, progress)

    monkeypatch.setattr(jobs, "record_progress", counting)
    hooks = JobHooks(job_id, "w1", lease_seconds=30, heartbeat_seconds=10, progress_seconds=0.2)
    start = time.monotonic()
    step = 0
    while time.monotonic() - start < 1.0:
        step += 1
        hooks.on_step(1, step, 10_000, {"loss": 1.0 / step})
    assert step > 1000, "the loop itself must not be slowed down"
    assert 2 <= len(writes) <= 1.0 / 0.2 + 2
    hooks.sync()
    stored = _job(job_id).progress
    assert stored["epoch"] == 1 and stored["step"] == step and stored["phase"] == "training"


def test_hooks_see_cancel_and_lost_lease(settings: Settings) -> None:
    from worker.hooks import JobHooks

    job_id = _create("train", {"config": TINY})
    with session_scope() as session:
        assert jobs.claim_job(session, job_id, "w1", 30) is not None
    hooks = JobHooks(job_id, "w1", lease_seconds=30, heartbeat_seconds=10, progress_seconds=0)
    hooks.on_step(1, 1, 5, {})
    assert not hooks.should_stop()
    with session_scope() as session:
        jobs.request_cancel(session, job_id, "alice")
    hooks.on_step(1, 2, 5, {})
    assert hooks.should_stop() and hooks.stop_reason == "cancel"

    # A worker whose lease expired and whose job went to someone else stops and writes nothing.
    other = _create("train", {"config": TINY})
    with session_scope() as session:
        assert jobs.claim_job(session, other, "w1", 0.01) is not None
    time.sleep(0.05)
    with session_scope() as session:
        assert jobs.reap(session, max_retries=3, stale_queued_seconds=3600) == [(other, "train")]
        assert jobs.claim_job(session, other, "w2", 30) is not None
    stale = JobHooks(other, "w1", lease_seconds=30, heartbeat_seconds=10, progress_seconds=0)
    stale.on_step(1, 1, 5, {})
    assert stale.stop_reason == "lease_lost"
    stale.on_epoch_end(1, {"epoch": 1, "loss": 0.5})
    assert _epochs(other) == []
    assert _job(other).worker_id == "w2"


# ---------------------------------------------------------------------------- runner
def test_a_job_delivered_twice_runs_once(settings: Settings) -> None:
    job_id = _create("train", {"config": TINY, "name": "twice"})
    outcomes: list[str] = []
    threads = [
        threading.Thread(target=lambda h=h: outcomes.append(runner.run_train_job(job_id, h)))
        for h in ("worker-a", "worker-b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(outcomes) == ["skipped", "succeeded"]
    job = _job(job_id)
    assert job.status == "succeeded" and job.result is not None
    assert _epochs(job_id) == [1, 2]
    assert job.result["epochs_this_run"] == 2 and job.result["resumed_from_epoch"] == 0
    assert _count(Model, job_id=job_id) == 1
    with session_scope() as session:
        model = session.get(Model, job.result["model_id"])
        assert model is not None and model.name == "twice" and model.training_method == "dpaat"
        artifact = session.scalars(
            select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
        ).one()
        path = Path(settings.artifact_dir) / "jobs" / job_id / "checkpoint.pt"
        assert artifact.sha256 == sha256_file(path) == model.checkpoint_sha256
    # A late third delivery finds nothing to claim either.
    assert runner.run_train_job(job_id, "worker-c") == "skipped"


def test_cancel_stops_training_and_keeps_the_checkpoint(settings: Settings) -> None:
    job_id = _create("train", {"config": {**TINY, "epochs": 200}})
    outcome: list[str] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run_train_job(job_id, "w")))
    thread.start()
    _wait(lambda: len(_epochs(job_id)) >= 1, 120, "the first epoch")
    with session_scope() as session:
        jobs.request_cancel(session, job_id, "alice")
    asked = time.monotonic()
    thread.join(timeout=60)
    assert outcome == ["cancelled"]
    assert time.monotonic() - asked < 10, "a cancel is seen within about a second of steps"
    job = _job(job_id)
    assert job.status == "cancelled" and len(_epochs(job_id)) < 200
    checkpoint = Path(settings.artifact_dir) / "jobs" / job_id / "checkpoint.pt"
    assert checkpoint.is_file()
    with session_scope() as session:
        kept = session.scalars(select(Artifact).where(Artifact.job_id == job_id)).one()
    assert kept.kind == "checkpoint" and kept.sha256 == sha256_file(checkpoint)
    assert _count(Model, job_id=job_id) == 0, "a cancelled run registers no model"


def test_a_bad_config_fails_the_job_with_its_message(settings: Settings) -> None:
    job_id = _create("train", {"config": {**TINY, "arch": "no_such_net"}})
    assert runner.run_train_job(job_id, "w") == "failed"
    job = _job(job_id)
    assert job.status == "failed" and job.error is not None and "no_such_net" in job.error


def test_client_config_cannot_name_server_files(settings: Settings) -> None:
    job_id = _create(
        "train",
        {"config": {**TINY, "data_root": "/etc", "pretrained": "/etc/passwd", "device": "cuda"}},
    )
    with session_scope() as session:
        config = runner.train_config(session, jobs.get_job(session, job_id), _store(settings))
    assert config["data_root"] is None and config["manifest"] is None
    assert "pretrained" not in config and config["device"] == "auto"


def _store(settings: Settings) -> Any:
    from app.services.storage import ArtifactStore

    return ArtifactStore(settings.artifact_dir)


# ---------------------------------------------------------------------------- reaper
def test_reaper_requeues_dead_workers_jobs_and_resends_lost_messages(
    monkeypatch: pytest.MonkeyPatch, settings: Settings
) -> None:
    sent: list[tuple[str, str]] = []
    monkeypatch.setattr(reaper, "dispatch", lambda job_id, kind: sent.append((job_id, kind)))
    dead = _create("train", {"config": TINY})
    lost = _create("evaluate", {"model_id": "m"})
    with session_scope() as session:
        assert jobs.claim_job(session, dead, "gone", 0.01) is not None
    time.sleep(0.05)
    assert reaper.reap_and_redispatch(settings) == []  # first sight: shown on the job
    assert _job(dead).progress["lost_worker"]["suspected"] is True
    time.sleep(0.1)  # no heartbeat within the confirmation
    assert reaper.reap_and_redispatch(settings) == [(dead, "train")]
    job = _job(dead)
    assert job.status == "queued" and job.retries == 1 and job.worker_id is None
    # At embedded start-up every queued job is re-sent (the in-memory queue died with the process).
    assert sorted(reaper.reap_and_redispatch(settings, stale_queued_seconds=0)) == sorted(
        [(dead, "train"), (lost, "evaluate")]
    )
    assert sent[0] == (dead, "train") and len(sent) == 3


# ---------------------------------------------------------------------------- embedded runtime
def test_embedded_runtime_trains_evaluates_and_resumes_after_a_restart(settings: Settings) -> None:
    """The embedded mode end to end: a queued job left by a previous process is picked up at
    start, dispatch() reaches the in-process worker, a shutdown interrupts training, and the next
    start resumes it from its checkpoint without redoing finished epochs."""
    from app.services.dispatch import dispatch
    from app.services.embedded import EmbeddedRuntime

    epochs = 3
    job_id = _create("train", {"config": {**TINY, "epochs": epochs}})  # queued before any worker
    runtime = EmbeddedRuntime(settings)
    runtime.start()
    try:
        _wait(lambda: len(_epochs(job_id)) >= 1, 120, "the first epoch")
    finally:
        runtime.stop(timeout=60)
    assert not runtime.running
    from worker import hooks

    assert not hooks.SHUTDOWN.is_set(), "a stopped runtime must not stop later jobs"
    interrupted = _job(job_id)
    assert interrupted.status == "running", "a shutdown is not a failure"
    done_before = len(_epochs(job_id))
    assert done_before < epochs

    with EmbeddedRuntime(settings):  # the reaper re-queues it (lease expired at shutdown)
        _wait(lambda: _job(job_id).status == "succeeded", 180, "the resumed job")
        job = _job(job_id)
        assert job.result is not None and job.retries == 1
        assert job.result["resumed_from_epoch"] == done_before
        assert job.result["epochs_this_run"] == epochs - done_before
        assert _epochs(job_id) == list(range(1, epochs + 1))

        eval_id = _create(
            "evaluate",
            {
                "model_id": job.result["model_id"],
                "part": "test",
                "limit": 8,
                "eps_list": [0.0, 2.0],
                "attacks": [{"name": "fgsm", "steps": None}, {"name": "pgd", "steps": 2}],
                "gradcam": False,
            },
        )
        dispatch(eval_id, "evaluate")
        _wait(lambda: _job(eval_id).status in ("succeeded", "failed"), 180, "the evaluation")
    evaluation = _job(eval_id)
    assert evaluation.status == "succeeded", evaluation.error
    assert evaluation.result is not None
    with session_scope() as session:
        row = session.get(Evaluation, evaluation.result["evaluation_id"])
        assert row is not None and row.job_id == eval_id
        assert row.report["verdict"] == evaluation.result["verdict"]
        kinds = set(session.scalars(select(Artifact.kind).where(Artifact.job_id == eval_id)))
    assert {"report_json", "report_md", "report_plot"} <= kinds


def test_dpaat_serve_with_no_configuration_runs_jobs_in_process(tmp_path: Path) -> None:
    """`dpaat serve` on a bare environment: SQLite and artifacts under ./var, migrations applied
    at start, and a training job run by the in-process worker; SIGTERM stops it cleanly."""
    import os
    import signal
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAAT_")}
    for name in ("DATABASE_URL", "BROKER_URL"):
        env.pop(name, None)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from app.cli import main; main()", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=30) as http:

            def up() -> bool:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    return http.get(f"{base}/health/ready").status_code == 200
                except httpx.HTTPError:
                    return False

            _wait(up, 90, "dpaat serve")
            ready = http.get(f"{base}/health/ready").json()
            assert ready["checks"]["broker"].startswith("embedded")
            r = http.post(f"{base}/api/v1/jobs/train", json={"config": TINY})
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]

            def finished() -> bool:
                status = http.get(f"{base}/api/v1/jobs/{job_id}").json()["status"]
                return status in ("succeeded", "failed", "cancelled")

            _wait(finished, 180, "the job")
            job = http.get(f"{base}/api/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job["error"]
            assert [e["epoch"] for e in job["epochs"]] == [1, 2]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    assert (tmp_path / "var" / "dpaat.db").is_file()
    assert (tmp_path / "var" / "artifacts" / "jobs" / job_id / "checkpoint.pt").is_file()
