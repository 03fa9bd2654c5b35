"""The results of an evaluation or a regression run, and how a run directory holds them.

Comparison run directory: `images/<role>/p<prompt>-s<seed>.<fmt>`, tables as Parquet and CSV
(`generations`, `prompts`, `categories`, `timing`), `evaluation.json` (the `EvaluationResult`) and
`report.html`. Regression run directory: `images/deployed/...`, `generations` (Parquet and CSV),
`regression.json` (the `RegressionRun`) and `report.html`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from evaluation.history import MetricCheck, Threshold
from evaluation.metrics import TimingSummary
from evaluation.stats import PairedStats, Verdict

if TYPE_CHECKING:
    import pandas as pd

Role = Literal["baseline", "candidate", "deployed"]
ROLES: tuple[Role, ...] = ("baseline", "candidate")
STAND_IN_PREFIXES = ("tiny-", "synthetic-")
RESULT_FILE = "evaluation.json"
REGRESSION_FILE = "regression.json"
REPORT_FILE = "report.html"
TABLES = ("generations", "prompts", "categories", "timing")
GENERATION_COLUMNS = (
    "role",
    "model",
    "prompt_id",
    "prompt",
    "category",
    "seed",
    "steps",
    "image",
    "resolution",
    "latency_s",
    "generation_s",
    "peak_vram_gb",
    "error",
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class GenerationSettings(BaseModel):
    """The `/generate` fields shared by every request of a comparison (None = the service's default)."""

    num_inference_steps: int = Field(30, ge=1, le=150)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    negative_prompt: str | None = None
    use_refiner: bool | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"

    def payload(self, prompt: str, seed: int) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True)
        return {**body, "prompt": prompt, "seed": seed}


class ServiceInfo(BaseModel):
    role: Role
    url: str
    model: str
    backend: str | None = None
    device: str | None = None
    quality_options: list[str] = []  # opt-in settings in force that change its images (/health)

    @property
    def stand_in(self) -> bool:
        """A tiny or synthetic random-weight model: its images are noise."""
        return self.model.startswith(STAND_IN_PREFIXES)


class CategoryStats(PairedStats):
    category: str


class EvaluationResult(BaseModel):
    """What the deploy gate and the report need; the tables live next to it in `run_dir`."""

    verdict: Verdict
    margin: float
    overall: PairedStats
    categories: list[CategoryStats]
    timing: dict[str, TimingSummary]
    services: dict[str, ServiceInfo]
    scorer: str
    random_weights: bool
    prompts: int
    seeds: list[int]
    settings: GenerationSettings
    price_per_hour: float
    run_dir: str
    report: str | None = None
    history_file: str | None = None
    created_at: str = Field(default_factory=_now)

    @property
    def baseline_score(self) -> float:
        return self.overall.baseline_mean

    @property
    def candidate_score(self) -> float:
        return self.overall.candidate_mean

    @property
    def stand_ins(self) -> bool:
        """True when the numbers come from random-weight stand-ins (models or scorer)."""
        return self.random_weights or any(s.stand_in for s in self.services.values())

    def headline(self) -> str:
        o = self.overall
        return (
            f"{self.verdict}: CLIP {o.candidate_mean:.2f} vs {o.baseline_mean:.2f} "
            f"(diff {o.mean_diff:+.2f}, 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}], "
            f"win rate {o.win_rate:.0%}, {o.n} prompts x {len(self.seeds)} seeds, margin {self.margin:g})"
        )


class RegressionRun(BaseModel):
    """One benchmark run of the deployed service, as written to `regression.json`."""

    service: ServiceInfo
    series: str
    scorer: str
    random_weights: bool
    prompts: int
    seeds: list[int]
    settings: GenerationSettings
    price_per_hour: float
    metrics: dict[str, float | None]
    thresholds: list[Threshold]
    checks: list[MetricCheck]
    regressed: bool
    accepted: bool = False
    run_dir: str
    report: str | None = None
    history_file: str
    created_at: str = Field(default_factory=_now)

    @property
    def stand_ins(self) -> bool:
        return self.random_weights or self.service.stand_in

    @property
    def regressions(self) -> list[MetricCheck]:
        return [c for c in self.checks if c.status == "regressed"]

    def message(self) -> str:
        """One line: what regressed (each metric, now vs baseline), or that nothing did."""
        if not self.regressed:
            return f"no regression in {', '.join(c.metric for c in self.checks)} ({self.service.model})"
        return "regression: " + "; ".join(c.message for c in self.regressions)


def save_result(result: EvaluationResult) -> Path:
    path = Path(result.run_dir) / RESULT_FILE
    path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_result(run_dir: str | Path) -> EvaluationResult:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not an evaluation run directory")
    return EvaluationResult.model_validate_json(path.read_text(encoding="utf-8"))


def save_regression_run(run: RegressionRun) -> Path:
    path = Path(run.run_dir) / REGRESSION_FILE
    path.write_text(run.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_regression_run(run_dir: str | Path) -> RegressionRun:
    return RegressionRun.model_validate_json((Path(run_dir) / REGRESSION_FILE).read_text(encoding="utf-8"))


def save_tables(run_dir: str | Path, tables: Mapping[str, pd.DataFrame]) -> None:
    """Each table as `<name>.parquet` and `<name>.csv` in the run directory."""
    for name, frame in tables.items():
        frame.to_parquet(Path(run_dir) / f"{name}.parquet", index=False)
        frame.to_csv(Path(run_dir) / f"{name}.csv", index=False)


def load_table(run_dir: str | Path, name: str) -> pd.DataFrame:
    """`<run_dir>/<name>.parquet` as a DataFrame."""
    import pandas as pd

    return pd.read_parquet(Path(run_dir) / f"{name}.parquet")
