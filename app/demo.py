"""`dpaat demo`: the whole product on the embedded default, through its HTTP API.

Starts `dpaat serve` (SQLite, local artifacts, the Celery worker inside the service process) in a
subprocess, then, as a user would: registers the shared HAM10000 copy (or trains on generated data
when there is none), trains DPAAT, evaluates the model, and asks for robust predictions of a few
test images. Everything it wrote stays under ``out``.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

console = Console(stderr=True)
FINAL = {"succeeded", "failed", "cancelled"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dpaat serve exited with status {proc.returncode}")
        try:
            if client.get("/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the service did not become ready in time")


def _check(r: httpx.Response) -> dict[str, Any]:
    if r.status_code >= 400:
        raise RuntimeError(f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text}")
    body: dict[str, Any] = r.json()
    return body


def _wait_job(client: httpx.Client, job_id: str, what: str) -> dict[str, Any]:
    """Poll a job to a final state, printing each finished epoch's vital signs."""
    shown = 0
    while True:
        job = _check(client.get(f"/api/v1/jobs/{job_id}"))
        for ep in job.get("epochs", [])[shown:]:
            m = ep.get("metrics", {})
            signs = ", ".join(
                f"{k}={m[k]:.3f}"
                for k in ("loss", "val_acc", "val_bacc", "tau", "broken_frac", "eps_mean")
                if isinstance(m.get(k), int | float)
            )
            console.print(f"  {what} epoch {ep.get('epoch')}: {signs}")
        shown = len(job.get("epochs", []))
        if job["status"] in FINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"{what} job {job_id} ended {job['status']}: {job.get('error')}")
            return job
        time.sleep(1.0)


def _demo_images(data: str | None, n: int = 3) -> list[tuple[str, bytes]]:
    """A few images to classify: real test-set lesions when there is data, else generated ones."""
    if data is not None:
        paths = sorted((Path(data) / "images").glob("*.jpg"))[-n:]
        return [(p.name, p.read_bytes()) for p in paths]
    from PIL import Image

    from models.data import synthetic_dataset

    ds = synthetic_dataset(n=n, size=64, seed=99)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(buf, format="PNG")
        out.append((f"generated_{i}.png", buf.getvalue()))
    return out


def run_demo(out: str, data: str | None, epochs: int, limit: int) -> int:
    """Run the round trip; 0 on success, 1 when any step failed (the reason is printed)."""
    from models.data import default_data_root

    run = Path(out).resolve()
    run.mkdir(parents=True, exist_ok=True)
    if data is None:
        try:
            found = default_data_root()
        except NotADirectoryError as e:
            console.print(f"[red]error:[/] {e}")
            return 1
        data = None if found is None else str(found)
    port = _free_port()
    env = {
        **os.environ,
        "DPAAT_DATABASE_URL": f"sqlite:///{run / 'dpaat.db'}",
        "DPAAT_ARTIFACT_DIR": str(run / "artifacts"),
    }
    env.pop("BROKER_URL", None)
    env.pop("DPAAT_BROKER_URL", None)
    if data is not None:
        env["DPAAT_DATA_ROOTS"] = json.dumps([str(Path(data).resolve())])
    log = (run / "serve.log").open("wb")
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            _wait_ready(client, proc)
            console.print(
                f"[bold]service ready[/] on 127.0.0.1:{port} (embedded: SQLite + in-process worker)"
            )
            dataset_id = None
            if data is not None:
                ds = _check(
                    client.post(
                        "/api/v1/datasets/register", json={"path": str(Path(data).resolve())}
                    )
                )
                dataset_id = ds["id"]
                console.print(
                    f"dataset {ds['name']}: {ds['num_samples']} images, {ds['class_counts']}"
                )
            else:
                console.print("no HAM10000 found: training on generated data")
            config = {
                "method": "dpaat",
                "epochs": epochs,
                "limit": limit,
                "image_size": 64,
                "pgd_steps": 5,
                "class_weights": True,  # nv is 2/3 of HAM10000
            }
            job = _check(
                client.post(
                    "/api/v1/jobs/train",
                    json={"dataset_id": dataset_id, "name": "demo-dpaat", "config": config},
                )
            )
            console.print(f"[bold]train[/] job {job['id']}: {config}")
            job = _wait_job(client, job["id"], "train")
            model_id = job["result"]["model_id"]
            console.print(f"model {model_id} registered")
            ev = _check(
                client.post(
                    "/api/v1/jobs/evaluate",
                    json={"model_id": model_id, "dataset_id": dataset_id, "limit": min(limit, 300)},
                )
            )
            console.print(f"[bold]evaluate[/] job {ev['id']} (FGSM + PGD-20, eps 0..8/255)")
            _wait_job(client, ev["id"], "evaluate")
            report = _check(client.get(f"/api/v1/models/{model_id}/report"))["report"]
            md = client.get(f"/api/v1/models/{model_id}/report", params={"format": "md"})
            (run / "report.json").write_text(json.dumps(report, indent=1))
            (run / "report.md").write_text(md.text)
            summary = {
                "clean_accuracy": report["clean"]["accuracy"],
                "clean_balanced_accuracy": report["clean"]["balanced_accuracy"],
                "robust_accuracy": {k: v["accuracy"] for k, v in report["robust"].items()},
                "curve_auc": report["curve_auc"],
                "lesion_focus": report.get("lesion_focus"),
                "verdict": report["verdict"],
            }
            console.print_json(json.dumps(summary))
            for name, blob in _demo_images(data):
                pred = _check(
                    client.post(f"/api/v1/models/{model_id}/predict", files={"file": (name, blob)})
                )
                rob = pred.get("robustness", {})
                console.print(
                    f"predict {name}: {pred.get('class')} "
                    f"(eps*={rob.get('eps_star')}/255, score={rob.get('score')})"
                )
            console.print(f"[bold green]demo done[/]: report in {run / 'report.md'}")
            return 0
    except (RuntimeError, httpx.HTTPError) as e:
        console.print(f"[bold red]demo failed[/]: {e} (service log: {run / 'serve.log'})")
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
