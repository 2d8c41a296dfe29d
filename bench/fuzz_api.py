"""A long schemathesis run over the whole OpenAPI schema: every operation, many generated cases
each, counting the answers by status class and failing on any 5xx (tests/test_api_fuzz.py is the
bounded version run by CI).

Half of the cases carry a valid admin key (instead of the generated headers, which get 401s) and
the ids of real objects created first (a dataset, an uploaded model, a queued training and
evaluation job, another owner's API key) in their path, so the fuzzer reaches the code behind the
401s and 404s too. The app runs in this process (ASGI, no network) on SQLite with authentication
on and a dispatcher that sends nothing.

    .venv/bin/python bench/fuzz_api.py [--max-examples 150] [--seed 0] [--json out.json]
                                       [--postgres [SERVER_URL]]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import schemathesis  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from PIL import Image  # noqa: E402

from app.core.settings import Settings  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services import api_keys  # noqa: E402

CLASSES = ["bcc", "mel", "nv"]


def _jpeg(colour: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (colour, 90, 120)).save(buf, format="JPEG")
    return buf.getvalue()


def _seed_objects(client: TestClient) -> dict[str, str]:
    """Create one object of each kind; returns path parameter name -> a real id."""
    from safetensors.torch import save_model

    from models.nets import build_model

    rows, buf = ["image_id,dx,lesion_id"], io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c, dx in enumerate(CLASSES):
            for i in range(3):
                image_id = f"ISIC_{c}{i:06d}"
                rows.append(f"{image_id},{dx},HAM_{c}{i}")
                zf.writestr(f"images/{image_id}.jpg", _jpeg(60 * c))
        zf.writestr("labels.csv", "\n".join(rows) + "\n")
    r = client.post(
        "/api/v1/datasets", files={"file": ("d.zip", buf.getvalue(), "application/zip")}
    )
    r.raise_for_status()
    ids = {"dataset_id": r.json()["id"]}
    classes = r.json()["classes"]  # the HAM10000 layout always has its seven classes
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_model(build_model("small_cnn", len(classes)), str(path))
        weights = path.read_bytes()
    description = {"architecture": "small_cnn", "classes": classes, "image_size": 32}
    r = client.post(
        "/api/v1/models",
        files={"weights": ("w.safetensors", weights, "application/octet-stream")},
        data={"description": json.dumps(description)},
    )
    r.raise_for_status()
    ids["model_id"] = r.json()["id"]
    r = client.post("/api/v1/jobs/train", json={"dataset_id": ids["dataset_id"]})
    r.raise_for_status()
    ids["job_id"] = r.json()["id"]
    r = client.post(
        "/api/v1/jobs/evaluate",
        json={"model_id": ids["model_id"], "dataset_id": ids["dataset_id"]},
    )
    r.raise_for_status()
    ids["audit_id"] = r.json()["id"]  # not an audit: the fuzzer still gets a well-formed id
    return ids


def fuzz_operation(
    operation: Any,
    label: str,
    seen: Counter[int],
    statuses: Counter[int],
    failures: list[dict[str, Any]],
    known: dict[str, str],
    key: str,
    picker: random.Random,
    args: argparse.Namespace,
) -> None:
    """Run ``max_examples`` generated cases of one operation, recording every answer."""

    @seed(args.seed)
    @settings(
        max_examples=args.max_examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: count, do not minimise
        database=None,
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        real = picker.random() < 0.5
        for name in list(case.path_parameters or {}):
            if name in known and real:
                case.path_parameters[name] = known[name]
        if real:  # a valid key instead of whatever was generated (that one gets a 401)
            headers = {
                k: v
                for k, v in (case.headers or {}).items()
                if k.lower() not in ("x-api-key", "authorization")
            }
            case.headers = {**headers, "X-API-Key": key}
        try:
            response = case.call()
        except Exception as e:  # the in-process client re-raises what the server did not handle
            status, answer = 500, f"unhandled {type(e).__name__}: {e}"[:300]
        else:
            status = response.status_code
            answer = response.content[:300].decode(errors="replace")  # binary bodies too
        statuses[status] += 1
        seen[status] += 1
        if status >= 500 and len(failures) < 20:
            failures.append(
                {
                    "operation": label,
                    "status": status,
                    "path": case.formatted_path,
                    "query": case.query,
                    "headers": {k: v for k, v in (case.headers or {}).items() if k != "X-API-Key"},
                    "body": repr(case.body)[:300],
                    "answer": answer,
                }
            )

    run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=150, help="cases per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--postgres",
        metavar="SERVER_URL",
        nargs="?",
        const="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="run on a fresh database of this PostgreSQL server (a NUL in a text column is a "
        "server error there, not on SQLite); default: SQLite",
    )
    args = parser.parse_args()
    if args.postgres:
        from app.db.testing import fresh_postgres_database

        with fresh_postgres_database(args.postgres, prefix="dpaat_fuzz") as url:
            return _run(args, url)
    return _run(args, None)


def _run(args: argparse.Namespace, database_url: str | None) -> int:
    root = Path(tempfile.mkdtemp(prefix="dpaat-fuzz-"))
    config = Settings(
        database_url=database_url or f"sqlite:///{root / 'fuzz.db'}",
        artifact_dir=root / "artifacts",
        data_roots=[root / "artifacts"],
        auth="on",
        predict_steps=1,
        sse_poll_seconds=0.01,
        sse_max_seconds=0.5,  # an event stream of a live job ends quickly
    )
    upgrade(config.database_url)
    app = create_app(config, dispatcher=lambda job_id, kind: None)
    with app.state.sessionmaker() as session:
        _row, key = api_keys.create_key(session, owner="fuzz", scopes=["admin", "read", "submit"])
        victim, _ = api_keys.create_key(session, owner="other", scopes=["read"])
    with TestClient(app, headers={"X-API-Key": key}) as client:
        known = {**_seed_objects(client), "key_id": victim.key_id}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    picker = random.Random(args.seed)
    statuses: Counter[int] = Counter()
    per_operation: dict[str, Counter[int]] = {}
    failures: list[dict[str, Any]] = []
    began = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        seen = per_operation.setdefault(label, Counter())
        fuzz_operation(operation, label, seen, statuses, failures, known, key, picker, args)
        print(f"{label:<55} {sum(seen.values()):>5} cases  {dict(sorted(seen.items()))}")
    elapsed = time.monotonic() - began
    cases = sum(statuses.values())
    server_errors = sum(n for status, n in statuses.items() if status >= 500)
    app.state.engine.dispose()  # the database can be dropped now
    print(
        f"\n{'PostgreSQL' if database_url else 'SQLite'}: "
        f"{len(per_operation)} operations, {cases} cases in {elapsed:.0f} s, "
        f"{server_errors} answers 5xx; by status: {dict(sorted(statuses.items()))}"
    )
    for failure in failures:
        print("5xx:", json.dumps(failure))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "database": "postgresql" if database_url else "sqlite",
                    "operations": len(per_operation),
                    "cases": cases,
                    "server_errors": server_errors,
                    "seconds": round(elapsed),
                    "max_examples": args.max_examples,
                    "by_status": dict(sorted(statuses.items())),
                    "failures": failures,
                },
                indent=2,
            )
        )
    return 1 if server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
