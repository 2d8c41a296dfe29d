"""Load on loopback: N concurrent clients for T seconds on prediction and on job status.

Each client (a thread with its own keep-alive connection) alternates ``POST
/api/v1/models/{id}/predict`` with a real HAM10000 image and ``GET /api/v1/jobs/{id}`` of a
finished training job, until the time is up. Printed: requests served, errors (any non-2xx or
transport error; the run exits 1 when there is one), p50/p95/p99 latency per endpoint as the
clients saw it and p50/p95 as the API measured it (its Prometheus histogram: the clients share the
machine, and their own threads' time is in the first figure),
throughput, and the resident memory (RSS) of the API and worker processes (with their children)
after a warm-up, at the end, the peak sampled each second, and the growth.

    .venv/bin/python bench/bench_load.py                       # full stack, 32 clients x 60 s
    .venv/bin/python bench/bench_load.py --stack embedded      # SQLite, in-process worker
    .venv/bin/python bench/bench_load.py --url http://127.0.0.1:8000 --api-key dpk_... \\
        --pids 1234,5678                                       # an already running service

Issue 12 (predictions on the workers), side by side in one run:

    git archive <commit before issue 12> | tar -x -C /tmp/dpaat-baseline
    .venv/bin/python bench/bench_load.py --compare /tmp/dpaat-baseline --seconds 20
        # the in-API design (the baseline checkout), then 1 and 2 prediction workers, at 1, 8
        # and 32 clients each: prediction throughput, p50s, GET /jobs/{id} p50 under the load
    .venv/bin/python bench/bench_load.py --stack embedded --latency 40
        # one client, the embedded default: HTTP prediction vs models.api.predict in this process

``--stack full`` starts the processes of tests/stack_support.py (a fresh database on
DPAAT_TEST_DATABASE_URL, default postgres@127.0.0.1:5432, Redis DPAAT_TEST_REDIS_URL, default
127.0.0.1:6379; ``dpaat migrate``, ``dpaat serve``, ``dpaat worker``), all removed afterwards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CLASSES = ["bcc", "mel", "nv"]
MODEL = {"architecture": "small_cnn", "classes": CLASSES, "image_size": 64, "name": "load"}
JOB_CONFIG = {"image_size": 32, "epochs": 1, "batch_size": 32, "pgd_steps": 1, "limit": 48}


# ============================================================================ memory
def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except ImportError:
        pass
    except Exception:  # the process is gone
        return []
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rss(pid: int) -> int:
    """Resident set size in bytes (psutil when installed, else /proc/<pid>/status)."""
    try:
        import psutil

        return int(psutil.Process(pid).memory_info().rss)
    except ImportError:
        pass
    except Exception:
        return 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (a prefork worker is a parent and children)."""
    return sum(_rss(p) for p in [pid, *_children(pid)])


# ============================================================================ load
@dataclass
class Endpoint:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    samples: list[str] = field(default_factory=list)  # the first few errors, for the report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


ROUTES = {
    "predict": ("POST", "/api/v1/models/{model_id}/predict"),
    "job_status": ("GET", "/api/v1/jobs/{job_id}"),
}


def _histograms(
    base_url: str, headers: dict[str, str]
) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """The API's own latency histograms (cumulative (upper bound, count) per method and route)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", headers=headers, timeout=30).text
    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "dpaat_http_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                key = (sample.labels["method"], sample.labels["route"])
                out.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
    return {k: sorted(v) for k, v in out.items()}


def _server_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """A quantile from cumulative bucket counts, interpolated inside its bucket (Prometheus'
    histogram_quantile); the default buckets make it coarse above 1 s."""
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def _server_side(
    start: dict[tuple[str, str], list[tuple[float, float]]],
    end: dict[tuple[str, str], list[tuple[float, float]]],
) -> dict[str, dict[str, float]]:
    figures = {}
    for name, key in ROUTES.items():
        first = dict(start.get(key, []))
        delta = [(le, n - first.get(le, 0.0)) for le, n in end.get(key, [])]
        figures[name] = {
            "count": int(delta[-1][1]) if delta else 0,
            "p50_ms": round(_server_quantile(delta, 0.50) * 1000, 1),
            "p95_ms": round(_server_quantile(delta, 0.95) * 1000, 1),
        }
    return figures


def _drive(
    calls: dict[str, Callable[[httpx.Client], httpx.Response]],
    headers: dict[str, str],
    clients: int,
    seconds: float,
) -> tuple[dict[str, Endpoint], float]:
    """``clients`` threads calling the endpoints in turn until ``seconds`` have passed."""
    results = {name: Endpoint() for name in calls}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        order = list(calls) if index % 2 == 0 else list(reversed(calls))
        with httpx.Client(headers=headers, timeout=120) as c:
            i = 0
            while time.monotonic() < deadline:
                name = order[i % len(order)]
                i += 1
                start = time.perf_counter()
                try:
                    r = calls[name](c)
                    ok, what = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, what = False, f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    ep = results[name]
                    if ok:
                        ep.latencies.append(elapsed)
                    else:
                        ep.errors += 1
                        if len(ep.samples) < 5:
                            ep.samples.append(what)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - began


def run_load(
    base_url: str,
    headers: dict[str, str],
    model_id: str,
    job_id: str,
    image: bytes,
    *,
    clients: int,
    seconds: float,
    pids: dict[str, int],
    predict_params: dict[str, Any] | None = None,
    warmup_seconds: float = 5.0,
) -> dict[str, Any]:
    """Run the load and return the figures (see the module docstring).

    First a warm-up at the same concurrency (not counted in the latencies, but its errors are):
    the model is loaded and cached, the server's thread pool and the allocator's per-thread
    arenas reach their working size. "before" is the RSS after it, so "growth" is what the
    measured run adds; "cold" is the RSS before any request of this run."""
    params = predict_params or {"steps": 3}
    calls: dict[str, Callable[[httpx.Client], httpx.Response]] = {
        "predict": lambda c: c.post(
            f"{base_url}/api/v1/models/{model_id}/predict",
            params=params,
            files={"file": ("lesion.jpg", image, "image/jpeg")},
        ),
        "job_status": lambda c: c.get(f"{base_url}/api/v1/jobs/{job_id}"),
    }
    cold = {name: tree_rss(pid) for name, pid in pids.items()}
    warm, _ = _drive(calls, headers, clients, warmup_seconds)
    before = {name: tree_rss(pid) for name, pid in pids.items()}
    peak = dict(before)
    stop = threading.Event()

    def sample_memory() -> None:
        while not stop.wait(1.0):
            for name, pid in pids.items():
                peak[name] = max(peak[name], tree_rss(pid))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    sampler.start()
    histograms_before = _histograms(base_url, headers)
    results, elapsed = _drive(calls, headers, clients, seconds)
    server = _server_side(histograms_before, _histograms(base_url, headers))
    stop.set()
    sampler.join()
    after = {name: tree_rss(pid) for name, pid in pids.items()}
    mb = 1 << 20
    served = sum(len(e.latencies) for e in results.values())
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "served": served,
        "errors": sum(e.errors for e in results.values()),
        "warmup": {
            "seconds": warmup_seconds,
            "served": sum(len(e.latencies) for e in warm.values()),
            "errors": sum(e.errors for e in warm.values()),
        },
        "throughput_rps": round(served / elapsed, 1),
        "endpoints": {
            name: {
                "served": len(e.latencies),
                "errors": e.errors,
                "error_samples": e.samples + warm[name].samples,
                "rps": round(len(e.latencies) / elapsed, 2),
                "p50_ms": round(_pct(e.latencies, 0.50) * 1000, 1),
                "p95_ms": round(_pct(e.latencies, 0.95) * 1000, 1),
                "p99_ms": round(_pct(e.latencies, 0.99) * 1000, 1),
                "server_p50_ms": server[name]["p50_ms"],
                "server_p95_ms": server[name]["p95_ms"],
            }
            for name, e in results.items()
        },
        "rss_mb": {
            name: {
                "cold": round(cold[name] / mb, 1),
                "before": round(before[name] / mb, 1),
                "after": round(after[name] / mb, 1),
                "peak": round(peak[name] / mb, 1),
                "growth": round((after[name] - before[name]) / mb, 1),
            }
            for name in pids
        },
        "predict_params": params,
    }


def print_report(figures: dict[str, Any]) -> None:
    print(
        f"\n{figures['clients']} clients x {figures['seconds']} s: {figures['served']} requests "
        f"served, {figures['errors']} errors, {figures['throughput_rps']} req/s"
    )
    print(
        f"{'endpoint':<12} {'served':>7} {'errors':>6} {'req/s':>7} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p99 ms':>8} | {'server p50':>10} {'p95':>8}"
    )
    for name, e in figures["endpoints"].items():
        print(
            f"{name:<12} {e['served']:>7} {e['errors']:>6} {e['rps']:>7} {e['p50_ms']:>8} "
            f"{e['p95_ms']:>8} {e['p99_ms']:>8} | {e['server_p50_ms']:>10} {e['server_p95_ms']:>8}"
        )
        for sample in e["error_samples"]:
            print(f"    error: {sample}")
    w = figures["warmup"]
    print(f"(after a {w['seconds']} s warm-up: {w['served']} requests, {w['errors']} errors)")
    print(
        f"{'process':<12} {'RSS cold':>9} {'before':>8} {'after':>8} {'peak':>8} {'growth':>8}"
        "  (MB; before = after the warm-up)"
    )
    for name, m in figures["rss_mb"].items():
        print(
            f"{name:<12} {m['cold']:>9} {m['before']:>8} {m['after']:>8} {m['peak']:>8} "
            f"{m['growth']:>8}"
        )


# ============================================================================ set-up
def lesion_image() -> bytes:
    """A real HAM10000 image when the data is here, else a generated JPEG."""
    from app.core.settings import default_data_roots

    for root in default_data_roots():
        found = next((root / "images").glob("ISIC_*.jpg"), None)
        if found is not None:
            return found.read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.effect_noise((600, 450), 50).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def small_weights() -> bytes:
    from safetensors.torch import save_model

    from models.nets import build_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_model(build_model(MODEL["architecture"], len(CLASSES)), str(path))
        return path.read_bytes()


def prepare(http: httpx.Client, base_url: str, weights: bytes | None = None) -> tuple[str, str]:
    """Upload a small model and run one tiny training job: (model_id, finished job id)."""
    r = http.post(
        f"{base_url}/api/v1/models",
        files={
            "weights": ("w.safetensors", weights or small_weights(), "application/octet-stream")
        },
        data={"description": json.dumps(MODEL)},
    )
    r.raise_for_status()
    model_id = r.json()["id"]
    r = http.post(f"{base_url}/api/v1/jobs/train", json={"config": JOB_CONFIG, "name": "load"})
    r.raise_for_status()
    job_id = r.json()["id"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = http.get(f"{base_url}/api/v1/jobs/{job_id}").json()["status"]
        if status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    return model_id, job_id


@dataclass
class Target:
    base_url: str
    headers: dict[str, str]
    pids: dict[str, int]


@contextmanager
def full_stack(
    workdir: Path,
    env: dict[str, str],
    predict_workers: int = 1,
    root: Path = ROOT,
    predict_nice: int = 0,
) -> Iterator[Target]:
    """The full stack of ``root``'s code with ``predict_workers`` prediction workers (0 for a
    checkout from before issue 12, which predicts in the API process) at ``dpaat worker --nice
    predict_nice``."""
    from stack_support import POSTGRES_URL, REDIS_URL, running_stack

    with running_stack(
        POSTGRES_URL,
        REDIS_URL,
        workdir,
        env=env,
        predict_workers=predict_workers,
        predict_nice=predict_nice,
        root=root,
    ) as s:
        assert s.api is not None and s.worker is not None
        pids = {"api": s.api.pid, "worker": s.worker.pid}
        pids.update({f"predict{i + 1}": p.pid for i, p in enumerate(s.predict_workers)})
        yield Target(s.base_url, dict(s.http.headers), pids)


@contextmanager
def embedded_stack(workdir: Path, extra: dict[str, str]) -> Iterator[Target]:
    """``dpaat serve`` on SQLite with its in-process worker (one process)."""
    from stack_support import dpaat_command, free_port, wait_for

    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAAT_")}
    env.pop("DATABASE_URL", None)
    env.pop("BROKER_URL", None)
    env.update(
        DPAAT_DATABASE_URL=f"sqlite:///{workdir / 'load.db'}",
        DPAAT_ARTIFACT_DIR=str(workdir / "artifacts"),
        DPAAT_AUTO_MIGRATE="true",
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    env.update(extra)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (workdir / "api.log").open("wb") as log:
        proc = subprocess.Popen(
            dpaat_command("serve", "--port", str(port), "--log-level", "warning"),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/health/ready").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 120, "the embedded service", every=0.3)
        yield Target(base, {}, {"api": proc.pid})
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ============================================================================ issue 12
def compare_designs(
    baseline: Path,
    levels: list[int],
    seconds: float,
    steps: int,
    env: dict[str, str],
    nice: int = 0,
) -> list[dict[str, Any]]:
    """The in-API design (``baseline`` checkout), then 1 and 2 prediction workers (and, with
    ``nice``, 2 workers at that lower CPU priority): each at every client level, the same model,
    image and parameters."""
    rows = []
    designs = [("in-API (baseline)", baseline, 0, 0), ("1 predict worker", ROOT, 1, 0)]
    designs.append(("2 predict workers", ROOT, 2, 0))
    if nice:
        designs.append((f"2 predict workers, nice {nice}", ROOT, 2, nice))
    image, weights = lesion_image(), small_weights()
    for name, root, workers, worker_nice in designs:
        with (
            tempfile.TemporaryDirectory(prefix="dpaat-cmp-") as tmp,
            full_stack(Path(tmp), env, workers, root, worker_nice) as target,
        ):
            with httpx.Client(headers=target.headers, timeout=300) as http:
                model_id, job_id = prepare(http, target.base_url, weights)
            for clients in levels:
                f = run_load(
                    target.base_url,
                    target.headers,
                    model_id,
                    job_id,
                    image,
                    clients=clients,
                    seconds=seconds,
                    pids=target.pids,
                    predict_params={"steps": steps},
                    warmup_seconds=min(10.0, seconds / 2),
                )
                p, j = f["endpoints"]["predict"], f["endpoints"]["job_status"]
                row = {
                    "design": name,
                    "clients": clients,
                    "predict_rps": p["rps"],
                    "predict_p50_ms": p["p50_ms"],
                    "job_status_p50_ms": j["p50_ms"],
                    "job_status_server_p50_ms": j["server_p50_ms"],
                    "errors": f["errors"] + f["warmup"]["errors"],
                    "error_samples": p["error_samples"] + j["error_samples"],
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def print_comparison(rows: list[dict[str, Any]]) -> None:
    print(
        f"\n{'design':<20} {'clients':>7} {'predict/s':>10} {'predict p50':>12} "
        f"{'jobs p50':>9} {'(server)':>9} {'errors':>6}"
    )
    for r in rows:
        print(
            f"{r['design']:<20} {r['clients']:>7} {r['predict_rps']:>10} "
            f"{r['predict_p50_ms']:>10.0f}ms {r['job_status_p50_ms']:>7.0f}ms "
            f"{r['job_status_server_p50_ms']:>7.0f}ms {r['errors']:>6}"
        )
    by = {(r["design"], r["clients"]): r["predict_rps"] for r in rows}
    designs = list(dict.fromkeys(r["design"] for r in rows))
    for clients in sorted({r["clients"] for r in rows}):
        base = by.get(("in-API (baseline)", clients)) or float("nan")
        one = by.get(("1 predict worker", clients)) or float("nan")
        ratios = [f"{d} / in-API = {by[d, clients] / base:.2f}" for d in designs[1:]]
        two = by.get(("2 predict workers", clients), float("nan"))
        print(f"{clients:>3} clients: {', '.join(ratios)}; 2 workers / 1 worker = {two / one:.2f}")


def latency_ratio(target: Target, n: int, steps: int) -> dict[str, float]:
    """One client: HTTP prediction against ``models.api.predict`` on the same weights and image
    in this process, interleaved (machine noise hits both alike)."""
    import statistics

    import torch

    import models.api as ml
    from app.services.images import sanitize_image

    torch.set_num_threads(1)  # as the service (OMP_NUM_THREADS=1): the same compute
    image, weights = lesion_image(), small_weights()
    with httpx.Client(headers=target.headers, timeout=300) as http:
        model_id, _ = prepare(http, target.base_url, weights)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "w.safetensors"
            path.write_bytes(weights)
            info = {**MODEL, "arch": MODEL["architecture"]}
            loaded = ml.load_model(path, info=info)
        clean = sanitize_image(image, max_bytes=10 << 20, max_pixels=25_000_000)
        url = f"{target.base_url}/api/v1/models/{model_id}/predict"

        def over_http() -> float:
            start = time.perf_counter()
            r = http.post(url, params={"steps": steps}, files={"file": ("x.jpg", image)})
            r.raise_for_status()
            return time.perf_counter() - start

        def direct() -> float:
            start = time.perf_counter()
            ml.predict(loaded, [clean], steps=steps)
            return time.perf_counter() - start

        for _ in range(3):
            over_http(), direct()
        h, d = [], []
        for _ in range(n):
            d.append(direct())
            h.append(over_http())
    return {
        "requests": n,
        "direct_median_ms": round(1000 * statistics.median(d), 1),
        "http_median_ms": round(1000 * statistics.median(h), 1),
        "ratio": round(statistics.median(h) / statistics.median(d), 3),
        "paired_ratio": round(statistics.median(a / b for a, b in zip(h, d, strict=True)), 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--stack", choices=("full", "embedded"), default="full")
    parser.add_argument("--url", help="an already running service (skips starting one)")
    parser.add_argument("--api-key", default=os.environ.get("DPAAT_API_KEY"))
    parser.add_argument("--pids", default="", help="with --url: api_pid[,worker_pid]")
    parser.add_argument("--steps", type=int, default=3, help="PGD steps of predict's score")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--env", action="append", default=[], help="KEY=VALUE for the started service processes"
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="a checkout of the in-API design: compare it with 1 and 2 "
        "prediction workers at --levels clients",
    )
    parser.add_argument("--levels", default="1,8,32", help="client counts for --compare")
    parser.add_argument(
        "--worker-nice",
        type=int,
        default=0,
        help="with --compare: also 2 prediction workers at `dpaat worker --nice N`",
    )
    parser.add_argument(
        "--latency", type=int, help="N one-client predictions: HTTP vs direct (no load run)"
    )
    args = parser.parse_args()

    print(
        f"bench_load on {platform.node()} ({os.cpu_count()} CPUs), "
        f"python {platform.python_version()}"
    )
    env = dict(item.split("=", 1) for item in args.env)
    if args.compare:
        levels = [int(c) for c in args.levels.split(",")]
        rows = compare_designs(
            args.compare, levels, args.seconds, args.steps, env, args.worker_nice
        )
        print_comparison(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 1 if any(r["errors"] for r in rows) else 0
    with tempfile.TemporaryDirectory(prefix="dpaat-load-") as tmp:
        if args.latency and not args.url:
            cm = full_stack(Path(tmp), env) if args.stack == "full" else None
            with cm or embedded_stack(Path(tmp), env) as target:
                figures = latency_ratio(target, args.latency, args.steps)
            print(json.dumps({"stack": args.stack, **figures}))
            return 0
        if args.url:
            pid_list = [int(p) for p in args.pids.split(",") if p]
            given = Target(
                args.url.rstrip("/"),
                {"X-API-Key": args.api_key} if args.api_key else {},
                dict(zip(("api", "worker"), pid_list, strict=False)),
            )
            target_cm: Any = nullcontext(given)
        elif args.stack == "full":
            target_cm = full_stack(Path(tmp), env)
        else:
            target_cm = embedded_stack(Path(tmp), env)
        with target_cm as target:
            with httpx.Client(headers=target.headers, timeout=300) as http:
                model_id, job_id = prepare(http, target.base_url)
            figures = run_load(
                target.base_url,
                target.headers,
                model_id,
                job_id,
                lesion_image(),
                clients=args.clients,
                seconds=args.seconds,
                pids=target.pids,
                predict_params={"steps": args.steps},
            )
    figures["stack"] = "url" if args.url else args.stack
    figures["env"] = env
    print_report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if figures["errors"] or figures["warmup"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
