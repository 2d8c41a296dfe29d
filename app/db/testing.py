"""Helpers for tests that need a real database: a throw-away Postgres database, and emptying
every table between tests. Used by the service's test modules (and usable by anyone's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from app.db.tables import Base


@contextmanager
def fresh_postgres_database(server_url: str, prefix: str = "dpaat_test") -> Iterator[str]:
    """Create ``<prefix>_<random>`` on the server of ``server_url``, yield its URL, drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def truncate_all(engine: Engine) -> None:
    """Delete every row of every table of the schema (children first)."""
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())
