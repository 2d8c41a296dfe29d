"""`dpaat train | evaluate | predict`: the ML core from a shell, no server.

torch is imported inside the commands, so `dpaat --help` and the torch-free client commands stay
fast. Expected failures (bad paths, unreadable images, wrong checkpoint files, invalid settings)
print one ``error:`` line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_USAGE = 2


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can cause into one line on stderr and exit status 2."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError, PermissionError, ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true, null...)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def parse_eps(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"--eps expects comma-separated numbers in 1/255 units, got {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise ValueError("--eps needs at least one value, all >= 0")
    return values


FULL_SIZE = {"image_size": 224, "arch": "resnet50", "batch_size": 32, "pgd_steps": 10}


def _epoch_lines() -> Any:
    """Hooks printing one line per epoch on stderr when it is not a terminal (a run under nohup or
    in CI shows its progress as it goes; on a terminal the progress bar does). Built on call: the
    training package imports torch, which a client-only install lacks."""
    from models.training import TrainingHooks
    from models.training.trainer import summary

    class EpochLines(TrainingHooks):
        def on_epoch_end(self, epoch: int, record: dict[str, Any]) -> None:
            if not sys.stderr.isatty():
                print(f"epoch {epoch}: {summary(record)}", file=sys.stderr, flush=True)

    return EpochLines()


def train_cmd(
    out: Annotated[Path, typer.Option(help="Run directory (checkpoint.pt, history.json).")] = Path(
        "runs/train"
    ),
    data: Annotated[
        str | None, typer.Option(help="Dataset folder (HAM10000 layout or class-per-folder).")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="standard|pgd_at|trades|dpaat|amat_external|iaat_flip [default: dpaat]"),
    ] = None,  # None, not "dpaat": a default given here would override --config's method
    arch: Annotated[
        str | None, typer.Option(help="Architecture name, e.g. small_cnn, resnet50.")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    image_size: Annotated[int | None, typer.Option(min=16)] = None,
    limit: Annotated[int | None, typer.Option(min=8, help="Cap on images per split part.")] = None,
    manifest: Annotated[
        Path | None, typer.Option(help="Split manifest (written if missing).")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file of TrainConfig fields.")] = None,
    full_size: Annotated[bool, typer.Option(help="224 px ResNet-50, PGD-10 (for a GPU).")] = False,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Any TrainConfig field: key=value.")
    ] = None,
) -> None:
    """Train a model with DPAAT or a baseline; resumes when OUT already holds a checkpoint."""
    with user_errors():
        from models.api import train
        from models.data import default_data_root

        fields: dict[str, Any] = {}
        if config is not None:
            fields.update(tomllib.loads(config.read_text()))
        if full_size:
            fields.update(FULL_SIZE)
        given = {
            "method": method,
            "arch": arch,
            "epochs": epochs,
            "image_size": image_size,
            "limit": limit,
        }
        fields.update({k: v for k, v in given.items() if v is not None})
        root = data if data is not None else fields.get("data_root")
        if root is None and (found := default_data_root()) is not None:
            root = str(found)
        fields["data_root"] = root
        if root is not None:
            fields["manifest"] = str(manifest or fields.get("manifest") or out / "split.json")
        fields.update(parse_overrides(set_ or []))
        result = train(fields, out, hooks=_epoch_lines())
        typer.echo(
            json.dumps(
                {
                    "status": result.status,
                    "checkpoint": result.checkpoint,
                    "sha256": result.checkpoint_sha256,
                    "best_checkpoint": result.best_checkpoint,
                    "best_epoch": result.best_epoch,
                    "best_by": result.best_by,
                    "epochs": result.epochs_done,
                    "last_epoch": result.history[-1] if result.history else None,
                },
                indent=2,
            )
        )


def evaluate_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt written by `dpaat train`.")],
    out: Annotated[Path, typer.Option(help="Where report.json/.md and the plot go.")] = Path(
        "runs/eval"
    ),
    data: Annotated[
        str | None, typer.Option(help="Dataset folder (default: the training data).")
    ] = None,
    part: Annotated[str, typer.Option(help="train|val|test")] = "test",
    limit: Annotated[int | None, typer.Option(min=1)] = None,
    eps: Annotated[str, typer.Option(help="Radii in 1/255 units.")] = "0,0.5,1,2,4,8",
    attacks: Annotated[
        str,
        typer.Option(
            help="Preset: quick (FGSM+PGD-10), default (+APGD-CE/T, Square, reduced budgets), "
            "full (AutoAttack's budgets, cascaded), autoattack (torchattacks' reference); "
            "or a JSON list of attack specs."
        ),
    ] = "quick",
    gradcam: Annotated[bool, typer.Option(help="Grad-CAM lesion focus.")] = True,
) -> None:
    """Evaluate a checkpoint: clean and robust metrics, checks, report (JSON, Markdown, PNG)."""
    with user_errors():
        from models.api import evaluate, report_summary
        from models.presets import expand

        attack_list = expand(attacks) or json.loads(attacks)
        report = evaluate(
            checkpoint,
            out,
            data_root=data,
            part=part,
            limit=limit,
            eps_list=parse_eps(eps),
            attacks=attack_list,
            gradcam=gradcam,
            progress=_progress_printer(),
        )
        typer.echo(report_summary(report))
        typer.echo(f"report: {out / 'report.md'}", err=True)


def predict_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt written by `dpaat train`.")],
    images: Annotated[list[Path], typer.Argument(help="JPEG or PNG files.")],
    cap: Annotated[float, typer.Option(help="Search eps* up to this radius (1/255).")] = 16.0,
    gradcam_dir: Annotated[
        Path | None, typer.Option(help="Write <image>_gradcam.png here.")
    ] = None,
) -> None:
    """Classify images: class, probabilities and robustness score as JSON lines."""
    with user_errors():
        from models.api import load_model, predict

        blobs = [p.read_bytes() for p in images]
        loaded = load_model(checkpoint)
        results = predict(loaded, blobs, cap=cap, gradcam=gradcam_dir is not None)
        for path, res in zip(images, results, strict=True):
            png = res.pop("gradcam_png")
            if gradcam_dir is not None and png is not None:
                gradcam_dir.mkdir(parents=True, exist_ok=True)
                target = gradcam_dir / f"{path.stem}_gradcam.png"
                target.write_bytes(png)
                res["gradcam"] = str(target)
            typer.echo(json.dumps({"image": str(path), **res}))


def export_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="checkpoint.pt, a .safetensors/.onnx file (with --model-info), or the id of a "
            "model registered on --server."
        ),
    ],
    format: Annotated[str, typer.Option("--format", help="safetensors or onnx.")] = "safetensors",
    out: Annotated[Path | None, typer.Option(help="Archive path (model-FORMAT.zip).")] = None,
    model_info: Annotated[
        Path | None, typer.Option("--model-info", help="model.json of a .safetensors/.onnx file.")
    ] = None,
    server: Annotated[
        str | None, typer.Option(envvar="DPAAT_SERVER", help="Server of a registered model.")
    ] = None,
    key: Annotated[str | None, typer.Option(envvar="DPAAT_API_KEY", help="API key.")] = None,
) -> None:
    """Export a model as a zip of model.json + model.safetensors or model.onnx (no pickle, no
    server path), ready for `dpaat audit --weights ... --model-info model.json`."""
    with user_errors():
        target = out or Path(f"model-{format}.zip")
        if Path(source).is_file():
            from models.api import load_model
            from models.export import export_archive

            info = json.loads(model_info.read_text()) if model_info is not None else None
            loaded = load_model(source, info=info)
            data = export_archive(loaded.model, loaded.info, format, source)
        elif server:
            import httpx

            headers = {"X-API-Key": key} if key else {}
            r = httpx.get(
                f"{server.rstrip('/')}/api/v1/models/{source}/export",
                params={"format": format},
                headers=headers,
                timeout=300.0,
            )
            if r.status_code != 200:
                raise ValueError(f"the server answered {r.status_code}: {r.text[:500]}")
            data = r.content
        else:
            raise ValueError(f"{source}: no such file (give --server to export a registered model)")
        target.write_bytes(data)
        typer.echo(json.dumps({"archive": str(target), "format": format, "bytes": len(data)}))


def _progress_printer() -> Callable[[str, float], None]:
    last: dict[str, int] = {}

    def show(stage: str, fraction: float) -> None:
        pct = int(fraction * 10) * 10
        if last.get(stage) != pct:
            last[stage] = pct
            print(f"  {stage}: {pct}%", file=sys.stderr)

    return show


def register(cli: typer.Typer) -> None:
    """Add the ML commands to the `dpaat` command line."""
    cli.command("train")(train_cmd)
    cli.command("evaluate")(evaluate_cmd)
    cli.command("predict")(predict_cmd)
    cli.command("export")(export_cmd)
    from models.experiment_cli import experiment_cmd

    cli.command("experiment")(experiment_cmd)
