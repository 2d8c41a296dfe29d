"""Alembic environment: the URL comes from the caller (``app.db.migrate.upgrade``) or the service
settings, never from alembic.ini, so one configuration serves the API, the worker and migrations."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from app.db.session import make_engine
from app.db.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("database_url")
    if url:
        return str(url)
    from app.core.settings import get_settings

    return get_settings().database_url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: batch mode rebuilds the table instead.
        render_as_batch=(connection is not None and connection.dialect.name == "sqlite")
        or (url or "").startswith("sqlite"),
        literal_binds=connection is None,
    )


def run_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade head --sql``)."""
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (tests) handed us an open connection
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
