"""Mixed sizes (issue 18): what an app sending many sizes sees right after the service starts.

`sdxl-deploy bench-gpu --mixed` does, per model family, after the other stages:

1. the service with compile off (`SDXL_COMPILE=off`): one request at each size after one at the default
   size - the uncompiled time of each size, the reference of the 2x target;
2. the service as it ships, started cold (empty compile cache): its start-up, then `MIXED_SIZES` in order,
   each size twice, end to end over HTTP; a size compiled before /ready runs compiled, any other is answered
   uncompiled at once while it compiles off the request path (`/health`'s `compiles` is recorded after each
   request); then it waits for those compiles as long as the budget allows, and times each size once more
   (compiled if its compile finished by then: `compiling_after` of each request says).

Both start with the refiner off (`SDXL_LOAD_REFINER=false`): the sizes are the point, and a refiner's compile
would double each one. Each request has a new prompt (no stored embeddings).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.served import READY_TIMEOUT_S, BenchedService

if TYPE_CHECKING:
    from bench.harness import Bench

log = logging.getLogger("bench")

# the issue's order: the default size, A1111's default, then SDXL's aspect buckets
MIXED_SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (512, 512), (832, 1216), (1216, 832), (768, 1344))
TINY_SIZES: tuple[tuple[int, int], ...] = ((128, 128), (64, 64), (64, 96), (96, 64), (64, 112))
STEPS = {"sdxl": 30, "sd15": 20}
REPEATS = 2
AFTER_COMPILE_NEEDS_S = 60.0  # budget kept for the round after the compiles (and the stop)


def sizes_of(bench: Bench) -> tuple[tuple[int, int], ...]:
    return TINY_SIZES if bench.c.tiny else MIXED_SIZES


def body(bench: Bench, family: str, size: tuple[int, int], take: int) -> dict[str, Any]:
    """One request at `size`; each with a new prompt."""
    return {
        "prompt": f"a lighthouse on a cliff at dusk, oil painting, take {take}",
        "num_inference_steps": 4 if bench.c.tiny else STEPS[family],
        "width": size[0],
        "height": size[1],
        "seed": 7,
        "use_refiner": False,
    }


def run_mixed(bench: Bench, family: str, model_dir: Path) -> None:
    """The uncompiled reference, then the shipped service cold on mixed sizes (module doc)."""
    out: dict[str, Any] = {"sizes": [f"{w}x{h}" for w, h in sizes_of(bench)]}
    bench.results.mixed[family] = out
    base_env = {"SDXL_LOAD_REFINER": "false", "SDXL_MAX_QUEUE": "32"}

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
    shutil.rmtree(cache, ignore_errors=True)
    env = {**base_env, "SDXL_COMPILE_CACHE_DIR": str(cache)}
    requests: list[dict[str, Any]] = []
    out["requests"] = requests
    with BenchedService(model_dir, bench.log_file(f"serve-{family}-mixed.log"), env) as svc:
        out["cold_start"] = svc.start()
        out["compiles_at_ready"] = svc.health().get("compiles")
        bench.save()
        for size in sizes_of(bench):
            for _ in range(REPEATS):
                requests.append(_timed(bench, svc, family, size, "after the start"))
                bench.save()
        left = bench.c.budget_s - bench.elapsed() - AFTER_COMPILE_NEEDS_S
        out["compiles_done_s"] = _wait_for_compiles(svc, max(0.0, min(left, READY_TIMEOUT_S)))
        out["compiles_before_last_round"] = svc.health().get("compiles")
        for size in sizes_of(bench):  # whatever compiled by now runs compiled (all, when done_s is set)
            requests.append(_timed(bench, svc, family, size, "later"))
            bench.save()
        out["compiles_at_end"] = svc.health().get("compiles")


def _timed(
    bench: Bench, svc: BenchedService, family: str, size: tuple[int, int], phase: str
) -> dict[str, Any]:
    answer = svc.generate(body(bench, family, size, next(bench.takes)))
    compiles = svc.health().get("compiles") or {}
    return {
        "size": f"{size[0]}x{size[1]}",
        "phase": phase,
        "e2e_s": answer["_client_s"],
        "server_total_s": answer["timings"].get("total"),
        "compiling_after": compiles.get("compiling", []),
        "uncompiled_calls_after": compiles.get("uncompiled_calls"),
    }


def _wait_for_compiles(svc: BenchedService, limit_s: float) -> float | None:
    """Seconds until `/health` lists nothing compiling, or None past `limit_s`."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        compiles = svc.health().get("compiles") or {}
        if not compiles.get("compiling"):
            return round(time.perf_counter() - started, 1)
        time.sleep(2.0)
    return None


def mixed_lines(family: str, m: dict[str, Any]) -> list[str]:
    """The table's lines: every request, the worst against 2x the uncompiled time of its size."""
    uncompiled = m.get("uncompiled_s", {})
    lines = [f"{family}: mixed sizes (uncompiled time of each size: service with compile off)"]
    cold = m.get("cold_start", {})
    if cold:
        lines.append(
            f"  cold start to ready {cold.get('ready_s')} s (warm-up {cold.get('warmup_compile_s')} s)"
        )
    worst: tuple[float, str] | None = None
    lines.append("  size       phase              e2e s  uncompiled s  ratio  compiling after it")
    for r in m.get("requests", []):
        ref = uncompiled.get(r["size"])
        ratio = r["e2e_s"] / ref if ref else None
        if ratio is not None and (worst is None or ratio > worst[0]):
            worst = (ratio, r["size"])
        lines.append(
            f"  {r['size']:<10} {r['phase']:<16} {r['e2e_s']:7.3f}  {ref if ref else '-':>12}  "
            f"{f'x{ratio:.2f}' if ratio is not None else '-':>5}  {len(r['compiling_after'] or [])} shape(s)"
        )
    if worst is not None:
        verdict = "ok" if worst[0] <= 2.0 else "OVER"
        lines.append(
            f"  worst request: {worst[1]} at x{worst[0]:.2f} its uncompiled time (target <= 2): {verdict}"
        )
    if m.get("compiles_done_s") is not None:
        lines.append(f"  every new size compiled {m['compiles_done_s']} s after the last mixed request")
    else:
        lines.append(
            f"  still compiling at the last round: {(m.get('compiles_before_last_round') or {}).get('compiling')}"
        )
    return lines
