"""What one ``GET /api/v1/jobs/{id}`` costs the service, this checkout against another, in one run.

Job status is what every client polls, so under prediction load its cost is what decides how
long it waits for a CPU (issue 12). For each checkout: a full stack (tests/stack_support.py:
a fresh Postgres database, ``dpaat serve`` with authentication on; no workers), a job with three
epochs, and one client sending requests one after another. Printed per request: database round
trips (the API's sends to Postgres, counted with ``strace`` when it is installed), CPU time of
the API process and of its Postgres backends (from /proc: robust to other load on the machine,
unlike wall time), and the client's median latency. The checkouts alternate ``--rounds`` times.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/bench_status.py --compare /tmp/before [--requests 400 --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy.orm import Session  # noqa: E402
from stack_support import POSTGRES_URL, REDIS_URL, running_stack  # noqa: E402

from app.services import jobs  # noqa: E402


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def backends(conninfo: str, database: str) -> list[int]:
    """The Postgres backend processes serving ``database`` (the API's pooled connections)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def measure(root: Path, requests: int) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="dpaat-status-") as tmp,
        running_stack(
            POSTGRES_URL, REDIS_URL, Path(tmp), workers=0, predict_workers=0, root=root
        ) as s,
    ):
        assert s.api is not None
        with Session(s.engine) as db:
            job_id = jobs.create_job(db, owner=s.owner, kind="train", params={"epochs": 3}).id
            for epoch in range(3):
                jobs.record_epoch(db, job_id, epoch, {"loss": 1.0, "tau": 0.5})
        url = s.url(f"/jobs/{job_id}")
        for _ in range(50):  # warm: the pool's connections opened, code paths imported
            assert s.http.get(url).status_code == 200
        database = s.engine.url.database or ""
        admin = s.engine.url.set(drivername="postgresql").render_as_string(False)
        pg_pids = backends(admin, database)

        trips = float("nan")
        if shutil.which("strace"):
            trace = Path(tmp) / "strace"
            sends = ["-e", "trace=sendto,sendmsg,write", "-o", str(trace)]
            tracer = subprocess.Popen(["strace", "-f", "-yy", "-qq", *sends, "-p", str(s.api.pid)])
            time.sleep(1.0)  # attached
            for _ in range(requests):
                s.http.get(url)
            time.sleep(0.5)
            tracer.terminate()
            tracer.wait()
            trips = len(re.findall(r":5432\]>", trace.read_text())) / requests

        api0, pg0 = cpu_seconds([s.api.pid]), cpu_seconds(pg_pids)
        latencies = []
        for _ in range(requests):
            start = time.perf_counter()
            assert s.http.get(url).status_code == 200
            latencies.append(time.perf_counter() - start)
        api1, pg1 = cpu_seconds([s.api.pid]), cpu_seconds(pg_pids)
    return {
        "round_trips": trips,
        "api_cpu_ms": 1000 * (api1 - api0) / requests,
        "postgres_cpu_ms": 1000 * (pg1 - pg0) / requests,
        "p50_ms": 1000 * statistics.median(latencies),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--compare", type=Path, required=True, help="the other checkout")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    roots = {"before (--compare)": args.compare.resolve(), "this checkout": ROOT}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
    for _ in range(args.rounds):
        for name, root in roots.items():
            runs[name].append(measure(root, args.requests))
            print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, flush=True)
    print(f"\nper GET /jobs/{{id}}, median of {args.rounds} rounds of {args.requests} requests")
    print(f"{'':<20} {'round trips':>11} {'API CPU ms':>11} {'Postgres CPU ms':>16} {'p50 ms':>7}")
    medians = {}
    for name, figures in runs.items():
        medians[name] = {k: statistics.median(f[k] for f in figures) for k in figures[0]}
        m = medians[name]
        print(
            f"{name:<20} {m['round_trips']:>11.2f} {m['api_cpu_ms']:>11.2f} "
            f"{m['postgres_cpu_ms']:>16.2f} {m['p50_ms']:>7.1f}"
        )
    before, now = medians["before (--compare)"], medians["this checkout"]
    print(
        "this checkout / before: "
        + ", ".join(f"{k} {now[k] / before[k]:.2f}" for k in now if before[k])
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
