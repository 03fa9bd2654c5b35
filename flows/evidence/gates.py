"""The gate: the success criteria as a table (threshold, enforce or warn), judged on the evidence the
other stages collected. Plain (no Prefect): the gate stage (`flows/stages/gates.py`) logs and publishes the
table, the run record (`flows/record/rundir.py`) writes it and judges downtime again at the end."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from flows.config.target import Criterion, StartMode
from flows.errors import GateFailed
from flows.evidence.downtime import Downtime
from flows.evidence.results import AppCheck, BenchmarkResult, LogScan, QualityResult
from service.schema import HealthResponse, ServiceHealth

# "inconclusive": the evidence cannot tell (so far only the quality comparison says it); it does not fail
# the deploy, and the summary, the report and the console show it in capitals.
Verdict = Literal["pass", "fail", "warn", "n/a", "inconclusive"]
INCONCLUSIVE: Literal["inconclusive"] = "inconclusive"

DESCRIPTIONS: dict[str, str] = {
    "model_loaded": "Health endpoint reports the model loaded",
    "resolution": "Generates at the requested size (at least threshold px)",
    "p95_seconds": "p95 generation time below threshold (s)",
    "valid_image": "Every image is valid base64 of a decodable image at the right size",
    "tunnel": "/health and /generate work through an SSH port forward",
    "app_request": "The app's request succeeds as the app sends it",
    "no_cuda_errors": "No CUDA errors or tracebacks in the service log",
    "peak_vram_gb": "Peak VRAM below threshold (GB)",
    "quality": "CLIP score not worse than the current model (by more than threshold)",
    "max_downtime_s": "Longest outage the app saw during the run below threshold (s)",
}


class Evidence(BaseModel):
    """What the stages observed; a None field means that stage did not run."""

    health: HealthResponse | ServiceHealth | None = None
    benchmark: BenchmarkResult | None = None
    app: AppCheck | None = None
    log_scan: LogScan | None = None
    quality: QualityResult | None = None
    downtime: Downtime | None = None


class GateRow(BaseModel):
    criterion: str
    description: str
    threshold: float | None
    observed: str
    enforce: bool
    verdict: Verdict


class GateReport(BaseModel):
    rows: list[GateRow]

    @property
    def passed(self) -> bool:
        return not any(row.verdict == "fail" for row in self.rows)

    @property
    def failures(self) -> list[GateRow]:
        return [row for row in self.rows if row.verdict == "fail"]

    @property
    def inconclusive(self) -> list[GateRow]:
        return [row for row in self.rows if row.verdict == INCONCLUSIVE]

    def table(self) -> list[dict[str, Any]]:
        return [row.model_dump() for row in self.rows]


# Each check returns (ok, observed); ok None = not applicable (or no evidence yet), "inconclusive" = the
# evidence cannot tell.
Outcome = bool | None | Literal["inconclusive"]
Check = Callable[[Evidence, Criterion], tuple[Outcome, str]]


def _model_loaded(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    if ev.health is None:
        return False, "no health answer"
    return bool(ev.health.model_loaded), f"model_loaded={ev.health.model_loaded}, model={ev.health.model}"


def _resolution(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    bench = ev.benchmark
    if bench is None or not bench.images:
        return False, "no image generated"
    width, height = (int(x) for x in bench.requested_size.split("x"))
    sizes = sorted({i.size or "?" for i in bench.images})
    big_enough = c.threshold is None or min(width, height) >= c.threshold
    all_match = all(i.size == bench.requested_size for i in bench.images)
    return big_enough and all_match, f"requested {bench.requested_size}, got {', '.join(sizes)}"


def _p95(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    bench = ev.benchmark
    if bench is None or bench.p95_s is None:
        return False, "no successful generation"
    ok = c.threshold is None or bench.p95_s < c.threshold
    return ok, f"p95 {bench.p95_s:.2f} s (p50 {bench.p50_s:.2f} s, {len(bench.generation_s)} runs)"


def _valid_image(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    bench = ev.benchmark
    if bench is None:
        return False, "no benchmark"
    good = sum(i.ok for i in bench.images)
    bad = [i.detail for i in bench.images if not i.ok] + bench.errors
    return good == bench.runs and not bad, f"{good}/{bench.runs} valid" + (f"; {bad[0]}" if bad else "")


def _tunnel(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    if ev.app is None:
        return False, "not checked"
    if not ev.app.through_tunnel:
        return None, "local target: no tunnel"
    return ev.app.health_ok and ev.app.generate_ok, ev.app.detail


def _app_request(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    if ev.app is None:
        return False, "not checked"
    return ev.app.generate_ok, ev.app.detail


def _no_cuda_errors(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    if ev.log_scan is None:
        return False, "log not scanned"
    matches = ev.log_scan.matches
    return not matches, f"{len(matches)} error lines" + (f": {matches[0][:160]}" if matches else "")


def _peak_vram(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    bench = ev.benchmark
    if bench is None or bench.peak_vram_gb is None:
        return None, "no GPU memory reported (CPU)"
    ok = c.threshold is None or bench.peak_vram_gb < c.threshold
    return ok, f"{bench.peak_vram_gb:.1f} GB"


def _quality(ev: Evidence, c: Criterion) -> tuple[Outcome, str]:
    if ev.quality is None:
        return None, "not compared (quality.enabled is off; verify-sdxl does not compare)"
    return INCONCLUSIVE if ev.quality.inconclusive else ev.quality.passed, ev.quality.detail


def _max_downtime(ev: Evidence, c: Criterion) -> tuple[bool | None, str]:
    if ev.downtime is None:
        return None, "not measured (probe.enabled is off, or verify-sdxl: nothing is switched)"
    ok = c.threshold is None or ev.downtime.longest_outage_s <= c.threshold
    return ok, ev.downtime.describe()


CHECKS: dict[str, Check] = {
    "model_loaded": _model_loaded,
    "resolution": _resolution,
    "p95_seconds": _p95,
    "valid_image": _valid_image,
    "tunnel": _tunnel,
    "app_request": _app_request,
    "no_cuda_errors": _no_cuda_errors,
    "peak_vram_gb": _peak_vram,
    "quality": _quality,
    "max_downtime_s": _max_downtime,
}


# The criteria judged against a threshold: its unit, and the lowest value it may take (and whether that value
# itself is allowed). The others have no threshold.
THRESHOLDS: dict[str, tuple[str, float, bool]] = {
    "resolution": ("px", 0.0, False),
    "p95_seconds": ("seconds", 0.0, False),
    "peak_vram_gb": ("GB", 0.0, False),
    "quality": ("CLIP points", 0.0, True),
    "max_downtime_s": ("seconds", 0.0, True),
}


def criteria_problems(criteria: list[Criterion], app_size: tuple[int, int]) -> list[str]:
    """Thresholds the gate cannot judge as meant, each naming `criteria.<name>.threshold`, the value and what
    would be accepted: one on a criterion that has none, one out of its range, and a resolution above the
    app's requested size `app_size` (that gate would fail every deploy)."""
    problems = []
    for criterion in criteria:
        value, field = criterion.threshold, f"criteria.{criterion.name}.threshold"
        if value is None:
            continue
        if criterion.name not in THRESHOLDS:
            problems.append(f"{field}: {criterion.name} has no threshold (got {value:g}); leave it out")
            continue
        unit, lowest, allowed = THRESHOLDS[criterion.name]
        if not math.isfinite(value) or value < lowest or (value == lowest and not allowed):
            problems.append(
                f"{field}: {value:g} is out of range; accepted: {'at least' if allowed else 'above'} {lowest:g} {unit}"
            )
        elif criterion.name == "resolution" and value > min(app_size):
            problems.append(
                f"{field}: {value:g} px is above the app's request ({app_size[0]}x{app_size[1]}, "
                f"workload.app_request), so the gate would fail every deploy; accepted: at most {min(app_size)}"
            )
    return problems


def criteria_for_mode(criteria: list[Criterion], mode: StartMode) -> list[Criterion]:
    """The criteria as a deploy of this mode judges them: a stop-first deploy's outage is the new service's
    whole start, so there `max_downtime_s` is report-only (a staged one enforces it as configured)."""
    if mode == "staged":
        return criteria
    return [c.model_copy(update={"enforce": False}) if c.name == "max_downtime_s" else c for c in criteria]


def judge(criteria: list[Criterion], evidence: Evidence) -> GateReport:
    """One row per criterion: pass, fail (enforced), warn (failed but warn-only), n/a or inconclusive."""
    rows = []
    for criterion in criteria:
        ok, observed = CHECKS[criterion.name](evidence, criterion)
        verdict: Verdict
        if ok == INCONCLUSIVE:
            verdict = INCONCLUSIVE
        else:
            verdict = "n/a" if ok is None else "pass" if ok else "fail" if criterion.enforce else "warn"
        rows.append(
            GateRow(
                criterion=criterion.name,
                description=DESCRIPTIONS[criterion.name],
                threshold=criterion.threshold,
                observed=observed,
                enforce=criterion.enforce,
                verdict=verdict,
            )
        )
    return GateReport(rows=rows)


def judge_downtime(report: GateReport, downtime: Downtime | None) -> GateReport:
    """`report` with its `max_downtime_s` row judged again over `downtime` (by the row's own threshold and
    mode); unchanged when it has no such row or nothing was measured."""
    if downtime is None:
        return report
    rows = []
    for row in report.rows:
        if row.criterion == "max_downtime_s":
            criterion = Criterion(name="max_downtime_s", threshold=row.threshold, enforce=row.enforce)
            row = judge([criterion], Evidence(downtime=downtime)).rows[0]
        rows.append(row)
    return GateReport(rows=rows)


def require_passed(report: GateReport) -> None:
    """Raise `GateFailed` naming every enforced criterion that failed (what was observed is in the criteria
    table, which the run records: said once)."""
    if not report.passed:
        failed = ", ".join(row.criterion for row in report.failures)
        raise GateFailed(f"enforced success criteria failed: {failed} (observed: the criteria table)")


def shown_verdict(verdict: str) -> str:
    """How a verdict is shown: in capitals when the evidence could not tell, so nobody reads past it."""
    return verdict.upper() if verdict == INCONCLUSIVE else verdict


def shown_passed(passed: bool | None) -> str:
    """How a run's verdict on its criteria (`gates_passed`) is shown."""
    return {True: "passed", False: "FAILED", None: "not judged"}[passed]


def gates_markdown(report: GateReport) -> str:
    lines = ["| criterion | threshold | observed | mode | verdict |", "|---|---|---|---|---|"]
    for row in report.rows:
        threshold = "" if row.threshold is None else f"{row.threshold:g}"
        mode = "enforce" if row.enforce else "warn"
        observed = row.observed.replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {row.criterion} | {threshold} | {observed} | {mode} | **{shown_verdict(row.verdict)}** |"
        )
    return "\n".join(lines)
