"""The regression benchmark of one running service: generate a prompt set, CLIP-score it, time it, compare
with the history, append to it, and write the run directory with its report.

The Prefect flow `regression-benchmark` (flows/runbooks/regression.py) wraps `run_regression_benchmark`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.clip_score import ClipScorer, load_scorer, score_generations
from evaluation.collect import collect, seed_list
from evaluation.compare import timing_table
from evaluation.history import DEFAULT_THRESHOLDS, HistoryStore, MetricCheck, Threshold, detect_regressions
from evaluation.metrics import DEFAULT_PRICE_PER_HOUR
from evaluation.prompts import Prompt
from evaluation.report import render_report
from evaluation.results import (
    REPORT_FILE,
    GenerationSettings,
    RegressionRun,
    save_regression_run,
    save_tables,
)

log = logging.getLogger(__name__)


class RegressionDetected(RuntimeError):
    """A metric regressed; the message names each metric with its value now and its baseline."""


def series_key(
    model: str, settings: GenerationSettings, scorer: str, prompts: Sequence[Prompt], seeds: list[int]
) -> str:
    """What makes two runs comparable, readable in the history file."""
    digest = hashlib.sha256("\n".join(f"{p.category}\t{p.text}" for p in prompts).encode()).hexdigest()[:8]
    size = f"{settings.width or 'default'}x{settings.height or 'default'}"
    refiner = {None: "default", True: "on", False: "off"}[settings.use_refiner]
    return (
        f"{model} | {size} | {settings.num_inference_steps} steps | refiner {refiner} | {scorer} | "
        f"prompts {digest} x{len(prompts)} | seeds {','.join(map(str, seeds))}"
    )


def run_metrics(generations: Any, price_per_hour: float) -> dict[str, float | None]:
    """The history columns of one run: CLIP score, latency, throughput, VRAM, cost and errors."""
    timing = timing_table(generations, price_per_hour)["deployed"]
    scores = generations["score"].dropna()
    return {
        "clip_score": float(scores.mean()) if len(scores) else None,
        **timing.model_dump(exclude={"images", "errors"}),
        "images": float(timing.images),
        "errors": float(timing.errors),
    }


def run_regression_benchmark(
    url: str,
    prompts: Sequence[Prompt],
    run_dir: str | Path,
    results_dir: str | Path,
    *,
    seeds: int | Sequence[int] = 2,
    settings: GenerationSettings | None = None,
    scorer: ClipScorer | None = None,
    thresholds: Sequence[Threshold] = DEFAULT_THRESHOLDS,
    window: int = 5,
    min_runs: int = 3,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    accept: bool = False,
    api_key: str | None = None,
) -> RegressionRun:
    """Benchmark the service at `url`, judge it against the history, append this run, write the report.

    Failed requests count as a regression of their own (`errors`). With `accept`, a regressed run is
    recorded as the new normal (it joins later baselines) instead of failing.
    """
    prompts, chosen_seeds = list(prompts), seed_list(seeds)
    settings = settings or GenerationSettings()
    scorer = scorer or load_scorer()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    store = HistoryStore(results_dir)

    info, frame = collect(url, "deployed", prompts, chosen_seeds, run_dir, settings, api_key)
    generations = score_generations(frame, run_dir, scorer)
    metrics = run_metrics(generations, price_per_hour)
    series = series_key(info.model, settings, scorer.describe(), prompts, chosen_seeds)
    checks = detect_regressions(store.load(), metrics, series, list(thresholds), window, min_runs)
    errors = int(metrics["errors"] or 0)
    if errors:
        first = generations["error"].dropna().iloc[0]
        checks.append(
            MetricCheck(
                metric="errors",
                current=errors,
                baseline=0,
                limit=0,
                status="regressed",
                message=f"errors regressed: {errors} of {len(generations)} requests failed now vs 0 "
                f"allowed (first: {first})",
            )
        )
    regressed = any(c.status == "regressed" for c in checks)
    run = RegressionRun(
        service=info,
        series=series,
        scorer=scorer.describe(),
        random_weights=scorer.random_weights,
        prompts=len(prompts),
        seeds=chosen_seeds,
        settings=settings,
        price_per_hour=price_per_hour,
        metrics=metrics,
        thresholds=list(thresholds),
        checks=checks,
        regressed=regressed,
        accepted=accept and regressed,
        run_dir=str(run_dir),
        report=str(run_dir / REPORT_FILE),
        history_file=str(store.path),
    )
    save_tables(run_dir, {"generations": generations})
    status = "accepted" if run.accepted else "regressed" if regressed else "ok"
    store.append(
        {
            "created_at": run.created_at,
            "run_dir": str(run_dir),
            "series": series,
            "model": info.model,
            "url": url,
            "status": status,
            "regressions": [c.metric for c in run.regressions],
            **metrics,
        }
    )
    save_regression_run(run)
    render_report(run_dir, history_file=store.path)
    log.info("regression benchmark: %s; report %s", run.message(), run.report)
    return run
