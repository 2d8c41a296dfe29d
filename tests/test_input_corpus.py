"""Issue 14: a NUL / control / line-break / bidi corpus sent to every parameter of every operation
of the OpenAPI schema (path, query, JSON body property, form field, upload file name), against the
real PostgreSQL, where a NUL in a text column is a server error. Every one is a 422 naming that
parameter, and nothing is stored. Generated from the schema, so a route added later is covered."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.settings import Settings
from app.db.migrate import upgrade
from app.db.tables import Base
from app.db.testing import fresh_postgres_database
from app.main import create_app
from app.services import api_keys

CORPUS = {
    "nul": "ab\x00cd",
    "control": "ab\x1bcd",
    "newline": "ab\ncd",
    "bidi": "ab\u202ecd",
    "c1": "ab\x85cd",
}


@pytest.fixture(scope="module")
def client(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("corpus")
    with fresh_postgres_database(postgres_url) as url:
        upgrade(url)
        settings = Settings(
            database_url=url, artifact_dir=root / "artifacts", data_roots=[root], auth="on"
        )
        app = create_app(settings, dispatcher=lambda job_id, kind: None)
        with app.state.sessionmaker() as s:  # every scope, so no request stops at a 403
            _row, key = api_keys.create_key(s, owner="fuzz", scopes=["admin", "read", "submit"])
        with TestClient(app, headers={"X-API-Key": key}) as c:
            yield c


def _operations() -> list[tuple[str, str, dict[str, Any]]]:
    schema = create_app(Settings(database_url="sqlite://", auth="off")).openapi()
    return [
        (method, path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def _targets() -> list[tuple[str, str, str, str]]:
    """(method, path, where, name) for every parameter and top-level body field."""
    schema = create_app(Settings(database_url="sqlite://", auth="off")).openapi()
    out = []
    for method, path, op in _operations():
        for p in op.get("parameters", []):
            if p["in"] in ("path", "query"):
                out.append((method, path, p["in"], p["name"]))
        for ctype, media in (op.get("requestBody") or {}).get("content", {}).items():
            ref = media.get("schema", {})
            while "$ref" in ref:
                ref = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[-1]]
            for name, prop in (ref.get("properties") or {}).items():
                if ctype == "application/json":
                    out.append((method, path, "json", name))
                elif ctype == "multipart/form-data":
                    is_file = prop.get("format") == "binary" or "contentMediaType" in prop
                    is_file = is_file or (prop.get("items") or {}).get("format") == "binary"
                    out.append((method, path, "file" if is_file else "form", name))
    return out


TARGETS = _targets()


def _fill(path: str, value: str = "x") -> str:
    import re

    return re.sub(r"\{[^}]+\}", value, path)


def _stored(client: TestClient) -> dict[str, int]:
    with client.app.state.sessionmaker() as s:  # type: ignore[attr-defined]
        return {
            t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
            for t in Base.metadata.sorted_tables
        }


def test_the_corpus_reaches_every_operation() -> None:
    assert len(_operations()) >= 30
    wheres = {w for _m, _p, w, _n in TARGETS}
    assert wheres == {"path", "query", "json", "form", "file"}, wheres


@pytest.mark.parametrize("kind", list(CORPUS))
@pytest.mark.parametrize(("method", "path", "where", "name"), TARGETS)
def test_every_parameter_refuses_the_corpus(
    client: TestClient, method: str, path: str, where: str, name: str, kind: str
) -> None:
    bad = CORPUS[kind]
    url, params, kwargs = _fill(path), {}, {}
    if where == "path":
        url = path.replace("{" + name + "}", quote(bad, safe=""))
        url = _fill(url)
    elif where == "query":
        params = {name: bad}
    elif where == "json":
        kwargs = {"json": {name: bad}}
    elif where == "form":
        kwargs = {"data": {name: bad}, "files": {"_": ("a.bin", b"x")}}
    else:  # raw bytes: httpx would percent-escape control characters in a file name
        disposition = f'form-data; name="{name}"; filename="scan{bad}.png"'.encode()
        kwargs = {
            "content": b"--B\r\nContent-Disposition: " + disposition
            + b"\r\nContent-Type: image/png\r\n\r\nx\r\n--B--\r\n",
            "headers": {"Content-Type": "multipart/form-data; boundary=B"},
        }  # fmt: skip
    before = _stored(client)
    r = client.request(method.upper(), url, params=params, **kwargs)
    assert r.status_code == 422, (r.status_code, r.text[:300])
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["type"] == "text_policy", detail
    assert detail[0]["loc"][-1] == name or detail[0]["loc"][:2] == ["body", name], detail
    assert _stored(client) == before
    json.dumps(r.json())  # the answer itself is valid JSON
