"""Quality: is the new model's CLIP score not worse than the current one's? (the evaluation package).

The deploy cannot run both services at once (one port, one GPU), so the comparison is split around the
switch: `collect_baseline` sends the prompts to the current service before it is stopped, and
`assess_quality` sends the same prompts and seeds to the new one after warm-up, scores both sets here
with CLIP, writes the comparison's run directory and report, publishes its Prefect artifacts
(`flows.artifacts`) and judges the difference with the `quality` criterion's threshold as the margin.
Three outcomes (`evaluation.stats.verdict`): pass, fail (the evidence says worse, or a candidate request
failed) and inconclusive (too few prompts to tell: the row says INCONCLUSIVE and, for now, does not fail
the deploy; it names how many prompts the baseline's spread calls for). A comparison that cannot run
becomes a failed quality row, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.common import run_logger, service_url
from flows.hosts import Host
from flows.secrets import api_key
from flows.target import Target
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
    host: Host,
    target: Target,
    baseline: Baseline | None,
    run_dir: Path,
    margin: float,
    port: int | None = None,
) -> QualityResult | None:
    """Generate the same prompts on the new service (on `port`, default its own), CLIP-score both sets and
    judge the difference."""
    if baseline is None:
        return None
    if baseline.error:
        return QualityResult(current_score=None, new_score=None, passed=False, detail=baseline.error)
    import pandas as pd

    from evaluation.clip_score import load_scorer, score_generations
    from evaluation.collect import collect
    from evaluation.evaluate import write_evaluation
    from evaluation.stats import per_prompt
    from flows.artifacts import publish_evaluation

    check = target.quality
    try:
        prompts, seeds, settings = comparison_plan(target)
        with service_url(host, port or target.new.port) as url:
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
        judged = judge_comparison(result, per_prompt(scored)["baseline"], margin)
    except Exception as exc:
        return QualityResult(
            current_score=None,
            new_score=None,
            passed=False,
            detail=f"quality comparison failed: {type(exc).__name__}: {exc}",
        )
    run_logger().info("quality: %s; report %s", judged.detail, result.report)
    return judged


def judge_comparison(result: Any, baseline_scores: Any, margin: float) -> QualityResult:
    """Pass, fail (worse, or a candidate request failed) or inconclusive, from a finished comparison
    (`evaluation.compare.EvaluationResult`); `baseline_scores`: the baseline's per-prompt scores."""
    from evaluation.compare import quality_gate
    from evaluation.stats import outcome, verdict

    passed, detail = quality_gate(result, margin)
    o = result.overall
    inconclusive = passed and outcome(verdict(o.ci_low, o.ci_high, margin)) == "inconclusive"
    if inconclusive:
        detail += "; " + sizing_hint(baseline_scores, margin, len(result.seeds))
    if result.stand_ins:
        detail += " (random-weight stand-ins: not a real quality signal)"
    return QualityResult(
        current_score=result.baseline_score,
        new_score=result.candidate_score,
        passed=passed,
        inconclusive=inconclusive,
        detail=detail,
    )


def sizing_hint(baseline_scores: Any, margin: float, seeds: int, probability: float = 0.95) -> str:
    """How many prompts the baseline's per-prompt spread calls for (`evaluation.stats.comparison_size`)."""
    import numpy as np

    from evaluation.stats import comparison_size

    if len(baseline_scores) < 2 or margin <= 0:
        return "too few prompts to estimate their spread: raise quality.prompt_limit"
    spread = float(np.std(np.asarray(baseline_scores, dtype=float), ddof=1))
    needed = comparison_size(spread, margin, probability)
    return (
        f"with the baseline's per-prompt SD of {spread:.2f} CLIP points, two equal services pass "
        f"{probability:.0%} of the time at {needed} prompts x {seeds} seed(s) (quality.prompt_limit)"
    )
