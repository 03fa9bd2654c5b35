"""What the stages observed, as plain models (no Prefect): the processes found, the benchmark's timings and
images, the log scan, the app's own request, the quality comparison's sizing and verdict, the host's facts and
the current service, and what the ship, prefetch, compile, warm-up, cut-over and rollback stages did. The stages
(`flows/stages/`) fill them in; the gate (`flows/evidence/gates.py`), the run record and the start-mode
decision read them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from service.schema import CompileReport, HealthResponse, ServiceHealth


class Recorded(BaseModel):
    """A record whose JSON holds the fields that were set: an optional field never set is absent, not null
    (`summary.json` keeps only the facts a run found)."""

    @model_serializer(mode="wrap")
    def _only_set(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


class ProcessInfo(BaseModel):
    """One running process, as recorded when it was found or started."""

    pid: int
    start_ticks: int
    cmdline: str
    group_leader: bool

    def describe(self) -> str:
        # Long command lines keep both ends: the program and its last arguments (model, port).
        text = self.cmdline if len(self.cmdline) <= 160 else f"{self.cmdline[:70]} ... {self.cmdline[-85:]}"
        return f"PID {self.pid} ({text})"


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


class CurrentFacts(BaseModel):
    """The service answering today."""

    process: ProcessInfo | None
    health: ServiceHealth | None
    health_error: str | None
    baseline_s: float | None
    baseline_error: str | None
    problems: list[str]


class CompileCheck(BaseModel):
    """`python -m service.compile_check` run with the release's python (contract 2)."""

    ok: bool
    device: str
    torch: str
    error: str | None

    def warning(self) -> str | None:
        if self.ok:
            return None
        return (
            f"torch.compile does not work with the release's python on {self.device} (torch {self.torch}): "
            f"{self.error}; the service will serve uncompiled"
        )


class PrefetchResult(BaseModel):
    """What the prefetch stage did (`summary.json` facts `prefetch`)."""

    files: int = 0  # hub files the new service loads
    cached_files: int = 0  # of them, already in the box's cache when the stage began
    bytes_total: int = 0
    bytes_downloaded: int = 0  # brought to the box by this stage
    seconds: float = 0.0
    attempts: int = 0
    offline_ready: bool = False  # every file cached: the new service starts with HF_HUB_OFFLINE=1
    cache_dir: str | None = None
    note: str = ""


class CompileResult(BaseModel):
    """What the compile stage did (`summary.json` facts `compile`): the step's own report and how it ran."""

    report: CompileReport
    summary: str  # one line: what was built or reused, or why nothing was
    where: str  # beside the old service, after it stopped, beside the serving release
    seconds: float
    command: str  # the step's argv (its secrets are in its environment, never here)
    log_file: str

    def warnings(self) -> list[str]:
        """The step's problems (files that could not be loaded, signatures not compiled whole)."""
        return [f"compile step: {problem}" for problem in self.report.problems]


class WarmupFacts(BaseModel):
    """What the warm-up stage did (`summary.json` facts `warmup`)."""

    ready_after_s: float
    warmup_s: list[float]
    log_offset: int
    compile_s: float | None = (
        None  # the service's load-time warm-up (torch.compile): /health's startup.warmup_s
    )


class WarmupResult(WarmupFacts):
    health: HealthResponse

    def facts(self) -> WarmupFacts:
        return WarmupFacts(**self.model_dump(exclude={"health"}))


class CutoverTimes(BaseModel):
    stopped_old: str
    seconds: float  # from telling the new service to it answering on the app's port


class Cutover(CutoverTimes):
    health: ServiceHealth


class RollbackResult(BaseModel):
    backup_dir: str | None
    stopped_new: str
    restored_files: list[str]
    restarted: str
    health: ServiceHealth | None
    answering: bool
    release: int | None = None  # the recorded release put back (None: the target's current service)
    port: int = 0  # where the service put back answers


class QualitySizing(Recorded):
    """How many prompts the quality comparison sends, and why (`summary.json` facts `quality_sizing`): a fixed
    number, or sized from the CLIP spread of the baseline's first batch."""

    mode: Literal["fixed", "sized"]
    prompts: int
    seeds: int
    needed: int | None = None
    baseline_sd: float | None = None
    first_batch: int | None = None
    max_prompts: int | None = None
    margin: float | None = None
    probability: float | None = None
    capped: bool | None = None
    why: str | None = None
