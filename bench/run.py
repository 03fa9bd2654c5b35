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
6. optional (`--mixed`): mixed sizes right after a cold start, against each size's uncompiled time
   (`bench.mixed`);
7. optional: service variants (`SERVICE_VARIANTS`, e.g. CUDA graphs off, the opt-ins), each started and
   restarted like the default (no concurrent clients); the PNG encoders on 1024x1024 (`bench.encode`).

Scenarios are data (`bench.scenarios`). Each stage runs in its own `Bench.stage`: a failure is recorded and the
run goes on, and the JSON is written after every stage (a run cut short keeps what it had); the table
(`bench.table`) is printed last. `--tiny` runs the same code on the tiny models (CPU-friendly), for tests.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from dataclasses import asdict

from bench import baseline, eager, encode, mixed, served
from bench.harness import Bench, BenchConfig, Results
from bench.launch import REPO
from bench.measure import environment
from bench.scenarios import FAMILY_MODELS, SERVICE_VARIANTS, TINY_MODELS
from bench.table import table

log = logging.getLogger("bench")


def run_stages(bench: Bench) -> Results:
    """Every stage of the run, in order, each in its own `bench.stage`."""
    bench.results.meta = environment()
    bench.results.meta["config"] = {k: str(v) for k, v in asdict(bench.c).items()}
    bench.save()
    if bench.c.pytest_gpu:
        with bench.stage("pytest -m gpu"):
            run_pytest_gpu(bench)
    for family in bench.c.families:
        model = (TINY_MODELS if bench.c.tiny else FAMILY_MODELS)[family]
        with bench.stage(f"{family}: build"):
            model_dir = bench.build(family, model)
        if "baseline" not in bench.c.skip:
            with bench.stage(f"{family}: baseline"):
                baseline.run_baseline(bench, family, model_dir)
        if "eager" not in bench.c.skip:
            with bench.stage(f"{family}: service eager path"):
                eager.run_eager(bench, family, model_dir)
        if "service" not in bench.c.skip:
            with bench.stage(f"{family}: service"):
                served.run_service(bench, family, model_dir)
        if bench.c.mixed:
            with bench.stage(f"{family}: mixed sizes"):
                mixed.run_mixed(bench, family, model_dir)
        for variant in bench.c.variants:
            with bench.stage(f"{family}: service {variant}", optional=True, needs_s=90) as ok:
                if ok:
                    served.run_service(bench, family, model_dir, label=variant, env=SERVICE_VARIANTS[variant])
    if "encode" not in bench.c.skip:
        with bench.stage("encode 1024x1024"):
            bench.results.encode = encode.time_encoders()
    return bench.results


def run_pytest_gpu(bench: Bench) -> None:
    """The GPU tests of tests/service/test_accel.py, their exit code and last lines recorded."""
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
            "tests/service/test_accel.py",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    bench.results.pytest = {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "tail": tail,
    }
    log.info("pytest -m gpu: rc=%d\n%s", proc.returncode, "\n".join(tail))


def run_bench(config: BenchConfig) -> Results:
    """Run every stage, write `bench.json` and `table.txt` under `config.out`, print the table last."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    bench = Bench(config)
    results = run_stages(bench)
    bench.save()
    text = table(results)
    (config.out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return results
