"""The full deployment on the real services: a fresh Postgres database, a private Redis database
and queue names, ``dpaat migrate``, ``dpaat serve`` (uvicorn, a subprocess) and separate
``dpaat worker`` processes (prefork, with the reaper on Celery beat).

Scenarios: upload real HAM10000 images -> train DPAAT -> evaluate -> predict through HTTP; the same
task delivered twice runs once; cancelling a running job; a worker killed with SIGKILL in the
middle of training, its job re-queued by the reaper and finished by a new worker from the last
checkpoint. Sized for 2 CPU cores: ~90 images at 32 px, 2 PGD steps.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from celery import Celery
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db.tables import JobEpoch
from app.services import jobs

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("bkl", "mel", "nv")
PER_CLASS = 30
LEASE_SECONDS = 5
TINY = {
    "image_size": 32,
    "batch_size": 16,
    "pgd_steps": 2,
    "bisection_steps": 2,
    "method": "dpaat",
    "epochs": 2,
}


def _dpaat(*args: str) -> list[str]:
    """The ``dpaat`` console script, run by this interpreter (no install needed)."""
    return [sys.executable, "-c", "from app.cli import main; main()", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Stack:
    """The processes of one test session and how to reach them."""

    env: dict[str, str]
    base_url: str
    database_url: str
    broker_url: str
    artifact_dir: Path
    logs: Path
    engine: Engine
    api: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    worker_log: Path | None = None
    workers_started: int = 0
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))

    # -------------------------------------------------------------- processes
    def _spawn(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            # Own process group: SIGKILL reaches the prefork children too, like a dead machine.
            proc = subprocess.Popen(
                _dpaat(*args),
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return proc, log

    def start_api(self) -> None:
        port = int(self.base_url.rsplit(":", 1)[1])
        self.api, log = self._spawn("api", "serve", "--port", str(port), "--log-level", "warning")

        def ready() -> bool:
            assert self.api is not None and self.api.poll() is None, log.read_text()[-3000:]
            try:
                return self.http.get(f"{self.base_url}/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, 90, "the API", every=0.3)

    def start_worker(self, concurrency: int = 2) -> None:
        self.workers_started += 1
        name = f"worker{self.workers_started}"
        self.worker, self.worker_log = self._spawn(
            name,
            "worker",
            "--beat",
            "--concurrency",
            str(concurrency),
            "--hostname",
            f"{name}@fullstack",
        )
        log = self.worker_log

        def ready() -> bool:
            assert self.worker is not None and self.worker.poll() is None, log.read_text()[-3000:]
            return " ready." in log.read_text(errors="replace")

        _wait(ready, 90, "the worker", every=0.3)

    def kill_worker(self) -> None:
        """SIGKILL the worker and its children: no warm shutdown, no acknowledgement."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)

    def stop(self) -> None:
        for proc in (self.worker, self.api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.http.close()

    # -------------------------------------------------------------- HTTP and database
    def url(self, path: str) -> str:
        return f"{self.base_url}/api/v1{path}"

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(self.url(f"/jobs/{job_id}"))
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
        seen: list[dict[str, Any]] = []

        def reached() -> bool:
            seen.append(self.job(job_id))
            return seen[-1]["status"] in statuses

        _wait(reached, timeout, f"job {job_id} to reach {statuses}", every=0.2)
        return seen[-1]

    def epoch_rows(self, job_id: str) -> list[JobEpoch]:
        with Session(self.engine) as session:
            return list(
                session.scalars(
                    select(JobEpoch).where(JobEpoch.job_id == job_id).order_by(JobEpoch.epoch)
                )
            )

    def worker_log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("worker*.log")))


def _admin_conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def stack(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tag = uuid.uuid4().hex[:10]
    db_name = f"dpaat_fs_{tag}"
    admin = _admin_conninfo(postgres_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    database_url = make_url(postgres_url).set(database=db_name).render_as_string(False)
    # A Redis database of its own and private queue names: parallel sessions never collide.
    redis_db = 2 + int(tag, 16) % 14
    broker_url = str(
        make_url(redis_url.replace("redis://", "redis+x://")).set(database=str(redis_db))
    )
    broker_url = broker_url.replace("redis+x://", "redis://")
    tmp = tmp_path_factory.mktemp("fullstack")
    logs = tmp / "logs"
    logs.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("DPAAT_") or k == "DPAAT_DATA_ROOT"
    }
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    env.update(
        {
            "DATABASE_URL": database_url,
            "BROKER_URL": broker_url,
            "DPAAT_ARTIFACT_DIR": str(tmp / "artifacts"),
            "DPAAT_ENVIRONMENT": "test",
            "DPAAT_LEASE_SECONDS": str(LEASE_SECONDS),
            "DPAAT_HEARTBEAT_SECONDS": "1",
            "DPAAT_REAP_INTERVAL_SECONDS": "1",
            "DPAAT_STALE_QUEUED_SECONDS": "60",
            "DPAAT_TRAIN_QUEUE": f"fs_{tag}_train",
            "DPAAT_EVALUATE_QUEUE": f"fs_{tag}_evaluate",
            "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1",  # two worker children and the API share 2 cores
        }
    )
    engine = create_engine(database_url)
    s = Stack(
        env=env,
        base_url=f"http://127.0.0.1:{_free_port()}",
        database_url=database_url,
        broker_url=broker_url,
        artifact_dir=tmp / "artifacts",
        logs=logs,
        engine=engine,
    )
    try:
        migrate = subprocess.run(_dpaat("migrate"), cwd=ROOT, env=env, capture_output=True)
        assert migrate.returncode == 0, migrate.stderr.decode()[-3000:]
        s.start_api()
        s.start_worker()
        yield s
    finally:
        s.stop()
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        client = redis.Redis.from_url(broker_url)
        for pattern in (f"*fs_{tag}_*", "unacked*", "_kombu.binding.default"):
            keys = list(client.scan_iter(match=pattern))
            if keys:
                client.delete(*keys)
        client.close()


def _ham_archive(ham_root: Path) -> bytes:
    """A class-per-folder zip of real HAM10000 images (PER_CLASS per class, one per lesion)."""
    picked: dict[str, list[str]] = {c: [] for c in CLASSES}
    lesions: set[str] = set()
    with (ham_root / "labels.csv").open() as f:
        for row in csv.DictReader(f):
            dx, lesion = row["dx"], row["lesion_id"]
            if dx in picked and len(picked[dx]) < PER_CLASS and lesion not in lesions:
                lesions.add(lesion)
                picked[dx].append(row["image_id"])
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for dx, ids in picked.items():
            assert len(ids) == PER_CLASS
            for image_id in ids:
                zf.write(ham_root / "images" / f"{image_id}.jpg", f"{dx}/{image_id}.jpg")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset_id(stack: Stack, ham_root: Path) -> str:
    r = stack.http.post(
        stack.url("/datasets"),
        files={"file": ("ham-subset.zip", _ham_archive(ham_root), "application/zip")},
        data={"name": "ham subset"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert sorted(body["classes"]) == sorted(CLASSES)
    return str(body["id"])


def _submit_train(stack: Stack, dataset_id: str, **config: Any) -> dict[str, Any]:
    r = stack.http.post(
        stack.url("/jobs/train"),
        json={"dataset_id": dataset_id, "config": {**TINY, **config}, "name": "fullstack"},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_upload_train_evaluate_predict(stack: Stack, dataset_id: str, ham_root: Path) -> None:
    submitted = _submit_train(stack, dataset_id)
    job_id = submitted["id"]
    statuses = [submitted["status"]]

    def finished() -> bool:
        status = stack.job(job_id)["status"]
        if status != statuses[-1]:
            statuses.append(status)
        return status in ("succeeded", "failed", "cancelled")

    _wait(finished, 240, "training", every=0.1)
    job = stack.job(job_id)
    assert statuses == ["queued", "running", "succeeded"], (statuses, job["error"])

    # Per-epoch metrics with DPAAT's vital signs.
    assert [e["epoch"] for e in job["epochs"]] == [1, 2]
    for epoch in job["epochs"]:
        assert {"loss", "val_acc", "tau", "broken_frac"} <= set(epoch["metrics"])
        hist = epoch["metrics"]["eps_hist"]
        assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) > 0
    assert job["vital_signs"] is not None and len(job["vital_signs"]["tau"]) == 2

    # The registered checkpoint is the file on disk and the file served, byte for byte.
    model_id = job["result"]["model_id"]
    model = stack.http.get(stack.url(f"/models/{model_id}")).json()
    weights = stack.http.get(stack.url(f"/models/{model_id}/weights"))
    assert weights.status_code == 200
    on_disk = (stack.artifact_dir / "jobs" / job_id / "checkpoint.pt").read_bytes()
    assert model["checkpoint_sha256"] == _sha256(weights.content) == _sha256(on_disk)
    assert job["result"]["checkpoint_sha256"] == model["checkpoint_sha256"]

    # Evaluate on the dataset's test split, then read the stored report.
    r = stack.http.post(
        stack.url("/jobs/evaluate"),
        json={
            "model_id": model_id,
            "limit": 12,
            "eps_list": [0, 1, 2],
            "attacks": [{"name": "fgsm"}, {"name": "pgd", "steps": 2}],
            "gradcam": True,
            "batch_size": 32,
        },
    )
    assert r.status_code == 201, r.text
    evaluation = stack.wait_status(r.json()["id"], {"succeeded", "failed"}, 240)
    assert evaluation["status"] == "succeeded", evaluation["error"]
    report = stack.http.get(stack.url(f"/models/{model_id}/report"))
    assert report.status_code == 200, report.text
    body = report.json()
    assert body["verdict"] in ("pass", "warn", "fail")
    assert body["report"]["model"]["checkpoint_sha256"] == model["checkpoint_sha256"]
    assert set(body["report"]["robust"]) >= {"1", "2"} or set(body["report"]["robust"]) >= {
        "1.0",
        "2.0",
    }
    markdown = stack.http.get(stack.url(f"/models/{model_id}/report"), params={"format": "md"})
    assert markdown.status_code == 200 and "#" in markdown.text

    # Predict one real image with its robustness score.
    image = next((ham_root / "images").glob("ISIC_*.jpg")).read_bytes()
    r = stack.http.post(
        stack.url(f"/models/{model_id}/predict"),
        files={"file": ("lesion.jpg", image, "image/jpeg")},
        params={"steps": 3},
    )
    assert r.status_code == 200, r.text
    pred = r.json()
    assert pred["class"] in CLASSES
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-3
    robustness = pred["robustness"]
    assert 0.0 <= robustness["score"] <= 1.0
    assert robustness["eps_star"] is None or 0 < robustness["eps_star"] <= robustness["cap"]


def test_the_same_task_delivered_twice_runs_once(stack: Stack, dataset_id: str) -> None:
    """Commit a job, then send its task twice by name: two worker children receive it at the
    same time, one claims it, the other finds nothing to claim."""
    with Session(stack.engine) as session:
        job = jobs.create_job(
            session,
            owner="local",
            kind="train",
            params={"dataset_id": dataset_id, "config": TINY, "name": "twice"},
        )
        job_id = job.id
    producer = Celery(broker=stack.broker_url)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    queue = stack.env["DPAAT_TRAIN_QUEUE"]
    try:
        for _ in range(2):
            producer.send_task("dpaat.train", args=[job_id], queue=queue)
    finally:
        producer.close()
    job_out = stack.wait_status(job_id, {"succeeded", "failed"}, 240)
    assert job_out["status"] == "succeeded", job_out["error"]
    assert [e.epoch for e in stack.epoch_rows(job_id)] == [1, 2]
    _wait(lambda: f"job {job_id}: nothing to claim" in stack.worker_log_text(), 30, "2nd delivery")
    log = stack.worker_log_text()
    assert len(re.findall(rf"job {job_id}: claimed by", log)) == 1
    assert len(re.findall(rf"job {job_id}: nothing to claim", log)) == 1
    assert job_out["result"]["epochs_this_run"] == 2


def test_claim_race_on_postgres_has_one_winner(stack: Stack) -> None:
    """Eight workers claim the same job at the same instant: the conditional UPDATE lets one in."""
    import threading

    with Session(stack.engine) as session:
        job_id = jobs.create_job(session, owner="local", kind="train", params={"config": TINY}).id
    barrier = threading.Barrier(8)
    winners: list[str] = []

    def claim(holder: str) -> None:
        with Session(stack.engine) as session:
            barrier.wait()
            if jobs.claim_job(session, job_id, holder, 60) is not None:
                winners.append(holder)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(winners) == 1
    with Session(stack.engine) as session:
        assert jobs.get_job(session, job_id).worker_id == winners[0]
        assert jobs.mark_cancelled(session, job_id, winners[0])  # nothing left for the worker


def test_cancel_a_running_job(stack: Stack, dataset_id: str) -> None:
    job_id = _submit_train(stack, dataset_id, epochs=200)["id"]
    _wait(lambda: len(stack.epoch_rows(job_id)) >= 1, 180, "the first epoch", every=0.2)
    r = stack.http.post(stack.url(f"/jobs/{job_id}/cancel"))
    assert r.status_code == 202 and r.json()["status"] in ("cancel_requested", "cancelled")
    asked = time.monotonic()
    epochs_at_cancel = len(stack.epoch_rows(job_id))
    job = stack.wait_status(job_id, {"cancelled", "succeeded", "failed"}, 60)
    assert job["status"] == "cancelled"
    assert time.monotonic() - asked < 15
    # Stopped between steps: at most the epoch in flight finished after the request.
    assert len(stack.epoch_rows(job_id)) <= epochs_at_cancel + 1 < 200
    checkpoint = stack.artifact_dir / "jobs" / job_id / "checkpoint.pt"
    assert checkpoint.is_file() and checkpoint.stat().st_size > 0


def test_worker_killed_mid_training_the_job_resumes_on_a_new_worker(
    stack: Stack, dataset_id: str
) -> None:
    epochs = 8
    job_id = _submit_train(stack, dataset_id, epochs=epochs)["id"]
    _wait(lambda: len(stack.epoch_rows(job_id)) >= 1, 180, "the first epoch", every=0.1)
    stack.kill_worker()
    before = {e.epoch: e.created_at for e in stack.epoch_rows(job_id)}
    job = stack.job(job_id)
    assert job["status"] == "running" and 1 <= len(before) < epochs, job
    killed_at = time.monotonic()

    stack.start_worker()  # its beat runs the reaper: the expired lease re-queues the job
    job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert job["status"] == "succeeded", job["error"]
    assert job["retries"] == 1
    assert time.monotonic() - killed_at >= LEASE_SECONDS * 0.5
    rows = stack.epoch_rows(job_id)
    assert [e.epoch for e in rows] == list(range(1, epochs + 1))
    # Epochs finished before the kill were not trained (nor recorded) again.
    for row in rows:
        if row.epoch in before:
            assert row.created_at == before[row.epoch]
    resumed = job["result"]["resumed_from_epoch"]
    assert resumed >= len(before)
    assert job["result"]["epochs_this_run"] == epochs - resumed
    log = stack.worker_log_text()
    assert "reaper: re-sending train job " + job_id in log
    assert len(re.findall(rf"job {job_id}: claimed by", log)) == 2
