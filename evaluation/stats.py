"""Paired comparison statistics: per-prompt differences, bootstrap 95% CI of the mean, win rate, verdict.

The unit is the prompt: a prompt's score is the mean over its seeds, and the difference is candidate minus
baseline on the same prompt and seeds. The verdict is a non-inferiority call on the CI's lower bound:

- "better": the whole CI is above 0;
- "not worse within margin": the CI's lower bound is above `-margin`;
- "worse": a drop larger than the margin cannot be ruled out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd

Verdict = Literal["better", "not worse within margin", "worse"]
VERDICTS: tuple[Verdict, ...] = ("better", "not worse within margin", "worse")
BOOTSTRAP_SEED = 20240601


class PairedStats(BaseModel):
    """Candidate minus baseline over `n` paired prompts."""

    n: int
    baseline_mean: float
    candidate_mean: float
    mean_diff: float
    ci_low: float
    ci_high: float
    win_rate: float
    verdict: Verdict


def bootstrap_ci(
    values: np.ndarray | list[float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (fixed-seed generator: the same data gives the same interval)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_rate(diffs: np.ndarray | list[float]) -> float:
    """Share of prompts where the candidate scored higher; ties count half."""
    data = np.asarray(diffs, dtype=float)
    if data.size == 0:
        raise ValueError("win_rate needs at least one difference")
    return float(((data > 0).sum() + 0.5 * (data == 0).sum()) / data.size)


def verdict(ci_low: float, ci_high: float, margin: float) -> Verdict:
    """Non-inferiority call on the CI of candidate minus baseline (see the module docstring)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if ci_low > 0:
        return "better"
    if ci_low > -margin:
        return "not worse within margin"
    return "worse"


def paired_stats(
    baseline: np.ndarray | list[float], candidate: np.ndarray | list[float], margin: float
) -> PairedStats:
    """Mean difference, bootstrap CI, win rate and verdict of two aligned arrays of per-prompt scores."""
    base, cand = np.asarray(baseline, dtype=float), np.asarray(candidate, dtype=float)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError(
            f"baseline and candidate must be aligned 1-d arrays, got {base.shape} and {cand.shape}"
        )
    diffs = cand - base
    low, high = bootstrap_ci(diffs)
    return PairedStats(
        n=int(diffs.size),
        baseline_mean=float(base.mean()),
        candidate_mean=float(cand.mean()),
        mean_diff=float(diffs.mean()),
        ci_low=low,
        ci_high=high,
        win_rate=win_rate(diffs),
        verdict=verdict(low, high, margin),
    )


def per_prompt(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt that both models answered: category, prompt, baseline, candidate, diff.

    `scores` has columns prompt_id, prompt, category, role ("baseline"/"candidate"), seed, score; a prompt
    counts only with the seeds both models answered.
    """
    ok = scores.dropna(subset=["score"])
    wide = ok.pivot_table(index=["prompt_id", "seed"], columns="role", values="score", aggfunc="mean")
    wide = wide.reindex(columns=["baseline", "candidate"]).dropna()
    means = wide.groupby(level="prompt_id").mean()
    means["seeds"] = wide.groupby(level="prompt_id").size()
    labels = scores.drop_duplicates("prompt_id").set_index("prompt_id")[["category", "prompt"]]
    table = labels.join(means, how="inner")
    table["diff"] = table["candidate"] - table["baseline"]
    return table.reset_index()


def compare_scores(table: pd.DataFrame, margin: float) -> tuple[PairedStats, pd.DataFrame]:
    """Overall stats and one row per category (category, n, means, diff, CI, win rate, verdict)."""
    import pandas as pd

    if table.empty:
        raise ValueError("no prompt was answered by both models: nothing to compare")
    overall = paired_stats(table["baseline"], table["candidate"], margin)
    rows = [
        {"category": category, **paired_stats(group["baseline"], group["candidate"], margin).model_dump()}
        for category, group in table.groupby("category", sort=False)
    ]
    return overall, pd.DataFrame(rows)
