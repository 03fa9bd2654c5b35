"""Prefect artifacts of evaluations and regression runs, under stable keys so every run's numbers are
versioned in the Prefect UI (table, markdown summary, link to the HTML report).

The evaluation package knows nothing of Prefect: the flows publish its results here (the deploy's
quality task and the regression-benchmark flow). Outside a Prefect flow or task run these functions log
that they skipped and return False.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from evaluation.results import EvaluationResult, RegressionRun

log = logging.getLogger(__name__)

EVALUATION_KEY = "sdxl-evaluation"
REGRESSION_KEY = "regression-benchmark"


def in_prefect_run() -> bool:
    """True inside a Prefect flow run or task run."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_evaluation(result: EvaluationResult, key: str = EVALUATION_KEY) -> bool:
    """`<key>-categories` (table), `<key>-summary` (markdown), `<key>-report` (link)."""
    if not in_prefect_run():
        log.info("not in a Prefect run: evaluation artifacts not published (%s)", result.run_dir)
        return False
    o = result.overall
    rows = [{"category": "overall", **o.model_dump()}] + [c.model_dump() for c in result.categories]
    timing = "\n".join(
        f"| {role} | {result.services[role].model} | {_f(t.latency_p50_s)} | {_f(t.latency_p95_s)} | "
        f"{_f(t.peak_vram_gb)} | {t.errors} |"
        for role, t in result.timing.items()
    )
    markdown = "\n".join(
        [
            f"# Quality: **{result.verdict}**",
            "",
            result.headline(),
            "",
            "| role | model | p50 s | p95 s | peak VRAM GB | failed |",
            "|---|---|---|---|---|---|",
            timing,
            "",
            f"Scorer: {result.scorer}. Report: `{result.report}`",
        ]
        + (
            ["", "> Random-weight stand-ins: these numbers say nothing about image quality."]
            if result.stand_ins
            else []
        )
    )
    _publish(key, "categories", rows, markdown, result.report, result.headline()[:250])
    return True


def publish_regression(run: RegressionRun, key: str = REGRESSION_KEY) -> bool:
    """`<key>-checks` (table), `<key>-summary` (markdown), `<key>-report` (link)."""
    if not in_prefect_run():
        log.info("not in a Prefect run: regression artifacts not published (%s)", run.run_dir)
        return False
    rows = [c.model_dump() for c in run.checks]
    metrics = "\n".join(f"| {name} | {_f(value)} |" for name, value in run.metrics.items())
    markdown = "\n".join(
        [
            f"# Regression benchmark: **{'REGRESSED' if run.regressed else 'ok'}**",
            "",
            run.message(),
            "",
            "| metric | value |",
            "|---|---|",
            metrics,
            "",
            f"Series: `{run.series}`. Report: `{run.report}`",
        ]
    )
    _publish(key, "checks", rows, markdown, run.report, run.message()[:250])
    return True


def _publish(
    key: str, table: str, rows: list[dict], markdown: str, report: str | None, description: str
) -> None:
    create_table_artifact(key=f"{key}-{table}", table=rows, description=description)
    create_markdown_artifact(key=f"{key}-summary", markdown=markdown, description=description)
    if report:
        create_link_artifact(
            key=f"{key}-report",
            link=Path(report).resolve().as_uri(),
            link_text="HTML report",
            description=description,
        )


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
