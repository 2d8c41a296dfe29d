"""The full deployment on the real services, for the tests that need it (test_fullstack, the fault
and audit tests): a fresh Postgres database, a private Redis database and queue names,
``dpaat migrate``, an API key for owner ``ci`` (``dpaat keys create``: authentication is on, as on
every full stack), ``dpaat serve`` (uvicorn, a subprocess) and separate ``dpaat worker`` processes
(prefork, with the reaper on Celery beat). Sized for 2 CPU cores: ~90 images at 32 px, 2 PGD steps.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db.tables import JobEpoch

ROOT = Path(__file__).resolve().parents[1]
# The loopback services of this machine's kind (.ci/run exports the same defaults)
POSTGRES_URL = os.environ.get(
    "DPAAT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("DPAAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
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


def dpaat_command(*args: str) -> list[str]:
    """The ``dpaat`` console script, run by this interpreter (no install needed)."""
    return [sys.executable, "-c", "from app.cli import main; main()", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> None:
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
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)  # every one started
    # `dpaat worker --queues <predict queue>` processes (issue 12), oldest first.
    predict_workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    predict_workers_started: int = 0
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=60))
    # The key of owner ``ci`` (admin, read, submit) made by ``dpaat keys create`` after migrate;
    # ``http`` sends it with every request.
    api_key: str = ""
    owner: str = "ci"
    root: Path = ROOT  # the checkout whose code the processes run

    # -------------------------------------------------------------- processes
    def _spawn(
        self, name: str, *args: str, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{name}.log"
        with log.open("wb") as out:
            # Own process group: SIGKILL reaches the prefork children too, like a dead machine.
            # Not a new session: with the kernel's autogroup scheduling each session gets an equal
            # CPU share, which would make a worker's --nice meaningless against the API.
            proc = subprocess.Popen(
                dpaat_command(*args),
                cwd=self.root,
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
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

        wait_for(ready, 90, "the API", every=0.3)

    def start_worker(
        self, concurrency: int = 2, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A training/evaluation worker with the reaper on beat; ``env`` overrides variables for
        this process only (another "host": its own cache and scratch folders, issue 15)."""
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
            env=env,
        )
        self.workers.append(self.worker)
        log = self.worker_log

        def ready() -> bool:
            assert self.worker is not None and self.worker.poll() is None, log.read_text()[-3000:]
            return " ready." in log.read_text(errors="replace")

        wait_for(ready, 90, "the worker", every=0.3)
        return self.worker

    def start_predict_worker(
        self, env: dict[str, str] | None = None, nice: int = 0
    ) -> subprocess.Popen[bytes]:
        """One more prediction worker (threads pool, batching), ready when this returns; ``nice``
        lowers its CPU priority (``dpaat worker --nice``)."""
        self.predict_workers_started += 1
        name = f"predict{self.predict_workers_started}"
        proc, log = self._spawn(
            name,
            "worker",
            "--queues",
            self.env["DPAAT_PREDICT_QUEUE"],
            "--hostname",
            f"{name}@fullstack",
            *(["--nice", str(nice)] if nice else []),
            env=env,
        )
        self.predict_workers.append(proc)

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return " ready." in log.read_text(errors="replace")

        wait_for(ready, 90, "the prediction worker", every=0.3)
        return proc

    def stop_predict_workers(self, kill: bool = False) -> None:
        """Stop every prediction worker (SIGKILL with ``kill``: no warm shutdown)."""
        for proc in self.predict_workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
            proc.wait(timeout=30)
        self.predict_workers.clear()

    def kill_worker(self) -> None:
        """SIGKILL the worker and its children: no warm shutdown, no acknowledgement."""
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)

    def stop(self) -> None:
        for proc in (*self.predict_workers, *self.workers, self.api):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        self.http.close()

    # -------------------------------------------------------------- keys
    def new_key(self, owner: str, scopes: str = "read,submit") -> str:
        """A new API key made the documented way (``dpaat keys create``, the admin bootstrap)."""
        out = subprocess.run(
            dpaat_command("keys", "create", "--owner", owner, "--scopes", scopes),
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        key = out.stdout.strip()
        assert key.startswith("dpk_"), out.stdout
        return key

    def client(self, key: str | None) -> httpx.Client:
        """Another HTTP client sending ``key`` (none: no key header)."""
        return httpx.Client(timeout=60, headers={"X-API-Key": key} if key else {})

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

        wait_for(reached, timeout, f"job {job_id} to reach {statuses}", every=0.2)
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


@contextmanager
def running_stack(
    postgres_url: str,
    redis_url: str,
    tmp: Path,
    env: dict[str, str] | None = None,
    *,
    predict_workers: int = 1,
    predict_nice: int = 0,
    workers: int = 1,
    root: Path = ROOT,
) -> Iterator[Stack]:
    """A fresh database, a private Redis database and queues, ``dpaat migrate``, the API,
    ``workers`` training/evaluation workers and ``predict_workers`` prediction workers (started
    with ``--nice predict_nice``); all stopped and dropped afterwards. ``env`` overrides the
    processes' variables; ``root`` runs the code of another checkout (the benchmark's baseline)."""
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
    logs = tmp / "logs"
    logs.mkdir()
    env_vars = {
        k: v for k, v in os.environ.items() if not k.startswith("DPAAT_") or k == "DPAAT_DATA_ROOT"
    }
    env_vars.pop("DATABASE_URL", None)
    env_vars.pop("BROKER_URL", None)
    env_vars.update(
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
            "DPAAT_PREDICT_QUEUE": f"fs_{tag}_predict",
            "PYTHONPATH": str(root),
            "OMP_NUM_THREADS": "1",  # two worker children and the API share 2 cores
        }
    )
    env_vars.update(env or {})
    engine = create_engine(database_url)
    s = Stack(
        env=env_vars,
        base_url=f"http://127.0.0.1:{free_port()}",
        database_url=database_url,
        broker_url=broker_url,
        artifact_dir=tmp / "artifacts",
        logs=logs,
        engine=engine,
        root=root,
    )
    try:
        migrate = subprocess.run(
            dpaat_command("migrate"), cwd=root, env=env_vars, capture_output=True
        )
        assert migrate.returncode == 0, migrate.stderr.decode()[-3000:]
        s.api_key = s.new_key(s.owner, "admin,read,submit")
        s.http.headers["X-API-Key"] = s.api_key
        s.start_api()
        for _ in range(workers):
            s.start_worker()
        for _ in range(predict_workers):
            s.start_predict_worker(nice=predict_nice)
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


def ham_archive(ham_root: Path) -> bytes:
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


def submit_train(stack: Stack, dataset_id: str, **config: Any) -> dict[str, Any]:
    r = stack.http.post(
        stack.url("/jobs/train"),
        json={"dataset_id": dataset_id, "config": {**TINY, **config}, "name": "fullstack"},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body
