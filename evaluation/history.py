"""The regression history: one JSON line per benchmark run in `<results_dir>/history.jsonl`, append-only,
and regression detection of a new run against a window of earlier comparable runs.

Runs are comparable when they share a `series` (model, size, steps, refiner, scorer, prompt set, seeds).
The baseline of a metric is the median of the last `window` comparable runs that were not regressions.
A metric regresses when it moved the bad way by more than every tolerance at once: its threshold
(relative to the baseline and/or absolute) and the window's own noise (`noise_k` robust standard
deviations, 1.4826 x the median absolute deviation). So a planted 50% slowdown is caught, while the
few-percent jitter of an unchanged service is not.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import pandas as pd

HISTORY_FILE = "history.jsonl"
CheckStatus = Literal["ok", "regressed", "no baseline", "not measured"]
RunStatus = Literal["ok", "regressed", "accepted"]


class Threshold(BaseModel):
    """How far a metric may move the bad way before it counts as a regression."""

    metric: str = Field(..., description="History column, e.g. latency_p95_s, peak_vram_gb, clip_score.")
    worse: Literal["higher", "lower"] = Field(..., description="Which direction is bad.")
    relative: float = Field(0.0, ge=0, description="Tolerance as a fraction of the baseline (0.2 = 20%).")
    absolute: float = Field(0.0, ge=0, description="Tolerance in the metric's unit.")
    noise_k: float = Field(3.0, ge=0, description="Tolerance in robust standard deviations of the window.")
    unit: str = Field("", description="Unit for messages.")


DEFAULT_THRESHOLDS: tuple[Threshold, ...] = (
    Threshold(metric="latency_p50_s", worse="higher", relative=0.20, unit="s"),
    Threshold(metric="latency_p95_s", worse="higher", relative=0.25, unit="s"),
    Threshold(metric="peak_vram_gb", worse="higher", relative=0.10, absolute=0.5, unit="GB"),
    Threshold(metric="clip_score", worse="lower", absolute=1.0, unit="points"),
)


class MetricCheck(BaseModel):
    metric: str
    current: float | None
    baseline: float | None
    limit: float | None
    runs: int = Field(0, description="Earlier runs in the baseline window.")
    status: CheckStatus
    message: str


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g} {unit}".strip()


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the standard deviation, if the data were normal."""
    return float(1.4826 * np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def check_metric(
    threshold: Threshold, current: float | None, window: list[float], min_runs: int
) -> MetricCheck:
    """Judge one metric of the new run against the window of earlier values."""
    name, unit = threshold.metric, threshold.unit
    if current is None or not math.isfinite(current):
        return MetricCheck(
            metric=name,
            current=None,
            baseline=None,
            limit=None,
            status="not measured",
            message=f"{name}: not measured in this run",
        )
    values = np.asarray([v for v in window if v is not None and math.isfinite(v)], dtype=float)
    if values.size < min_runs:
        return MetricCheck(
            metric=name,
            current=current,
            baseline=None,
            limit=None,
            runs=int(values.size),
            status="no baseline",
            message=f"{name}: {_fmt(current, unit)}; {values.size} earlier runs, a baseline needs {min_runs}",
        )
    baseline = float(np.median(values))
    tolerance = max(
        threshold.relative * abs(baseline), threshold.absolute, threshold.noise_k * robust_sd(values)
    )
    sign = 1 if threshold.worse == "higher" else -1
    limit = baseline + sign * tolerance
    regressed = sign * (current - limit) > 0
    direction = "above" if sign > 0 else "below"
    verb = "regressed" if regressed else "ok"
    message = (
        f"{name} {verb}: {_fmt(current, unit)} now vs {_fmt(baseline, unit)} baseline "
        f"(median of {values.size} runs; limit {_fmt(limit, unit)}"
        + (f", {direction} it)" if regressed else ")")
    )
    return MetricCheck(
        metric=name,
        current=current,
        baseline=baseline,
        limit=limit,
        runs=int(values.size),
        status="regressed" if regressed else "ok",
        message=message,
    )


def detect_regressions(
    history: pd.DataFrame,
    current: dict[str, Any],
    series: str,
    thresholds: list[Threshold] | tuple[Threshold, ...] = DEFAULT_THRESHOLDS,
    window: int = 5,
    min_runs: int = 3,
) -> list[MetricCheck]:
    """One check per threshold: the new run's metrics against the last `window` good runs of its series."""
    if window < 1 or min_runs < 1:
        raise ValueError(f"window and min_runs must be at least 1, got {window} and {min_runs}")
    earlier = history
    if not history.empty:
        earlier = history[(history["series"] == series) & (history["status"] != "regressed")]
        earlier = earlier.sort_values("created_at").tail(window)
    checks = []
    for threshold in thresholds:
        column = earlier[threshold.metric].tolist() if threshold.metric in earlier else []
        value = current.get(threshold.metric)
        checks.append(check_metric(threshold, None if value is None else float(value), column, min_runs))
    return checks


class HistoryStore:
    """`<results_dir>/history.jsonl`: append a record, read them all back as a DataFrame."""

    def __init__(self, results_dir: str | Path) -> None:
        self.path = Path(results_dir).expanduser() / HISTORY_FILE

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one run (a `created_at` UTC timestamp is added when missing)."""
        record = {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, default=str) + "\n")
        return record

    def load(self) -> pd.DataFrame:
        """Every run so far, oldest first (an empty frame when there is no history yet)."""
        return read_history(self.path)


def read_history(path: str | Path) -> pd.DataFrame:
    """The runs of a history file, oldest first (an empty frame when the file does not exist)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        return pd.DataFrame(columns=["created_at", "series", "status"])
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"history file {path} line {number} is not JSON: {exc}") from exc
    frame = pd.DataFrame(records, columns=None if records else ["created_at", "series", "status"])
    return frame.sort_values("created_at", kind="stable").reset_index(drop=True)
