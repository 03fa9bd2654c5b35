"""The whole comparison of two services: the same prompts and seeds sent to both over HTTP, every image
CLIP-scored, the statistics, and the run directory with its tables, `evaluation.json` and `report.html`.

`evaluate_services(...)` does it all. Its parts also work alone, for callers that cannot have both
services up at once (the deploy stops the old one before starting the new one): `collect.collect(url,
role, ...)` for each service while it runs, then `clip_score.score_generations(...)` and
`write_evaluation(...)`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evaluation.clip_score import ClipScorer, load_scorer, score_generations
from evaluation.collect import collect, seed_list
from evaluation.compare import DEFAULT_MARGIN, summarize
from evaluation.metrics import DEFAULT_PRICE_PER_HOUR
from evaluation.prompts import Prompt, builtin_prompts
from evaluation.report import render_report
from evaluation.results import (
    ROLES,
    EvaluationResult,
    GenerationSettings,
    ServiceInfo,
    save_result,
    save_tables,
)

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_SEEDS = 2


def write_evaluation(
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
) -> EvaluationResult:
    """Compare scored generations; write the tables, `evaluation.json` and `report.html` to `run_dir`."""
    result, tables = summarize(
        generations,
        services,
        run_dir,
        scorer=scorer,
        random_weights=random_weights,
        seeds=seeds,
        settings=settings,
        margin=margin,
        price_per_hour=price_per_hour,
        history_file=history_file,
    )
    save_tables(run_dir, tables)
    save_result(result)
    render_report(run_dir)
    return result


def evaluate_services(
    baseline_url: str,
    candidate_url: str,
    prompts: Sequence[Prompt] | None = None,
    seeds: int | Sequence[int] = DEFAULT_SEEDS,
    run_dir: str | Path = "runs/evaluation",
    *,
    settings: GenerationSettings | None = None,
    scorer: ClipScorer | None = None,
    margin: float = DEFAULT_MARGIN,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    api_key: str | None = None,
    baseline_api_key: str | None = None,
    history_file: str | Path | None = None,
    progress: bool = False,
) -> EvaluationResult:
    """Send the same prompts x seeds to both services, CLIP-score every image, compare, write the report.

    `prompts` defaults to the built-in set; `scorer` to ViT-L-14 (OpenAI weights); `api_key` is sent to the
    candidate (and to the baseline unless `baseline_api_key` is given).
    """
    import pandas as pd

    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    prompts = list(prompts) if prompts is not None else builtin_prompts()
    if not prompts:
        raise ValueError("prompts must not be empty")
    chosen_seeds = seed_list(seeds)
    settings = settings or GenerationSettings()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    urls = {"baseline": baseline_url, "candidate": candidate_url}
    keys = {"baseline": baseline_api_key or api_key, "candidate": api_key}
    total = len(prompts) * len(chosen_seeds)

    services: dict[str, ServiceInfo] = {}
    frames = []
    bar = _progress_bar() if progress else None
    with bar or contextlib.nullcontext():
        for role in ROLES:
            advance = functools.partial(bar.advance, bar.add_task(role, total=total)) if bar else None
            info, frame = collect(
                urls[role], role, prompts, chosen_seeds, run_dir, settings, keys[role], on_image=advance
            )
            services[role] = info
            frames.append(frame)
    scorer = scorer or load_scorer()
    generations = score_generations(pd.concat(frames, ignore_index=True), run_dir, scorer)
    result = write_evaluation(
        generations,
        services,
        run_dir,
        scorer=scorer.describe(),
        random_weights=scorer.random_weights,
        seeds=chosen_seeds,
        settings=settings,
        margin=margin,
        price_per_hour=price_per_hour,
        history_file=history_file,
    )
    log.info("evaluation %s; report %s", result.headline(), result.report)
    return result


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
