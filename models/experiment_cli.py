"""`dpaat experiment CONFIG`: run an experiment file (resumable), then publish its results."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer


def experiment_cmd(
    config: Annotated[
        Path, typer.Argument(help="Experiment TOML file, e.g. experiments/cpu.toml.")
    ],
    results: Annotated[
        Path | None,
        typer.Option(
            help="Write the published results (README.md, plots) here (with --summarize-only, "
            "docs/results/<experiment name> by default); units already published there "
            "(units/*.json, valid and of the same settings) are not run again."
        ),
    ] = None,
    summarize_only: Annotated[
        bool, typer.Option("--summarize-only", help="Do not train: publish what has finished.")
    ] = False,
    only: Annotated[
        list[str] | None,
        typer.Option(help="Run only these units or groups (main, sweep, ablation...)."),
    ] = None,
    seed: Annotated[list[int] | None, typer.Option(help="Run only these seeds.")] = None,
    out: Annotated[Path | None, typer.Option(help="Override the experiment's run root.")] = None,
    gradcam: Annotated[bool, typer.Option(help="Grad-CAM montage in the results.")] = True,
    cost: Annotated[
        bool, typer.Option("--cost", help="Measure training cost side by side for the results.")
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(min=1, help="torch CPU threads (1 is much faster on a busy shared machine)."),
    ] = None,
) -> None:
    """Train and evaluate every method of CONFIG under one protocol; finished units are skipped,
    so an interrupted run continues where it stopped. Log: <run dir>/experiment.log."""
    from models.cli import user_errors

    with user_errors():
        import torch

        from models.experiment import load_experiment, run_experiment

        if threads is not None:
            torch.set_num_threads(threads)

        exp = load_experiment(config, out=out)
        exp.run_dir.mkdir(parents=True, exist_ok=True)
        log_file = exp.run_dir / "experiment.log"

        def log(line: str) -> None:
            stamped = f"{datetime.now().strftime('%H:%M:%S')} {line}"
            print(stamped, file=sys.stderr, flush=True)
            with log_file.open("a") as f:
                f.write(stamped + "\n")

        failed = False
        if not summarize_only:
            published = None if results is None else results / "units"
            outcomes = run_experiment(
                exp, only=only or (), seeds=seed or (), log=log, published=published
            )
            failed = any(o.status == "failed" for o in outcomes)
        if results is not None or summarize_only:
            from models.experiment_report import summarize

            # one folder per experiment: docs/results/README.md is the index of the pages
            page = results or Path("docs/results") / exp.name
            summarize(exp, page, gradcam=gradcam, cost=cost, log=log)
        if failed:
            raise typer.Exit(1)
