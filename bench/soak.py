"""A soak of the full stack (issue 14): concurrent training and evaluation jobs while job workers
are SIGKILLed at random moments (>= 20 kills), the broker is killed and restarted empty once, and
PostgreSQL is cut for 10 s once (a TCP proxy, as tests/test_faults.py does). Then every job must
have succeeded (0 lost), no job may have been held by two live workers (0 run twice: no worker
log says "lease lost"), and every epoch finished before a kill keeps its record (0 redone).
Prints, per kill, the delay from the kill to the job showing ``progress.lost_worker`` (the
reaper's ``noticed_at``) and to its re-queue (``requeued_at``), with median and max.

Processes: ``dpaat serve``, one reaper process (``dpaat worker --beat`` on the default queue
only, never killed) and one job worker (prefork, 2 children, train + evaluate queues), which is
killed with its process group and started again. Real HAM10000 images (90, 32 px), tiny DPAAT.

    DPAAT_DATA_ROOT=/work/shared/data/ham10000 .venv/bin/python bench/soak.py [--kills 20]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from stack_support import Stack, ham_archive, running_stack, wait_for  # noqa: E402
from test_faults import PrivateRedis, TcpProxy  # noqa: E402

from app.db.tables import Job, JobEpoch  # noqa: E402
from models.data import default_data_root  # noqa: E402

TINY = {"image_size": 32, "batch_size": 16, "pgd_steps": 2, "bisection_steps": 2}
ENV = {  # the defaults of issue 14 (heartbeat 2 s, lease 5 s, reaper every 2 s, confirm 3 s)
    "DPAAT_HEARTBEAT_SECONDS": "2",
    "DPAAT_LEASE_SECONDS": "5",
    "DPAAT_REAP_INTERVAL_SECONDS": "2",
    "DPAAT_LOST_WORKER_CONFIRM_SECONDS": "3",
    "DPAAT_STALE_QUEUED_SECONDS": "6",  # messages lost with the broker are re-sent quickly
    "DPAAT_MAX_RETRIES": "100",  # the soak kills far more often than production would
    "DPAAT_MAX_ACTIVE_JOBS": "100",
}


_STARTED: list[Any] = []  # every process this script started, stopped at the end


def _start(stack: Stack, name: str, *args: str) -> Any:
    proc, log = stack._spawn(name, "worker", *args, "--hostname", f"{name}@soak")
    _STARTED.append(proc)
    wait_for(lambda: " ready." in log.read_text(errors="replace"), 120, name, every=0.3)
    return proc


def _kill(proc: Any) -> None:
    import os
    import signal

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _jobs(stack: Stack, ids: list[str]) -> dict[str, Job]:
    with Session(stack.engine) as s:
        return {j.id: j for j in s.scalars(select(Job).where(Job.id.in_(ids)))}


def _epochs(stack: Stack, ids: list[str]) -> dict[tuple[str, int], datetime]:
    with Session(stack.engine) as s:
        rows = s.scalars(select(JobEpoch).where(JobEpoch.job_id.in_(ids)))
        return {(r.job_id, r.epoch): r.created_at for r in rows}


def _when(value: str | None) -> float | None:
    if not value:
        return None
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--train-jobs", type=int, default=4)
    parser.add_argument("--eval-jobs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    ham = default_data_root()
    assert ham is not None, "set DPAAT_DATA_ROOT to the HAM10000 folder"
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="dpaat-soak-"))
    url = make_url(args.postgres)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    broker = PrivateRedis(tmp)
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    report: dict[str, Any] = {}
    try:
        with running_stack(proxied, broker.url, tmp, env=ENV) as stack:
            direct = make_url(stack.database_url).set(host=url.host, port=url.port)
            stack.engine = create_engine(direct.render_as_string(hide_password=False))
            try:
                report = _soak(stack, proxy, broker, ham, rng, args)
            finally:
                for proc in _STARTED:  # the stack stops only the processes it started itself
                    if proc.poll() is None:
                        _kill(proc)
    finally:
        broker.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    ok = report.get("lost") == 0 and report.get("run_twice") == 0 and report.get("redone") == 0
    return 0 if ok else 1


def _soak(
    stack: Stack,
    proxy: TcpProxy,
    broker: PrivateRedis,
    ham: Path,
    rng: random.Random,
    args: argparse.Namespace,
) -> dict[str, Any]:
    assert stack.worker is not None
    _kill(stack.worker)  # the stack's own worker: replaced by a reaper and a job worker below
    train_q, eval_q = stack.env["DPAAT_TRAIN_QUEUE"], stack.env["DPAAT_EVALUATE_QUEUE"]
    _start(stack, "reaper", "--beat", "--queues", "default", "--concurrency", "1")
    jobs_args = ("--queues", f"{train_q},{eval_q}", "--concurrency", "2")
    worker = _start(stack, "worker1", *jobs_args)
    r = stack.http.post(
        stack.url("/datasets"), files={"file": ("ham.zip", ham_archive(ham), "application/zip")}
    )
    assert r.status_code == 201, r.text
    dataset, classes = r.json()["id"], list(r.json()["classes"])
    ids: list[str] = []
    for i in range(args.train_jobs):
        config = {**TINY, "method": "dpaat", "epochs": args.epochs, "seed": i}
        r = stack.http.post(
            stack.url("/jobs/train"), json={"dataset_id": dataset, "config": config}
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    model = _upload_model(stack, classes)
    eval_ids: list[str] = []
    for _ in range(args.eval_jobs):
        r = stack.http.post(
            stack.url("/jobs/evaluate"),
            json={
                "model_id": model,
                "dataset_id": dataset,
                "part": "train",  # the largest part: evaluations long enough to be killed
                "eps_list": [0, 1, 2, 4],
                "attacks": [{"name": "pgd", "steps": 5}],
                "gradcam": False,
            },
        )
        assert r.status_code == 201, r.text
        eval_ids.append(r.json()["id"])
    started = time.time()
    kills: list[dict[str, Any]] = []
    seen_epochs: dict[tuple[str, int], datetime] = {}
    events: list[str] = []
    n = 0
    while n < args.kills:
        all_ids = ids + eval_ids
        states = _jobs(stack, all_ids)
        running = [j for j in states.values() if j.status == "running" and j.worker_id]
        if not running:
            if all(j.status in ("succeeded", "failed", "cancelled") for j in states.values()):
                ids += _more_training(stack, dataset, args, len(ids))  # keep work for the kills
            time.sleep(0.3)
            continue
        # Kill at a random moment of real work: once one more epoch has been recorded (or an
        # evaluation is under way), 0-3 s into what follows.
        done = len(_epochs(stack, ids))

        def progressed(done: int = done, ids: list[str] = ids) -> bool:
            states = _jobs(stack, ids + eval_ids)
            evaluating = any(
                j.status == "running" and (j.progress or {}).get("phase") == "evaluating"
                for j in states.values()
            )
            return evaluating or len(_epochs(stack, ids)) > done

        wait_for(progressed, 300, f"progress before kill {n + 1}", every=0.2)
        time.sleep(rng.uniform(0.0, 3.0))
        running = [
            j for j in _jobs(stack, all_ids).values() if j.status == "running" and j.worker_id
        ]
        if not running:
            continue
        seen_epochs = {**_epochs(stack, ids), **seen_epochs}  # first record of each epoch
        held = [j.id for j in running]
        killed_at = time.time()
        _kill(worker)
        n += 1
        # while the job worker is down: the broker restart and the database cut, once each
        if n == args.kills // 3:
            broker.kill()
            time.sleep(3)
            broker.start()
            events.append(f"redis killed and restarted empty after kill {n}")
        shown: dict[str, float] = {}
        requeued: dict[str, float] = {}

        def noticed(
            held: list[str] = held,
            at: float = killed_at,
            shown: dict[str, float] = shown,
            requeued: dict[str, float] = requeued,
        ) -> bool:
            waiting = 0
            for job in _jobs(stack, held).values():
                lost = (job.progress or {}).get("lost_worker") or {}
                t_shown, t_requeued = _when(lost.get("noticed_at")), _when(lost.get("requeued_at"))
                if t_shown and t_shown > at:
                    shown[job.id] = t_shown - at
                if t_requeued and t_requeued > at:
                    requeued[job.id] = t_requeued - at
                elif job.status not in ("succeeded", "failed", "cancelled"):
                    waiting += 1  # (a job that ended just before the kill is not waited for)
            return waiting == 0

        wait_for(noticed, 120, f"the jobs of kill {n} to be re-queued", every=0.2)
        kills.append({"kill": n, "jobs": len(held), "shown_s": shown, "requeued_s": requeued})
        print(
            f"kill {n}: {len(held)} job(s); shown after "
            f"{', '.join(f'{v:.1f}' for v in shown.values())} s, re-queued after "
            f"{', '.join(f'{v:.1f}' for v in requeued.values())} s",
            flush=True,
        )
        if n == 2 * args.kills // 3:
            worker = _start(stack, f"worker{n + 1}", *jobs_args)
            time.sleep(rng.uniform(1.0, 3.0))
            proxy.cut()
            cut = time.monotonic()
            time.sleep(args.outage)
            proxy.restore()
            events.append(f"postgres cut for {time.monotonic() - cut:.1f} s after kill {n}")
            continue
        worker = _start(stack, f"worker{n + 1}", *jobs_args)
    all_ids = ids + eval_ids
    deadline = time.time() + 900
    while time.time() < deadline:
        states = _jobs(stack, all_ids)
        if all(j.status in ("succeeded", "failed", "cancelled") for j in states.values()):
            break
        time.sleep(1)
    states = _jobs(stack, all_ids)
    after = _epochs(stack, ids)
    redone = [key for key, at in seen_epochs.items() if after.get(key) != at]
    logs = stack.worker_log_text()
    run_twice = len(re.findall(r"lease lost, abandoning", logs))
    shown_all = [v for k in kills for v in k["shown_s"].values()]
    requeued_all = [v for k in kills for v in k["requeued_s"].values()]
    return {
        "kills": len(kills),
        "jobs": {"train": len(ids), "evaluate": len(eval_ids)},
        "statuses": dict(Counter(j.status for j in states.values())),
        "retries": sum(j.retries for j in states.values()),
        "lost": sum(j.status != "succeeded" for j in states.values()),
        "run_twice": run_twice,
        "redone": len(redone),
        "epochs_checked": len(seen_epochs),
        "kill_to_lost_worker_s": _stats(shown_all),
        "kill_to_requeued_s": _stats(requeued_all),
        "events": events,
        "wall_s": round(time.time() - started),
        "per_kill": kills,
    }


def _upload_model(stack: Stack, classes: list[str]) -> str:
    """An untrained small CNN (safetensors) for the evaluation jobs."""
    from safetensors.torch import save_model

    from models.nets import build_model

    path = Path(tempfile.mkdtemp()) / "w.safetensors"
    save_model(build_model("small_cnn", len(classes)), str(path))
    description = {"architecture": "small_cnn", "classes": classes, "image_size": 32}
    r = stack.http.post(
        stack.url("/models"),
        files={"weights": ("w.safetensors", path.read_bytes(), "application/octet-stream")},
        data={"description": json.dumps(description)},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _more_training(stack: Stack, dataset: str, args: argparse.Namespace, offset: int) -> list[str]:
    out = []
    for i in range(2):
        config = {**TINY, "method": "dpaat", "epochs": args.epochs, "seed": offset + i}
        r = stack.http.post(
            stack.url("/jobs/train"), json={"dataset_id": dataset, "config": config}
        )
        assert r.status_code == 201, r.text
        out.append(r.json()["id"])
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "n": len(values),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
        "min": round(min(values), 2),
    }


if __name__ == "__main__":
    sys.exit(main())
