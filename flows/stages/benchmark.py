"""Benchmark: N generations with the app's payload; latency percentiles, peak VRAM, every image checked;
and a scan of the service log for CUDA errors and tracebacks."""

from __future__ import annotations

import base64
import binascii
import io
import re
import statistics
import time

from PIL import Image, UnidentifiedImageError
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import run_logger, service_url
from flows.box.hostfs import tail_bytes
from flows.box.hosts import Host
from flows.config.secrets import api_key
from flows.config.target import Target
from flows.evidence.results import BenchmarkResult, ImageCheck, LogScan
from service.client import ServiceCallError, ServiceClient

LOG_ERROR_PATTERNS = re.compile(
    r"CUDA error|CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS|CUDNN_STATUS|cuDNN error|"
    r"device-side assert|Traceback \(most recent call last\)"
)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def check_image(b64: str, width: int, height: int, fmt: str = "PNG") -> ImageCheck:
    """Base64 decodes, the image opens as `fmt`, and has the requested size."""
    try:
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        image.load()
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as exc:
        return ImageCheck(ok=False, size=None, detail=f"not a decodable image: {exc}")
    size = f"{image.width}x{image.height}"
    if image.format != fmt:
        return ImageCheck(ok=False, size=size, detail=f"format {image.format}, expected {fmt}")
    if (image.width, image.height) != (width, height):
        return ImageCheck(ok=False, size=size, detail=f"size {size}, expected {width}x{height}")
    return ImageCheck(ok=True, size=size, detail=f"valid {fmt} {size}")


@task(cache_policy=NO_CACHE)
def run_benchmark(host: Host, target: Target, port: int | None = None) -> BenchmarkResult:
    """N generations with the app's payload: p50/p95, peak VRAM, and every image checked (the new service
    on `port`, default its own)."""
    log = run_logger()
    workload = target.workload
    width, height = workload.size
    fmt = str(workload.app_request.get("output_format", "png")).upper()
    wall, generation, vram, images, errors, model = [], [], [], [], [], None
    with (
        service_url(host, port or target.new.port) as url,
        ServiceClient(url, api_key=api_key(target.new), timeout=workload.request_timeout_s) as client,
    ):
        for run in range(workload.benchmark_runs):
            started = time.perf_counter()
            try:
                answer = client.generate(**workload.app_request)
            except ServiceCallError as exc:
                errors.append(f"run {run + 1}: {exc}")
                continue
            wall.append(round(time.perf_counter() - started, 3))
            generation.append(answer.timings.get("total", wall[-1]))
            if answer.peak_vram_gb is not None:
                vram.append(answer.peak_vram_gb)
            images.append(check_image(answer.image, width, height, "JPEG" if fmt == "JPG" else fmt))
            model = answer.model
    result = BenchmarkResult(
        runs=workload.benchmark_runs,
        requested_size=f"{width}x{height}",
        wall_s=wall,
        generation_s=generation,
        p50_s=percentile(generation, 50),
        p95_s=percentile(generation, 95),
        peak_vram_gb=max(vram) if vram else None,
        images=images,
        errors=errors,
        model=model,
    )
    log.info(
        "benchmark: %d/%d ok, p50 %s s, p95 %s s, peak VRAM %s GB",
        sum(i.ok for i in images),
        workload.benchmark_runs,
        result.p50_s,
        result.p95_s,
        result.peak_vram_gb,
    )
    return result


@task(cache_policy=NO_CACHE)
def scan_log(host: Host, log_file: str, offset: int = 0) -> LogScan:
    """Look for CUDA errors and tracebacks in the service log written since `offset`."""
    text, end = tail_bytes(host, log_file, offset, limit=50_000_000)
    matches = [line.strip() for line in text.splitlines() if LOG_ERROR_PATTERNS.search(line)]
    if matches:
        run_logger().warning("service log %s: %d error lines, first: %s", log_file, len(matches), matches[0])
    return LogScan(log_file=log_file, bytes_scanned=end - offset, matches=matches[:50])
