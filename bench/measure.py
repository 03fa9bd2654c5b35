"""Timing and memory helpers, and where a figure was measured (card, driver, versions)."""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else float("nan")


def best_of(fn: Callable[[], Any], n: int) -> float:
    """Median seconds of `n` calls of `fn`, after one untimed call."""
    fn()
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def cuda_sync() -> None:
    """Wait for the GPU's queued work (no-op without CUDA), so a wall-clock timing covers it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, between stages."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib_and_reset() -> float | None:
    """This process's peak allocated CUDA memory since the last reset (GiB), then reset; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 3)


def gpu_state() -> dict[str, Any]:
    """What nvidia-smi says of the whole card (every process), plus this process's own CUDA memory."""
    import torch

    state: dict[str, Any] = {}
    with suppress(OSError, subprocess.SubprocessError):
        state["nvidia_smi"] = nvidia_smi("--query-gpu=memory.used,memory.total,utilization.gpu")
        state["compute_apps"] = nvidia_smi("--query-compute-apps=pid,used_memory")
    if torch.cuda.is_available():
        state["bench_process_reserved_gib"] = round(torch.cuda.memory_reserved() / 2**30, 2)
    return state


def nvidia_smi(query: str) -> str:
    """One `nvidia-smi --query-...` answer as CSV lines without a header."""
    return subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
    ).stdout.strip()


def environment() -> dict[str, Any]:
    """Card, driver and versions, so every figure names where it was measured."""
    import diffusers
    import torch
    import transformers

    meta: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = props.name
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        with suppress(OSError, subprocess.SubprocessError):
            meta["driver"] = nvidia_smi("--query-gpu=driver_version")
    else:
        meta["gpu"] = None
    return meta
