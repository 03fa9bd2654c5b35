"""Quality: is the new model's CLIP score not worse than the current one's? (the evaluation package).

The deploy cannot run both services at once (one port, one GPU), so the comparison is split around the
switch: `collect_baseline` sends the prompts to the current service before it is stopped, and
`assess_quality` sends the same prompts and seeds to the new one after warm-up, scores both sets here
with CLIP, writes the comparison's run directory and report, publishes its Prefect artifacts
(`flows.artifacts`) and applies `evaluation.compare.quality_gate` with the `quality` criterion's
threshold as the margin. A comparison that cannot run becomes a failed (by default warn-only) quality
row, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.hosts import Host
from flows.secrets import api_key
from flows.target import Target
from flows.tasks.common import run_logger, service_url
from flows.tasks.gates import QualityResult


@dataclass
class Baseline:
    """The current service's generations (or why there are none)."""

    info: Any = None  # evaluation.results.ServiceInfo
    generations: Any = None  # pandas.DataFrame, one row per prompt x seed
    error: str | None = None


def comparison_plan(target: Target) -> tuple[list[Any], int, Any]:
    """Prompts, seeds and generation settings (the app's request) of the comparison."""
    from evaluation.prompts import builtin_prompts, load_prompts, spread
    from evaluation.results import GenerationSettings

    check = target.quality
    prompts = load_prompts(check.prompts_file) if check.prompts_file else builtin_prompts()
    settings = GenerationSettings.model_validate(target.workload.app_request)
    return spread(prompts, check.prompt_limit), check.seeds, settings


@task(cache_policy=NO_CACHE)
def collect_baseline(host: Host, target: Target, run_dir: Path) -> Baseline | None:
    """Generate the comparison prompts on the current service, before it is stopped."""
    if not target.quality.enabled:
        return None
    from evaluation.collect import collect

    try:
        prompts, seeds, settings = comparison_plan(target)
        with service_url(host, target.current.port) as url:
            info, generations = collect(url, "baseline", prompts, seeds, run_dir, settings)
    except Exception as exc:  # the old script may not speak the full contract; the gate reports it
        run_logger().warning("quality baseline not collected: %s: %s", type(exc).__name__, exc)
        return Baseline(error=f"baseline from the current service failed: {type(exc).__name__}: {exc}")
    return Baseline(info=info, generations=generations)


@task(cache_policy=NO_CACHE)
def assess_quality(
    host: Host, target: Target, baseline: Baseline | None, run_dir: Path, margin: float
) -> QualityResult | None:
    """Generate the same prompts on the new service, CLIP-score both sets and judge the difference."""
    if baseline is None:
        return None
    if baseline.error:
        return QualityResult(current_score=None, new_score=None, passed=False, detail=baseline.error)
    import pandas as pd

    from evaluation.clip_score import load_scorer, score_generations
    from evaluation.collect import collect
    from evaluation.compare import quality_gate
    from evaluation.evaluate import write_evaluation
    from flows.artifacts import publish_evaluation

    check = target.quality
    try:
        prompts, seeds, settings = comparison_plan(target)
        with service_url(host, target.new.port) as url:
            info, generations = collect(
                url,
                "candidate",
                prompts,
                seeds,
                run_dir,
                settings,
                api_key=api_key(target.new),
            )
        scorer = load_scorer(check.scorer, check.scorer_weights)
        scored = score_generations(
            pd.concat([baseline.generations, generations], ignore_index=True), run_dir, scorer
        )
        result = write_evaluation(
            scored,
            {"baseline": baseline.info, "candidate": info},
            run_dir,
            scorer=scorer.describe(),
            random_weights=scorer.random_weights,
            seeds=list(range(seeds)),
            settings=settings,
            margin=margin,
        )
        publish_evaluation(result)
        passed, detail = quality_gate(result, margin)
    except Exception as exc:
        return QualityResult(
            current_score=None,
            new_score=None,
            passed=False,
            detail=f"quality comparison failed: {type(exc).__name__}: {exc}",
        )
    if result.stand_ins:
        detail += " (random-weight stand-ins: not a real quality signal)"
    run_logger().info("quality: %s; report %s", detail, result.report)
    return QualityResult(
        current_score=result.baseline_score, new_score=result.candidate_score, passed=passed, detail=detail
    )
