"""The service as it ships, over HTTP: `sdxl-deploy serve` in its own process (started cold, then restarted on
its warm compile cache), every scenario end to end, the same-seed comparison, and concurrent clients."""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from bench.images import decode_image, image_diff
from bench.launch import ServiceProcess
from bench.measure import free_memory, gpu_state, p50
from bench.scenarios import SAME_IMAGE_MIN_PSNR_DB, TARGETS, Scenario, scenario_sizes, setup_key
from bench.startup import NO_STARTUP_FACTS, startup_figures
from service.schema import HealthResponse

if TYPE_CHECKING:
    from bench.harness import Bench

log = logging.getLogger("bench")

READY_TIMEOUT_S = 540.0  # a cold SDXL start compiles for minutes before /ready


class BenchedService:
    """One start of the service under measurement: the shared launcher, an HTTP client, its start-up figures."""

    def __init__(self, model_dir: Path, log_file: Path, env: dict[str, str]) -> None:
        self.process = ServiceProcess(model_dir, env=env, log=log_file, ready_timeout_s=READY_TIMEOUT_S)
        self.client: httpx.Client | None = None

    def __enter__(self) -> BenchedService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, Any]:
        """Start, wait for /ready; the start-up figures from `/health`'s `startup` (`bench.startup`)."""
        self.process.start()
        self.client = httpx.Client(base_url=self.process.url, timeout=600)
        startup = self.health().startup
        if startup is None:
            log.warning(NO_STARTUP_FACTS)
        assert self.process.ready_s is not None
        return startup_figures(startup, ready_s=self.process.ready_s, spawned_at=self.process.spawned_at)

    def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None, "not started"
        t0 = time.perf_counter()
        response = self.client.post("/generate", json=body)
        elapsed = time.perf_counter() - t0
        if response.status_code != 200:
            raise RuntimeError(f"/generate answered {response.status_code}: {response.text[:500]}")
        data = response.json()
        data["_client_s"] = round(elapsed, 4)
        return data

    def health(self) -> HealthResponse:
        """`/health`, typed by the service's own schema (the service under measurement is this checkout's)."""
        assert self.client is not None, "not started"
        return HealthResponse.model_validate(self.client.get("/health").json())

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.process.stop()
        free_memory()


def run_service(
    bench: Bench, family: str, model_dir: Path, label: str = "default", env: dict[str, str] | None = None
) -> None:
    """Start `sdxl-deploy serve`, time every scenario, then restart it on the warm cache.

    Each set-up starts cold (its compile cache emptied first) unless `keep_cache`, which starts it on the
    cache an earlier run left. A variant without a cache of its own starts on a copy of the default's and
    compiles only what it changes (e.g. the unguided UNet shape).
    """
    default_cache = bench.c.work / f"compile-cache-{family}-default"
    cache = bench.c.work / f"compile-cache-{family}-{label}"
    if cache.exists() and not bench.c.keep_cache:
        shutil.rmtree(cache)
    seeded = label != "default" and not cache.exists() and default_cache.exists()
    if seeded:
        shutil.copytree(default_cache, cache)
    env = {
        "SDXL_COMPILE_CACHE_DIR": str(cache),
        "SDXL_MAX_QUEUE": "32",
        "TORCH_LOGS": "recompiles",
        **(env or {}),
    }
    out: dict[str, Any] = {"env": env, "cache": "seeded from the default's" if seeded else "as found"}
    key = setup_key(family, label)
    bench.results.service[key] = out
    out["gpu_before"] = gpu_state()
    with BenchedService(model_dir, bench.log_file(f"serve-{family}-{label}.log"), env) as svc:
        out["cold_start"] = svc.start()
        out["gpu_ready"] = gpu_state()
        bench.save()
        out["quality_options"] = svc.health().quality_options
        for s in bench.scenarios(family):
            timed, image = time_http(bench, svc, s, compare=True, judge=not out["quality_options"])
            out[s.name] = timed
            image_key = f"{family}/{s.name}"
            if label == "default":
                bench.service_images[image_key] = image
            elif image_key in bench.service_images:
                timed["same_seed_vs_default"] = image_diff(image, bench.service_images[image_key])
            bench.save()
        if label == "default":
            out["health_after"] = svc.health().model_dump(mode="json")
            out["gpu_after"] = gpu_state()
            if bench.c.concurrency > 1 and not bench.c.restart:
                out["concurrency"] = concurrency(bench, svc, bench.scenarios(family)[0])
                bench.save()
    if bench.c.restart:
        with bench.stage(f"{key}: restart (warm compile cache)", optional=True, needs_s=75) as ok:
            if ok:
                run_restart(bench, family, model_dir, env, label)


def run_restart(
    bench: Bench, family: str, model_dir: Path, env: dict[str, str], label: str = "default"
) -> None:
    """The same service again on the now-warm compile cache: restart-to-ready, a few requests, then (the
    default set-up) the concurrent clients, on the restarted service so the cold run's time goes to the
    scenarios."""
    key = setup_key(family, label)
    with BenchedService(model_dir, bench.log_file(f"serve-{family}-{label}-restart.log"), env) as svc:
        restart: dict[str, Any] = {"warm_start": svc.start()}
        bench.results.restart[key] = restart
        s = bench.scenarios(family)[0]
        restart[s.name] = time_http(bench, svc, s, compare=False, reps=3)[0]
        bench.save()
        if label == "default" and bench.c.concurrency > 1:
            with bench.stage(
                f"{family}: {bench.c.concurrency} concurrent clients", optional=True, needs_s=20
            ) as ok:
                if ok:
                    bench.results.service[family]["concurrency"] = concurrency(bench, svc, s)


def request(bench: Bench, s: Scenario, seed: int | None = None, take: int | None = None) -> dict[str, Any]:
    """The scenario's request; `take` makes its prompt one the service has not seen (timed requests: a
    repeated prompt would come from the service's store of embeddings, an app's rarely does)."""
    steps, size = scenario_sizes(s, bench.c.tiny)
    return {
        "prompt": s.prompt if take is None else f"{s.prompt}, take {take}",
        "num_inference_steps": steps,
        "width": size,
        "height": size,
        "seed": s.seed if seed is None else seed,
        "use_refiner": s.use_refiner,
        "refiner_split": s.refiner_split,
        "output_format": "png",
    }


def time_http(
    bench: Bench,
    svc: BenchedService,
    s: Scenario,
    *,
    compare: bool,
    judge: bool = True,
    reps: int | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """Time one scenario over HTTP: (figures, the image at the scenario's own prompt and seed).

    `compare`: that image against the eager one, passed or failed unless the service runs opt-ins that change
    images (`judge` False: the distance is reported, not judged). The timed requests each get a new prompt.
    """
    reps = reps or bench.c.reps
    first = svc.generate(request(bench, s))  # the worker thread records its CUDA graphs here
    second = svc.generate(request(bench, s))  # the image compared: the eager reference's prompt and seed
    e2e, server_total, encode, peaks = [], [], [], []
    body = None
    for _ in range(reps):
        t0 = time.perf_counter()
        body = svc.generate(request(bench, s, take=next(bench.takes)))
        e2e.append(time.perf_counter() - t0)
        server_total.append(body["timings"]["total"])
        encode.append(body["timings"].get("encode", float("nan")))
        if body.get("peak_vram_gb") is not None:
            peaks.append(body["peak_vram_gb"])
    assert body is not None
    out: dict[str, Any] = {
        "e2e_p50_s": p50(e2e),
        "e2e_runs_s": [round(x, 4) for x in e2e],
        "server_total_p50_s": p50(server_total),
        "encode_p50_ms": round(p50(encode) * 1000, 1),
        "first_two_requests_s": [first["_client_s"], second["_client_s"]],
        "timings_last": body["timings"],
        "peak_vram_gib": max(peaks) if peaks else None,
        "png_b64_mb": round(len(body["image"]) / 1e6, 2),
        "target_p50_s": s.target_p50_s,
    }
    image = decode_image(second["image"])
    if compare and s.name in bench.references:
        diff = image_diff(image, bench.references[s.name])
        # Random weights make the sampling trajectory chaotic: a mere dtype change (plain fp16 vs the
        # service's bf16 eager) can already move the image far. The optimised path passes when it is
        # within SAME_IMAGE_MIN_PSNR_DB of the eager one, or no further from it than that dtype change.
        floor = bench.dtype_floor.get(s.name)
        diff["min_psnr_db"] = SAME_IMAGE_MIN_PSNR_DB
        diff["dtype_floor_psnr_db"] = floor
        ok = diff["psnr_db"] >= min(SAME_IMAGE_MIN_PSNR_DB, floor if floor is not None else 1e9)
        diff["ok"] = bool(ok) if judge else None
        out["same_seed_vs_eager"] = diff
    return out, image


def concurrency(bench: Bench, svc: BenchedService, s: Scenario) -> dict[str, Any]:
    """Single-stream images/s, then N clients at once (each sends `rounds` requests)."""
    n, rounds = bench.c.concurrency, bench.c.concurrency_rounds
    t0 = time.perf_counter()
    for i in range(n):
        svc.generate(request(bench, s, seed=i, take=next(bench.takes)))
    single = n / (time.perf_counter() - t0)

    def client(i: int) -> list[tuple[float, int]]:
        times = []
        for r in range(rounds):
            t = time.perf_counter()
            answer = svc.generate(request(bench, s, seed=1000 + i * rounds + r, take=next(bench.takes)))
            times.append((time.perf_counter() - t, int(answer["timings"].get("batched_with", 1))))
        return times

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        answers = [x for xs in pool.map(client, range(n)) for x in xs]
    concurrent = n * rounds / (time.perf_counter() - t0)
    latencies = [seconds for seconds, _ in answers]
    batched = [together for _, together in answers]
    return {
        "coalesced_requests": sum(1 for together in batched if together > 1),
        "mean_requests_per_call": round(statistics.fmean(batched), 2),
        "clients": n,
        "single_stream_images_per_s": round(single, 3),
        "concurrent_images_per_s": round(concurrent, 3),
        "speedup": round(concurrent / single, 3),
        "concurrent_latency_p50_s": p50(latencies),
        "target_speedup": TARGETS["concurrency_speedup"],
    }
