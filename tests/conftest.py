"""Shared fixtures. Real data and the full stack are optional on a laptop and mandatory in CI:
.ci/run sets DPAAT_REQUIRE_DATA=1, DPAAT_REQUIRE_FULLSTACK=1 and DPAAT_REQUIRE_BROWSER=1, which
turn a skip into a failure."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_support import S3Server, moto_server
from stack_support import POSTGRES_URL, REDIS_URL

from models.data import default_data_root

# Attack loops pick their memory layout by timing it (models/attacks/layout.py), which would make a
# test's rounding depend on the machine's load: the suite pins the previous CPU default (a run may
# set another), and tests/test_layout.py unpins it.
os.environ.setdefault("DPAAT_ATTACK_LAYOUT", "channels_last")


def _require(flag: str, reason: str) -> None:
    if os.environ.get(flag) == "1":
        pytest.fail(f"{reason} ({flag}=1 makes this mandatory)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def ham_root() -> Path:
    """The shared HAM10000 copy (DPAAT_DATA_ROOT or ../shared/data/ham10000)."""
    root = default_data_root()
    if root is None or not (root / "labels.csv").is_file():
        _require("DPAAT_REQUIRE_DATA", "HAM10000 not found: set DPAAT_DATA_ROOT")
    assert root is not None
    return root


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def postgres_url() -> str:
    if not _reachable("127.0.0.1", 5432):
        _require("DPAAT_REQUIRE_FULLSTACK", "PostgreSQL not reachable on 127.0.0.1:5432")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _reachable("127.0.0.1", 6379):
        _require("DPAAT_REQUIRE_FULLSTACK", "Redis not reachable on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and its chromedriver: (browser, driver) paths."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        _require(
            "DPAAT_REQUIRE_BROWSER",
            "chromium and chromium-driver are not installed (apt-get install them)",
        )
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 API server process on loopback (moto's standalone server, issue 15)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        _require("DPAAT_REQUIRE_FULLSTACK", "moto[server] is not installed (pip install '.[test]')")
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server
