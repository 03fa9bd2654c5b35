"""What the stages observed, as plain models (no Prefect): the benchmark's timings and images, the log
scan, the app's own request, the quality comparison's verdict and the host's facts. The stages (`flows/stages/`)
fill them in; the gate (`flows/evidence/gates.py`), the run record and the start-mode decision read them."""

from __future__ import annotations

from pydantic import BaseModel


class ImageCheck(BaseModel):
    ok: bool
    size: str | None
    detail: str


class BenchmarkResult(BaseModel):
    runs: int
    requested_size: str
    wall_s: list[float]
    generation_s: list[float]
    p50_s: float | None
    p95_s: float | None
    peak_vram_gb: float | None
    images: list[ImageCheck]
    errors: list[str]
    model: str | None


class LogScan(BaseModel):
    log_file: str
    bytes_scanned: int
    matches: list[str]


class AppCheck(BaseModel):
    through_tunnel: bool
    health_ok: bool
    generate_ok: bool
    seconds: float | None
    detail: str


class QualityResult(BaseModel):
    """The evaluation's verdict: CLIP scores of the current and the new service."""

    current_score: float | None
    new_score: float | None
    passed: bool  # the evidence does not say worse (a pass, or an inconclusive comparison)
    detail: str
    inconclusive: bool = False  # too little evidence to call it either way
    mean_diff: float | None = None  # new minus current, CLIP points
    ci_low: float | None = None  # 95% CI of mean_diff
    ci_high: float | None = None
    margin: float | None = None  # how much worse still counts as not worse
    report: str | None = None  # the comparison's HTML report (CI against the margin in one picture)


class GpuInfo(BaseModel):
    name: str
    total_gb: float
    free_gb: float


class HostFacts(BaseModel):
    """What the host offers."""

    free_disk_gb: float
    needed_disk_gb: float
    gpus: list[GpuInfo]
    driver: str | None
    python: str
    python_version: str | None
    packages: dict[str, str | None]
    torch_cuda: str | None
    cuda_available: bool | None
    problems: list[str]
    release_fixes: list[str] = []  # installed into the release environment over the box's versions
    notes: list[str] = []
