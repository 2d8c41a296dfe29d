"""Faults on the real processes: the worker SIGKILLed at random points of one training job three
times, the broker (a private Redis) killed and restarted empty while jobs are queued, Postgres cut
off for a few seconds; then the hostile-upload corpus over real HTTP and a bounded load run.

One stack serves every scenario (stack start-up is the expensive part on 2 cores): its database
connections go through a TCP proxy this test can cut (the shared Postgres other sessions use is
never stopped), and its broker is a ``redis-server`` of its own, started with ``--save ''
--appendonly no`` so a restart loses every queued message: the worst case, which the database
(the source of truth) and the reaper must cover without help from the broker.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import torch
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from stack_support import (
    ROOT,
    Stack,
    free_port,
    ham_archive,
    running_stack,
    submit_train,
    wait_for,
)
from test_hostile_uploads import HOSTILE, SMALL_MODEL, Marker, send

from app.db.tables import Base

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]

sys.path.insert(0, str(ROOT / "bench"))
import bench_load  # noqa: E402

LEASE = 10  # seconds: longer than the Postgres outage below, short enough for the kills
OUTAGE = 4.0  # seconds without Postgres
KILLS = 3
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# Bounded load run: clients x seconds, and the RSS growth allowed per process (MB) after the
# warm-up. Allocator noise over 10 s was -8 to +62 MB in the API; a leak of 2.5 MB per
# prediction (~50 in the run) would pass it. The 32 x 60 s bench run is the finer figure.
LOAD_CLIENTS, LOAD_SECONDS, RSS_GROWTH_MB = 8, 10, 128


# ============================================================================ fault injectors
class TcpProxy:
    """A loopback TCP forwarder to ``target``; ``cut()`` closes its listener and every connection
    (clients see the server vanish), ``restore()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self._listener is not None
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._listener = None
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()  # linger 0: a reset, like a server that died

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class PrivateRedis:
    """A ``redis-server`` of this test only (no persistence: a restart starts empty)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def pong() -> bool:
            try:
                return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
            except redis.RedisError:
                return False

        wait_for(pong, 20, "redis-server")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def faults(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, TcpProxy, PrivateRedis]]:
    if not Path(REDIS_SERVER).is_file():
        pytest.fail("redis-server is needed to restart a broker of this test's own")
    tmp = tmp_path_factory.mktemp("faults")
    url = make_url(postgres_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    broker = PrivateRedis(tmp)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    env = {
        "DPAAT_LEASE_SECONDS": str(LEASE),
        "DPAAT_STALE_QUEUED_SECONDS": "6",  # lost messages are re-sent within seconds
        "DPAAT_MAX_ARCHIVE_ENTRIES": "200",  # the hostile corpus' limits where they matter
        "DPAAT_MAX_ARCHIVE_EXTRACTED_MB": "40",
    }
    try:
        with running_stack(proxied, broker.url, tmp, env=env) as s:
            # The test's own reads go straight to Postgres: they must work during the outage.
            direct = make_url(s.database_url).set(host=url.host, port=url.port)
            s.engine = create_engine(direct.render_as_string(hide_password=False))
            try:
                yield s, proxy, broker
            finally:
                s.engine.dispose()
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def dataset_id(faults: tuple[Stack, TcpProxy, PrivateRedis], ham_root: Path) -> str:
    stack = faults[0]
    r = stack.http.post(
        stack.url("/datasets"),
        files={"file": ("ham.zip", ham_archive(ham_root), "application/zip")},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _claims(stack: Stack, job_id: str) -> int:
    return len(re.findall(rf"job {job_id}: claimed by", stack.worker_log_text()))


def _final_tensors(stack: Stack, job_id: str) -> dict[str, torch.Tensor]:
    path = stack.artifact_dir / "jobs" / job_id / "checkpoint.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    return dict(state["model"])


def _comparable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Epoch metrics without wall-clock figures."""
    return {k: v for k, v in metrics.items() if "time" not in k and "second" not in k}


# ===================================================================== hostile corpus, real HTTP
def _stored(stack: Stack) -> tuple[dict[str, int], set[str]]:
    with Session(stack.engine) as s:
        counts = {
            t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in Base.metadata.sorted_tables
        }
    files = {str(p.relative_to(stack.artifact_dir)) for p in stack.artifact_dir.rglob("*")}
    return counts, files


def _declare_and_stop(stack: Stack, path: str, declared: int) -> tuple[int, bytes]:
    """Send headers declaring ``declared`` body bytes and only 1 KB of body: the answer must come
    from the headers alone (an HTTP client library refuses to send such a request)."""
    port = int(stack.base_url.rsplit(":", 1)[1])
    extra = "".join(f"{k}: {v}\r\n" for k, v in stack.http.headers.items() if k.startswith("x-"))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"
        f"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: {declared}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head.encode() + b"\0" * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


def test_hostile_corpus_over_real_http(
    faults: tuple[Stack, TcpProxy, PrivateRedis], dataset_id: str, tmp_path: Path
) -> None:
    """The corpus of test_hostile_uploads through uvicorn, Postgres and the worker's store
    (cases whose message names the in-process limits are covered there)."""
    stack = faults[0]
    usage = _stored(stack)[0]["upload_usage"]
    r = stack.http.post(
        stack.url("/models"),
        files={
            "weights": ("w.safetensors", bench_load.small_weights(), "application/octet-stream")
        },
        data={"description": json.dumps(SMALL_MODEL)},
    )
    assert r.status_code == 201, r.text
    model_id = r.json()["id"]
    # an accepted upload's quota row is written after its response has gone out: wait for it,
    # or it lands inside the "nothing stored" comparison below (seen under load in CI)
    wait_for(lambda: _stored(stack)[0]["upload_usage"] == usage + 1, 30, "the upload's quota row")
    Marker.path = tmp_path / "PWNED"
    before = _stored(stack)
    refused = 0
    for name, case in HOSTILE.items():
        if name.startswith("oversized"):
            continue
        r = send(stack.http, stack.url, case, model_id)
        assert r.status_code == case.status, (name, r.text)
        assert case.message in r.json()["detail"], (name, r.text)
        refused += 1
    # Oversized: a declared length over the stack's 512 MB limit, refused before the body.
    status, body = _declare_and_stop(stack, "/api/v1/datasets", 600 << 20)
    assert status == 413 and b"limit of 512 MB" in body, body
    assert _stored(stack) == before and not Marker.path.exists()
    print(f"\nhostile corpus over real HTTP: {refused + 1} uploads refused, nothing stored")


# ============================================================================ 2a: kills
def test_worker_killed_three_times_in_one_job_ends_like_an_undisturbed_run(
    faults: tuple[Stack, TcpProxy, PrivateRedis], dataset_id: str
) -> None:
    stack = faults[0]
    # Each kill waits for one new epoch, then kills at a random instant of the next one at the
    # latest (cut short when that epoch is recorded): at most 2 epochs per kill, so with 7 epochs
    # the third kill always finds the job running, however the machine's load changes.
    epochs = 2 * KILLS + 1
    reference = submit_train(stack, dataset_id, epochs=epochs, seed=7)["id"]
    ref = stack.wait_status(reference, {"succeeded", "failed"}, 240)
    assert ref["status"] == "succeeded", ref["error"]

    ref_rows = stack.epoch_rows(reference)
    epoch_seconds = (ref_rows[-1].created_at - ref_rows[0].created_at).total_seconds() / (
        epochs - 1
    )

    job_id = submit_train(stack, dataset_id, epochs=epochs, seed=7)["id"]
    rng = random.Random(0)
    seen: dict[int, Any] = {}
    for kill in range(1, KILLS + 1):
        # Let the worker started last claim the job and finish one more epoch, then kill it at
        # a random instant of the next epoch (or of the checkpoint write, or the record).
        done = len(seen)
        wait_for(
            lambda k=kill, d=done: (
                _claims(stack, job_id) >= k and len(stack.epoch_rows(job_id)) > d
            ),
            240,
            f"progress before kill {kill}",
            0.05,
        )
        # a random instant of the next epoch; the reference's epoch time is only a guide (the
        # load may change), so the wait ends when that epoch is recorded
        recorded = len(stack.epoch_rows(job_id))
        deadline = time.monotonic() + rng.uniform(0.0, 0.8 * epoch_seconds)
        while time.monotonic() < deadline and len(stack.epoch_rows(job_id)) <= recorded:
            time.sleep(0.05)
        stack.kill_worker()
        rows = stack.epoch_rows(job_id)
        assert stack.job(job_id)["status"] == "running" and len(rows) < epochs, "finished early"
        seen.update({r.epoch: r.created_at for r in rows})
        stack.start_worker()  # its beat reaps the expired lease and re-sends the job
    job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert job["status"] == "succeeded", job["error"]
    assert job["retries"] == KILLS
    assert _claims(stack, job_id) == KILLS + 1
    lost = job["progress"]["lost_worker"]  # the last lost worker stays visible on the job
    assert lost["requeued_at"] >= lost["noticed_at"] and lost["worker"], lost

    rows = stack.epoch_rows(job_id)
    assert [r.epoch for r in rows] == list(range(1, epochs + 1))
    for row in rows:  # no epoch finished before a kill was trained or recorded again
        if row.epoch in seen:
            assert row.created_at == seen[row.epoch], row.epoch

    # The same result as the undisturbed run: metrics of every epoch and the final weights.
    ref_epochs = {e["epoch"]: _comparable(e["metrics"]) for e in ref["epochs"]}
    got_epochs = {e["epoch"]: _comparable(e["metrics"]) for e in job["epochs"]}
    assert got_epochs == ref_epochs
    a, b = _final_tensors(stack, reference), _final_tensors(stack, job_id)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"\nkills survived: {KILLS} (job {job_id}, {epochs} epochs, claimed {KILLS + 1} times)")


# ============================================================================ 2b: Redis restart
def test_broker_restarted_empty_while_jobs_are_queued(
    faults: tuple[Stack, TcpProxy, PrivateRedis], dataset_id: str
) -> None:
    stack, _proxy, broker = faults
    ids = [submit_train(stack, dataset_id, epochs=2, seed=i)["id"] for i in range(4)]
    wait_for(lambda: stack.job(ids[0])["status"] == "running", 120, "a running job", 0.1)
    queued_at_kill = sum(stack.job(i)["status"] == "queued" for i in ids)
    broker.kill()  # every message in Redis is gone (no persistence)

    r = stack.http.post(
        stack.url("/jobs/train"),
        json={"dataset_id": dataset_id, "config": {"epochs": 2, "image_size": 32}},
    )
    assert r.status_code == 201 and r.json()["status"] == "queued", r.text
    ids.append(r.json()["id"])
    ready = stack.http.get(f"{stack.base_url}/health/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("error")
    assert ready.json()["checks"]["database"] == "ok"
    assert stack.http.get(f"{stack.base_url}/health/live").status_code == 200
    time.sleep(3)
    broker.start()  # empty: the reaper must re-send what was lost

    for job_id in ids:
        job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300)
        assert job["status"] == "succeeded", job["error"]
        assert job["retries"] == 0  # never re-run: the running ones kept their lease
        assert [e.epoch for e in stack.epoch_rows(job_id)] == [1, 2]
        assert _claims(stack, job_id) == 1, job_id
    assert stack.http.get(f"{stack.base_url}/health/ready").status_code == 200
    print(
        f"\nredis restarted empty with {queued_at_kill} job(s) queued and 1 submitted during the "
        f"outage: {len(ids)} jobs succeeded, each claimed once"
    )


# ============================================================================ 2c: Postgres cut
def test_database_outage_gives_503_and_recovers_without_restart(
    faults: tuple[Stack, TcpProxy, PrivateRedis], dataset_id: str
) -> None:
    stack, proxy, _broker = faults
    job_id = submit_train(stack, dataset_id, epochs=8)["id"]
    wait_for(lambda: len(stack.epoch_rows(job_id)) >= 1, 240, "the first epoch", 0.1)
    api_pid, worker_pid = stack.api.pid, stack.worker.pid  # type: ignore[union-attr]

    before = {e.epoch: e.created_at for e in stack.epoch_rows(job_id)}
    proxy.cut()
    cut_at = time.monotonic()
    statuses: list[int] = []
    try:
        deadline = time.monotonic() + OUTAGE
        while time.monotonic() < deadline:
            for r in (
                stack.http.get(stack.url(f"/jobs/{job_id}")),
                stack.http.get(stack.url("/jobs")),
                stack.http.post(stack.url("/jobs/train"), json={"config": {"epochs": 1}}),
            ):
                statuses.append(r.status_code)
                assert r.status_code == 503, r.text
                assert "database" in r.json()["detail"] and r.headers["retry-after"].isdigit()
            ready = stack.http.get(f"{stack.base_url}/health/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["checks"]["database"].startswith("error")
            assert stack.http.get(f"{stack.base_url}/health/live").status_code == 200
            time.sleep(0.2)
    finally:
        proxy.restore()
    began = time.monotonic()
    outage = began - cut_at  # the loop above ends after OUTAGE s, later on a loaded machine

    def recovered() -> bool:
        try:
            return stack.http.get(stack.url(f"/jobs/{job_id}")).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(recovered, 30, "the API to answer again", 0.1)
    recovery = time.monotonic() - began
    assert stack.http.get(f"{stack.base_url}/health/ready").status_code == 200
    job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300)
    assert job["status"] == "succeeded", job["error"]
    rows = stack.epoch_rows(job_id)
    assert [e.epoch for e in rows] == list(range(1, 9))
    assert all(e.created_at == before[e.epoch] for e in rows if e.epoch in before)  # none redone
    # The running job carried on, even when the outage outlasted the lease: the reaper first only
    # marks an expired lease and the live worker beats again within the confirmation (issue 14).
    assert job["retries"] == 0 and _claims(stack, job_id) == 1, outage
    assert stack.api.pid == api_pid and stack.worker.pid == worker_pid  # type: ignore[union-attr]
    assert stack.api.poll() is None and stack.worker.poll() is None  # type: ignore[union-attr]
    print(
        f"\npostgres cut for {outage:.1f} s: {len(statuses)} API answers, all 503 with "
        f"Retry-After; answering again {recovery:.1f} s after it came back; the running job "
        f"finished with {job['retries']} retries"
    )


# ============================================================================ bounded load
def test_bounded_load_has_no_errors_and_bounded_memory(
    faults: tuple[Stack, TcpProxy, PrivateRedis], ham_root: Path
) -> None:
    stack = faults[0]
    model_id, job_id = bench_load.prepare(stack.http, stack.base_url)
    assert stack.job(job_id)["status"] == "succeeded"
    image = next((ham_root / "images").glob("ISIC_*.jpg")).read_bytes()
    figures = bench_load.run_load(
        stack.base_url,
        dict(stack.http.headers),
        model_id,
        job_id,
        image,
        clients=LOAD_CLIENTS,
        seconds=LOAD_SECONDS,
        pids={"api": stack.api.pid, "worker": stack.worker.pid},  # type: ignore[union-attr]
    )
    bench_load.print_report(figures)
    assert figures["errors"] == 0 and figures["warmup"]["errors"] == 0, figures["endpoints"]
    assert all(e["served"] > 0 for e in figures["endpoints"].values())
    for name, rss in figures["rss_mb"].items():
        assert rss["growth"] < RSS_GROWTH_MB, (name, rss)
