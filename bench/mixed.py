"""Mixed sizes: what an app sending many sizes sees after a deploy-like start.

`sdxl-deploy bench-gpu --mixed` does, per model family, after the other stages:

1. the service with compile off (`SDXL_COMPILE=off`): one request at each size after one at the default
   size - the uncompiled time of each size, the reference of each request's ratio;
2. the compile step on an empty compile cache (`serve --compile-only`, as the deploy's `compile` stage runs
   it): its time, peak GPU memory and the functions it built;
3. the service started on what the step built (it only loads): its start-up, then `MIXED_SIZES` in order,
   each size twice, end to end over HTTP (`/health`'s `compiles` after each request says whether any call
   ran uncompiled);
4. a restart on the same cache: start to ready.

Both services start with the refiner off (`SDXL_LOAD_REFINER=false`) and no coalescing: the sizes are the
point, and the refiner's functions double the step's work. Each request has a new prompt. Environment:
`BENCH_MIXED_REFINER=1` loads the refiner and asks for it in every request; `BENCH_MIXED_UNCOMPILED=0` skips
phase 1 (a re-run that has its figures); `BENCH_MIXED_KEEP_CACHE=1` keeps the compile cache of an earlier run
(its functions are reused); `SDXL_COMPILE_JOBS` sets the step's processes side by side.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.launch import run_compile_step
from bench.served import BenchedService

if TYPE_CHECKING:
    from bench.harness import Bench

log = logging.getLogger("bench")

# the issue's order: the default size, A1111's default, then SDXL's aspect buckets
MIXED_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (512, 512), (832, 1216), (1216, 832), (768, 1344))
TINY_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (64, 64), (64, 96), (96, 64), (64, 112))
STEPS = {"sdxl": 30, "sd15": 20}
REPEATS = 2
AFTER_COMPILE_NEEDS_S = 90.0  # budget kept for the service's start, the requests and the restart
TARGET_RATIO = 0.6  # each request at most this share of its size's uncompiled time


def sizes_of(bench: Bench) -> tuple[tuple[int, int], ...]:
    return TINY_SIZES if bench.c.tiny else MIXED_SIZES


def with_refiner() -> bool:
    return os.environ.get("BENCH_MIXED_REFINER") == "1"


def body(bench: Bench, family: str, size: tuple[int, int], take: int) -> dict[str, Any]:
    """One request at `size`; each with a new prompt."""
    return {
        "prompt": f"a lighthouse on a cliff at dusk, oil painting, take {take}",
        "num_inference_steps": 4 if bench.c.tiny else STEPS[family],
        "width": size[0],
        "height": size[1],
        "seed": 7,
        "use_refiner": with_refiner(),
    }


def run_mixed(bench: Bench, family: str, model_dir: Path) -> None:
    """The uncompiled reference, then the shipped service cold on mixed sizes (module doc)."""
    out: dict[str, Any] = {"sizes": [f"{w}x{h}" for w, h in sizes_of(bench)], "refiner": with_refiner()}
    bench.results.mixed[family] = out
    base_env = {"SDXL_MAX_QUEUE": "32", "SDXL_COALESCE": "off"}
    if not with_refiner():
        base_env["SDXL_LOAD_REFINER"] = "false"

    uncompiled: dict[str, float] = {}
    out["uncompiled_s"] = uncompiled
    log_file = bench.log_file(f"serve-{family}-mixed-uncompiled.log")
    skip = os.environ.get("BENCH_MIXED_UNCOMPILED") == "0"  # a re-run that has them (short device time)
    if skip:
        return _compiled(bench, family, model_dir, base_env, out)
    with BenchedService(model_dir, log_file, {**base_env, "SDXL_COMPILE": "off"}) as svc:
        svc.start()
        svc.generate(body(bench, family, sizes_of(bench)[0], next(bench.takes)))  # first-call costs
        for size in sizes_of(bench):
            uncompiled[f"{size[0]}x{size[1]}"] = svc.generate(body(bench, family, size, next(bench.takes)))[
                "_client_s"
            ]
    bench.save()
    _compiled(bench, family, model_dir, base_env, out)


def _compiled(
    bench: Bench, family: str, model_dir: Path, base_env: dict[str, str], out: dict[str, Any]
) -> None:
    cache = bench.c.work / f"compile-cache-{family}-mixed"
    if os.environ.get("BENCH_MIXED_KEEP_CACHE") != "1":
        shutil.rmtree(cache, ignore_errors=True)
    env = {**base_env, "SDXL_COMPILE_CACHE_DIR": str(cache)}
    left = bench.c.budget_s - bench.elapsed() - AFTER_COMPILE_NEEDS_S
    out["compile_step"] = run_compile_step(
        model_dir, env, bench.log_file(f"compile-{family}-mixed.log"), timeout_s=max(60.0, left)
    )
    bench.save()
    requests: list[dict[str, Any]] = []
    out["requests"] = requests
    with BenchedService(model_dir, bench.log_file(f"serve-{family}-mixed.log"), env) as svc:
        out["start"] = svc.start()
        out["compiles_at_ready"] = _compiles(svc)
        bench.save()
        for size in sizes_of(bench):
            for _ in range(REPEATS):
                requests.append(_timed(bench, svc, family, size))
                bench.save()
        out["compiles_at_end"] = _compiles(svc)
    with BenchedService(model_dir, bench.log_file(f"serve-{family}-mixed-restart.log"), env) as svc:
        out["restart"] = svc.start()
    bench.save()


def _timed(bench: Bench, svc: BenchedService, family: str, size: tuple[int, int]) -> dict[str, Any]:
    answer = svc.generate(body(bench, family, size, next(bench.takes)))
    compiles = svc.health().compiles
    return {
        "size": f"{size[0]}x{size[1]}",
        "e2e_s": answer["_client_s"],
        "server_total_s": answer["timings"].get("total"),
        "uncompiled_calls_after": compiles.uncompiled_calls if compiles else 0,
    }


def _compiles(svc: BenchedService) -> dict[str, Any] | None:
    """`/health`'s compiled functions, as bench.json keeps them."""
    compiles = svc.health().compiles
    return compiles.model_dump(mode="json") if compiles else None


def mixed_lines(family: str, m: dict[str, Any]) -> list[str]:
    """The table's lines: the step, the start, every request against its size's uncompiled time, the worst
    one against `TARGET_RATIO`, the restart."""
    uncompiled = m.get("uncompiled_s", {})
    refiner = "base + refiner" if m.get("refiner") else "base only"
    lines = [f"{family} ({refiner}): mixed sizes (uncompiled time of each size: service with compile off)"]
    step = m.get("compile_step")
    if step:
        functions = ", ".join(f"{f['module']} {f['covers']}" for f in step.get("functions", []))
        lines.append(
            f"  compile step {step.get('wall_s')} s in {step.get('jobs', 1)} process(es) (compiling "
            f"{step.get('compile_s')} s), peak GPU memory {step.get('peak_vram_gb')} GiB (summed over processes): "
            f"{step.get('compiled')} built, {step.get('reused')} reused: {functions}"
        )
    for key, name in (("start", "start to ready on the step's functions"), ("restart", "restart to ready")):
        if m.get(key):
            lines.append(f"  {name} {m[key].get('ready_s')} s")
    worst: tuple[float, str] | None = None
    lines.append("  size       e2e s  uncompiled s  ratio  uncompiled calls so far")
    for r in m.get("requests", []):
        ref = uncompiled.get(r["size"])
        ratio = r["e2e_s"] / ref if ref else None
        if ratio is not None and (worst is None or ratio > worst[0]):
            worst = (ratio, r["size"])
        lines.append(
            f"  {r['size']:<10} {r['e2e_s']:6.3f}  {ref if ref else '-':>12}  "
            f"{f'x{ratio:.2f}' if ratio is not None else '-':>5}  {r.get('uncompiled_calls_after', 0)}"
        )
    if worst is not None:
        verdict = "ok" if worst[0] <= TARGET_RATIO else "OVER"
        lines.append(
            f"  worst request: {worst[1]} at x{worst[0]:.2f} its uncompiled time "
            f"(target <= {TARGET_RATIO}): {verdict}"
        )
    return lines
