"""``dpaat audit``: run a robustness audit on a DPAAT server from CI and gate the pipeline on it.

Exit codes: 0 every threshold (and regression rule) met, 1 one failed, 2 the evaluation job failed
or was cancelled (also when this client is interrupted while waiting: it cancels the audit), 3
timed out waiting, 4 usage, authentication or connection error. Writes
``audit.json`` (the report contract + the audit's results), ``audit.xml`` (JUnit) and ``audit.md``
(a pull-request summary) into ``--out``. Depends on httpx, typer and rich only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer import core as typer_core

from app.client import render
from app.client.thresholds import parse_threshold

EXIT_PASSED, EXIT_FAILED, EXIT_JOB, EXIT_TIMEOUT, EXIT_USAGE = 0, 1, 2, 3, 4
API = "/api/v1"
FINAL = ("succeeded", "failed", "cancelled")
_SUBMIT_TRIES = 4  # transient failures (connection, 5xx) on submit; the key makes retries safe

console = Console(stderr=True)


class UsageError(Exception):
    """Bad arguments, or the server refused the request (exit 4)."""


def _usage_errors() -> tuple[type[Exception], ...]:
    """Recent typer vendors its own click (``typer.core._click``) and does not install click;
    older typer is built on click itself."""
    found: list[type[Exception]] = []
    vendored = getattr(typer_core, "_click", None)
    if vendored is not None:
        found.append(vendored.exceptions.UsageError)
    try:
        import click

        found.append(click.UsageError)
    except ImportError:
        pass
    return tuple(found)


_USAGE_ERRORS = _usage_errors()


class _AuditCommand(typer_core.TyperCommand):
    """Usage errors exit with 4, not click's 2 (which means 'the job failed' here)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            parsed: list[str] = super().parse_args(ctx, args)
        except _USAGE_ERRORS as e:
            e.show()  # type: ignore[attr-defined]
            raise typer.Exit(EXIT_USAGE) from None
        return parsed


# ---------------------------------------------------------------------------- the request
def parse_attacks(text: str) -> list[dict[str, Any]]:
    """``fgsm,pgd:10,square:500`` -> attack specs (the number is steps, or queries for square);
    a preset name (``quick``, ``default``, ``full``, ``autoattack``) expands to its list."""
    from models.presets import expand

    preset = expand(text.strip())
    if preset is not None:
        return preset
    attacks = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, n = item.partition(":")
        spec: dict[str, Any] = {"name": name}
        if n:
            if not n.isdigit() or int(n) < 1:
                raise UsageError(f"attack {item!r}: expected NAME or NAME:N with N >= 1")
            spec["n_queries" if name == "square" else "steps"] = int(n)
        attacks.append(spec)
    if not attacks:
        raise UsageError("--attacks names no attack")
    return attacks


def parse_eps(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--eps expects numbers separated by commas, got {text!r}") from None
    if not values:
        raise UsageError("--eps names no radius")
    return values


def build_request(
    *,
    model: str | None,
    dataset: str | None,
    eps: str,
    attacks: str,
    thresholds: list[str],
    baseline_audit: str | None,
    baseline_model: str | None,
    max_drop: float,
    limit: int | None,
    part: str,
    gradcam: bool,
    on_interval: bool = False,
) -> dict[str, Any]:
    """The body of ``POST /api/v1/audits`` from the command's options. ``on_interval`` checks
    every metric that has a 95 % interval on its conservative bound instead of its estimate."""
    if not thresholds:
        raise UsageError("give at least one --threshold, e.g. --threshold 'accuracy@2>=0.4'")
    if baseline_audit and baseline_model:
        raise UsageError("give --baseline-audit or --baseline-model, not both")
    try:
        rules = [parse_threshold(t) for t in thresholds]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if on_interval:
        for rule in rules:
            rule["use_interval"] = rule["metric"] not in ("verdict", "curve_auc", "auroc")
    body: dict[str, Any] = {
        "dataset_id": dataset,
        "part": part,
        "limit": limit,
        "eps_list": parse_eps(eps),
        "attacks": parse_attacks(attacks),
        "gradcam": gradcam,
        "thresholds": rules,
    }
    if model is not None:
        body = {"model_id": model, **body}
    if baseline_audit or baseline_model:
        body["baseline"] = {
            "audit_id": baseline_audit,
            "model_name": baseline_model,
            "max_drop": max_drop,
        }
    return body


@dataclass(frozen=True)
class Upload:
    """A model file audited in the same request: safetensors weights and their description."""

    weights: Path
    description: dict[str, Any]
    sha256: str


def read_upload(weights: Path, model_info: Path) -> Upload:
    """Check the two files exist and the description is a JSON object (the server checks the
    rest: format, architecture, tensor shapes, classes)."""
    if not weights.is_file():
        raise UsageError(f"--weights {weights}: no such file")
    try:
        description = json.loads(model_info.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--model-info {model_info}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"--model-info {model_info} is not JSON: {e}") from None
    if not isinstance(description, dict):
        raise UsageError(f"--model-info {model_info} must hold a JSON object")
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Upload(weights, description, digest.hexdigest())


def ci_idempotency_key(body: dict[str, Any], env: dict[str, str] | None = None) -> str:
    """One audit per CI job execution and argument set: the run (GitHub run id + attempt, or
    GitLab pipeline + job id), the job's name and a hash of the request. A re-run of the job is
    a new execution (a new audit); the client's own retries reuse the key. Outside CI: random."""
    env = dict(os.environ) if env is None else env
    if env.get("GITHUB_RUN_ID"):
        run = ["github", env["GITHUB_RUN_ID"], env.get("GITHUB_RUN_ATTEMPT", "1")]
        run.append(env.get("GITHUB_JOB", ""))
    elif env.get("CI_PIPELINE_ID"):
        run = ["gitlab", env["CI_PIPELINE_ID"], env.get("CI_JOB_ID", "")]
        run.append(env.get("CI_JOB_NAME", ""))
    else:
        run = ["local", uuid.uuid4().hex]
    digest = hashlib.sha256(json.dumps([run, body], sort_keys=True).encode()).hexdigest()
    return f"dpaat-audit-{run[0]}-{digest[:40]}"


# ---------------------------------------------------------------------------- HTTP
def _detail(r: httpx.Response) -> str:
    """The server's message: ``detail``, or the messages of a validation error list."""
    try:
        detail = r.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, list):
        return "; ".join(str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in detail)
    return str(detail) if detail is not None else r.text[:300]


def _post_audit(
    client: httpx.Client, body: dict[str, Any], key: str, upload: Upload | None
) -> httpx.Response:
    headers = {"Idempotency-Key": key}
    if upload is None:
        return client.post(f"{API}/audits", json=body, headers=headers)
    with upload.weights.open("rb") as f:  # reopened on every retry
        return client.post(
            f"{API}/audits",
            files={"weights": (upload.weights.name, f, "application/octet-stream")},
            data={"description": json.dumps(upload.description), "audit": json.dumps(body)},
            headers=headers,
            timeout=httpx.Timeout(30.0, write=600.0, read=120.0),
        )


class SubmitTimeout(Exception):
    """The server kept answering 429/503 (Retry-After) until the overall timeout (exit 3)."""


def retry_after(r: httpx.Response, default: float = 5.0) -> float:
    """Seconds a 429/503 asks to wait (``Retry-After``: seconds or an HTTP date)."""
    value = r.headers.get("Retry-After", "").strip()
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError):
        return default


def submit(
    client: httpx.Client,
    body: dict[str, Any],
    key: str,
    upload: Upload | None = None,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST the audit (with the model file when ``upload``), retrying transient failures with
    the same Idempotency-Key. A 429 or 503 is retried after its ``Retry-After`` for as long as
    ``deadline`` (a ``clock()`` time) allows; ``SubmitTimeout`` when it does not."""
    last = ""
    attempt = 0
    while attempt < _SUBMIT_TRIES:
        try:
            r = _post_audit(client, body, key, upload)
        except httpx.TransportError as e:
            last = f"cannot reach {client.base_url}: {e}"
            r = None
        if r is not None and r.status_code in (429, 503):
            wait_for = retry_after(r)
            if deadline is not None and clock() + wait_for > deadline:
                raise SubmitTimeout(
                    f"the server answered {r.status_code} ({_detail(r)}) and asked to retry "
                    f"in {wait_for:g} s, after the timeout"
                )
            last = f"the server answered {r.status_code}: {_detail(r)}"
            if deadline is None:  # no overall timeout: a bounded number of tries
                attempt += 1
                if attempt >= _SUBMIT_TRIES:
                    break
            console.print(f"[yellow]{last}; retrying in {wait_for:g} s[/]")
            sleep(wait_for)
            continue  # with a deadline, not a failed try: the server said when to come back
        attempt += 1
        if r is None:
            sleep(min(2.0 ** (attempt - 1), 4.0))
            continue
        if r.status_code >= 500:
            last = f"the server answered {r.status_code}: {_detail(r)}"
            sleep(min(2.0 ** (attempt - 1), 4.0))
            continue
        if r.status_code in (401, 403):
            raise UsageError(f"authentication refused ({r.status_code}): {_detail(r)}")
        if r.status_code >= 400:
            raise UsageError(f"the server refused the audit ({r.status_code}): {_detail(r)}")
        result: dict[str, Any] = r.json()
        return result
    raise UsageError(last)


def _get(client: httpx.Client, path: str, **params: Any) -> httpx.Response:
    r = client.get(path, params=params or None)
    if r.status_code in (401, 403, 404):
        raise UsageError(f"GET {path} -> {r.status_code}: {_detail(r)}")
    r.raise_for_status()
    return r


def wait(
    client: httpx.Client,
    audit: dict[str, Any],
    timeout: float,
    poll: float,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any] | None:
    """Poll the audit until its job is final (None on timeout), showing its progress. Network
    errors while waiting are retried until the timeout (the server may be restarting)."""
    deadline = clock() + timeout
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]audit {task.fields[audit]}[/] {task.fields[status]} {task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task("", total=1.0, audit=audit["id"][:8], status=audit["status"])
        shown = None
        pause = poll
        while True:
            status = audit["status"]
            progress = audit.get("progress") or {}
            stage = str(progress.get("stage") or "")
            bar.update(
                task,
                completed=float(progress.get("fraction") or 0.0),
                status=status,
                description=stage,
            )
            if not console.is_terminal and (status, stage) != shown:
                console.print(f"audit {audit['id']}: {status} {stage}".rstrip())
                shown = (status, stage)
            if status in FINAL:
                if status == "succeeded":
                    bar.update(task, completed=1.0)
                return audit
            if clock() >= deadline:
                return None
            time.sleep(max(0.0, min(pause, deadline - clock())))
            pause = poll
            try:
                audit = _get(client, f"{API}/audits/{audit['id']}").json()
            except httpx.HTTPStatusError as e:
                if e.response.status_code in (429, 503):  # wait as long as the server asks
                    pause = max(poll, retry_after(e.response))
                console.print(f"[yellow]polling failed ({e}); retrying in {pause:g} s[/]")
            except httpx.TransportError as e:
                console.print(f"[yellow]polling failed ({e}); retrying[/]")


# ---------------------------------------------------------------------------- files
def download_figures(
    client: httpx.Client, links: dict[str, str], out: Path, prefix: str = ""
) -> dict[str, str]:
    """Save each figure (name -> API URL) as ``out/<prefix><name>.png``; returns name -> local
    file name for the Markdown, for the figures that came back as PNGs (a missing figure leaves
    its picture out, never the report)."""
    saved: dict[str, str] = {}
    for name, url in links.items():
        if not name.replace("_", "").isalnum():
            continue  # a name we would not write as a file name
        try:
            r = client.get(url)
        except httpx.TransportError:
            continue
        if r.status_code == 200 and r.content.startswith(b"\x89PNG"):
            local = f"{prefix}{name}.png"
            (out / local).write_bytes(r.content)
            saved[name] = local
    return saved


def write_outputs(client: httpx.Client, audit: dict[str, Any], out: Path) -> dict[str, Any]:
    """Fetch the finished audit's report and write audit.json, audit.xml, audit.md and the
    figures the Markdown shows (``<name>.png`` beside it, linked by relative path, so the
    folder renders offline and as a CI artifact)."""
    doc: dict[str, Any] = _get(client, f"{API}/audits/{audit['id']}/report").json()
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "audit.xml").write_text(render.junit_xml(doc), encoding="utf-8")
    links = dict(audit.get("figures") or {})
    links.setdefault("robustness_curve", f"{API}/audits/{audit['id']}/curve.png")
    saved = download_figures(client, links, out)
    (out / "audit.md").write_text(
        render.markdown(doc, saved.get("robustness_curve"), saved), encoding="utf-8"
    )
    return doc


def write_error_outputs(audit: dict[str, Any], out: Path) -> None:
    """Files for an audit whose evaluation failed or was cancelled (no report exists)."""
    message = f"the evaluation job ended {audit['status']}: {audit.get('error') or 'no detail'}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps({"audit": audit}, indent=2) + "\n", "utf-8")
    (out / "audit.xml").write_text(render.error_junit(message), encoding="utf-8")
    (out / "audit.md").write_text(
        f"## ⚠️ Robustness audit did not run to the end\n\nAudit `{audit['id']}`: {message}.\n",
        encoding="utf-8",
    )


def write_timeout_outputs(audit: dict[str, Any] | None, reason: str, out: Path) -> None:
    """Files saying the audit did not finish (a CI JUnit step then reports an error case
    instead of finding nothing): the client timed out waiting, or could not even submit."""
    where = f"Audit `{audit['id']}` ({audit.get('status')})" if audit else "The audit"
    message = f"the audit did not finish: {reason}"
    out.mkdir(parents=True, exist_ok=True)
    doc = {"audit": audit, "finished": False, "reason": reason}
    (out / "audit.json").write_text(json.dumps(doc, indent=2) + "\n", "utf-8")
    (out / "audit.xml").write_text(render.error_junit(message, "timeout"), encoding="utf-8")
    (out / "audit.md").write_text(
        f"## ⏱️ Robustness audit did not finish\n\n{where}: {message}.\n", encoding="utf-8"
    )


def _summary(doc: dict[str, Any]) -> None:
    table = Table(title=f"audit {doc['audit']['id']}", show_lines=False)
    for col in ("rule", "observed", "required", "result"):
        table.add_column(col)
    for kind, r in render.cases(doc):
        required = r.get("required")
        op = r.get("op", ">=")
        req = f"{op} {required:.4f}" if isinstance(required, float) else f"{op} {required}"
        obs = r.get("observed")
        table.add_row(
            r["name"] if kind == "thresholds" else f"[dim]{r['name']}[/]",
            f"{obs:.4f}" if isinstance(obs, float) else str(obs),
            req,
            "[green]pass[/]" if r.get("passed") else "[red]FAIL[/]",
        )
    console.print(table)


# ---------------------------------------------------------------------------- the command
def _cancel_quietly(client: httpx.Client, audit_id: str) -> None:
    """Do not leave an orphan evaluation running when the pipeline that wanted it is gone."""
    try:
        r = client.post(f"{API}/audits/{audit_id}/cancel", timeout=10.0)
        console.print(f"[yellow]interrupted: audit {audit_id} cancelled ({r.status_code})[/]")
    except httpx.HTTPError as e:
        console.print(f"[yellow]interrupted; could not cancel audit {audit_id}: {e}[/]")


def _sigterm_as_interrupt() -> None:
    def handler(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # ValueError outside the main thread (embedded use): Ctrl-C handling still applies there.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, handler)


def run(
    *,
    server: str,
    key: str | None,
    body: dict[str, Any],
    idempotency_key: str,
    no_wait: bool,
    timeout: float,
    poll: float,
    out: Path,
    upload: Upload | None = None,
) -> int:
    """Submit, wait, write the files; returns the exit code."""
    headers = {"X-API-Key": key} if key else {}
    started = time.monotonic()
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=30.0) as client:
        try:
            audit = submit(client, body, idempotency_key, upload, deadline=started + timeout)
        except SubmitTimeout as e:
            write_timeout_outputs(None, str(e), out)
            console.print(f"[red]timed out[/] after {timeout:g} s: {e}")
            return EXIT_TIMEOUT
        if upload is not None:
            console.print(f"uploaded {upload.weights.name} as model {audit['model_id']}")
        console.print(f"audit {audit['id']} ({audit['status']}) on {server}")
        if no_wait:
            typer.echo(audit["id"])
            return EXIT_PASSED
        try:
            finished = wait(client, audit, max(0.0, started + timeout - time.monotonic()), poll)
        except KeyboardInterrupt:  # Ctrl-C, or the CI system cancelling the job (SIGTERM)
            _cancel_quietly(client, audit["id"])
            return EXIT_JOB
        if finished is None:
            write_timeout_outputs(
                audit, f"timed out after {timeout:g} s; the audit is still running", out
            )
            console.print(
                f"[red]timed out[/] after {timeout:g} s; audit {audit['id']} is still running "
                "(a re-run of this CI job step picks it up again)"
            )
            return EXIT_TIMEOUT
        if finished["outcome"] == "error" or finished["status"] != "succeeded":
            write_error_outputs(finished, out)
            console.print(f"[red]the evaluation job ended {finished['status']}[/]")
            return EXIT_JOB
        doc = write_outputs(client, finished, out)
    _summary(doc)
    passed = bool(doc["audit"]["passed"])
    console.print(
        f"[{'green' if passed else 'red'}]audit {'passed' if passed else 'FAILED'}[/]; "
        f"wrote {out}/audit.json, audit.xml, audit.md"
    )
    return EXIT_PASSED if passed else EXIT_FAILED


def audit_cmd(
    model: str | None = typer.Option(
        None, "--model", help="Registered model id (or --weights and --model-info)."
    ),
    weights: Path | None = typer.Option(
        None,
        "--weights",
        help="A model file to audit (safetensors, or ONNX with framework onnx), uploaded in the "
        "audit request; needs --model-info and --dataset. The server registers it as your model.",
    ),
    model_info: Path | None = typer.Option(
        None,
        "--model-info",
        help="model.json, the description of --weights (docs/model-description.md), as for POST "
        '/api/v1/models: {"framework": "timm", "architecture": "resnet10t", "classes": [...], '
        '"image_size": 224}.',
    ),
    threshold: list[str] = typer.Option(
        ...,
        "--threshold",
        "-t",
        help="METRIC[@EPS] OP VALUE, repeatable: 'balanced_accuracy>=0.6', 'accuracy@2>=0.4', "
        "'recall.mel@1>=0.5', 'verdict!=fail'. No @EPS: clean.",
    ),
    server: str = typer.Option(..., envvar="DPAAT_SERVER", help="e.g. https://dpaat.example.org"),
    key: str | None = typer.Option(None, envvar="DPAAT_API_KEY", help="API key (X-API-Key)."),
    dataset: str | None = typer.Option(None, help="Dataset id (default: the model's own)."),
    eps: str = typer.Option("0,1,2", help="Radii in 1/255 units, comma-separated."),
    attacks: str = typer.Option(
        "fgsm,pgd",
        help="fgsm, pgd[:steps], apgd-ce, apgd-t, square, autoattack; or a preset: quick, "
        "default, full (AutoAttack budgets, cascaded), autoattack.",
    ),
    baseline_audit: str | None = typer.Option(None, help="Compare with this audit."),
    baseline_model: str | None = typer.Option(
        None, help="Compare with the latest passing audit of the model with this name."
    ),
    max_drop: float = typer.Option(0.02, min=0, max=1, help="Allowed drop below the baseline."),
    limit: int | None = typer.Option(None, min=1, help="Cap on test images (class-stratified)."),
    part: str = typer.Option("test", help="train | val | test"),
    gradcam: bool = typer.Option(True, help="Grad-CAM lesion focus in the report."),
    on_interval: bool = typer.Option(
        False,
        "--on-interval",
        help="Check each threshold on the 95% interval's conservative bound (lower for >=, "
        "upper for <=) instead of the point estimate: a model passes only when the sample size "
        "supports it.",
    ),
    no_wait: bool = typer.Option(False, "--no-wait", help="Submit, print the audit id, exit 0."),
    timeout: float = typer.Option(3600.0, min=0, help="Seconds to wait for the result."),
    poll: float = typer.Option(2.0, min=0.05, help="Seconds between status requests."),
    out: Path = typer.Option(Path("audit-report"), help="Folder for audit.json/.xml/.md."),
    idempotency_key: str | None = typer.Option(
        None, help="Default: derived from the CI run (GitHub/GitLab variables) and the arguments."
    ),
) -> None:
    """Audit a model's robustness on the server and fail the pipeline on a threshold.

    Exit status: 0 all met, 1 a threshold failed, 2 the job failed or was cancelled, 3 timed
    out, 4 usage, authentication or connection error.
    """
    try:
        if (model is None) == (weights is None):
            raise UsageError("give --model ID, or --weights FILE with --model-info FILE")
        if (weights is None) != (model_info is None):
            raise UsageError("--weights and --model-info go together")
        upload = read_upload(weights, model_info) if weights and model_info else None
        body = build_request(
            model=model,
            dataset=dataset,
            eps=eps,
            attacks=attacks,
            thresholds=threshold,
            baseline_audit=baseline_audit,
            baseline_model=baseline_model,
            max_drop=max_drop,
            limit=limit,
            part=part,
            gradcam=gradcam,
            on_interval=on_interval,
        )
        _sigterm_as_interrupt()
        # the file's hash is part of the key: another model file in the same CI step is a new audit
        keyed = body if upload is None else {**body, "weights_sha256": upload.sha256}
        code = run(
            server=server,
            key=key,
            body=body,
            idempotency_key=idempotency_key or ci_idempotency_key(keyed),
            no_wait=no_wait,
            timeout=timeout,
            poll=poll,
            out=out,
            upload=upload,
        )
    except UsageError as e:
        console.print(f"[red]error:[/] {e}")
        code = EXIT_USAGE
    except httpx.HTTPError as e:
        console.print(f"[red]error:[/] talking to {server}: {e}")
        code = EXIT_USAGE
    raise typer.Exit(code)


def register(cli: typer.Typer) -> None:
    """Add ``audit`` to the ``dpaat`` command line."""
    cli.command("audit", cls=_AuditCommand)(audit_cmd)
