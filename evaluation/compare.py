"""The comparison's statistics: scored generations of a baseline and a candidate in, the
`EvaluationResult` and its tables out, and the quality gate on that result. No I/O here.

The whole comparison (collect, score, compare, write the run directory and its report) is
`evaluation.evaluate.evaluate_services`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.metrics import DEFAULT_PRICE_PER_HOUR, TimingSummary, summarize_timing
from evaluation.results import (
    REPORT_FILE,
    CategoryStats,
    EvaluationResult,
    GenerationSettings,
    ServiceInfo,
)
from evaluation.stats import compare_scores, per_prompt, verdict

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_MARGIN = 1.0


def timing_table(
    generations: pd.DataFrame, price_per_hour: float = DEFAULT_PRICE_PER_HOUR
) -> dict[str, TimingSummary]:
    """Role -> latency percentiles, steps/s, images/h, peak VRAM and cost per image."""
    summaries = {}
    for role, group in generations.groupby("role", sort=False):
        ok = group[group["error"].isna()]
        summaries[str(role)] = summarize_timing(
            latency_s=ok["latency_s"].astype(float).tolist(),
            generation_s=ok["generation_s"].astype(float).tolist(),
            steps=ok["steps"].astype(int).tolist(),
            peak_vram_gb=[None if v is None or v != v else float(v) for v in ok["peak_vram_gb"]],
            errors=int(group["error"].notna().sum()),
            price_per_hour=price_per_hour,
        )
    return summaries


def summarize(
    generations: pd.DataFrame,
    services: Mapping[str, ServiceInfo],
    run_dir: str | Path,
    *,
    scorer: str,
    random_weights: bool,
    seeds: Sequence[int],
    settings: GenerationSettings,
    margin: float = DEFAULT_MARGIN,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    history_file: str | Path | None = None,
) -> tuple[EvaluationResult, dict[str, pd.DataFrame]]:
    """Statistics of scored generations: the result (its report path inside `run_dir`) and the tables
    the run directory keeps (`generations`, `prompts`, `categories`, `timing`)."""
    import pandas as pd

    prompts_table = per_prompt(generations)
    overall, categories = compare_scores(prompts_table, margin)
    timing = timing_table(generations, price_per_hour)
    result = EvaluationResult(
        verdict=overall.verdict,
        margin=margin,
        overall=overall,
        categories=[CategoryStats(**row) for row in categories.to_dict("records")],
        timing=timing,
        services=dict(services),
        scorer=scorer,
        random_weights=random_weights,
        prompts=int(generations["prompt_id"].nunique()),
        seeds=list(seeds),
        settings=settings,
        price_per_hour=price_per_hour,
        run_dir=str(run_dir),
        report=str(Path(run_dir) / REPORT_FILE),
        history_file=str(history_file) if history_file else None,
    )
    timing_frame = pd.DataFrame([{"role": role, **t.model_dump()} for role, t in timing.items()])
    tables = {
        "generations": generations,
        "prompts": prompts_table,
        "categories": categories,
        "timing": timing_frame,
    }
    return result, tables


def quality_gate(result: EvaluationResult, margin: float | None = None) -> tuple[bool, str]:
    """Passed when the candidate is "better" or "not worse within margin" and none of its requests failed."""
    margin = result.margin if margin is None else margin
    o = result.overall
    call = verdict(o.ci_low, o.ci_high, margin)
    errors = result.timing["candidate"].errors if "candidate" in result.timing else 0
    detail = (
        f"{call}: CLIP {o.candidate_mean:.2f} vs {o.baseline_mean:.2f} (diff {o.mean_diff:+.2f}, "
        f"95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}], margin {margin:g}, win rate {o.win_rate:.0%}, "
        f"{o.n} prompts x {len(result.seeds)} seeds)"
    )
    if errors:
        detail += f"; {errors} candidate request(s) failed"
    return call != "worse" and not errors, detail
