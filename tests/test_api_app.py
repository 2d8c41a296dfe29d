"""The service's rules that need no database: import discipline (no torch in the web process),
the request schema mirroring TrainConfig, settings, storage, images."""

from __future__ import annotations

import ast
import dataclasses
import io
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.core.settings import Settings
from app.schemas.jobs import SERVER_FIELDS, Architecture, Method, TrainHyperParams
from app.services import errors
from app.services.archives import safe_parts
from app.services.images import sanitize_image
from app.services.storage import ArtifactStore

ROOT = Path(__file__).resolve().parents[1]


def test_web_process_starts_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import app.main\n"
        "application = app.main.app\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(application) as c:\n"
        "    assert c.get('/health/live').status_code == 200\n"
        "    assert c.get('/openapi.json').status_code == 200\n"
        "    assert c.get('/api/v1/jobs').json()['total'] == 0\n"
        "    assert c.get('/ui/jobs').status_code == 200\n"  # the dashboard, too
        "    assert c.get('/docs').status_code == 200\n"
        "print('torch' in sys.modules, 'models' in sys.modules, 'celery' in sys.modules)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "DPAAT_DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
        "DPAAT_ARTIFACT_DIR": str(tmp_path / "artifacts"),
        "DPAAT_AUTO_MIGRATE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_routers_never_import_torch_models_or_worker() -> None:
    routers = [*(ROOT / "app" / "api").rglob("*.py"), *(ROOT / "app" / "ui").rglob("*.py")]
    for path in sorted(routers):
        bad = {n for n in _imports(path) if n.split(".")[0] in {"torch", "models", "worker"}}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_services_raise_domain_errors_not_http() -> None:
    for path in sorted((ROOT / "app" / "services").glob("*.py")):
        text = path.read_text()
        assert "HTTPException" not in text and "status_code" not in text, path.name


def test_train_schema_mirrors_train_config() -> None:
    from models.nets import ARCHITECTURES
    from models.training.config import METHODS, TrainConfig

    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    schema_fields = TrainHyperParams.model_fields
    assert set(schema_fields) | SERVER_FIELDS == set(config_fields)
    assert not set(schema_fields) & SERVER_FIELDS
    for name, info in schema_fields.items():
        assert info.default == config_fields[name].default, name
    assert set(typing.get_args(Method)) == set(METHODS)
    assert set(typing.get_args(Architecture)) == set(ARCHITECTURES)
    # What the schema accepts, TrainConfig accepts.
    for sample in (
        {},
        {"method": "trades", "eps_max": 2, "optimizer": "adam", "scheduler": "none"},
        {"method": "standard", "eps_max": 0, "batch_size": 2, "limit": 2},
        {"method": "iaat_flip", "delta": 0.5, "bisection_steps": 1, "pgd_at_beta": 0.5},
    ):
        params = TrainHyperParams.model_validate(sample).model_dump()
        TrainConfig.from_dict(params).validate()


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 1},
        {"method": "dpaat", "eps_max": 0},
        {"class_weights": True, "balanced_sampler": True},
        {"tau_momentum": 1.0},
        {"bisection_steps": 0},
    ],
)
def test_schema_refuses_what_train_config_refuses(bad: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from models.training.config import TrainConfig

    with pytest.raises(ValidationError):
        TrainHyperParams.model_validate(bad)
    with pytest.raises(ValueError):
        TrainConfig.from_dict({**TrainHyperParams().model_dump(), **bad}).validate()


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("DPAAT_DATA_ROOTS", f"{a}:{b}")
    monkeypatch.setenv("DPAAT_LEASE_SECONDS", "90")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@h/db" and not s.embedded
    assert s.data_roots == [a.resolve(), b.resolve()] and s.lease_seconds == 90
    assert s.queue_for("train") == "train"
    monkeypatch.setenv("DPAAT_DATA_ROOTS", f'["{a}"]')
    monkeypatch.delenv("BROKER_URL")
    s = Settings()
    assert s.data_roots == [a.resolve()] and s.embedded


def test_a_data_root_variable_that_names_no_folder_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The service does not start with a mistyped DPAAT_DATA_ROOT (it used to register
    ../shared/data/ham10000 instead); a real folder is the one registered."""
    monkeypatch.delenv("DPAAT_DATA_ROOTS", raising=False)
    monkeypatch.setenv("DPAAT_DATA_ROOT", str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError, match="DPAAT_DATA_ROOT="):
        Settings()
    monkeypatch.setenv("DPAAT_DATA_ROOT", str(tmp_path))
    assert Settings().data_roots == [tmp_path.resolve()]


def test_settings_refuse_unsafe_values() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="filesystem root"):
        Settings.model_validate({"data_roots": ["/"]})
    with pytest.raises(ValidationError, match="absolute"):
        Settings.model_validate({"environment": "production", "artifact_dir": "relative/dir"})
    with pytest.raises(ValidationError):
        Settings.model_validate({"max_upload_mb": 0})


def test_store_writes_atomically_under_generated_names(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = store.put_bytes(b"hello", ".txt")
    path = store.path(ref.uri)
    assert path.read_bytes() == b"hello" and path.suffix == ".txt" and ref.size == 5
    assert ref.uri.startswith("artifact://blobs/") and "hello" not in ref.uri
    copy = store.put_file(path)
    assert copy.sha256 == ref.sha256 and copy.uri != ref.uri
    assert store.ref(path) == ref
    for uri in ("artifact://../x", "artifact:///etc/passwd", "file:///etc/passwd", "artifact://"):
        with pytest.raises(errors.Invalid):
            store.path(uri)
    with pytest.raises(errors.Invalid):
        store.put_bytes(b"x", "/../../evil")
    with pytest.raises(errors.Invalid):
        store.dir_for("..")
    with pytest.raises(errors.TooLarge):
        store.put_stream(io.BytesIO(b"x" * 2048), ".bin", max_bytes=1024)
    store.delete(ref.uri)
    assert not path.exists() and not path.parent.exists()
    leftovers = [p for p in store.root.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("images/a.jpg", ("images", "a.jpg")),
        ("./images//a.jpg", ("images", "a.jpg")),
        ("__MACOSX/._a.jpg", None),
        ("images/._a.jpg", None),
    ],
)
def test_safe_parts_accepts(name: str, parts: tuple[str, ...] | None) -> None:
    assert safe_parts(name) == parts


@pytest.mark.parametrize(
    "name", ["../a", "a/../../b", "/etc/passwd", "C:/x", "\\\\server\\x", "a\x00b"]
)
def test_safe_parts_refuses(name: str) -> None:
    with pytest.raises(errors.Invalid):
        safe_parts(name)


def test_images_are_reencoded_without_exif() -> None:
    im = Image.new("RGB", (40, 20), (10, 200, 30))
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0112] = 6  # Orientation: rotate 90
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif)
    assert b"SecretCam" in buf.getvalue()
    out = sanitize_image(buf.getvalue(), max_bytes=1 << 20, max_pixels=10_000)
    assert out.startswith(b"\x89PNG") and b"SecretCam" not in out
    with Image.open(io.BytesIO(out)) as clean:
        assert clean.size == (20, 40) and clean.mode == "RGB" and not clean.getexif()
    with pytest.raises(errors.TooLarge):
        sanitize_image(buf.getvalue(), max_bytes=1 << 20, max_pixels=100)


def test_every_domain_error_has_one_status() -> None:
    from app.api.errors import STATUS_OF, status_of

    assert status_of(errors.NotFound("x")) == 404
    assert status_of(errors.TooLarge("x")) == 413
    classes = [c for c in vars(errors).values() if isinstance(c, type)]
    subclasses = [
        c for c in classes if issubclass(c, errors.ServiceError) and c is not errors.ServiceError
    ]
    assert set(subclasses) == set(STATUS_OF)
