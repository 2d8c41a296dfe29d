"""The `dpaat` command line: ML commands (train, evaluate, predict), the demo, and the server
commands (serve, worker, migrate). Heavy imports (torch, FastAPI, Celery) happen inside commands."""

from __future__ import annotations

import typer

from app.client import audit as audit_cli
from app.client import compare as compare_cli
from models import cli as ml_cli

cli = typer.Typer(
    help="DPAAT: adversarial training and robustness audits for medical image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
ml_cli.register(cli)


def _register_server() -> None:
    from app import server_cli

    server_cli.register(cli)


_register_server()
audit_cli.register(cli)  # httpx + typer + rich only: works with just `dpaat[client]` installed
compare_cli.register(cli)


@cli.command("demo")
def demo_cmd(
    out: str = typer.Option("runs/demo", help="Where the demo writes its run."),
    data: str | None = typer.Option(None, help="Dataset folder (default: the shared HAM10000)."),
    epochs: int = typer.Option(3, min=1),
    limit: int = typer.Option(600, min=16, help="Images per split part (CPU-sized)."),
) -> None:
    """Train DPAAT, evaluate it and predict with robustness scores, end to end."""
    from app.demo import run_demo

    raise typer.Exit(run_demo(out=out, data=data, epochs=epochs, limit=limit))


# Packages that only the `ml` / `server` extras install: a client-only install (`dpaat[client]`)
# lists every command, and one of these missing means "install the extra", not a traceback.
_EXTRA_PACKAGES = {"torch", "torchvision", "numpy", "PIL", "matplotlib", "safetensors", "fastapi"}
_EXTRA_PACKAGES |= {"uvicorn", "sqlalchemy", "alembic", "celery", "redis", "psycopg"}
_EXTRA_PACKAGES |= {"timm", "onnx", "onnxruntime", "onnx2torch"}  # issue 10: bring your own model


def main() -> None:
    try:
        cli()
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in _EXTRA_PACKAGES:
            raise
        typer.echo(
            f"error: this command needs the full install (no module named {e.name!r}): "
            "pip install 'dpaat[server]'; the client extra has only `dpaat audit` and "
            "`dpaat compare`",
            err=True,
        )
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
