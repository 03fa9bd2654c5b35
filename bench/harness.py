"""GPU benchmark: plain diffusers beside the service's own path, in one run, on one card.

`sdxl-deploy bench-gpu --models sdxl --out DIR` does, per model family, in this order:

1. build the synthetic full-size model on the GPU and write it to local disk (timed), then load from there;
2. the plain-diffusers baseline (`bench.baseline`): fp16 eager, then fp16 eager + attention slicing + VAE
   slicing, pipeline time and pipeline + Pillow PNG + base64 (what most self-hosted SD APIs do);
3. the service's eager path (bf16, compile off) in process (`bench.eager`): the same-seed reference images, and
   an eager ablation (classic attention -> SDPA -> + fused QKV -> + channels_last) on the same loaded pipelines;
4. the service as it ships (`bench.served`): `sdxl-deploy serve` in its own process under uvicorn with its
   defaults (cold start with an empty compile cache = the first compile), then every scenario end to end over
   HTTP (request -> JSON with base64 PNG, decoded by the client) and the same-seed comparison with step 3;
5. a restart with the warm compile cache (restart-to-ready), a few requests after it, then N concurrent
   clients on the restarted service;
6. optional: service variants (`SERVICE_VARIANTS`, e.g. CUDA graphs off, the opt-ins), each started and
   restarted like the default (no concurrent clients); the PNG encoders on 1024x1024 (`bench.encode`).

Scenarios are data (`bench.scenarios`). Each stage runs in its own `Bench.stage`: a failure is recorded and the
run goes on, and the JSON is written after every stage (a run cut short keeps what it had); the table
(`bench.table`) is printed last. `--tiny` runs the same code on the tiny models (CPU-friendly), for tests.
"""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import baseline, eager, encode, served
from bench.launch import REPO
from bench.measure import environment, free_memory
from bench.scenarios import FAMILY_MODELS, SERVICE_VARIANTS, TINY_MODELS, Scenario, scenarios_of
from bench.table import table

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

    # -- the run

    def run(self) -> Results:
        self.results.meta = environment()
        self.results.meta["config"] = {k: str(v) for k, v in asdict(self.c).items()}
        self.save()
        if self.c.pytest_gpu:
            with self.stage("pytest -m gpu"):
                self.run_pytest_gpu()
        for family in self.c.families:
            model = (TINY_MODELS if self.c.tiny else FAMILY_MODELS)[family]
            with self.stage(f"{family}: build"):
                model_dir = self.build(family, model)
            if "baseline" not in self.c.skip:
                with self.stage(f"{family}: baseline"):
                    baseline.run_baseline(self, family, model_dir)
            if "eager" not in self.c.skip:
                with self.stage(f"{family}: service eager path"):
                    eager.run_eager(self, family, model_dir)
            if "service" not in self.c.skip:
                with self.stage(f"{family}: service"):
                    served.run_service(self, family, model_dir)
            for variant in self.c.variants:
                with self.stage(f"{family}: service {variant}", optional=True, needs_s=90) as ok:
                    if ok:
                        served.run_service(
                            self, family, model_dir, label=variant, env=SERVICE_VARIANTS[variant]
                        )
        if "encode" not in self.c.skip:
            with self.stage("encode 1024x1024"):
                self.results.encode = encode.time_encoders()
        return self.results

    def run_pytest_gpu(self) -> None:
        started = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-m",
                "gpu",
                "--noconftest",
                "-p",
                "no:cacheprovider",
                "tests/test_accel.py",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        self.results.pytest = {
            "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - started, 1),
            "tail": tail,
        }
        log.info("pytest -m gpu: rc=%d\n%s", proc.returncode, "\n".join(tail))

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


def run_bench(config: BenchConfig) -> Results:
    """Run every stage, write `bench.json` and `table.txt` under `config.out`, print the table last."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bench = Bench(config)
    results = bench.run()
    bench.save()
    text = table(results)
    (config.out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return results
