"""Issue 15, the headline: two hosts simulated on one machine with no shared filesystem.

The API and two ``dpaat worker`` processes each get their own local folders (cache, scratch, and an
artifact directory that must never be created) and share only PostgreSQL, Redis and an S3 server
(moto's standalone server on loopback). A training job starts on worker A; A is SIGKILLed after its
first epoch's checkpoint is in the bucket and its folders are deleted; the reaper re-queues the job
and worker B resumes it from the checkpoint in S3 with no epoch redone. The resulting model is then
evaluated and used for a prediction, and every artifact is found in the bucket.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from s3_support import S3Server
from stack_support import CLASSES, ham_archive, running_stack, submit_train, wait_for

pytestmark = [pytest.mark.fullstack, pytest.mark.realdata]

EPOCHS = 3
PREFIX = "artifacts"


def _host(root: Path) -> dict[str, str]:
    """The local folders of one simulated host."""
    return {
        "DPAAT_CACHE_DIR": str(root / "cache"),
        "DPAAT_SCRATCH_DIR": str(root / "scratch"),
        "DPAAT_ARTIFACT_DIR": str(root / "artifacts"),  # unused on S3: must never appear
    }


def test_a_job_started_on_host_a_finishes_on_host_b_through_s3(
    postgres_url: str, redis_url: str, ham_root: Path, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.new_bucket()
    hosts = {name: tmp_path / f"host-{name}" for name in ("api", "a", "b")}
    env = {**s3_server.env(bucket, PREFIX), **_host(hosts["api"])}
    with running_stack(
        postgres_url, redis_url, tmp_path, env, workers=0, predict_workers=0
    ) as stack:
        r = stack.http.post(
            stack.url("/datasets"),
            files={"file": ("ham-subset.zip", ham_archive(ham_root), "application/zip")},
            data={"name": "ham subset"},
        )
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        objects = s3_server.objects(bucket)
        # ONE archive object per dataset plus its split manifest, not one object per image
        assert {f"{PREFIX}/datasets/{dataset_id}/data.tar"} | {
            f"{PREFIX}/datasets/{dataset_id}/manifest.json"
        } <= set(objects)
        assert not [k for k in objects if k.endswith(".jpg")]

        # Host A alone: it takes the job.
        stack.start_worker(concurrency=1, env=_host(hosts["a"]))
        job_id = submit_train(stack, dataset_id, epochs=EPOCHS, best_by="last")["id"]
        checkpoint_key = f"{PREFIX}/jobs/{job_id}/checkpoint.pt"
        wait_for(lambda: len(stack.epoch_rows(job_id)) >= 1, 240, "the first epoch", every=0.1)
        assert checkpoint_key in s3_server.objects(bucket)  # published before it was recorded
        stack.kill_worker()
        before = {e.epoch: e.created_at for e in stack.epoch_rows(job_id)}
        assert 1 <= len(before) < EPOCHS, before
        assert (hosts["a"] / "scratch" / "jobs" / job_id / "checkpoint.pt").is_file()
        shutil.rmtree(hosts["a"])  # host A is gone, and everything it had on disk with it

        # Host B: its beat re-queues the job once A's lease expires; it resumes from S3.
        stack.start_worker(concurrency=1, env=_host(hosts["b"]))
        job = stack.wait_status(job_id, {"succeeded", "failed", "cancelled"}, 300)
        assert job["status"] == "succeeded", job["error"]
        assert job["retries"] == 1
        rows = stack.epoch_rows(job_id)
        assert [e.epoch for e in rows] == list(range(1, EPOCHS + 1))
        for row in rows:  # the epochs of host A were neither trained nor recorded again
            if row.epoch in before:
                assert row.created_at == before[row.epoch]
        result = job["result"]
        assert result["resumed_from_epoch"] >= len(before) >= 1
        assert result["epochs_this_run"] == EPOCHS - result["resumed_from_epoch"]
        log = stack.worker_log_text()
        assert "resuming from the checkpoint in the store" in log

        # The model is in the bucket, byte for byte what the API serves.
        model_id = result["model_id"]
        model = stack.http.get(stack.url(f"/models/{model_id}")).json()
        weights = stack.http.get(stack.url(f"/models/{model_id}/weights"))
        assert weights.status_code == 200
        assert hashlib.sha256(weights.content).hexdigest() == model["checkpoint_sha256"]
        objects = s3_server.objects(bucket)
        assert f"{PREFIX}/jobs/{job_id}/best.pt" in objects
        assert objects[f"{PREFIX}/jobs/{job_id}/best.pt"] == len(weights.content)

        # Evaluate on host B, then predict on a prediction worker of host B.
        r = stack.http.post(
            stack.url("/jobs/evaluate"),
            json={
                "model_id": model_id,
                "limit": 8,
                "eps_list": [0, 1],
                "attacks": [{"name": "fgsm"}],
                "gradcam": False,
                "batch_size": 32,
            },
        )
        assert r.status_code == 201, r.text
        eval_id = r.json()["id"]
        evaluation = stack.wait_status(eval_id, {"succeeded", "failed"}, 240)
        assert evaluation["status"] == "succeeded", evaluation["error"]
        report = stack.http.get(stack.url(f"/models/{model_id}/report"), params={"format": "md"})
        assert report.status_code == 200 and "#" in report.text
        for figure in ("robustness_curve", "class_recall"):  # stored / drawn by the API
            png = stack.http.get(stack.url(f"/models/{model_id}/figures/{figure}.png"))
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG"), figure

        stack.start_predict_worker(env=_host(hosts["b"]))
        image = next((ham_root / "images").glob("ISIC_*.jpg")).read_bytes()
        r = stack.http.post(
            stack.url(f"/models/{model_id}/predict"),
            files={"file": ("lesion.jpg", image, "image/jpeg")},
            params={"steps": 2},
        )
        assert r.status_code == 200, r.text
        assert r.json()["class"] in CLASSES

        # Every artifact is in the bucket; no host ever had an artifact directory.
        objects = s3_server.objects(bucket)
        for name in ("report.json", "report.md", "robustness_curve.png"):
            assert f"{PREFIX}/jobs/{eval_id}/{name}" in objects, name
        assert [k for k in objects if k.startswith(f"{PREFIX}/jobs/{eval_id}/figures/")]
        assert not hosts["a"].exists()
        for name in ("api", "b"):
            assert not (hosts[name] / "artifacts").exists(), name
            assert (hosts[name] / "cache").is_dir(), name
        assert not (tmp_path / "artifacts").exists()
        # a finished job leaves no scratch behind on the host that finished it
        assert not (hosts["b"] / "scratch" / "jobs" / job_id).exists()
