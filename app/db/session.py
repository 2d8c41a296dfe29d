"""Engines and sessions. One engine per database URL per process, created on first use."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

# What the driver raises when the database cannot be reached or dropped the connection (not a
# bad query: those are ProgrammingError/IntegrityError and stay 500s, they are our bugs).
DATABASE_DOWN: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the pool had no connection to give within its timeout
)

_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Foreign keys are off by default in SQLite; WAL lets the API read while a worker writes.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for ``url`` with the settings this service needs on each backend.

    SQLite: the file's folder is created, foreign keys enforced, WAL journal, a 30 s busy timeout
    (the embedded worker writes from another thread); an in-memory URL shares one connection.
    Postgres: connections are checked before use (pool_pre_ping) so a restarted server is survived.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        connect_args = {"check_same_thread": False, "timeout": 30}
        if database in ("", ":memory:"):
            kwargs.setdefault("poolclass", StaticPool)
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def get_engine(url: str | None = None) -> Engine:
    """The shared engine of ``url`` (default: the configured database)."""
    if url is None:
        from app.core.settings import get_settings

        url = get_settings().database_url
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def make_sessionmaker(engine: Engine, *, reads_only: bool = False) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (rows are handed to response models).

    ``reads_only``: on Postgres, each statement is its own transaction (autocommit), which saves
    the BEGIN and ROLLBACK round trips of a request that only reads (issue 12: a key check plus
    ``GET /jobs/{id}`` went from 9 round trips to 4). Only for code that never writes and whose
    reads are one statement each, or may see different snapshots. SQLite keeps transactions: its
    round trips are function calls, and an in-memory database shares one connection between
    sessions, where switching it to autocommit would end another session's transaction.
    """
    if reads_only and engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(bind=engine, expire_on_commit=False)


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    """A sessionmaker on the shared engine of ``url`` (default: the configured database)."""
    return make_sessionmaker(get_engine(url))


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Close every shared engine (tests, and a worker after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
