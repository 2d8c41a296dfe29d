"""Apply the Alembic migrations from Python (``dpaat migrate``, the API's auto-migrate, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(database_url: str | None = None) -> Config:
    """The Alembic configuration of ``migrations/`` aimed at ``database_url`` (None: settings)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if database_url is not None:
        # An attribute, not an ini option: a URL may hold '%', which ini interpolation mangles.
        cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the database at ``database_url`` (default: the configured one) to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    """Undo migrations down to ``revision`` (tests and manual recovery)."""
    command.downgrade(alembic_config(database_url), revision)


def current(database_url: str | None = None) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    from app.db.session import make_engine

    url = database_url or _settings_url()
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def _settings_url() -> str:
    from app.core.settings import get_settings

    return get_settings().database_url
