"""CLI commands of the service: `serve` and `models build|list`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from service.settings import ServiceSettings

models_app = typer.Typer(help="Generated models: list them, or write one to disk.", no_args_is_help=True)


def serve(
    model: Annotated[str | None, typer.Option(help="Registry name or path (default: SDXL_MODEL).")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 7860).")] = None,
    stage_port: Annotated[
        int | None,
        typer.Option(help="When --port is held at start, serve here and take --port over on SIGUSR1."),
    ] = None,
    ready_sizes: Annotated[
        str | None,
        typer.Option(help="Sizes compiled (static) besides the default, e.g. 512x512,832x1216."),
    ] = None,
    compile_only: Annotated[
        bool,
        typer.Option(
            "--compile-only",
            help="Build the compiled functions a service with these settings loads, print a JSON report, exit "
            "(the compile step; nothing listens).",
        ),
    ] = False,
    compile_jobs: Annotated[
        int | None,
        typer.Option(help="With --compile-only: processes that build side by side, each loading the model."),
    ] = None,
) -> None:
    """Serve a model over HTTP (GET /health, GET /ready, POST /generate, GET /metrics)."""
    from service.takeover_signal import hold_takeover_signal

    if not compile_only:
        hold_takeover_signal()  # before torch is imported (it starts threads): the cut-over signal is never lost
    from pydantic import ValidationError

    from service.models import require_model_exists
    from service.server import PortInUse
    from service.server import serve as run_server
    from service.settings import ServiceSettings

    given = {
        "model": model,
        "host": host,
        "port": port,
        "stage_port": stage_port,
        "ready_sizes": ready_sizes,
        "compile_jobs": compile_jobs,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as exc:
        for err in exc.errors():
            name = ".".join(map(str, err["loc"]))
            reason = err["msg"].removeprefix("Value error, ")
            got = "" if repr(err["input"]) in reason else f" (got {err['input']!r})"
            typer.echo(f"invalid setting {_setting_source(name, given)}: {reason}{got}", err=True)
        raise typer.Exit(2) from None
    try:  # a name that is no model fails here, not in a load behind a server that is already up
        require_model_exists(settings.model)
    except ValueError as exc:
        typer.echo(f"invalid setting {_setting_source('model', given)}: {exc}", err=True)
        raise typer.Exit(2) from None
    if compile_only:
        _compile_step(settings)
        return
    try:
        run_server(settings)
    except PortInUse as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _compile_step(settings: ServiceSettings) -> None:
    """`serve --compile-only`: the compile step (service/compile_step.py); its report is the last stdout line."""
    import logging

    from service.compile_step import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = build(settings)
    for problem in report.problems:
        typer.echo(f"warning: {problem}", err=True)
    typer.echo(report.model_dump_json())


def _setting_source(setting: str, options: dict[str, object]) -> str:
    """A service setting as the user sets it: `model (--model / SDXL_MODEL)`, or the env var alone."""
    env = f"SDXL_{setting.upper()}"
    return (
        f"{setting} (--{setting.replace('_', '-')} / {env})" if setting in options else f"{setting} ({env})"
    )


@models_app.command("list")
def list_models() -> None:
    """Names that `serve --model` accepts."""
    from service.models import known_models

    for name, description in known_models().items():
        typer.echo(f"{name:16} {description}")


@models_app.command("build")
def build_model(
    name: Annotated[str, typer.Argument(help="tiny-sd15, tiny-sdxl, synthetic-sd15 or synthetic-sdxl")],
    out: Annotated[Path, typer.Option(help="Folder to write (base/, refiner/, MODEL.json).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    device: Annotated[str, typer.Option(help="Where to build (cuda is much faster for synthetic).")] = "cpu",
    half: Annotated[
        bool, typer.Option(help="Save in float16 (halves the size of synthetic models).")
    ] = False,
) -> None:
    """Write a generated (random-weight) model to disk, to serve it from a folder like a real one."""
    import torch

    from service.builders import save_model

    dtype = torch.float16 if half else torch.float32
    path = save_model(name, out, seed=seed, device=device, dtype=dtype)
    typer.echo(f"wrote {name} to {path}")
