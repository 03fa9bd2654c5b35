"""The benchmark run's bookkeeping: its options (`BenchConfig`), what it measured (`Results`, dumped to JSON
after every stage) and `Bench`, the stage wrapper (a failure is recorded and the run goes on) that the
stages (`bench.baseline`, `bench.eager`, `bench.served`) write their figures through. `bench.run` runs them.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.measure import free_memory
from bench.scenarios import Scenario, scenarios_of

log = logging.getLogger("bench")


@dataclass
class BenchConfig:
    """What one run does (CLI options)."""

    families: tuple[str, ...] = ("sdxl",)
    out: Path = Path("bench-out")
    work: Path = Path("/tmp/sdxl-bench")
    reps: int = 5
    baseline_reps: int = 3
    concurrency: int = 8
    concurrency_rounds: int = 2
    tiny: bool = False
    variants: tuple[str, ...] = ()  # names in SERVICE_VARIANTS, started after the default service
    skip: tuple[str, ...] = ()  # names in SKIPPABLE_STAGES
    keep_cache: bool = False  # start the default service on the compile cache a previous run left
    restart: bool = True
    slicing_baseline: bool = True
    budget_s: float = 570.0  # stop starting optional stages past this (device commands end at 600 s)
    pytest_gpu: bool = False
    ablation: bool = True  # the eager technique-by-technique chain (stage 3)
    mixed: bool = False  # the mixed-size stage (bench/mixed.py)


@dataclass
class Results:
    """Everything measured; dumped to JSON after each stage."""

    meta: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    baseline: dict[str, Any] = field(default_factory=dict)
    eager: dict[str, Any] = field(default_factory=dict)
    service: dict[str, Any] = field(default_factory=dict)
    restart: dict[str, Any] = field(default_factory=dict)
    ablation: dict[str, Any] = field(default_factory=dict)
    encode: dict[str, Any] = field(default_factory=dict)
    pytest: dict[str, Any] = field(default_factory=dict)
    mixed: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Bench:
    """One benchmark run: the stage wrapper, the JSON, and what stages hand each other (reference images)."""

    def __init__(self, config: BenchConfig) -> None:
        self.c = config
        self.results = Results()
        self.started = time.monotonic()
        self.c.out.mkdir(parents=True, exist_ok=True)
        self.c.work.mkdir(parents=True, exist_ok=True)
        self.references: dict[str, np.ndarray] = {}  # the service's eager images, by scenario
        self.baseline_images: dict[str, np.ndarray] = {}
        self.service_images: dict[str, np.ndarray] = {}  # the default service's, to compare variants with
        self.dtype_floor: dict[str, float] = {}  # PSNR of plain fp16 vs the service's eager bf16, same seed
        self.takes = itertools.count(1)  # numbers the timed requests' prompts (see `served.request`)

    # -- bookkeeping

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log_file(self, name: str) -> Path:
        """A log's path in the output folder, its name kept to characters that travel back ("+" does not)."""
        return self.c.out / "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in name)

    def save(self) -> None:
        path = self.c.out / "bench.json"
        path.write_text(json.dumps(asdict(self.results), indent=2, default=str) + "\n", encoding="utf-8")

    @contextmanager
    def stage(self, name: str, *, optional: bool = False, needs_s: float = 0.0) -> Iterator[bool]:
        """Run a stage, record a failure instead of dying, write the JSON after it."""
        if optional and self.elapsed() + needs_s > self.c.budget_s:
            msg = f"{name}: skipped, {self.elapsed():.0f} s used of the {self.c.budget_s:.0f} s budget"
            log.warning(msg)
            self.results.errors.append(msg)
            yield False
            return
        log.info("== %s (t=%.0f s)", name, self.elapsed())
        try:
            yield True
        except Exception as exc:  # keep going: later stages may still work
            log.exception("stage %s failed", name)
            self.results.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            self.save()

    def scenarios(self, family: str) -> list[Scenario]:
        return scenarios_of(family)

    def build(self, family: str, model: str) -> Path:
        """Build the model on the GPU (random weights, real architecture) and write it to local disk."""
        import torch

        from service.builders import save_model

        out = self.c.work / "models" / model
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        started = time.perf_counter()
        if not out.exists():
            save_model(model, out, device=device, dtype=dtype)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        self.results.build[family] = {
            "model": model,
            "path": str(out),
            "build_and_save_s": round(time.perf_counter() - started, 2),
            "disk_gib": round(size / 2**30, 2),
        }
        free_memory()
        return out
