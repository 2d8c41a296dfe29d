"""``dpaat compare``: two or more reports side by side, from a DPAAT server, into a folder:
``compare.json`` (the ``Comparison`` of ``GET /api/v1/compare``), ``compare.md`` (a table fit for
a pull-request comment) and ``compare_curve.png`` (every model's robustness curve on one figure),
linked from the Markdown by relative path. Exit codes: 0 written, 4 usage, authentication,
connection error or a report that cannot be compared (not finished, not found). Depends on
httpx, typer and rich only, like ``dpaat audit``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import typer

from app.client import render
from app.client.audit import (
    API,
    EXIT_PASSED,
    EXIT_USAGE,
    UsageError,
    _AuditCommand,
    _detail,
    console,
    download_figures,
)

CURVE = "compare_curve"


def fetch(client: httpx.Client, ids: list[str], models: bool) -> dict[str, Any]:
    """The comparison of audits (or, with ``models``, models' latest reports)."""
    if not 2 <= len(ids) <= 8:
        raise UsageError(f"compare 2 to 8 reports, got {len(ids)}")
    params = httpx.QueryParams([("model" if models else "audit", i) for i in ids])
    try:
        r = client.get(f"{API}/compare", params=params)
    except httpx.TransportError as e:
        raise UsageError(f"cannot reach {client.base_url}: {e}") from None
    if r.status_code in (401, 403):
        raise UsageError(f"authentication refused ({r.status_code}): {_detail(r)}")
    if r.status_code >= 400:
        raise UsageError(f"the server refused the comparison ({r.status_code}): {_detail(r)}")
    doc: dict[str, Any] = r.json()
    return doc


def write(client: httpx.Client, doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    saved = download_figures(client, {CURVE: str(doc.get("curve_url") or "")}, out)
    (out / "compare.md").write_text(
        render.comparison_markdown(doc, saved.get(CURVE)), encoding="utf-8"
    )


def compare_cmd(
    ids: list[str] = typer.Argument(..., help="Two to eight audit ids (model ids with --models)."),
    models: bool = typer.Option(
        False, "--models", help="The ids are models: compare their latest reports."
    ),
    server: str = typer.Option(..., envvar="DPAAT_SERVER", help="e.g. https://dpaat.example.org"),
    key: str | None = typer.Option(None, envvar="DPAAT_API_KEY", help="API key (X-API-Key)."),
    out: Path = typer.Option(Path("compare-report"), help="Folder for compare.json/.md/.png."),
) -> None:
    """Put two or more audits' (or models') reports side by side: a table and one curve figure.

    Exit status: 0 written, 4 usage, authentication or connection error, or a report that
    cannot be compared (unknown, not finished).
    """
    headers = {"X-API-Key": key} if key else {}
    try:
        with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=60.0) as client:
            doc = fetch(client, list(ids), models)
            write(client, doc, out)
    except UsageError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(EXIT_USAGE) from None
    except httpx.HTTPError as e:
        console.print(f"[red]error:[/] talking to {server}: {e}")
        raise typer.Exit(EXIT_USAGE) from None
    note = "" if doc.get("comparable") else " (not comparable number for number: see the notes)"
    console.print(f"compared {len(doc['items'])} reports{note}; wrote {out}/compare.md")
    raise typer.Exit(EXIT_PASSED)


def register(cli: typer.Typer) -> None:
    """Add ``compare`` to the ``dpaat`` command line (usage errors exit 4, as for ``audit``)."""
    cli.command("compare", cls=_AuditCommand)(compare_cmd)
