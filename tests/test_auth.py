"""Authentication, scopes, ownership and quotas (issue 5, items 1 and 3).

Unit level: the key format, what the database keeps (no plaintext), constant-time comparison.
HTTP level, on an app with authentication on: 401/403/revocation, every /api/v1 route walked with
another owner's key (404, nothing listed), the admin key routes, the job and upload quotas (429
with Retry-After, nothing stored, decided before the body is read). Process level: `dpaat serve`
and `dpaat worker` refuse the full stack with auth off; the CI client exits 4 on 401/403.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.auth import flat_routes, required_scope
from app.core.settings import Settings
from app.db.migrate import upgrade
from app.db.tables import ApiKey, Audit, Base, Evaluation, Job, UploadUsage, utcnow
from app.main import create_app
from app.services import api_keys, quotas
from app.services.errors import QuotaExceeded

ROOT = Path(__file__).resolve().parents[1]
API = "/api/v1"
CLASSES = ["akiec", "bcc", "nv"]  # in the archive; a HAM10000-layout dataset has all seven
HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
THRESHOLDS = [{"metric": "accuracy", "op": ">=", "value": 0.5}]


# ============================================================================ builders
def image_bytes(colour: tuple[int, int, int] = (200, 80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


def ham_zip(per_class: int = 4, padding: int = 0) -> bytes:
    """A tiny HAM10000-layout archive; ``padding`` adds an incompressible extra file."""
    rows = ["image_id,dx,lesion_id"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for c, dx in enumerate(CLASSES):
            for i in range(per_class):
                image_id = f"ISIC_{c:02d}{i:05d}"
                rows.append(f"{image_id},{dx},HAM_{c:02d}{i:05d}")
                zf.writestr(f"images/{image_id}.jpg", image_bytes((40 * c, 90 + i, 120)))
        zf.writestr("labels.csv", "\n".join(rows) + "\n")
        if padding:
            zf.writestr("notes/padding.bin", os.urandom(padding))
    return buf.getvalue()


def safetensors_bytes(tmp: Path) -> bytes:
    from safetensors.torch import save_model

    from models.nets import build_model

    path = tmp / "w.safetensors"
    save_model(build_model("small_cnn", len(HAM)), str(path))
    return path.read_bytes()


@dataclass
class AuthApi:
    """An app with authentication on (SQLite, a recording dispatcher) and key helpers."""

    client: TestClient
    settings: Settings
    sent: list[str] = field(default_factory=list)

    def session(self) -> Session:
        session: Session = self.client.app.state.sessionmaker()  # type: ignore[attr-defined]
        return session

    def key(self, owner: str, scopes: str = "read,submit") -> str:
        with self.session() as s:
            return api_keys.create_key(s, owner=owner, scopes=scopes.split(","))[1]

    def stored_state(self) -> tuple[dict[str, int], set[str]]:
        with self.session() as s:
            counts = {
                t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables
            }
        root = self.settings.artifact_dir
        return counts, {
            str(p.relative_to(root)) for p in root.rglob("*")
        } if root.exists() else set()


def h(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture
def make_auth_api(tmp_path: Path) -> Iterator[Callable[..., AuthApi]]:
    clients: list[TestClient] = []

    def build(**overrides: Any) -> AuthApi:
        url = f"sqlite:///{tmp_path / f'auth{len(clients)}.db'}"
        upgrade(url)
        values: dict[str, Any] = {
            "database_url": url,
            "artifact_dir": tmp_path / f"artifacts{len(clients)}",
            "data_roots": [tmp_path],
            "auth": "on",
            "sse_poll_seconds": 0.02,
        }
        values.update(overrides)
        settings = Settings(**values)
        api = AuthApi(TestClient(create_app(settings)), settings)
        api.client.app.state.dispatcher = lambda job_id, kind: api.sent.append(job_id)  # type: ignore[attr-defined]
        api.client.__enter__()
        clients.append(api.client)
        return api

    yield build
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def auth_api(make_auth_api: Callable[..., AuthApi]) -> AuthApi:
    return make_auth_api()


# ============================================================================ keys, unit level
def test_a_key_is_shown_once_and_stored_only_as_a_hash(auth_api: AuthApi) -> None:
    with auth_api.session() as s:
        row, key = api_keys.create_key(s, owner="team-a", scopes=["submit", "read"], label="ci")
    match = re.fullmatch(r"dpk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})", key)
    assert match and match.group(1) == row.key_id
    secret = match.group(2)
    with auth_api.session() as s:
        stored = s.execute(select(ApiKey.__table__)).mappings().one()
    # Scan every column of the row: neither the key nor its secret is there, only the hash.
    assert all(secret not in str(v) and key not in str(v) for v in stored.values())
    assert stored["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert stored["scopes"] == ["read", "submit"] and stored["owner"] == "team-a"
    with auth_api.session() as s:
        principal = api_keys.verify_key(s, key)
    assert principal is not None and principal.owner == "team-a"
    assert principal.scopes == {"read", "submit"}


def test_verification_compares_in_constant_time(
    auth_api: AuthApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = auth_api.key("team-a")
    key_id = key.split("_")[1]
    calls: list[tuple[str, str]] = []
    real = api_keys.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", spy)
    with auth_api.session() as s:
        assert api_keys.verify_key(s, key) is not None
        assert api_keys.verify_key(s, key[:-1] + ("A" if key[-1] != "A" else "B")) is None
        assert api_keys.verify_key(s, f"dpk_{'0' * 16}_{'x' * 43}") is None  # unknown id
    # Every verification, unknown key id included, went through compare_digest on hex digests.
    assert len(calls) == 3
    assert all(len(a) == len(b) == 64 for a, b in calls)
    with auth_api.session() as s:
        assert calls[0][1] == s.get(ApiKey, key_id).secret_sha256  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw",
    ["", "dpk_", "dpk_abc_secret", f"dpk_{'g' * 16}_secret", f"dpk_{'a' * 16}_", "Bearer x"],
)
def test_malformed_keys_are_refused(auth_api: AuthApi, raw: str) -> None:
    with auth_api.session() as s:
        assert api_keys.verify_key(s, raw) is None


def test_scopes_and_owner_names_are_validated(auth_api: AuthApi) -> None:
    with auth_api.session() as s:
        for scopes, owner in ((["read", "root"], "a"), ([], "a"), (["read"], "bad owner")):
            with pytest.raises(api_keys.Invalid):
                api_keys.create_key(s, owner=owner, scopes=scopes)


def test_auth_setting_resolves_per_deployment() -> None:
    sqlite, pg = "sqlite:///x.db", "postgresql+psycopg://u@h/db"
    assert not Settings(database_url=sqlite, broker_url=None).auth_enabled  # embedded default
    assert Settings(database_url=pg, broker_url=None).auth_enabled
    assert Settings(database_url=sqlite, broker_url="redis://h:6379/0").auth_enabled
    assert Settings(database_url=sqlite, broker_url=None, auth="on").auth_enabled
    assert not Settings(database_url=pg, auth="off").auth_enabled


def test_required_scope_follows_the_route() -> None:
    assert required_scope("GET", "/health/ready") is None
    assert required_scope("GET", "/openapi.json") is None
    assert required_scope("GET", f"{API}/jobs/{{job_id}}") == "read"
    assert required_scope("POST", f"{API}/models/{{model_id}}/predict") == "submit"
    assert required_scope("DELETE", f"{API}/datasets/{{dataset_id}}") == "submit"
    assert required_scope("GET", f"{API}/keys") == "admin"
    assert required_scope("GET", f"{API}/nothing-here") == "read"  # unknown paths need a key


# ============================================================================ 401 / 403
def test_missing_unknown_and_revoked_keys_are_401(auth_api: AuthApi) -> None:
    key = auth_api.key("team-a")
    c = auth_api.client
    for headers in ({}, h("not-a-key"), h(f"dpk_{'0' * 16}_{'x' * 43}"), h(key[:-2] + "zz")):
        r = c.get(f"{API}/jobs", headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("ApiKey")
        assert "API key" in r.json()["detail"]
    assert c.get(f"{API}/jobs", headers=h(key)).status_code == 200
    assert c.get(f"{API}/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with auth_api.session() as s:
        api_keys.revoke_key(s, key.split("_")[1])
    r = c.get(f"{API}/jobs", headers=h(key))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # Infrastructure and documentation stay public.
    for path in ("/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert c.get(path).status_code == 200, path


def test_401_comes_before_validation_and_before_the_body(auth_api: AuthApi) -> None:
    before = auth_api.stored_state()
    r = auth_api.client.post(f"{API}/jobs/train", json={"config": {"epochs": -5}})
    assert r.status_code == 401  # not 422: an anonymous client learns nothing about the API
    r = auth_api.client.post(
        f"{API}/datasets", files={"file": ("d.zip", ham_zip(), "application/zip")}
    )
    assert r.status_code == 401 and r.headers["connection"] == "close"
    assert auth_api.stored_state() == before
    status, body_read = asgi_post(auth_api, f"{API}/datasets", headers={})
    assert status == 401 and not body_read


def test_a_missing_scope_is_403_naming_it(auth_api: AuthApi) -> None:
    reader, submitter = auth_api.key("team-a", "read"), auth_api.key("team-a", "submit")
    c = auth_api.client
    r = c.post(f"{API}/jobs/train", json={}, headers=h(reader))
    assert r.status_code == 403 and "'submit' scope" in r.json()["detail"]
    r = c.get(f"{API}/jobs", headers=h(submitter))
    assert r.status_code == 403 and "'read' scope" in r.json()["detail"]
    r = c.get(f"{API}/keys", headers=h(reader))
    assert r.status_code == 403 and "'admin' scope" in r.json()["detail"]
    assert c.post(f"{API}/jobs/train", json={}, headers=h(submitter)).status_code == 201


def test_admin_key_routes(auth_api: AuthApi) -> None:
    admin = auth_api.key("ops", "admin")
    c = auth_api.client
    r = c.post(f"{API}/keys", json={"owner": "team-b", "scopes": ["read"]}, headers=h(admin))
    assert r.status_code == 201, r.text
    created = r.json()
    new_key, secret = created["key"], created["key"].split("_", 2)[2]
    assert created["owner"] == "team-b" and created["scopes"] == ["read"]
    assert c.get(f"{API}/jobs", headers=h(new_key)).status_code == 200
    listed = c.get(f"{API}/keys", headers=h(admin))
    assert listed.status_code == 200 and listed.json()["total"] == 2
    # The list never carries a secret or its hash.
    assert secret not in listed.text and "sha256" not in listed.text and "dpk_" not in listed.text
    assert c.get(f"{API}/keys", params={"owner": "team-b"}, headers=h(admin)).json()["total"] == 1
    r = c.post(f"{API}/keys", json={"owner": "x", "scopes": ["root"]}, headers=h(admin))
    assert r.status_code == 422
    r = c.post(f"{API}/keys/{created['key_id']}/revoke", headers=h(admin))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    assert c.get(f"{API}/jobs", headers=h(new_key)).status_code == 401
    assert c.post(f"{API}/keys/{'0' * 16}/revoke", headers=h(admin)).status_code == 404


def test_auth_off_is_logged_and_keeps_owners_apart_by_header(
    make_auth_api: Callable[..., AuthApi], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="app.main"):
        api = make_auth_api(auth="auto")  # SQLite, no broker: the embedded default
    assert "AUTHENTICATION IS OFF" in caplog.text
    c = api.client
    job = c.post(f"{API}/jobs/train", json={}).json()["id"]
    assert c.get(f"{API}/jobs/{job}").status_code == 200
    assert c.get(f"{API}/jobs/{job}", headers=h("someone-else")).status_code == 404
    # Keys made over HTTP while auth is off would be valid once it is on: refused.
    r = c.post(f"{API}/keys", json={"owner": "x", "scopes": ["admin"]})
    assert r.status_code == 403 and "dpaat keys" in r.json()["detail"]


# ============================================================================ ownership walk
@dataclass
class Tenant:
    ids: dict[str, str]
    key: str


def _owner_a(api: AuthApi) -> Tenant:
    """Owner A with one of everything: datasets, jobs, a model with a report, an audit."""
    key = api.key("owner-a")
    c = api.client
    r = c.post(
        f"{API}/datasets", files={"file": ("d.zip", ham_zip(), "application/zip")}, headers=h(key)
    )
    assert r.status_code == 201, r.text
    dataset = r.json()["id"]
    description = json.dumps({"architecture": "small_cnn", "classes": HAM, "image_size": 32})
    r = c.post(
        f"{API}/models",
        files={"weights": ("w.safetensors", safetensors_bytes(api.settings.artifact_dir.parent))},
        data={"description": description},
        headers=h(key),
    )
    assert r.status_code == 201, r.text
    model = r.json()["id"]
    with api.session() as s:
        s.add(Evaluation(owner="owner-a", model_id=model, report={"clean": {}}, verdict="pass"))
        s.commit()
    r = c.post(f"{API}/jobs/train", json={"dataset_id": dataset}, headers=h(key))
    assert r.status_code == 201, r.text
    job = r.json()["id"]
    finished = c.post(f"{API}/jobs/train", json={"name": "done"}, headers=h(key)).json()["id"]
    assert c.post(f"{API}/jobs/{finished}/cancel", headers=h(key)).status_code == 202
    body = {"model_id": model, "dataset_id": dataset, "thresholds": THRESHOLDS}
    r = c.post(f"{API}/audits", json=body, headers=h(key))
    assert r.status_code == 201, r.text
    audit = r.json()["id"]
    with api.session() as s:
        key_id = s.scalars(select(ApiKey.key_id).where(ApiKey.owner == "owner-a")).one()
    ids = {
        "dataset_id": dataset,
        "model_id": model,
        "job_id": job,
        "finished_job_id": finished,
        "audit_id": audit,
        "key_id": key_id,
    }
    return Tenant(ids, key)


# How each /api/v1 route is exercised by owner B against owner A's rows. A new route makes
# test_every_route_is_classified fail until it is added here.
#   foreign: B gets 404 (and A, the owner, does not);  list: B sees none of A's rows;
#   create: makes B's own rows from B's own input (nothing of A's is named);  admin: B gets 403.
ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/datasets"): "create",
    ("POST", "/datasets/register"): "create",
    ("GET", "/datasets"): "list",
    ("GET", "/datasets/{dataset_id}"): "foreign",
    ("DELETE", "/datasets/{dataset_id}"): "foreign",
    ("POST", "/jobs/train"): "foreign",  # names A's dataset
    ("POST", "/jobs/evaluate"): "foreign",  # names A's model
    ("GET", "/jobs"): "list",
    ("GET", "/jobs/{job_id}"): "foreign",
    ("POST", "/jobs/{job_id}/cancel"): "foreign",
    ("GET", "/jobs/{job_id}/events"): "foreign",
    ("POST", "/models"): "create",
    ("GET", "/models"): "list",
    ("GET", "/models/{model_id}"): "foreign",
    ("GET", "/models/{model_id}/weights"): "foreign",
    ("GET", "/models/{model_id}/export"): "foreign",
    ("GET", "/models/{model_id}/report"): "foreign",
    ("GET", "/models/{model_id}/figures/{name}.png"): "foreign",
    ("POST", "/models/{model_id}/predict"): "foreign",
    ("POST", "/models/{model_id}/predict/batch"): "foreign",
    ("POST", "/audits"): "foreign",  # names A's model
    ("GET", "/audits"): "list",
    ("GET", "/audits/{audit_id}"): "foreign",
    ("POST", "/audits/{audit_id}/cancel"): "foreign",
    ("GET", "/audits/{audit_id}/report"): "foreign",
    ("GET", "/audits/{audit_id}/figures/{name}.png"): "foreign",
    ("GET", "/audits/{audit_id}/curve.png"): "foreign",
    ("GET", "/compare"): "foreign",  # names A's audits
    ("GET", "/compare/curve.png"): "foreign",
    ("POST", "/keys"): "admin",
    ("GET", "/keys"): "admin",
    ("POST", "/keys/{key_id}/revoke"): "admin",
}
# Routes whose owner may also get 404 for lack of content (no such figure yet): B's 404 is still
# asserted, A's answer is not used as evidence.
A_MAY_404 = {
    ("GET", "/models/{model_id}/figures/{name}.png"),
    ("GET", "/audits/{audit_id}/figures/{name}.png"),
}


def _api_routes(app: Any) -> set[tuple[str, str]]:
    found = set()
    for route in flat_routes(app.routes):
        path = getattr(route, "path", "")
        if path.startswith(f"{API}/"):
            for method in getattr(route, "methods", set()) - {"HEAD"}:
                found.add((method, path.removeprefix(API)))
    return found


def test_every_route_is_classified(auth_api: AuthApi) -> None:
    routes = _api_routes(auth_api.client.app)
    assert routes - set(ROUTES) == set(), "classify the new routes in ROUTES"
    assert set(ROUTES) - routes == set(), "ROUTES names routes that no longer exist"


def _request(
    api: AuthApi, key: str, method: str, template: str, ids: dict[str, str]
) -> httpx.Response:
    values = {**ids, "name": "curve"}
    if template.endswith("/events"):
        values["job_id"] = ids["finished_job_id"]  # a final job: the stream ends at once
    path = API + re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], template)
    kwargs: dict[str, Any] = {"headers": h(key)}
    if template == "/jobs/train":
        kwargs["json"] = {"dataset_id": ids["dataset_id"]}
    elif template == "/jobs/evaluate":
        kwargs["json"] = {"model_id": ids["model_id"], "dataset_id": ids["dataset_id"]}
    elif template == "/audits":
        kwargs["json"] = {
            "model_id": ids["model_id"],
            "dataset_id": ids["dataset_id"],
            "thresholds": THRESHOLDS,
        }
    elif template.endswith("/predict"):
        kwargs["files"] = {"file": ("x.png", b"not an image", "image/png")}
    elif template.endswith("/predict/batch"):
        kwargs["files"] = [("files", ("x.png", b"not an image", "image/png"))]
    elif template.startswith("/compare"):
        kwargs["params"] = {"audit": [ids["audit_id"], ids["audit_id"]]}
    elif template == "/keys":
        kwargs["json"] = {"owner": "owner-b", "scopes": ["admin"]}
    return api.client.request(method, path, **kwargs)


def test_another_owner_gets_404_on_every_route(auth_api: AuthApi) -> None:
    a = _owner_a(auth_api)
    b_key = auth_api.key("owner-b")
    before = auth_api.stored_state()
    a_ids = set(a.ids.values())
    for (method, template), kind in sorted(ROUTES.items()):
        if kind == "create":
            continue
        r = _request(auth_api, b_key, method, template, a.ids)
        where = f"{method} {template}: {r.status_code} {r.text[:200]}"
        if kind == "foreign":
            assert r.status_code == 404, where
            # A 404 may echo the id asked for, never another of A's.
            asked = str(r.request.url) + r.request.content.decode(errors="replace")
            assert all(i in asked for i in a_ids if i in r.text), where
        elif kind == "list":
            assert r.status_code == 200 and r.json()["total"] == 0, where
            assert not any(i in r.text for i in a_ids), where
        else:
            assert r.status_code == 403 and "'admin' scope" in r.json()["detail"], where
    # B's attempts changed nothing of A's: no row, no file, no job sent.
    assert auth_api.stored_state() == before
    with auth_api.session() as s:
        assert s.get(Job, a.ids["job_id"]).status == "queued"  # type: ignore[union-attr]
        audit = s.get(Audit, a.ids["audit_id"])
        assert audit is not None and s.get(Job, audit.job_id).status == "queued"  # type: ignore[union-attr]
    # The same requests with A's key do reach A's rows (the 404s above were about ownership).
    reads = sorted(k for k, v in ROUTES.items() if v == "foreign" and k not in A_MAY_404)
    for method, template in sorted(reads, key=lambda k: (k[0] != "GET", k)):
        r = _request(auth_api, a.key, method, template, a.ids)
        assert r.status_code != 404, f"owner A: {method} {template}: {r.text[:200]}"
    # B's own creations stay B's.
    r = auth_api.client.post(
        f"{API}/datasets", files={"file": ("d.zip", ham_zip(), "application/zip")}, headers=h(b_key)
    )
    assert r.status_code == 201
    assert auth_api.client.get(f"{API}/datasets", headers=h(b_key)).json()["total"] == 1
    assert auth_api.client.get(f"{API}/datasets", headers=h(a.key)).json()["total"] == 1


# ============================================================================ quotas
def test_job_quota_is_429_with_retry_after_and_stores_nothing(
    make_auth_api: Callable[..., AuthApi],
) -> None:
    api = make_auth_api(max_active_jobs=2)
    key, other = api.key("team-a"), api.key("team-b")
    c = api.client
    first = c.post(
        f"{API}/jobs/train", json={"name": "1"}, headers={**h(key), "Idempotency-Key": "k1"}
    )
    assert first.status_code == 201
    assert c.post(f"{API}/jobs/train", json={"name": "2"}, headers=h(key)).status_code == 201
    before, sent = api.stored_state(), list(api.sent)
    r = c.post(f"{API}/jobs/train", json={"name": "3"}, headers=h(key))
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) == quotas.JOB_RETRY_AFTER_SECONDS
    assert "job quota exceeded" in r.json()["detail"] and "limit 2" in r.json()["detail"]
    assert api.stored_state() == before and api.sent == sent  # nothing stored, nothing sent
    # A retry of an accepted submit still gets its job back at the limit.
    again = c.post(
        f"{API}/jobs/train", json={"name": "1"}, headers={**h(key), "Idempotency-Key": "k1"}
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    # Another owner has a quota of its own; a finished job frees a slot.
    assert c.post(f"{API}/jobs/train", json={}, headers=h(other)).status_code == 201
    assert c.post(f"{API}/jobs/{first.json()['id']}/cancel", headers=h(key)).status_code == 202
    assert c.post(f"{API}/jobs/train", json={"name": "3"}, headers=h(key)).status_code == 201


def test_audits_count_against_the_job_quota(auth_api: AuthApi) -> None:
    a = _owner_a(auth_api)  # two active jobs: a train job and the audit's evaluation
    auth_api.client.app.state.settings.max_active_jobs = 2  # type: ignore[attr-defined]
    before = auth_api.stored_state()
    body = {"model_id": a.ids["model_id"], "dataset_id": a.ids["dataset_id"]}
    r = auth_api.client.post(
        f"{API}/audits", json={**body, "thresholds": THRESHOLDS}, headers=h(a.key)
    )
    assert r.status_code == 429 and r.headers["retry-after"]
    r = auth_api.client.post(f"{API}/jobs/evaluate", json=body, headers=h(a.key))
    assert r.status_code == 429
    assert auth_api.stored_state() == before


def test_upload_quota_is_429_with_retry_after_and_stores_nothing(
    make_auth_api: Callable[..., AuthApi],
) -> None:
    api = make_auth_api(upload_quota_mb=1, upload_quota_window_seconds=600)
    key, other = api.key("team-a"), api.key("team-b")
    archive = ham_zip(padding=600_000)  # ~0.6 MB: one fits in the quota, two do not
    c = api.client

    def upload(k: str) -> httpx.Response:
        return c.post(
            f"{API}/datasets", files={"file": ("d.zip", archive, "application/zip")}, headers=h(k)
        )

    assert upload(key).status_code == 201
    before = api.stored_state()
    r = upload(key)
    assert r.status_code == 429, r.text
    retry = int(r.headers["retry-after"])
    assert 0 < retry <= 600
    assert "upload quota exceeded" in r.json()["detail"] and "1 MB per 10 min" in r.json()["detail"]
    assert api.stored_state() == before  # nothing stored, not even the ledger
    # Model weights count too; another owner is not affected.
    r = c.post(
        f"{API}/models",
        files={"weights": ("w.safetensors", b"x" * 700_000)},
        data={"description": "{}"},
        headers=h(key),
    )
    assert r.status_code == 429
    # So does a model uploaded inside an audit request (multipart POST /audits).
    r = c.post(
        f"{API}/audits",
        files={"weights": ("w.safetensors", b"x" * 700_000)},
        data={"description": "{}", "audit": "{}"},
        headers=h(key),
    )
    assert r.status_code == 429, r.text
    assert api.stored_state() == before
    assert upload(other).status_code == 201
    # Refused before the body is read: the declared Content-Length is enough.
    status, body_read = asgi_post(api, f"{API}/datasets", headers=h(key), length=600_000)
    assert status == 429 and not body_read
    # Once the earlier upload leaves the window, uploading works again.
    with api.session() as s:
        for row in s.scalars(select(UploadUsage).where(UploadUsage.owner == "team-a")):
            row.created_at = utcnow() - timedelta(seconds=601)
        s.commit()
    assert upload(key).status_code == 201


def test_upload_quota_retry_after_is_when_enough_expires(auth_api: AuthApi) -> None:
    now = utcnow()
    with auth_api.session() as s:
        for age, size in ((500, 400_000), (100, 400_000)):
            s.add(UploadUsage(owner="o", bytes=size, created_at=now - timedelta(seconds=age)))
        s.commit()
        quotas.check_upload(s, "o", 200_000, limit_mb=1, window_seconds=600, now=now)  # fits
        with pytest.raises(QuotaExceeded) as e:
            quotas.check_upload(s, "o", 400_000, limit_mb=1, window_seconds=600, now=now)
        assert e.value.retry_after == 100  # the 500 s old upload leaves the window in 100 s
        with pytest.raises(QuotaExceeded) as e:
            quotas.check_upload(s, "o", 1_000_000, limit_mb=1, window_seconds=600, now=now)
        assert e.value.retry_after == 500  # both must expire
        quotas.record_upload(s, "o", 10, window_seconds=300, now=now)  # prunes the 500 s row
        assert s.scalar(select(func.count()).select_from(UploadUsage)) == 2


def asgi_post(
    api: AuthApi, path: str, headers: dict[str, str], length: int = 1000
) -> tuple[int, bool]:
    """POST straight into the ASGI app with a declared body; returns the status and whether the
    app asked for the body at all."""
    app = api.client.app
    read = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"x" * length, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"multipart/form-data; boundary=x"),
            (b"content-length", str(length).encode()),
            *raw,
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return status, read


# ============================================================================ processes
def _dpaat(*args: str) -> list[str]:
    return [sys.executable, "-c", "from app.cli import main; main()", *args]


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DPAAT_") and k not in ("DATABASE_URL", "BROKER_URL")
    }
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["serve"], {"DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"}),
        (["worker"], {"BROKER_URL": "redis://127.0.0.1:1/0"}),
    ],
)
def test_the_full_stack_refuses_to_start_with_auth_off(
    command: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    out = subprocess.run(
        _dpaat(*command),
        cwd=tmp_path,
        env=_env(DPAAT_AUTH="off", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "authentication is off" in lines[0], out.stderr
    assert "dpaat keys create" in lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """`dpaat serve` (embedded, SQLite) with DPAAT_AUTH=on, its database migrated first."""
    tmp = tmp_path_factory.mktemp("auth-serve")
    env = _env(
        DPAAT_DATABASE_URL=f"sqlite:///{tmp / 'dpaat.db'}",
        DPAAT_ARTIFACT_DIR=str(tmp / "artifacts"),
        DPAAT_AUTH="on",
    )
    subprocess.run(_dpaat("migrate"), cwd=tmp, env=env, check=True, capture_output=True)
    port = _free_port()
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        _dpaat("serve", "--port", str(port)), cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "dpaat serve did not start"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        env["_LOG"] = str(tmp / "serve.log")
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _keys(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _dpaat("keys", *args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_keys_cli_and_the_ci_client_against_an_auth_on_server(
    auth_server: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, env = auth_server
    assert "authentication on" in Path(env["_LOG"]).read_text()
    made = _keys(env, "create", "--owner", "ci", "--scopes", "read")
    assert made.returncode == 0, made.stderr
    reader = made.stdout.strip()
    assert re.fullmatch(r"dpk_[0-9a-f]{16}_\S+", reader) and "shown once" in made.stderr
    submitter = _keys(env, "create", "--owner", "ci", "--scopes", "read,submit").stdout.strip()
    listed = _keys(env, "list")
    assert listed.returncode == 0 and listed.stdout.count("ci") == 2
    assert reader.split("_", 2)[2] not in listed.stdout  # never a secret

    def audit(key: str | None) -> subprocess.CompletedProcess[str]:
        argv = ["audit", "--model", "0" * 32, "-t", "accuracy>=0.5", "--server", url]
        argv += ["--out", str(tmp_path / "out"), "--timeout", "5"]
        return subprocess.run(
            _dpaat(*argv, *(["--key", key] if key else [])),
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    for key, code in ((None, "401"), ("dpk_nope", "401"), (reader, "403")):
        out = audit(key)
        assert out.returncode == 4, out.stdout + out.stderr
        assert f"authentication refused ({code})" in " ".join((out.stdout + out.stderr).split())
    out = audit(submitter)  # authenticated: the unknown model is the problem now
    assert out.returncode == 4 and "404" in out.stdout + out.stderr
    key_id = submitter.split("_")[1]
    assert _keys(env, "revoke", key_id).returncode == 0
    out = audit(submitter)
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 4 and "authentication refused (401)" in text
    assert _keys(env, "revoke", "0" * 16).returncode == 1
