"""Service benchmarks on the real stack (Postgres + Redis + a separate ``dpaat worker``).

(a) Submit-to-running latency: a training job is submitted over HTTP, the time until a worker has
    claimed it (``started_at - created_at``, both stamped on this machine) is recorded, then the
    job is cancelled and the next one submitted once it has stopped. The first job of a fresh
    worker child also pays the torch import; it is reported apart.
(b) Prediction with a robustness score over HTTP against the same ``models.api.predict`` call in
    this process: the overhead ratio of medians at one client, then latency and throughput at 1, 8
    and 32 concurrent clients on loopback, each level bounded in requests and seconds. Every error
    is counted and printed; the run fails when there is any.

    .venv/bin/python bench/bench_service.py [--jobs 12] [--requests 48] [--steps 10]

Needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379 (override with
DPAAT_BENCH_DATABASE_URL / DPAAT_BENCH_REDIS_URL). A fresh database is created and dropped.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.tables import Job  # noqa: E402

TINY_MODEL = {"image_size": 32, "epochs": 1, "batch_size": 32, "pgd_steps": 2, "limit": 64}


def _dpaat(*args: str) -> list[str]:
    return [sys.executable, "-c", "from app.cli import main; main()", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Stack:
    base: str
    database_url: str
    artifact_dir: Path
    http: httpx.Client

    def api(self, path: str) -> str:
        return f"{self.base}/api/v1{path}"

    def status(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(self.api(f"/jobs/{job_id}"))
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data


@contextmanager
def stack(pg_url: str, redis_url: str, workdir: Path) -> Iterator[Stack]:
    """A fresh database, the API and one worker (prefork, concurrency 1) as subprocesses."""
    tag = uuid.uuid4().hex[:10]
    admin = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    db_name = f"dpaat_bench_{tag}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db_name}"')
    database_url = make_url(pg_url).set(database=db_name).render_as_string(hide_password=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAAT_")}
    env.update(
        DATABASE_URL=database_url,
        BROKER_URL=redis_url,
        DPAAT_ARTIFACT_DIR=str(workdir / "artifacts"),
        DPAAT_TRAIN_QUEUE=f"bench_{tag}_train",
        DPAAT_EVALUATE_QUEUE=f"bench_{tag}_evaluate",
        DPAAT_HEARTBEAT_SECONDS="1",
        PYTHONPATH=str(ROOT),
        # One intra-op thread everywhere: on a small shared machine OpenMP threads of several
        # processes spin against each other and a 0.5 s prediction takes 5-15 s.
        OMP_NUM_THREADS="1",
    )
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    http = httpx.Client(timeout=300)
    try:
        subprocess.run(_dpaat("migrate"), cwd=ROOT, env=env, check=True, capture_output=True)
        # Authentication is on for the full stack: the benchmark's key, made the documented way.
        made = subprocess.run(
            _dpaat("keys", "create", "--owner", "bench", "--scopes", "read,submit"),
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        http.headers["X-API-Key"] = made.stdout.strip()
        for name, args in (
            ("api", ("serve", "--port", str(port), "--log-level", "warning")),
            ("worker", ("worker", "--concurrency", "1", "--log-level", "warning")),
        ):
            with (workdir / f"{name}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        _dpaat(*args),
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        base = f"http://127.0.0.1:{port}"

        def api_ready() -> bool:
            try:
                return http.get(f"{base}/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(api_ready, 120, "the API", every=0.3)
        yield Stack(base, database_url, workdir / "artifacts", http)
    finally:
        http.close()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')


def _status_is(s: Stack, job_id: str, status: str) -> bool:
    return s.status(job_id)["status"] == status


def _status_not(s: Stack, job_id: str, status: str) -> bool:
    return s.status(job_id)["status"] != status


def submit_to_running(s: Stack, jobs: int) -> dict[str, Any]:
    """(a): seconds from the committed job row to the worker's claim, per job."""
    engine = create_engine(s.database_url)
    latencies: list[float] = []
    try:
        for _ in range(jobs + 1):  # +1: the first pays the child's torch import
            r = s.http.post(s.api("/jobs/train"), json={"config": {**TINY_MODEL, "epochs": 1000}})
            r.raise_for_status()
            job_id: str = r.json()["id"]
            _wait(partial(_status_not, s, job_id, "queued"), 120, "running", every=0.01)
            s.http.post(s.api(f"/jobs/{job_id}/cancel")).raise_for_status()
            with Session(engine) as session:
                job = session.scalars(select(Job).where(Job.id == job_id)).one()
                assert job.started_at is not None
                latencies.append((job.started_at - job.created_at).total_seconds())
            _wait(partial(_status_is, s, job_id, "cancelled"), 120, "cancelled")
    finally:
        engine.dispose()
    cold, warm = latencies[0], latencies[1:]
    return {
        "cold_s": cold,
        "median_s": statistics.median(warm),
        "p95_s": _pct(warm, 0.95),
        "n": len(warm),
    }


def _image() -> bytes:
    """A real HAM10000 image when the shared copy is there, else a generated one."""
    from models.data import default_data_root

    root = default_data_root()
    if root is not None and (root / "images").is_dir():
        first = next((root / "images").glob("ISIC_*.jpg"), None)
        if first is not None:
            return first.read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((64, 64), 40).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def prediction(s: Stack, requests: int, steps: int, max_seconds: float) -> dict[str, Any]:
    """(b): HTTP vs direct, then 1 / 8 / 32 concurrent clients."""
    import torch

    import models.api as ml

    torch.set_num_threads(1)  # as the API process (OMP_NUM_THREADS=1): the same compute
    r = s.http.post(s.api("/jobs/train"), json={"config": TINY_MODEL})
    r.raise_for_status()
    job_id = r.json()["id"]
    _wait(lambda: s.status(job_id)["status"] in ("succeeded", "failed"), 600, "the model")
    job = s.status(job_id)
    assert job["status"] == "succeeded", job["error"]
    model_id = job["result"]["model_id"]
    image = _image()
    url = s.api(f"/models/{model_id}/predict")
    params = {"steps": steps}

    def over_http(client: httpx.Client) -> float:
        start = time.perf_counter()
        resp = client.post(url, files={"file": ("x.jpg", image, "image/jpeg")}, params=params)
        elapsed = time.perf_counter() - start
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return elapsed

    loaded = ml.load_model(s.artifact_dir / "jobs" / job_id / "checkpoint.pt")

    def direct() -> float:
        start = time.perf_counter()
        ml.predict(loaded, [image], steps=steps)
        return time.perf_counter() - start

    # Warm both paths (model load into the API's cache, allocator, first-call costs).
    for _ in range(3):
        direct()
        over_http(s.http)
    # Interleaved so that machine noise hits both sides alike.
    d_times, h_times = [], []
    for _ in range(requests):
        d_times.append(direct())
        h_times.append(over_http(s.http))
    result: dict[str, Any] = {
        "direct_median_ms": 1000 * statistics.median(d_times),
        "http_median_ms": 1000 * statistics.median(h_times),
        "ratio": statistics.median(h_times) / statistics.median(d_times),
        # Each HTTP call against the direct call just before it: robust to the load drifting.
        "paired_ratio": statistics.median(h / d for h, d in zip(h_times, d_times, strict=True)),
        **_overhead_parts(s, image),
        "levels": [],
    }
    for clients in (1, 8, 32):
        result["levels"].append(
            _load(url, image, params, clients, requests, max_seconds, dict(s.http.headers))
        )
    return result


def _overhead_parts(s: Stack, image: bytes, n: int = 30) -> dict[str, float]:
    """Where the HTTP path's extra time goes: a bare round trip, and the image sanitizing the
    server does before the model sees the image (decode, check, re-encode)."""
    from app.services import images

    def timed(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    return {
        "roundtrip_ms": timed(lambda: s.http.get(f"{s.base}/health/live")),
        "sanitize_ms": timed(
            lambda: images.sanitize_image(image, max_bytes=10 << 20, max_pixels=25_000_000)
        ),
    }


def _load(
    url: str,
    image: bytes,
    params: dict[str, Any],
    clients: int,
    requests: int,
    max_s: float,
    headers: dict[str, str],
) -> dict[str, Any]:
    """``requests`` predictions from ``clients`` threads (each its own connection), stopping
    early after ``max_s`` seconds; every failure is counted."""
    deadline = time.monotonic() + max_s
    latencies: list[float] = []
    errors: list[str] = []
    per_client = -(-max(requests, clients) // clients)  # at least one request per client

    def client_loop(_: int) -> None:
        with httpx.Client(timeout=300, headers={"X-API-Key": headers["x-api-key"]}) as client:
            for _ in range(per_client):
                if time.monotonic() > deadline:
                    return
                start = time.perf_counter()
                try:
                    resp = client.post(
                        url, files={"file": ("x.jpg", image, "image/jpeg")}, params=params
                    )
                    if resp.status_code != 200:
                        errors.append(f"HTTP {resp.status_code}")
                        continue
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                    continue
                latencies.append(time.perf_counter() - start)

    start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client_loop, range(clients)))
    wall = time.monotonic() - start
    return {
        "clients": clients,
        "done": len(latencies),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * _pct(latencies, 0.95) if latencies else float("nan"),
        "throughput_per_s": len(latencies) / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12, help="jobs timed for (a)")
    parser.add_argument("--requests", type=int, default=48, help="predictions per level for (b)")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps of the robustness score")
    parser.add_argument("--max-seconds", type=float, default=120, help="time cap per level")
    args = parser.parse_args()
    pg = os.environ.get(
        "DPAAT_BENCH_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    redis_url = os.environ.get("DPAAT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp, stack(pg, redis_url, Path(tmp)) as s:
        a = submit_to_running(s, args.jobs)
        print(
            f"(a) submit -> running over {a['n']} jobs: median {1000 * a['median_s']:.0f} ms, "
            f"p95 {1000 * a['p95_s']:.0f} ms (first job of a fresh worker child: "
            f"{1000 * a['cold_s']:.0f} ms)"
        )
        b = prediction(s, args.requests, args.steps, args.max_seconds)
        print(
            f"(b) predict + robustness, {args.steps} PGD steps: direct median "
            f"{b['direct_median_ms']:.1f} ms, HTTP median {b['http_median_ms']:.1f} ms, "
            f"ratio of medians {b['ratio']:.3f}, median paired ratio {b['paired_ratio']:.3f} "
            f"(target <= 1.10); a bare HTTP round trip "
            f"{b['roundtrip_ms']:.1f} ms, image sanitizing {b['sanitize_ms']:.1f} ms"
        )
        print("    clients  done  errors   p50 ms   p95 ms   req/s")
        for lv in b["levels"]:
            print(
                f"    {lv['clients']:>7}  {lv['done']:>4}  {lv['errors']:>6}  {lv['p50_ms']:>7.1f}"
                f"  {lv['p95_ms']:>7.1f}  {lv['throughput_per_s']:>6.2f}"
                + (f"  {lv['error_kinds']}" if lv["errors"] else "")
            )
    errors = sum(lv["errors"] for lv in b["levels"])
    if errors:
        print(f"FAILED: {errors} errors")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
