"""Fuzzing the OpenAPI schema (schemathesis): whatever a client sends, no 5xx.

Semantic refusals (422 for a schema-valid but inconsistent request, 404 for made-up ids) are the
expected answers here; only server errors fail the test. SQLite only: the HTTP layer is the same
on both backends, and the time budget is small.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from app.core.settings import Settings
from app.db.migrate import upgrade
from app.main import create_app

# schemathesis reads the schema when the module is collected; the database is migrated by the
# fixture below, before the first case runs (creating the app opens no connection).
_ROOT = Path(tempfile.mkdtemp(prefix="dpaat-fuzz-"))
_CONFIG = Settings(
    database_url=f"sqlite:///{_ROOT / 'fuzz.db'}",
    artifact_dir=_ROOT / "artifacts",
    data_roots=[_ROOT / "artifacts"],
    predict_steps=1,
)
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(_CONFIG, dispatcher=lambda job_id, kind: None)
)


@pytest.fixture(scope="module", autouse=True)
def _database() -> Iterator[None]:
    upgrade(_CONFIG.database_url)
    yield
    shutil.rmtree(_ROOT, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error])
