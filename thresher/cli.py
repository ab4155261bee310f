"""The `thresher` command line: calibrate a model, evaluate an artifact."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from thresher.calibration.pipeline import DEFAULT_LEVELS, calibrate, evaluate_artifacts
from thresher.calibration.report import print_report
from thresher.calibration.thresholds import METHODS

app = typer.Typer(
    help="thresher: serve LLMs made faster by activation sparsity and steerable by SAE features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ModelOption = Annotated[
    Optional[str],
    typer.Option(help="HF model folder or .gguf file; default: the embedded SmolLM2-135M-Instruct."),
]
DataOption = Annotated[
    Optional[Path],
    typer.Option("--data", help=".txt (paragraphs) or .jsonl ('text' or chat 'messages'); default: embedded Wikipedia."),
]


def _parse_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated fractions like 0.25,0.4, got {text!r}") from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _fail_on_user_error(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


@app.command("calibrate")
def calibrate_command(
    out: Annotated[Path, typer.Option(help="Artifact directory to write.")],
    model: ModelOption = None,
    data: DataOption = None,
    levels: Annotated[str, typer.Option(help="Sparsity levels to fit (fractions of projection weights skipped).")] = (
        ",".join(str(x) for x in DEFAULT_LEVELS)
    ),
    method: Annotated[str, typer.Option(help=f"Threshold method: {' or '.join(METHODS)}.")] = METHODS[0],
    max_tokens: Annotated[int, typer.Option(help="Calibration tokens.")] = 16384,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for the quick report (0: no report).")] = 4096,
) -> None:
    """Fit per-channel activation thresholds for several sparsity levels and write an artifact with a report."""
    from thresher.artifact import ArtifactError
    from thresher.data import DataError
    from thresher.models import ModelError

    if method not in METHODS:
        raise typer.BadParameter(f"method must be one of {', '.join(METHODS)}", param_hint="--method")
    try:
        report = calibrate(model, out, data_path=data, levels=_parse_levels(levels), method=method,
                           max_tokens=max_tokens, eval_tokens=eval_tokens)
    except (ModelError, DataError, ArtifactError, ValueError) as error:
        _fail_on_user_error(error)
    if report:
        print_report(report, console)
    console.print(f"artifact written to [bold]{out}[/]")


@app.command("eval")
def eval_command(
    artifact: Annotated[list[Path], typer.Option(help="Artifact directory; repeat to compare methods.")],
    model: ModelOption = None,
    data: DataOption = None,
    max_tokens: Annotated[int, typer.Option(help="Held-out evaluation tokens.")] = 16384,
    report_dir: Annotated[Optional[Path], typer.Option(help="Where report.json/png go; default: first artifact.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
) -> None:
    """Perplexity of the dense model and of every calibrated level, with measured sparsity."""
    from thresher.artifact import ArtifactError
    from thresher.data import DataError
    from thresher.models import ModelError

    try:
        report = evaluate_artifacts(artifact, model=model, data_path=data, eval_tokens=max_tokens,
                                    report_dir=report_dir)
    except (ModelError, DataError, ArtifactError) as error:
        _fail_on_user_error(error)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report, console)
