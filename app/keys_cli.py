"""``dpaat keys create|list|revoke``: API keys, straight in the configured database (DATABASE_URL).

This is the admin bootstrap: the first key (with the ``admin`` scope) is made here, before any
HTTP call is possible. ``create`` prints the key alone on stdout, once; the rest goes to stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import typer

from app.services.errors import ServiceError

if TYPE_CHECKING:  # `dpaat` loads this module with only the torch-free client installed
    from sqlalchemy.orm import Session

keys_app = typer.Typer(help="Manage API keys (in the configured database).", no_args_is_help=True)
T = TypeVar("T")


@contextmanager
def _session() -> Iterator[Session]:
    from app.core.settings import get_settings
    from app.db.session import make_engine, make_sessionmaker

    engine = make_engine(get_settings().database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _run(action: Callable[[Session], T]) -> T:
    """Run ``action`` in a session; domain and database errors become one line and exit 1."""
    from sqlalchemy.exc import DBAPIError

    try:
        with _session() as session:
            return action(session)
    except ServiceError as e:
        typer.echo(f"error: {e.message}", err=True)
    except DBAPIError as e:
        first = str(e.orig).splitlines()[0] if e.orig else type(e).__name__
        typer.echo(f"error: database: {first} (is it migrated? run `dpaat migrate`)", err=True)
    raise typer.Exit(1)


@keys_app.command("create")
def create(
    owner: str = typer.Option(..., help="Whose rows the key reads and creates (e.g. a team)."),
    scopes: str = typer.Option("read,submit", help="Comma-separated: read, submit, admin."),
    label: str | None = typer.Option(None, help="A note for humans (who holds the key)."),
) -> None:
    """Create a key and print it once (only its sha256 is stored)."""
    from app.services import api_keys

    row, key = _run(
        lambda s: api_keys.create_key(s, owner=owner, scopes=scopes.split(","), label=label)
    )
    typer.echo(
        f"created key {row.key_id} for owner {row.owner!r} with scopes {','.join(row.scopes)}; "
        "it is shown once, store it now:",
        err=True,
    )
    typer.echo(key)


@keys_app.command("list")
def list_(
    owner: str | None = typer.Option(None, help="Only this owner's keys."),
) -> None:
    """Every key (newest first) without its secret."""
    from app.services import api_keys

    rows, _total = _run(lambda s: api_keys.list_keys(s, owner=owner, limit=10_000))
    typer.echo(f"{'KEY_ID':<16}  {'OWNER':<20}  {'SCOPES':<18}  {'CREATED':<20}  STATE  LABEL")
    for r in rows:
        state = "revoked" if r.revoked_at else "active"
        created = r.created_at.strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(
            f"{r.key_id:<16}  {r.owner:<20}  {','.join(r.scopes):<18}  {created:<20}  "
            f"{state:<6} {r.label or ''}"
        )


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The KEY_ID shown by `dpaat keys list`."),
) -> None:
    """Revoke a key: refused (401) from the next request on."""
    from app.services import api_keys

    row = _run(lambda s: api_keys.revoke_key(s, key_id))
    typer.echo(f"revoked key {row.key_id} of owner {row.owner!r}")


def register(cli: typer.Typer) -> None:
    cli.add_typer(keys_app, name="keys")
