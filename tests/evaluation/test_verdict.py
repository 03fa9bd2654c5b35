"""The quality verdict with three outcomes (pass, fail, inconclusive), the comparison's sizing, the rates of
the rule on simulated equal and worse pairs (fixed seeds), and how the gate shows an inconclusive call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from evaluation.compare import EvaluationResult, GenerationSettings, ServiceInfo
from evaluation.evaluate import write_evaluation
from evaluation.metrics import TimingSummary
from evaluation.report.charts import svg_uri, verdict_zones
from evaluation.report.comparison import VERDICT_CHART
from evaluation.stats import comparison_size, outcome, paired_stats, verdict
from flows.config.target import Criterion
from flows.evidence.gates import Evidence, gates_markdown, judge, require_passed
from flows.record.rundir import RunSummary, report_markdown
from flows.stages.quality import judge_comparison, sizing_hint

MARGIN = 1.0
RUNS = 1000


# ---------------------------------------------------------------- the three outcomes


@pytest.mark.parametrize(
    ("ci", "expected"),
    [
        ((0.2, 1.5), "better"),
        ((-0.9, 0.8), "not worse within margin"),
        ((-3.0, -1.5), "worse"),  # the whole CI below -margin: the textbook failure
        ((-2.5, -0.3), "worse"),  # significantly worse, estimated drop 1.4 > margin
        (
            (-1.6, -0.2),
            "inconclusive",
        ),  # significantly worse, but the estimated drop 0.9 is within the margin
        ((-2.5, 0.3), "inconclusive"),  # too wide to tell
        ((-1.0, 0.0), "inconclusive"),  # lower end exactly at -margin: not shown to be within it
    ],
)
def test_verdict_on_constructed_intervals(ci: tuple[float, float], expected: str) -> None:
    assert verdict(*ci, MARGIN) == expected


def test_three_outcomes_on_constructed_samples() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(30, 2, 40)
    equal = paired_stats(base, base + rng.normal(0, 0.3, 40), MARGIN)
    worse = paired_stats(base, base - 3 + rng.normal(0, 0.3, 40), MARGIN)
    few = paired_stats([30.0, 28.0, 31.0, 27.0], [32.0, 25.0, 32.0, 24.5], MARGIN)  # +2, -3, +1, -2.5
    assert outcome(equal.verdict) == "pass" and equal.ci_low > -MARGIN
    assert worse.verdict == "worse" and outcome(worse.verdict) == "fail" and worse.ci_high < -MARGIN
    assert few.verdict == "inconclusive" and outcome(few.verdict) == "inconclusive"
    assert few.ci_low < -MARGIN < few.ci_high


# ---------------------------------------------------------------- sizing


def test_comparison_size_known_values_and_bad_input() -> None:
    # ((1.96 + 1.645) * sqrt(2) * 1.0 / 1.0) ** 2 = 25.99...
    assert comparison_size(1.0, 1.0, 0.95) == 26
    assert comparison_size(2.0, 1.0, 0.95) == 104  # four times the prompts for twice the spread
    assert comparison_size(1.0, 2.0, 0.95) == 7
    assert comparison_size(1.0, 1.0, 0.95, correlation=1.0) == 2  # the same model twice: no spread left
    assert comparison_size(1.0, 1.0, 0.80) < comparison_size(1.0, 1.0, 0.99)
    with pytest.raises(ValueError, match="margin must be > 0"):
        comparison_size(1.0, 0.0)
    with pytest.raises(ValueError, match="score_sd must be .* got -1"):
        comparison_size(-1.0, 1.0)
    with pytest.raises(ValueError, match="probability must be .* got 1.5"):
        comparison_size(1.0, 1.0, 1.5)


# ---------------------------------------------------------------- simulation (fixed seeds)


def simulate(n: int, score_sd: float, true_diff: float, seed: int) -> dict[str, float]:
    """Share of RUNS comparisons of n prompts called pass / fail / inconclusive, with the old rule's fail
    rate (CI lower end at or below -margin) and the textbook's (whole CI below -margin) beside them."""
    rng = np.random.default_rng(seed)
    counts = {"pass": 0, "fail": 0, "inconclusive": 0, "old_fail": 0, "textbook_fail": 0}
    for _ in range(RUNS):
        base = rng.normal(30.0, score_sd, n)
        cand = rng.normal(30.0 + true_diff, score_sd, n)  # no prompt-level correlation: the sizing's case
        stats = paired_stats(base, cand, MARGIN)
        counts[outcome(stats.verdict)] += 1
        counts["old_fail"] += stats.ci_low <= -MARGIN
        counts["textbook_fail"] += stats.ci_high < -MARGIN
    return {key: value / RUNS for key, value in counts.items()}


def test_equal_services_at_the_default_twelve_prompts_are_rarely_failed() -> None:
    rates = simulate(12, score_sd=1.0, true_diff=0.0, seed=1)
    msg = f"equal pairs, 12 prompts, SD 1: {rates}"
    assert rates["fail"] < 0.05, msg  # measured 0.004 (the old rule: 0.254)
    assert rates["old_fail"] > 0.2, msg  # the old rule failed about a quarter of equal candidates
    assert rates["inconclusive"] == pytest.approx(rates["old_fail"], abs=0.02), msg  # now inconclusive


def test_at_the_sized_number_of_prompts_equal_services_pass() -> None:
    n = comparison_size(1.0, MARGIN, 0.95)
    rates = simulate(n, score_sd=1.0, true_diff=0.0, seed=2)
    msg = f"equal pairs, {n} prompts, SD 1: {rates}"
    assert rates["pass"] >= 0.93 and rates["fail"] < 0.05, msg  # measured 0.943 and 0.0


def test_worse_services_are_detected() -> None:
    n = comparison_size(1.0, MARGIN, 0.95)
    twice = simulate(12, score_sd=1.0, true_diff=-2 * MARGIN, seed=3)
    near = simulate(n, score_sd=1.0, true_diff=-1.5 * MARGIN, seed=4)
    msg = f"worse by 2x margin, 12 prompts: {twice}; worse by 1.5x margin, {n} prompts: {near}"
    assert twice["fail"] >= 0.9 and twice["pass"] == 0, msg
    assert near["fail"] >= 0.85 and near["pass"] == 0, msg
    assert near["textbook_fail"] < 0.6 < near["fail"], msg  # why the rule also fails a significant big drop


# ---------------------------------------------------------------- the gate


def _result(base: list[float], cand: list[float], errors: int = 0) -> EvaluationResult:
    stats = paired_stats(base, cand, MARGIN)
    timing = TimingSummary(
        images=len(cand), errors=errors, latency_p50_s=None, latency_p95_s=None, steps_per_s=None,
        images_per_hour=None, peak_vram_gb=None, cost_per_image=None,
    )  # fmt: skip
    return EvaluationResult(
        verdict=stats.verdict,
        margin=MARGIN,
        overall=stats,
        categories=[],
        timing={"candidate": timing},
        services={
            "baseline": ServiceInfo(role="baseline", url="http://a", model="sd15"),
            "candidate": ServiceInfo(role="candidate", url="http://b", model="sdxl"),
        },
        scorer="ViT-L-14/openai",
        random_weights=False,
        prompts=len(base),
        seeds=[0],
        settings=GenerationSettings(),
        price_per_hour=1.0,
        run_dir="/tmp/x",
    )


def test_an_inconclusive_comparison_is_shown_but_does_not_fail_the_deploy() -> None:
    base, cand = [30.0, 28.0, 31.0, 27.0], [32.0, 25.0, 32.0, 24.5]
    quality = judge_comparison(_result(base, cand), base, MARGIN)
    assert quality.passed and quality.inconclusive
    assert (
        quality.detail.startswith("inconclusive:")
        and "two equal services pass 95% of the time at" in quality.detail
    )

    report = judge([Criterion(name="quality", threshold=MARGIN)], Evidence(quality=quality))
    assert [r.verdict for r in report.rows] == ["inconclusive"] and report.passed
    require_passed(report)  # enforced, and still not a failure (for now)
    assert "**INCONCLUSIVE**" in gates_markdown(report)
    summary = RunSummary(
        flow="deploy-sdxl", run_dir="/tmp/x", target="local", current_service="sd15", new_model="sdxl",
        started_at="now", gates=report.rows,
    )  # fmt: skip
    assert "- quality: **INCONCLUSIVE**, a person should look" in report_markdown(summary)


def test_a_worse_comparison_or_a_failed_request_fails_and_a_good_one_passes() -> None:
    base = [30.0 + i % 5 for i in range(20)]
    worse = judge_comparison(
        _result(base, [b - 3.0 + (i % 3) * 0.1 for i, b in enumerate(base)]), base, MARGIN
    )
    errors = judge_comparison(_result(base, [b + 0.1 for b in base], errors=1), base, MARGIN)
    good = judge_comparison(
        _result(base, [b + (0.1 if i % 2 else -0.1) for i, b in enumerate(base)]), base, MARGIN
    )
    assert (worse.passed, worse.inconclusive) == (False, False) and worse.detail.startswith("worse:")
    assert (errors.passed, errors.inconclusive) == (
        False,
        False,
    ) and "1 candidate request(s) failed" in errors.detail
    assert (good.passed, good.inconclusive) == (True, False)
    verdicts = [
        judge([Criterion(name="quality", threshold=MARGIN)], Evidence(quality=q)).rows[0].verdict
        for q in (worse, errors, good)
    ]
    assert verdicts == ["fail", "fail", "pass"]


def test_the_sizing_hint_reads_the_baselines_spread() -> None:
    scores = np.random.default_rng(5).normal(30, 1.0, 12)
    sd = float(np.std(scores, ddof=1))
    assert f"{comparison_size(sd, MARGIN)} prompts x 2 seed(s)" in sizing_hint(scores, MARGIN, seeds=2)
    assert "too few prompts" in sizing_hint([30.0], MARGIN, seeds=1)


# ---------------------------------------------------------------- the picture: the CI against the margin


def test_the_pictures_zones_agree_with_the_rule() -> None:
    """For any CI, moving the mean with the CI's offsets kept: the zone the chart shades is the verdict."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        mean, below, above, margin = (
            rng.normal(0, 2),
            rng.uniform(0, 2),
            rng.uniform(0, 2),
            rng.uniform(0.1, 2),
        )
        zones = verdict_zones(mean, mean - below, mean + above, margin)
        assert zones.fail_below <= zones.pass_above
        assert zones.zone_of(mean) == zones.outcome == outcome(verdict(mean - below, mean + above, margin))
        for moved in np.linspace(zones.fail_below - 3, zones.pass_above + 3, 41):
            if min(abs(moved - zones.fail_below), abs(moved - zones.pass_above)) < 1e-9:
                continue
            expected = outcome(verdict(moved - below, moved + above, margin))
            assert zones.zone_of(moved) == expected, (mean, below, above, margin, moved)


def test_the_report_embeds_the_verdict_picture_and_writes_it_next_to_it(tmp_path: Path) -> None:
    base, cand = [30.0, 28.0, 31.0, 27.0], [32.0, 25.0, 32.0, 24.5]  # +2, -3, +1, -2.5: inconclusive
    (tmp_path / "images").mkdir()
    rows = []
    for role, scores in (("baseline", base), ("candidate", cand)):
        for prompt_id, score in enumerate(scores):
            image = f"images/{role}-{prompt_id}.png"
            Image.new("RGB", (8, 8), (prompt_id * 40, 90, 120)).save(tmp_path / image)
            rows.append({
                "role": role, "model": "sd15" if role == "baseline" else "sdxl", "prompt_id": prompt_id,
                "prompt": f"prompt {prompt_id}", "category": "objects", "seed": 0, "steps": 2,
                "image": image, "resolution": "8x8", "latency_s": 1.0, "generation_s": 1.0,
                "peak_vram_gb": None, "error": None, "score": score,
            })  # fmt: skip
    services = {
        "baseline": ServiceInfo(role="baseline", url="http://a", model="sd15"),
        "candidate": ServiceInfo(role="candidate", url="http://b", model="sdxl"),
    }
    result = write_evaluation(
        pd.DataFrame(rows), services, tmp_path, scorer="test", random_weights=False, seeds=[0],
        settings=GenerationSettings(), margin=MARGIN,
    )  # fmt: skip

    o = result.overall
    zones = verdict_zones(o.mean_diff, o.ci_low, o.ci_high, MARGIN)
    assert result.verdict == "inconclusive" and zones.outcome == zones.zone_of(o.mean_diff) == "inconclusive"
    assert zones.fail_below < o.mean_diff < zones.pass_above
    svg = (tmp_path / VERDICT_CHART).read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    html = Path(result.report).read_text()
    assert html.index('id="gate"') < html.index('id="verdict-chart"') < html.index('id="timing"')
    assert svg_uri(svg) in html and f'href="{VERDICT_CHART}"' in html
    assert f"95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}]" in html and f"-margin ({-MARGIN:g})" in html
    assert f"below {zones.fail_below:+.2f}" in html and f"above {zones.pass_above:+.2f}" in html
