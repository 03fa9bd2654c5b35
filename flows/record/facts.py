"""What a single-host run found, stage by stage: `summary.json`'s `facts`, one typed field per fact. A fact
the run never reached is absent from the JSON (not null); each is the stage's own model, or the part of it
the record keeps (the health bodies are left out where the gate table already judged them)."""

from __future__ import annotations

from typing import Literal

from flows.box.capacity import StartDecision
from flows.box.model_check import NewModel
from flows.box.supervisor import Restarts
from flows.evidence.gates import GateRow
from flows.evidence.results import (
    AppCheck,
    CompileCheck,
    CompileResult,
    CurrentFacts,
    CutoverTimes,
    HostFacts,
    PrefetchResult,
    QualitySizing,
    Recorded,
    RollbackResult,
    WarmupFacts,
)
from flows.record.approval import Approval


class PreflightFacts(Recorded):
    host: HostFacts
    current: CurrentFacts


class CompileSkipped(Recorded):
    """The compile step was not run (no GPU on the box, and the target does not force it on)."""

    skipped: str


class CutoverFacts(CutoverTimes, Recorded):
    """The cut-over's times, and the downtime criterion judged again after it (when the prober ran)."""

    max_downtime_s: GateRow | None = None


class Recovered(Recorded):
    """What a deploy cleaned up after an interrupted one: the compile step it left, then its staged service
    stopped (staged, before its cut-over) or the old service put back (the rollback's fields, less health)."""

    run_id: str
    stage: str
    mode: Literal["staged", "stop-first"]
    stopped_compile: str | None
    stopped_staged: str | None = None
    backup_dir: str | None = None
    stopped_new: str | None = None
    restored_files: list[str] | None = None
    restarted: str | None = None
    answering: bool | None = None
    release: int | None = None
    port: int | None = None


class RunFacts(Recorded):
    """`summary.json`'s `facts`: deploy-sdxl's by stage, verify-sdxl's and rollback-sdxl's own."""

    recovered: Recovered | None = None
    model: NewModel | None = None
    preflight: PreflightFacts | None = None
    start: StartDecision | None = None
    quality_sizing: QualitySizing | None = None
    compile_check: CompileCheck | None = None
    prefetch: PrefetchResult | None = None
    compile: CompileResult | CompileSkipped | None = None
    warmup: WarmupFacts | None = None
    app_path_before_cutover: AppCheck | None = None
    approval: Approval | None = None
    cutover: CutoverFacts | None = None
    app_path_after_cutover: AppCheck | None = None
    discarded_staged: str | None = None
    release: int | None = None
    ssh_reconnects: int | None = None
    restarts: Restarts | None = None  # verify-sdxl
    process: str | None = None  # verify-sdxl: the service's process, described
    rollback: RollbackResult | None = None  # rollback-sdxl
