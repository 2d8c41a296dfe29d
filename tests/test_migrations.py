"""The Alembic migrations and the ORM must describe the same schema, on SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, inspect

from app.db import migrate
from app.db.session import make_engine
from app.db.tables import Base
from app.db.testing import fresh_postgres_database

TABLES = {"datasets", "jobs", "job_epochs", "models", "artifacts", "evaluations"}


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('mig') / 'm.db'}"
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


def diffs(url: str, metadata: MetaData) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def test_orm_and_migrations_agree(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert diffs(empty_url, Base.metadata) == []
    # The comparison can fail: a column the migrations lack is reported.
    drifted = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(drifted)
    drifted.tables["jobs"].append_column(Column("priority", Integer, nullable=True))
    reported = diffs(empty_url, drifted)
    assert any("priority" in str(d) for d in reported), reported


def test_every_row_kind_has_an_owner() -> None:
    for name in ("datasets", "jobs", "models", "artifacts", "evaluations"):
        column = Base.metadata.tables[name].c.owner
        assert not column.nullable and column.index


def test_downgrade_to_base_and_back(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert (
        migrate.current(empty_url)
        == ScriptDirectory.from_config(migrate.alembic_config()).get_current_head()
    )
    migrate.downgrade(empty_url, "base")
    engine = make_engine(empty_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    migrate.upgrade(empty_url)
    engine = make_engine(empty_url)
    try:
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(migrate.alembic_config()).get_heads()
    assert len(heads) == 1
