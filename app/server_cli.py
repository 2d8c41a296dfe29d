"""Server commands of the ``dpaat`` CLI: ``serve``, ``worker``, ``migrate`` and ``keys``.

``app.cli`` calls :func:`register`. Heavy imports (uvicorn, FastAPI, Celery, Alembic) happen inside
the commands so that ``dpaat --help`` and the ML commands stay fast.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType

import typer

ASGI_APP = "app.main:app"


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _refuse_without_auth(command: str) -> None:
    """The full stack never runs open: exit 2 with one line when DPAAT_AUTH turns auth off."""
    from app.core.settings import get_settings

    settings = get_settings()
    if settings.full_stack and not settings.auth_enabled:
        typer.echo(
            f"dpaat {command}: refusing to start: authentication is off (DPAAT_AUTH="
            f"{settings.auth}) on the full stack (PostgreSQL or a broker configured); unset "
            "DPAAT_AUTH and create a key with `dpaat keys create --owner NAME --scopes ...`",
            err=True,
        )
        raise typer.Exit(2)


class _Stopped(Exception):
    """A stop signal, raised once uvicorn has finished its own graceful shutdown."""


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    raise _Stopped(signum)


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, min=1, max=65535),
    workers: int = typer.Option(
        1, min=1, help="API processes (full mode only: embedded mode runs its worker in-process)."
    ),
    log_level: str = typer.Option("info", help="debug | info | warning | error"),
) -> None:
    """Run the HTTP API. Without BROKER_URL it also runs the worker and the reaper in-process
    (embedded mode: SQLite and a local artifact folder by default, migrations applied on start)."""
    import uvicorn

    from app.core.settings import get_settings

    _configure_logging(log_level)
    _refuse_without_auth("serve")
    settings = get_settings()
    if settings.embedded or settings.auto_migrate:
        from app.db.migrate import upgrade

        upgrade(settings.database_url)
    runtime = None
    if settings.embedded:
        if workers != 1:
            raise typer.BadParameter("embedded mode runs one process; set BROKER_URL to scale")
        from app.services.embedded import EmbeddedRuntime

        runtime = EmbeddedRuntime(settings)
        runtime.start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal; turning it into
    # an exception here lets the embedded worker stop its task cleanly before the process exits.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stopped)
    try:
        uvicorn.run(ASGI_APP, host=host, port=port, workers=workers, log_level=log_level.lower())
    except _Stopped:
        pass
    finally:
        if runtime is not None:
            runtime.stop()


def worker(
    queues: str | None = typer.Option(
        None,
        "--queues",
        "-Q",
        help="Comma-separated queues: train, evaluate, predict, default (default: all but "
        "predict). The names are DPAAT_TRAIN_QUEUE, DPAAT_EVALUATE_QUEUE, DPAAT_PREDICT_QUEUE.",
    ),
    concurrency: int | None = typer.Option(
        None,
        min=1,
        help="Tasks at once (default: 1, one per GPU; a predict worker: twice "
        "DPAAT_PREDICT_BATCH_MAX_IMAGES, requests that wait to be batched together).",
    ),
    pool: str | None = typer.Option(
        None,
        help="prefork (tasks in a child process) | solo (in this process) | threads "
        "(default: threads for a predict-only worker, which batches in one process; else prefork)",
    ),
    beat: bool = typer.Option(
        False, "--beat", help="Also run the reaper schedule (exactly one process should)."
    ),
    hostname: str | None = typer.Option(None, help="Celery node name (default: celery@<host>)."),
    max_tasks_per_child: int | None = typer.Option(
        None, min=1, help="Replace the child process after this many tasks (frees GPU memory)."
    ),
    nice: int = typer.Option(
        0,
        min=0,
        max=19,
        help="Lower this worker's CPU priority by N (os.nice): a CPU prediction worker on the "
        "API's host then leaves the API the cores it needs to answer (docs/deployment.md).",
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Run a Celery worker for the full deployment (needs BROKER_URL). Training/evaluation
    workers (`--queues train,evaluate`) and prediction workers (`--queues predict`) scale apart."""
    from app.core.settings import get_settings

    settings = get_settings()
    if settings.embedded:
        typer.echo(
            "dpaat worker needs BROKER_URL (e.g. redis://localhost:6379/0); without a broker "
            "`dpaat serve` runs the worker itself.",
            err=True,
        )
        raise typer.Exit(2)
    _refuse_without_auth("worker")
    from worker.celery_app import DEFAULT_QUEUE, celery_app

    names = [q.strip() for q in (queues or "").split(",") if q.strip()] or list(
        dict.fromkeys([settings.train_queue, settings.evaluate_queue, DEFAULT_QUEUE])
    )
    predict_only = names == [settings.predict_queue]
    pool = pool or ("threads" if predict_only else "prefork")
    if pool not in ("prefork", "solo", "threads"):
        raise typer.BadParameter("pool must be prefork, solo or threads")
    if concurrency is None:
        concurrency = 2 * settings.predict_batch_max_images if predict_only else 1
    if pool == "threads" and settings.predict_queue in names:
        # Predictions run in this very process: import torch now, not on the first request.
        import importlib
        import threading

        threading.Thread(
            target=importlib.import_module, args=("models.api",), name="preload", daemon=True
        ).start()
    argv = [
        "worker",
        f"--loglevel={log_level.upper()}",
        f"--queues={','.join(names)}",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        # Workers share nothing but the database: no broadcast chatter at start-up.
        "--without-mingle",
        "--without-gossip",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    if max_tasks_per_child:
        argv.append(f"--max-tasks-per-child={max_tasks_per_child}")
    if beat:
        argv.append("--beat")
    if nice:
        os.nice(nice)  # before the pool starts: its processes and threads inherit it
    celery_app.worker_main(argv)


def migrate(
    revision: str = typer.Option("head", help="Alembic revision to upgrade to."),
) -> None:
    """Apply the database migrations (the one-off `migrate` service of docker-compose)."""
    from app.core.settings import get_settings
    from app.db.migrate import current, upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    typer.echo(f"database at revision {current(url)}")


def register(cli: typer.Typer) -> None:
    """Add ``serve``, ``worker``, ``migrate`` and ``keys`` to the ``dpaat`` command line."""
    from app import keys_cli

    cli.command("serve")(serve)
    cli.command("worker")(worker)
    cli.command("migrate")(migrate)
    keys_cli.register(cli)
