"""Paired comparison statistics: per-prompt differences, bootstrap 95% CI of the mean, win rate, verdict.

The unit is the prompt: a prompt's score is the mean over its seeds, and the difference is candidate minus
baseline on the same prompt and seeds. The verdict reads the CI against the margin, with three outcomes
(as Argo Rollouts' analysis has: successful, failed, inconclusive):

- "better" (pass): the whole CI is above 0;
- "not worse within margin" (pass): the CI's lower end is above `-margin`;
- "worse" (fail): the evidence says worse: the candidate is significantly worse (the whole CI below 0) AND
  its estimated drop (the CI's centre, which the percentile bootstrap puts at about the mean difference)
  is larger than the margin. This includes the textbook
  non-inferiority failure (the whole CI below `-margin`), and also catches drops near or past the margin
  that the textbook rule would leave inconclusive at a dozen prompts (tests/evaluation/test_verdict.py measures both);
  an equal candidate is called worse in under 2.5% of comparisons (the CI's upper end falls below 0 that
  rarely);
- "inconclusive": anything else: the comparison is too small to tell (the CI straddles `-margin` and the
  evidence does not say worse). It is not a failure; a person decides.

`comparison_size` gives the number of prompts that makes two equal services pass with a given probability.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    import pandas as pd

Verdict = Literal["better", "not worse within margin", "inconclusive", "worse"]
VERDICTS: tuple[Verdict, ...] = ("better", "not worse within margin", "inconclusive", "worse")
# What a gate does with a verdict.
Outcome = Literal["pass", "fail", "inconclusive"]
OUTCOMES: dict[Verdict, Outcome] = {
    "better": "pass",
    "not worse within margin": "pass",
    "inconclusive": "inconclusive",
    "worse": "fail",
}
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
    """The call on the CI of candidate minus baseline (see the module docstring)."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if ci_low > ci_high:
        raise ValueError(f"ci_low must not be above ci_high, got [{ci_low}, {ci_high}]")
    if ci_low > 0:
        return "better"
    if ci_low > -margin:
        return "not worse within margin"
    if ci_high < 0 and (ci_low + ci_high) / 2 < -margin:
        return "worse"
    return "inconclusive"


def outcome(call: Verdict) -> Outcome:
    """pass, fail or inconclusive: what a gate does with the verdict."""
    return OUTCOMES[call]


def comparison_size(
    score_sd: float,
    margin: float,
    probability: float = 0.95,
    *,
    correlation: float = 0.0,
    confidence: float = 0.95,
) -> int:
    """Prompts to compare so that two services of equal quality pass (the CI's lower end above `-margin`)
    with `probability`.

    `score_sd`: the SD of one service's per-prompt scores, as the baseline shows it. `correlation`: between
    the two services' scores on the same prompt (0, the default, assumes none: the safe side when only the
    baseline is known; the same model twice is close to 1). A per-prompt difference then has SD
    `d = score_sd * sqrt(2 * (1 - correlation))`; over n prompts its mean is about N(0, d^2/n) and the CI's
    lower end about mean - z_ci * d / sqrt(n), so P(pass) = Phi(margin * sqrt(n) / d - z_ci), which reaches
    `probability` at n = ((z_ci + z_p) * d / margin)^2.
    """
    if score_sd < 0 or not math.isfinite(score_sd):
        raise ValueError(f"score_sd must be a finite number >= 0, got {score_sd}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0 to size a comparison, got {margin}")
    if not 0.5 <= probability < 1:
        raise ValueError(f"probability must be in [0.5, 1), got {probability}")
    if not -1 <= correlation <= 1:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    normal = NormalDist()
    z_ci, z_p = normal.inv_cdf(1 - (1 - confidence) / 2), normal.inv_cdf(probability)
    diff_sd = score_sd * math.sqrt(2 * (1 - correlation))
    return max(2, math.ceil(((z_ci + z_p) * diff_sd / margin) ** 2))


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
