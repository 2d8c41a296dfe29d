"""The full deployment on the real services (tests/stack_support.py starts it).

Scenarios: upload real HAM10000 images -> train DPAAT -> evaluate -> predict through HTTP; the same
task delivered twice runs once; cancelling a running job; a worker killed with SIGKILL in the
middle of training, its job re-queued by the reaper and finished by a new worker from the last
checkpoint; API keys on the real deployment (401, another owner's 404, revocation).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy.orm import Session
from stack_support import (
    CLASSES,
    LEASE_SECONDS,
    ROOT,
    TINY,
    Stack,
    dpaat_command,
    ham_archive,
    running_stack,
    submit_train,
    wait_for,
)

from app.services import jobs

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]


@pytest.fixture(scope="module")
def stack(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    with running_stack(postgres_url, redis_url, tmp_path_factory.mktemp("fullstack")) as s:
        yield s


@pytest.fixture(scope="module")
def dataset_id(stack: Stack, ham_root: Path) -> str:
    r = stack.http.post(
        stack.url("/datasets"),
        files={"file": ("ham-subset.zip", ham_archive(ham_root), "application/zip")},
        data={"name": "ham subset"},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert sorted(body["classes"]) == sorted(CLASSES)
    return str(body["id"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_upload_train_evaluate_predict(stack: Stack, dataset_id: str, ham_root: Path) -> None:
    submitted = submit_train(stack, dataset_id)
    job_id = submitted["id"]
    statuses = [submitted["status"]]

    def finished() -> bool:
        status = stack.job(job_id)["status"]
        if status != statuses[-1]:
            statuses.append(status)
        return status in ("succeeded", "failed", "cancelled")

    wait_for(finished, 240, "training", every=0.1)
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
            owner=stack.owner,
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
    second = f"job {job_id}: nothing to claim"
    wait_for(lambda: second in stack.worker_log_text(), 30, "the 2nd delivery")
    log = stack.worker_log_text()
    assert len(re.findall(rf"job {job_id}: claimed by", log)) == 1
    assert len(re.findall(rf"job {job_id}: nothing to claim", log)) == 1
    assert job_out["result"]["epochs_this_run"] == 2


def test_claim_race_on_postgres_has_one_winner(stack: Stack) -> None:
    """Eight workers claim the same job at the same instant: the conditional UPDATE lets one in."""
    import threading

    with Session(stack.engine) as session:
        job_id = jobs.create_job(
            session, owner=stack.owner, kind="train", params={"config": TINY}
        ).id
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
    job_id = submit_train(stack, dataset_id, epochs=200)["id"]
    wait_for(lambda: len(stack.epoch_rows(job_id)) >= 1, 180, "the first epoch", every=0.2)
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
    job_id = submit_train(stack, dataset_id, epochs=epochs)["id"]
    wait_for(lambda: len(stack.epoch_rows(job_id)) >= 1, 180, "the first epoch", every=0.1)
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


def test_the_full_stack_requires_keys_and_keeps_owners_apart(stack: Stack, dataset_id: str) -> None:
    """On the real deployment (auth on by default): 401 without a key, another owner's key gets
    404 and an empty list, a revoked key is refused at once, `dpaat serve` refuses auth off."""
    r = stack.client(None).get(stack.url(f"/datasets/{dataset_id}"))
    assert r.status_code == 401 and "www-authenticate" in r.headers
    other_key = stack.new_key("other-team", "read,submit")
    with stack.client(other_key) as other:
        assert other.get(stack.url(f"/datasets/{dataset_id}")).status_code == 404
        assert other.get(stack.url("/datasets")).json()["total"] == 0
        r = other.post(stack.url("/jobs/train"), json={"dataset_id": dataset_id})
        assert r.status_code == 404
        revoke = subprocess.run(
            dpaat_command("keys", "revoke", other_key.split("_")[1]),
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
        )
        assert revoke.returncode == 0, revoke.stderr
        assert other.get(stack.url("/datasets")).status_code == 401
    refused = subprocess.run(
        dpaat_command("serve", "--port", "1"),
        cwd=ROOT,
        env={**stack.env, "DPAAT_AUTH": "off"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "authentication is off" in refused.stderr
