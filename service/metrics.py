"""Prometheus metrics of one service instance (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.schema import CompileStatus

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120, 300)


class ServiceMetrics:
    """Requests, latency, queue depth, errors and VRAM, exposed at `GET /metrics`."""

    def __init__(
        self,
        queue_depth: Callable[[], float],
        vram_used_gb: Callable[[], float],
        compiles: Callable[[], CompileStatus | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_CompileCollector(compiles))
        self.requests = Counter(
            "sdxl_requests", "HTTP requests by route and status.", ["route", "status"], registry=self.registry
        )
        self.errors = Counter("sdxl_errors", "Errors by kind.", ["error_type"], registry=self.registry)
        self.generation_seconds = Histogram(
            "sdxl_generation_seconds",
            "Time of successful /generate requests, queueing and encoding included.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("sdxl_images_generated", "Images generated.", registry=self.registry)
        self.coalesced = Counter(
            "sdxl_coalesced_requests",
            "Requests that ran in one batched pipeline call with other waiting requests.",
            registry=self.registry,
        )
        Gauge("sdxl_queue_depth", "Requests waiting for the GPU.", registry=self.registry).set_function(
            queue_depth
        )
        Gauge("sdxl_vram_used_gb", "GPU memory in use (GiB).", registry=self.registry).set_function(
            vram_used_gb
        )
        self.peak_vram = Gauge(
            "sdxl_last_peak_vram_gb", "Peak VRAM of the last request.", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CompileCollector(Collector):
    """`sdxl_compile_shape{shape, state}` = 1 per shape a compiled function covers ("compiled") or that ran
    uncompiled ("uncompiled"), and the count of module calls run uncompiled, read from the engine at each
    scrape."""

    def __init__(self, compiles: Callable[[], CompileStatus | None]) -> None:
        self.compiles = compiles

    def collect(self) -> Iterator[Metric]:
        status = self.compiles() or CompileStatus()
        shapes = GaugeMetricFamily(
            "sdxl_compile_shape",
            "Shapes of the compiled modules: covered by a compiled function, or run uncompiled.",
            labels=["shape", "state"],
        )
        for shape in status.compiled:
            shapes.add_metric([shape, "compiled"], 1)
        for shape in status.uncompiled:
            shapes.add_metric([shape, "uncompiled"], 1)
        yield shapes
        yield CounterMetricFamily(
            "sdxl_uncompiled_calls",
            "Module calls run uncompiled because no compiled function accepted their shape.",
            value=status.uncompiled_calls,
        )
