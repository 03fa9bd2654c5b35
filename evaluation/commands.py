"""CLI commands of the evaluation: `evaluate` (compare two services) and `report` (re-render a run's HTML)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated

import typer

RANDOM_WEIGHTS = ("none", "random")


def evaluate(
    baseline: Annotated[
        str, typer.Option(help="Base URL of the current service, e.g. http://127.0.0.1:7860.")
    ],
    candidate: Annotated[str, typer.Option(help="Base URL of the new service.")],
    prompts: Annotated[
        Path | None,
        typer.Option(help="Prompt file: .txt, .csv/.tsv (Prompt column) or .jsonl. Default: built-in."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Use at most N prompts, spread over categories.")
    ] = None,
    seeds: Annotated[
        int, typer.Option(min=1, help="Seeds per prompt (0..K-1), the same on both services.")
    ] = 2,
    steps: Annotated[int, typer.Option(min=1, max=150, help="num_inference_steps of every request.")] = 30,
    width: Annotated[
        int | None, typer.Option(min=64, max=2048, help="Width in px (default: each service's own).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(min=64, max=2048, help="Height in px (default: each service's own).")
    ] = None,
    refiner: Annotated[bool | None, typer.Option("--refiner/--no-refiner", help="SDXL refiner pass.")] = None,
    scorer: Annotated[
        str, typer.Option(help="open_clip model, or tiny-random-clip for a dry run.")
    ] = "ViT-L-14",
    pretrained: Annotated[
        str, typer.Option(help="open_clip weights tag or a local checkpoint file; 'none' = random weights.")
    ] = "openai",
    margin: Annotated[
        float, typer.Option(min=0, help="CLIP points the candidate may lose and still pass.")
    ] = 1.0,
    price_per_hour: Annotated[
        float, typer.Option(min=0, help="What the GPU box costs per hour (USD).")
    ] = 0.40,
    runs_dir: Annotated[Path, typer.Option(help="Where the run directory is created.")] = Path("runs"),
    history: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="A regression history.jsonl to show as a trend in the report."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="SDXL_API_KEY", help="Bearer key of the services (env SDXL_API_KEY).")
    ] = None,
) -> None:
    """Send the same prompts and seeds to both services, CLIP-score the images, write the report.

    Exits 1 when the verdict is "worse" (a drop larger than the margin cannot be ruled out).
    """
    from evaluation.clip_score import DEFAULT_PRETRAINED, TINY_CLIP, ClipScorer
    from evaluation.compare import quality_gate
    from evaluation.evaluate import evaluate_services
    from evaluation.prompts import PromptFileError, builtin_prompts, load_prompts, spread
    from evaluation.results import GenerationSettings

    try:
        chosen = spread(load_prompts(prompts) if prompts else builtin_prompts(), limit)
    except PromptFileError as exc:
        raise typer.BadParameter(str(exc), param_hint="--prompts") from None
    random = pretrained.lower() in RANDOM_WEIGHTS or (
        scorer == TINY_CLIP and pretrained == DEFAULT_PRETRAINED
    )
    try:
        clip = ClipScorer(scorer, None if random else pretrained)
    except Exception as exc:  # open_clip raises many kinds (unknown name, no network, bad file)
        raise typer.BadParameter(f"cannot load CLIP {scorer!r} with weights {pretrained!r}: {exc}") from None
    settings = GenerationSettings(num_inference_steps=steps, width=width, height=height, use_refiner=refiner)
    run_dir = new_run_dir(runs_dir, "evaluation")
    typer.echo(
        f"{len(chosen)} prompts x {seeds} seeds on {baseline} and {candidate}; scorer {clip.describe()}"
    )
    try:
        result = evaluate_services(
            baseline,
            candidate,
            chosen,
            seeds,
            run_dir,
            settings=settings,
            scorer=clip,
            margin=margin,
            price_per_hour=price_per_hour,
            api_key=api_key,
            history_file=history,
            progress=True,
        )
    except (RuntimeError, ValueError) as exc:  # a service down or not loaded, nothing comparable
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    passed, detail = quality_gate(result)
    typer.echo(detail)
    for role, timing in result.timing.items():
        typer.echo(
            f"{role:9} {result.services[role].model}: p50 {timing.latency_p50_s or 0:.2f} s, "
            f"p95 {timing.latency_p95_s or 0:.2f} s, {timing.images_per_hour or 0:,.0f} images/h"
        )
    if result.stand_ins:
        typer.echo("note: random-weight stand-ins; these numbers say nothing about image quality")
    typer.echo(f"report: {result.report}")
    if not passed:
        raise typer.Exit(1)


def report(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory of `evaluate` or of the regression benchmark.")
    ],
    history: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A history.jsonl to draw the trend from.")
    ] = None,
) -> None:
    """(Re)write RUN_DIR/report.html from the tables in the run directory."""
    from evaluation.report import render_report

    try:
        path = render_report(run_dir, history_file=history)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="RUN_DIR") from None
    typer.echo(f"report: {path}")


def new_run_dir(root: Path, name: str) -> Path:
    """`<root>/<UTC stamp>-<name>`, suffixed when two runs share a second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 100):
        path = Path(root) / (f"{stamp}-{name}" if attempt == 1 else f"{stamp}-{name}-{attempt}")
        try:
            path.mkdir(parents=True)
            return path.resolve()
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {root}")
