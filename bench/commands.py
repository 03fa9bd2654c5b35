"""CLI commands of the benchmarks: `bench-gpu` and `bench-unet` (registered by `sdxl_deploy.cli` in a checkout)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def bench_gpu(
    models: Annotated[
        str, typer.Option(help="Comma-separated model families to time: sdxl, sd15.")
    ] = "sdxl,sd15",
    out: Annotated[Path, typer.Option(help="Folder for bench.json and table.txt.")] = Path("bench-out"),
    work: Annotated[
        Path, typer.Option(help="Local folder for the generated models, compile caches and logs.")
    ] = Path("/tmp/sdxl-bench"),
    reps: Annotated[int, typer.Option(help="Timed requests per scenario on the service.")] = 5,
    baseline_reps: Annotated[int, typer.Option(help="Timed runs per scenario on the baseline.")] = 3,
    concurrency: Annotated[int, typer.Option(help="Concurrent clients (0 or 1: skip).")] = 8,
    variants: Annotated[
        str,
        typer.Option(
            help="Comma-separated service set-ups to time after the default one, e.g. cfg-cutoff-0.5+tiny-vae "
            "(the names of bench.scenarios.SERVICE_VARIANTS; an unknown name lists them all)."
        ),
    ] = "",
    skip: Annotated[
        str,
        typer.Option(
            help="Comma-separated stages to leave out (a follow-up run): baseline, eager, service, encode."
        ),
    ] = "",
    keep_cache: Annotated[
        bool,
        typer.Option(help="Start the default service on the compile cache a previous run left in --work."),
    ] = False,
    restart: Annotated[bool, typer.Option(help="Time a restart with the warm compile cache.")] = True,
    pytest_gpu: Annotated[bool, typer.Option(help="Run the GPU-marked tests first.")] = True,
    ablation: Annotated[
        bool, typer.Option(help="Time the eager techniques one by one (classic attention -> SDPA -> ...).")
    ] = True,
    mixed: Annotated[
        bool, typer.Option(help="Mixed sizes after a cold start, against each size's uncompiled time.")
    ] = False,
    budget_s: Annotated[float, typer.Option(help="Skip optional stages past this many seconds.")] = 570.0,
    tiny: Annotated[bool, typer.Option(help="Tiny models at 128 px: a quick dry run (CPU is fine).")] = False,
) -> None:
    """GPU benchmark: plain diffusers (fp16 eager, +- slicing) beside the service end to end over HTTP."""
    from bench.harness import BenchConfig
    from bench.run import run_bench
    from bench.scenarios import SERVICE_VARIANTS, SKIPPABLE_STAGES

    config = BenchConfig(
        families=_names("--models", models, ("sdxl", "sd15")),
        out=out,
        work=work,
        reps=reps,
        baseline_reps=baseline_reps,
        concurrency=concurrency,
        variants=_names("--variants", variants, tuple(SERVICE_VARIANTS)),
        skip=_names("--skip", skip, SKIPPABLE_STAGES),
        keep_cache=keep_cache,
        restart=restart,
        pytest_gpu=pytest_gpu,
        ablation=ablation,
        budget_s=budget_s,
        tiny=tiny,
        mixed=mixed,
    )
    results = run_bench(config)
    if results.errors:
        raise typer.Exit(1)


def _names(option: str, text: str, valid: tuple[str, ...]) -> tuple[str, ...]:
    """The names of a comma-separated option; exit 2 naming the option, the unknown names and the valid ones."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(names) - set(valid))
    if unknown:
        typer.echo(f"unknown {option} {unknown}; valid: {', '.join(valid)}", err=True)
        raise typer.Exit(2)
    return names


def bench_unet(
    out: Annotated[
        Path, typer.Option(help="Folder for bench-unet.json (and a throw-away compile cache).")
    ] = Path("bench-unet-out"),
    family: Annotated[str, typer.Option(help="sdxl (1024 px) or sd15 (512 px).")] = "sdxl",
    calls: Annotated[int, typer.Option(help="Timed UNet calls per variant.")] = 30,
    budget_s: Annotated[
        float, typer.Option(help="Skip the remaining variants past this many seconds.")
    ] = 540.0,
    only: Annotated[
        str | None,
        typer.Option(help="Comma-separated variant indexes of bench.unet.VARIANTS to run."),
    ] = None,
    tiny: Annotated[
        bool, typer.Option(help="Tiny model on the CPU: a dry run, figures mean nothing.")
    ] = False,
) -> None:
    """GPU probe: one UNet call with CFG under each speed variant (attention kernel, compile, batch)."""
    import logging

    from bench.unet import VARIANTS, run

    if family not in ("sdxl", "sd15"):
        typer.echo(f"family={family!r}: use sdxl or sd15", err=True)
        raise typer.Exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    variants = VARIANTS if only is None else tuple(VARIANTS[int(i)] for i in only.split(","))
    run(out, family=family, calls=calls, budget_s=budget_s, variants=variants, tiny=tiny)


def bench_beside(
    out: Annotated[
        Path, typer.Option(help="Folder for beside.json, table.txt and the services' logs.")
    ] = Path("beside-out"),
    work: Annotated[Path, typer.Option(help="Local folder for the new service's compile cache.")] = Path(
        "/tmp/sdxl-beside"
    ),
    old_model: Annotated[
        str, typer.Option(help="The old service's model (SD1.5 in the seed's set-up); tiny-sd15 on a CPU.")
    ] = "synthetic-sd15",
    new_model: Annotated[
        str, typer.Option(help="The new service's model, staged beside the old; tiny-sdxl on a CPU.")
    ] = "synthetic-sdxl",
    models_dir: Annotated[
        Path | None, typer.Option(help="Where generated models are built (default: the service's).")
    ] = None,
    size: Annotated[int, typer.Option(help="Width and height of the load's request.")] = 512,
    steps: Annotated[int, typer.Option(help="Steps of the load's request.")] = 20,
    before_s: Annotated[float, typer.Option(help="Seconds of load on the old service alone.")] = 20.0,
    staged_s: Annotated[
        float, typer.Option(help="Seconds between the new service ready and the cut-over.")
    ] = 3.0,
    after_s: Annotated[
        float, typer.Option(help="Seconds of load on the new service after the cut-over.")
    ] = 15.0,
    new_ready_sizes: Annotated[
        str, typer.Option(help="serve --ready-sizes of the new service, e.g. 512x512 (default: as it ships).")
    ] = "",
    ready_timeout_s: Annotated[float, typer.Option(help="Longest wait for either service's /ready.")] = 480.0,
) -> None:
    """The old SD1.5 service under load while the new SDXL service stages beside it, then the cut-over:
    memory of both, the old one's latency while the new one compiles, the longest outage, failed requests."""
    import logging

    from bench.beside import BesideConfig, run_beside

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = BesideConfig(
        out=out,
        work=work,
        old_model=old_model,
        new_model=new_model,
        models_dir=models_dir,
        size=size,
        steps=steps,
        before_s=before_s,
        staged_s=staged_s,
        after_s=after_s,
        new_ready_sizes=new_ready_sizes,
        ready_timeout_s=ready_timeout_s,
    )
    if run_beside(config).errors:
        raise typer.Exit(1)
