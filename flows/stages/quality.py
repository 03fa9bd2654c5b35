"""Quality: is the new model's CLIP score not worse than the current one's? (the evaluation package).

The comparison is split around the switch: `collect_baseline` sends the prompts to the current service
before the new release is shipped (stage `baseline`, in either start mode), and
`assess_quality` sends the same prompts and seeds to the new one after warm-up, scores both sets here
with CLIP, writes the comparison's run directory and report, publishes its Prefect artifacts
(`flows.record.artifacts`) and judges the difference with the `quality` criterion's threshold as the margin.
Three outcomes (`evaluation.stats.verdict`): pass, fail (the evidence says worse, or a candidate request
failed) and inconclusive (too few prompts to tell: the row says INCONCLUSIVE and names how many prompts
the baseline's spread calls for; stage `approval` asks a person, `flows.record.approval`). A comparison that
cannot run becomes a failed quality row, never a crash. By default the number of prompts is sized from the
spread of the baseline's first batch (`size_comparison`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import run_logger, service_url
from flows.box.hosts import Host
from flows.config.secrets import api_key
from flows.config.target import Target
from flows.evidence.results import QualityResult, QualitySizing

PASS_PROBABILITY = 0.95  # a sized comparison: how often two equal services pass


@dataclass
class Baseline:
    """The current service's generations (or why there are none), and how the comparison was sized."""

    info: Any = None  # evaluation.results.ServiceInfo
    generations: Any = None  # pandas.DataFrame, one row per prompt x seed
    error: str | None = None
    prompts: list[Any] = field(default_factory=list)  # evaluation.prompts.Prompt, in prompt_id order
    sizing: QualitySizing | None = None  # how many prompts, and why (summary.json facts.quality_sizing)


def comparison_margin(target: Target) -> float:
    """The `quality` criterion's threshold: how many CLIP points worse still counts as not worse."""
    threshold = next((c.threshold for c in target.criteria if c.name == "quality"), None)
    return 1.0 if threshold is None else threshold


def comparison_plan(target: Target) -> tuple[list[Any], int, Any]:
    """Prompts (in turn from each category; a sized comparison gets up to `max_prompts`, of which it uses
    a prefix), seeds and generation settings (the app's request) of the comparison."""
    from evaluation.prompts import builtin_prompts, in_turn, load_prompts
    from evaluation.results import GenerationSettings

    check = target.quality
    prompts = in_turn(load_prompts(check.prompts_file) if check.prompts_file else builtin_prompts())
    settings = GenerationSettings.model_validate(target.workload.app_request)
    return prompts[: check.prompt_limit or check.max_prompts], check.seeds, settings


def size_comparison(
    first: Any, run_dir: Path, target: Target, available: int, probability: float = PASS_PROBABILITY
) -> QualitySizing:
    """How many prompts to compare, from the CLIP spread of the baseline's first batch (`first`, its
    generations): `evaluation.stats.comparison_size` at the margin, so that two equal services pass with
    `probability`; at least the batch, at most `max_prompts` (time) and the prompts there are."""
    import numpy as np

    from evaluation.clip_score import load_scorer, score_generations
    from evaluation.stats import comparison_size

    check, margin = target.quality, comparison_margin(target)
    batch = int(first["prompt_id"].nunique())
    scored = score_generations(first, run_dir, load_scorer(check.scorer, check.scorer_weights))
    means = scored.dropna(subset=["score"]).groupby("prompt_id")["score"].mean().to_numpy()
    sd = float(np.std(means, ddof=1)) if means.size >= 2 else float("nan")
    cap = min(check.max_prompts, available)
    if not np.isfinite(sd) or margin <= 0:
        needed, why = cap, "no spread to size from (fewer than 2 scored prompts, or margin 0)"
    else:
        needed = comparison_size(sd, margin, probability)
        why = (
            f"the baseline's per-prompt CLIP SD of {sd:.2f} over {means.size} prompts calls for {needed} "
            f"prompts for two equal services to pass {probability:.0%} of the time at margin {margin:g}"
        )
    prompts = max(batch, min(needed, cap))
    if needed > cap:
        why += f"; capped at {cap} (quality.max_prompts, prompts available): an equal candidate may be inconclusive"
    return QualitySizing(
        mode="sized",
        prompts=prompts,
        seeds=check.seeds,
        needed=needed,
        baseline_sd=None if not np.isfinite(sd) else round(sd, 4),
        first_batch=batch,
        max_prompts=check.max_prompts,
        margin=margin,
        probability=probability,
        capped=bool(needed > cap),
        why=why,
    )


@task(cache_policy=NO_CACHE)
def collect_baseline(host: Host, target: Target, run_dir: Path) -> Baseline | None:
    """Generate the comparison prompts on the current service, before it is stopped.

    Sized (`quality.prompt_limit` None): the first `sizing_batch` prompts are generated and CLIP-scored
    here, their spread sizes the comparison (`size_comparison`), and the rest are generated in the same
    stage, so the new service later gets exactly the prompts the baseline answered.
    """
    if not target.quality.enabled:
        return None
    import pandas as pd

    from evaluation.collect import collect

    check = target.quality
    try:
        prompts, seeds, settings = comparison_plan(target)
        with service_url(host, target.current.port) as url:
            if check.prompt_limit is not None:
                info, generations = collect(url, "baseline", prompts, seeds, run_dir, settings)
                sizing = QualitySizing(mode="fixed", prompts=len(prompts), seeds=seeds)
            else:
                first = prompts[: check.sizing_batch]
                info, generations = collect(url, "baseline", first, seeds, run_dir, settings)
                sizing = size_comparison(generations, run_dir, target, len(prompts))
                rest = prompts[len(first) : sizing.prompts]
                if rest:
                    _, more = collect(url, "baseline", rest, seeds, run_dir, settings, first_id=len(first))
                    generations = pd.concat([generations, more], ignore_index=True)
                prompts = prompts[: sizing.prompts]
    except Exception as exc:  # the old script may not speak the full contract; the gate reports it
        run_logger().warning("quality baseline not collected: %s: %s", type(exc).__name__, exc)
        return Baseline(error=f"baseline from the current service failed: {type(exc).__name__}: {exc}")
    run_logger().info(
        "quality comparison: %d prompts x %d seed(s)%s",
        len(prompts),
        seeds,
        f" ({sizing.why})" if sizing.why is not None else " (quality.prompt_limit)",
    )
    return Baseline(info=info, generations=generations, prompts=prompts, sizing=sizing)


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
    from flows.record.artifacts import publish_evaluation

    check = target.quality
    try:
        _, seeds, settings = comparison_plan(target)
        with service_url(host, port or target.new.port) as url:
            info, generations = collect(
                url,
                "candidate",
                baseline.prompts,
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
    report = getattr(result, "report", None)
    return QualityResult(
        current_score=result.baseline_score,
        new_score=result.candidate_score,
        passed=passed,
        inconclusive=inconclusive,
        detail=detail,
        mean_diff=o.mean_diff,
        ci_low=o.ci_low,
        ci_high=o.ci_high,
        margin=margin,
        report=str(report) if report else None,
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
        f"{probability:.0%} of the time at {needed} prompts x {seeds} seed(s) (quality.prompt_limit; when "
        "sized, quality.max_prompts)"
    )
