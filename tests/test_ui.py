"""The dashboard through the ASGI app (no browser): sign-in and sessions, CSRF on every form post,
cookie flags, Content-Security-Policy, escaping, owners' isolation, the session cookie's read-only
access to the API, offline API docs, and forms that show errors next to them.

The browser tests (tests/test_ui_browser.py) drive the same pages in a real Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from test_api import ham_files, zip_bytes

from app.api.auth import flat_routes
from app.core.settings import Settings
from app.db.migrate import upgrade
from app.db.tables import Dataset, Job
from app.main import create_app
from app.services import api_keys

API = "/api/v1"
SCRIPT_NAME = "<script>alert('x')</script>"


class Browser:
    """A TestClient with its own cookie jar, as one person's browser."""

    def __init__(self, app: Any) -> None:
        self.client = TestClient(app, follow_redirects=False)

    def login_token(self) -> str:
        r = self.client.get("/ui/login")
        assert r.status_code == 200
        match = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        assert match, r.text
        return match.group(1)

    def sign_in(self, key: str) -> Any:
        token = self.login_token()
        return self.client.post(
            "/ui/login", data={"api_key": key, "csrf_token": token, "next": "/ui"}
        )

    def csrf(self, path: str = "/ui/jobs") -> str:
        r = self.client.get(path)
        assert r.status_code == 200, (r.status_code, r.text[:500])
        match = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        assert match
        return match.group(1)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'ui.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        artifact_dir=tmp_path / "artifacts",
        data_roots=[],
        auth="on",
        predict_steps=2,
    )
    app = create_app(settings)
    sent: list[tuple[str, str]] = []
    app.state.dispatcher = lambda job_id, kind: sent.append((job_id, kind))
    with app.state.sessionmaker() as s:
        alice = api_keys.create_key(s, owner="alice", scopes=["read", "submit"])[1]
        bob = api_keys.create_key(s, owner="bob", scopes=["read", "submit"])[1]
        reader = api_keys.create_key(s, owner="alice", scopes=["read"])[1]
        writer = api_keys.create_key(s, owner="alice", scopes=["submit"])[1]
    with TestClient(app):
        yield {
            "app": app,
            "alice": alice,
            "bob": bob,
            "reader": reader,
            "writer": writer,
            "sent": sent,
        }


def _signed_in(env: dict[str, Any], who: str = "alice") -> Browser:
    browser = Browser(env["app"])
    r = browser.sign_in(env[who])
    assert r.status_code == 303 and r.headers["location"] == "/ui", r.text
    return browser


def _rows(app: Any, table: Any) -> int:
    with app.state.sessionmaker() as s:
        return int(s.scalar(select(func.count()).select_from(table)) or 0)


def _upload(env: dict[str, Any], key: str, name: str) -> dict[str, Any]:
    client = TestClient(env["app"])
    r = client.post(
        f"{API}/datasets",
        files={"file": ("d.zip", zip_bytes(ham_files()), "application/zip")},
        data={"name": name},
        headers={"X-API-Key": key},
    )
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


# ============================================================================ sign-in, sessions
def test_pages_need_a_session_and_sign_in_sets_a_safe_cookie(env: dict[str, Any]) -> None:
    browser = Browser(env["app"])
    r = browser.client.get("/ui/models")
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login")

    r = browser.sign_in(env["alice"])
    assert r.status_code == 303
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("dpaat_session="))
    flags = {p.strip().lower() for p in cookie.split(";")}
    assert "httponly" in flags and "samesite=lax" in flags and "path=/" in flags
    assert env["alice"] not in cookie  # the key itself never goes into a cookie

    page = browser.client.get("/ui")
    assert page.status_code == 200 and 'id="owner">alice<' in page.text


def test_wrong_key_and_missing_login_token_open_no_session(env: dict[str, Any]) -> None:
    browser = Browser(env["app"])
    r = browser.sign_in("dpk_0123456789abcdef_nope")
    assert r.status_code == 401 and "not valid" in r.text
    r = browser.client.post("/ui/login", data={"api_key": env["alice"], "csrf_token": "forged"})
    assert r.status_code == 403
    assert not any(c.startswith("dpaat_session=") for c in r.headers.get_list("set-cookie"))
    assert browser.client.get("/ui").status_code == 303
    r = browser.sign_in(env["writer"])  # a key that cannot read cannot browse either
    assert r.status_code == 403 and "read" in r.text
    assert browser.client.get("/ui").status_code == 303


def test_sign_out_and_key_revocation_end_the_session(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    assert browser.client.get(f"{API}/datasets").status_code == 200  # the cookie reads the API
    r = browser.client.post("/ui/logout", data={"csrf_token": browser.csrf()})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert browser.client.get("/ui").status_code == 303
    assert browser.client.get(f"{API}/datasets").status_code == 401

    other = _signed_in(env)
    key_id = env["alice"].split("_")[1]
    with env["app"].state.sessionmaker() as s:
        api_keys.revoke_key(s, key_id)
    assert other.client.get("/ui").status_code == 303


def test_open_redirect_after_sign_in_is_refused(env: dict[str, Any]) -> None:
    browser = Browser(env["app"])
    token = browser.login_token()
    r = browser.client.post(
        "/ui/login",
        data={"api_key": env["alice"], "csrf_token": token, "next": "//evil.example/x"},
    )
    assert r.status_code == 303 and r.headers["location"] == "/ui"


def test_embedded_default_without_auth_opens_directly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'open.db'}"
    upgrade(url)
    app = create_app(Settings(database_url=url, artifact_dir=tmp_path / "a", auth="off"))
    with TestClient(app, follow_redirects=False) as client:
        r = client.get("/ui/jobs")
        assert r.status_code == 200 and 'id="owner">local<' in r.text
        assert "HttpOnly" in r.headers["set-cookie"]
        token = re.search(r'name="csrf_token" value="([^"]+)"', r.text)
        assert token
        r = client.post("/ui/jobs", data={"csrf_token": token.group(1), "epochs": "1"})
        assert r.status_code == 303  # a form post works with the session opened for "local"


# ======================================================================== CSRF, headers, escaping
def _form_posts(app: Any) -> list[str]:
    return sorted(
        route.path
        for route in flat_routes(app.routes)
        if isinstance(route, APIRoute)
        and route.path.startswith("/ui")
        and "POST" in route.methods
        and route.path != "/ui/login"  # before a session: its own double-submit token, above
    )


def test_every_form_post_requires_the_csrf_token(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    dataset = _upload(env, env["alice"], "mine")
    posts = _form_posts(env["app"])
    assert {"/ui/datasets", "/ui/jobs", "/ui/jobs/{job_id}/cancel", "/ui/logout"} <= set(posts)
    assert "/ui/predict" in posts and "/ui/models/{model_id}/evaluate" in posts
    jobs_before, datasets_before = _rows(env["app"], Job), _rows(env["app"], Dataset)
    for path in posts:
        url = re.sub(r"\{[^}]+\}", "0" * 32, path)
        for token in (None, "wrong-token"):
            data: dict[str, str] = {"dataset_id": dataset["id"], "epochs": "1"}
            if token:
                data["csrf_token"] = token
            files = {"file": ("d.zip", zip_bytes(ham_files()), "application/zip")}
            r = browser.client.post(url, data=data, files=files)
            assert r.status_code == 403, (path, token, r.status_code, r.text[:300])
            assert "security token" in r.text
    assert (_rows(env["app"], Job), _rows(env["app"], Dataset)) == (jobs_before, datasets_before)
    assert browser.client.get("/ui").status_code == 200  # the session survived the refusals


def test_a_read_only_key_cannot_post_forms(env: dict[str, Any]) -> None:
    browser = _signed_in(env, "reader")
    r = browser.client.post("/ui/jobs", data={"csrf_token": browser.csrf(), "epochs": "1"})
    assert r.status_code == 403 and "submit" in r.text
    assert _rows(env["app"], Job) == 0


def test_security_headers_on_every_page(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    for path in ("/ui", "/ui/login", "/ui/datasets", "/ui/jobs", "/ui/models", "/ui/compare",
                 "/ui/leaderboard", "/ui/audits", "/ui/predict", "/ui/models/nope"):  # fmt: skip
        r = browser.client.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "script-src 'self'" in csp, path
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in r.text.replace(
            '<script src="/ui/static/ui.js" defer></script>', ""
        )


def test_a_hostile_dataset_name_renders_escaped(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    dataset = _upload(env, env["alice"], SCRIPT_NAME)
    for path in ("/ui/datasets", f"/ui/datasets/{dataset['id']}", "/ui/jobs"):
        text = browser.client.get(path).text
        assert SCRIPT_NAME not in text, path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in text, path


# ============================================================================ owners, the API
def test_owners_see_only_their_own_rows(env: dict[str, Any]) -> None:
    dataset = _upload(env, env["alice"], "alice-data")
    alice, bob = _signed_in(env), _signed_in(env, "bob")
    assert "alice-data" in alice.client.get("/ui/datasets").text
    assert "alice-data" not in bob.client.get("/ui/datasets").text
    assert bob.client.get(f"/ui/datasets/{dataset['id']}").status_code == 404
    assert bob.client.get(f"/ui/datasets/{dataset['id']}/thumbs/0.png").status_code == 404
    assert bob.client.get(f"{API}/datasets/{dataset['id']}").status_code == 404
    thumb = alice.client.get(f"/ui/datasets/{dataset['id']}/thumbs/0.png")
    assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")


def test_the_session_cookie_reads_the_api_but_never_writes(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    dataset = _upload(env, env["alice"], "d")
    assert browser.client.get(f"{API}/datasets/{dataset['id']}").status_code == 200
    r = browser.client.post(f"{API}/jobs/train", json={"dataset_id": dataset["id"]})
    assert r.status_code == 401
    assert browser.client.delete(f"{API}/datasets/{dataset['id']}").status_code == 401
    assert browser.client.get(f"{API}/keys").status_code == 401  # admin needs a real key
    assert _rows(env["app"], Job) == 0 and _rows(env["app"], Dataset) == 1


# ============================================================================ forms
def test_upload_errors_show_next_to_the_form_and_store_nothing(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    token = browser.csrf("/ui/datasets")
    r = browser.client.post(
        "/ui/datasets",
        data={"csrf_token": token, "name": "broken"},
        files={"file": ("d.zip", b"not an archive", "application/zip")},
    )
    assert 400 <= r.status_code < 500 and 'id="upload-error"' in r.text
    assert _rows(env["app"], Dataset) == 0

    r = browser.client.post(
        "/ui/datasets",
        data={"csrf_token": token, "name": "ok"},
        files={"file": ("d.zip", zip_bytes(ham_files()), "application/zip")},
    )
    assert r.status_code == 303
    page = browser.client.get(r.headers["location"]).text
    assert 'id="class-counts"' in page and ">akiec<" in page and 'id="split-sizes"' in page


def test_train_form_submits_a_job_or_explains_the_error(env: dict[str, Any]) -> None:
    browser = _signed_in(env)
    dataset = _upload(env, env["alice"], "d")
    token = browser.csrf()
    r = browser.client.post(
        "/ui/jobs", data={"csrf_token": token, "dataset_id": dataset["id"], "epochs": "0"}
    )
    assert r.status_code == 422 and 'id="train-error"' in r.text and "epochs" in r.text
    assert env["sent"] == []
    r = browser.client.post(
        "/ui/jobs",
        data={"csrf_token": token, "dataset_id": dataset["id"], "epochs": "1", "name": "n1"},
    )
    assert r.status_code == 303
    job_id = r.headers["location"].rsplit("/", 1)[1]
    assert env["sent"] == [(job_id, "train")]
    page = browser.client.get(r.headers["location"]).text
    assert 'data-events="/api/v1/jobs/' in page and 'id="cancel"' in page
    r = browser.client.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert r.status_code == 303
    assert "cancelled" in browser.client.get(f"/ui/jobs/{job_id}").text


# ============================================================================ docs
def test_api_docs_load_from_local_assets(env: dict[str, Any]) -> None:
    client = TestClient(env["app"])
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert urls and all(u.startswith("/") for u in urls), (page, urls)
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        for u in urls:
            r = client.get(u)
            assert r.status_code == 200 and len(r.content) > 1000, u


# ============================================================================ leaderboard
def _report(clean: float, robust: dict[float, float], attacks: tuple[str, ...]) -> dict[str, Any]:
    return {
        "verdict": "pass",
        "threat_model": {"norm": "Linf", "attacks": [{"name": a, "label": a} for a in attacks]},
        "clean": {"balanced_accuracy": clean, "map": clean / 2},
        "robust": {f"{e:g}": {"eps": e, "balanced_accuracy": v} for e, v in robust.items()},
    }


def test_leaderboard_ranks_comparable_reports_by_robust_balanced_accuracy(
    env: dict[str, Any],
) -> None:
    from app.db.tables import Evaluation, Model
    from app.services import leaderboard

    main, other = _upload(env, env["alice"], "main")["id"], _upload(env, env["alice"], "x")["id"]
    theirs = _upload(env, env["bob"], "bob's")["id"]
    rows = [  # (owner, name, dataset, report)
        ("alice", "robust", main, _report(0.6, {0: 0.6, 1: 0.5, 2: 0.4}, ("fgsm", "pgd-10"))),
        ("alice", "accurate", main, _report(0.9, {0: 0.9, 1: 0.3, 2: 0.1}, ("fgsm", "pgd-10"))),
        ("alice", "tie-low", main, _report(0.5, {0: 0.5, 1: 0.5, 2: 0.4}, ("fgsm", "pgd-10"))),
        ("alice", "fgsm-only", main, _report(0.9, {0: 0.9, 1: 0.9, 2: 0.9}, ("fgsm",))),
        ("alice", "elsewhere", other, _report(0.9, {0: 0.9, 1: 0.9}, ("fgsm", "pgd-10"))),
        ("bob", "not-mine", theirs, _report(1.0, {0: 1.0, 1: 1.0, 2: 1.0}, ("fgsm", "pgd-10"))),
    ]
    with env["app"].state.sessionmaker() as s:
        for owner, name, dataset_id, report in rows:
            model = Model(owner=owner, name=name, source="trained", weights_format="checkpoint",
                          architecture="small_cnn", classes=["a", "b"], image_size=32,
                          training_method="dpaat", checkpoint_sha256="0" * 64, weights_uri="x",
                          dataset_id=dataset_id)  # fmt: skip
            s.add(model)
            s.flush()
            s.add(Evaluation(owner=owner, model_id=model.id, dataset_id=dataset_id,
                             report=report, verdict="pass"))  # fmt: skip
        s.commit()
        board = leaderboard.board(s, "alice", dataset_id=main, threat="fgsm + pgd-10 (Linf)")
        assert board.eps == 2 and board.eps_choices == [0, 1, 2]
        assert [r.model_name for r in board.rows] == ["robust", "tie-low", "accurate"]
        assert board.threats == ["fgsm (Linf)", "fgsm + pgd-10 (Linf)"]
        at_1 = leaderboard.board(s, "alice", dataset_id=main, threat=board.threat, eps=1.0)
        assert [r.model_name for r in at_1.rows] == ["robust", "tie-low", "accurate"]
        assert [r.robust_bacc for r in at_1.rows] == [0.5, 0.5, 0.3]  # tie: clean bacc decides
        assert leaderboard.board(s, "bob").rows[0].model_name == "not-mine"
    page = _signed_in(env).client.get(f"/ui/leaderboard?dataset={main}&eps=1").text
    assert page.index(">robust<") < page.index(">tie-low<") < page.index(">accurate<")
    assert "not-mine" not in page and "elsewhere" not in page


def test_model_page_shows_the_reports_own_intervals() -> None:
    """The page prints the interval the evaluation computed, not one of its own; an old report
    without intervals shows the value alone."""
    from app.ui.templating import interval

    section = {"accuracy": 0.43, "intervals": {"accuracy": {"n": 300, "low": 0.374, "high": 0.487}}}
    assert interval(section, "accuracy") == "[0.374, 0.487]"
    assert interval(section, "map") == "" and interval({"accuracy": 0.4}, "accuracy") == ""
