"""The evaluation's pure parts: prompt files, statistics and timing on made-up data with known answers,
and regression detection (a planted slowdown is caught, noise is not)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from evaluation.history import DEFAULT_THRESHOLDS, HistoryStore, Threshold, detect_regressions
from evaluation.metrics import summarize_timing
from evaluation.prompts import PromptFileError, builtin_categories, builtin_prompts, load_prompts, spread
from evaluation.stats import bootstrap_ci, compare_scores, paired_stats, per_prompt, verdict, win_rate

# ---------------------------------------------------------------- prompts


def test_builtin_set_covers_the_categories_where_sdxl_should_differ() -> None:
    prompts = builtin_prompts()
    categories = {p.category for p in prompts}
    assert 45 <= len(prompts) <= 60
    assert {
        "people",
        "animals",
        "objects",
        "scenes",
        "text",
        "counting",
        "spatial",
        "faces",
        "hands",
    } <= categories
    assert set(builtin_categories()) == categories
    assert len({p.text for p in prompts}) == len(prompts), "duplicate prompts in the built-in set"


def test_txt_file_one_prompt_per_line(tmp_path: Path) -> None:
    file = tmp_path / "prompts.txt"
    file.write_text("# my prompts\na red cube\n\n  two dogs on a sofa  \n")
    assert [(p.text, p.category) for p in load_prompts(file)] == [
        ("a red cube", "general"),
        ("two dogs on a sofa", "general"),
    ]


def test_partiprompts_tsv_uses_prompt_and_category_columns(tmp_path: Path) -> None:
    file = tmp_path / "PartiPrompts.tsv"
    file.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "A photo of a cat, with a hat\tAnimals\tSimple Detail\t\n"
        'A sign that says "Deep Learning"\tArtifacts\tWriting & Symbols\tquote, comma\n'
    )
    assert [(p.text, p.category) for p in load_prompts(file)] == [
        ("A photo of a cat, with a hat", "Animals"),
        ('A sign that says "Deep Learning"', "Artifacts"),
    ]


def test_csv_with_quotes_and_without_category(tmp_path: Path) -> None:
    file = tmp_path / "prompts.csv"
    file.write_text('id,prompt\n1,"a cat, sitting"\n2,\n3,a dog\n')
    assert [(p.text, p.category) for p in load_prompts(file)] == [
        ("a cat, sitting", "general"),
        ("a dog", "general"),
    ]


def test_jsonl_with_optional_category(tmp_path: Path) -> None:
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "a red cube", "category": "spatial"}\n\n{"prompt": "a hand"}\n')
    assert [(p.text, p.category) for p in load_prompts(file)] == [
        ("a red cube", "spatial"),
        ("a hand", "general"),
    ]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.csv", "text,category\na cat,x\n", "no 'Prompt' column (columns: text, category)"),
        ("p.jsonl", '{"prompt": "ok"}\n{"text": "no prompt"}\n', "line 2: needs a non-empty string 'prompt'"),
        ("p.jsonl", "not json\n", "line 1: not JSON"),
        ("p.txt", "# only a comment\n", "holds no prompts"),
        ("p.yaml", "- a\n", "suffix '.yaml' is not one of"),
    ],
)
def test_bad_prompt_files_name_the_file_and_the_problem(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(PromptFileError) as info:
        load_prompts(file)
    assert expected in str(info.value) and str(file) in str(info.value)


def test_spread_takes_prompts_in_turn_from_each_category() -> None:
    chosen = spread(builtin_prompts(), 9)
    assert len({p.category for p in chosen}) == 9
    assert spread(builtin_prompts(), None) == builtin_prompts()


# ---------------------------------------------------------------- statistics


def test_bootstrap_ci_of_constant_differences_is_that_constant() -> None:
    assert bootstrap_ci([1.5] * 20) == (1.5, 1.5)


def test_bootstrap_ci_matches_the_normal_theory_interval_and_repeats() -> None:
    data = np.random.default_rng(7).normal(0.5, 1.0, 400)
    half_width = 1.96 * data.std(ddof=1) / np.sqrt(data.size)
    low, high = bootstrap_ci(data)
    assert low == pytest.approx(data.mean() - half_width, abs=0.01)
    assert high == pytest.approx(data.mean() + half_width, abs=0.01)
    assert bootstrap_ci(data) == (low, high), "a fixed-seed bootstrap gives the same interval every time"


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([1.0, -1.0, 0.0, 2.0]) == pytest.approx(0.625)


@pytest.mark.parametrize(
    ("ci", "margin", "expected"),
    [
        ((0.1, 2.0), 1.0, "better"),
        ((-0.5, 1.0), 1.0, "not worse within margin"),
        ((-1.0, 1.0), 1.0, "inconclusive"),  # the lower bound must be strictly above -margin to pass
        ((-3.0, -2.0), 1.0, "worse"),
        ((-0.1, 0.5), 0.0, "inconclusive"),  # not shown to be as good, nor shown to be worse
    ],
)
def test_verdict_is_a_non_inferiority_call_on_the_ci(
    ci: tuple[float, float], margin: float, expected: str
) -> None:
    assert verdict(*ci, margin) == expected


def test_paired_stats_on_known_data() -> None:
    stats = paired_stats([20.0, 22.0, 24.0, 26.0], [21.0, 23.0, 25.0, 27.0], margin=1.0)
    assert (stats.n, stats.baseline_mean, stats.candidate_mean, stats.mean_diff) == (4, 23.0, 24.0, 1.0)
    assert (stats.ci_low, stats.ci_high, stats.win_rate, stats.verdict) == (1.0, 1.0, 1.0, "better")


def _scores(rows: list[tuple[int, str, int, float, float]]) -> pd.DataFrame:
    """(prompt_id, category, seed, baseline score, candidate score) -> the long frame of a run."""
    long = [
        {
            "prompt_id": pid,
            "prompt": f"prompt {pid}",
            "category": cat,
            "seed": seed,
            "role": role,
            "score": score,
        }
        for pid, cat, seed, base, cand in rows
        for role, score in (("baseline", base), ("candidate", cand))
    ]
    return pd.DataFrame(long)


def test_per_prompt_means_over_seeds_and_category_breakdown() -> None:
    frame = _scores(
        [
            (0, "faces", 0, 20.0, 22.0),
            (0, "faces", 1, 22.0, 24.0),  # prompt 0: 21 -> 23, +2
            (1, "faces", 0, 30.0, 34.0),
            (1, "faces", 1, 30.0, 34.0),  # prompt 1: +4
            (2, "text", 0, 25.0, 24.0),
            (2, "text", 1, 25.0, 24.0),  # prompt 2: -1
        ]
    )
    frame.loc[(frame["prompt_id"] == 2) & (frame["seed"] == 1) & (frame["role"] == "candidate"), "score"] = (
        np.nan
    )
    table = per_prompt(frame)
    assert table["diff"].tolist() == [2.0, 4.0, -1.0]
    assert table["seeds"].tolist() == [2, 2, 1], "a seed one model failed on is left out of the pair"
    overall, categories = compare_scores(table, margin=1.0)
    assert overall.mean_diff == pytest.approx(5 / 3)
    assert overall.win_rate == pytest.approx(2 / 3)
    by = categories.set_index("category")
    assert by.loc["faces", "mean_diff"] == 3.0 and by.loc["faces", "n"] == 2
    # one prompt, a drop of exactly the margin: not shown to be worse by MORE than the margin
    assert by.loc["text", "mean_diff"] == -1.0 and by.loc["text", "verdict"] == "inconclusive"


def test_timing_summary_known_answers() -> None:
    timing = summarize_timing(
        latency_s=[1.0, 2.0, 3.0, 4.0],
        generation_s=[0.5, 1.5, 2.5, 3.5],
        steps=[20, 20, 20, 20],
        peak_vram_gb=[10.0, None, 12.5, 11.0],
        errors=1,
        price_per_hour=0.40,
    )
    assert timing.latency_p50_s == 2.5
    assert timing.latency_p95_s == pytest.approx(3.85)
    assert timing.steps_per_s == pytest.approx(80 / 8)
    assert timing.images_per_hour == pytest.approx(1440)
    assert timing.cost_per_image == pytest.approx(0.40 / 1440)
    assert (timing.peak_vram_gb, timing.images, timing.errors) == (12.5, 4, 1)


# ---------------------------------------------------------------- regression detection

SERIES = "tiny-sdxl | 64x64 | 2 steps"


def _history(latencies: list[float], **extra: object) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "created_at": f"2026-11-{day + 1:02d}T03:00:00+00:00",
                "series": SERIES,
                "status": "ok",
                "latency_p50_s": value,
                "latency_p95_s": value * 1.2,
                "peak_vram_gb": 14.0,
                "clip_score": 31.0,
                **extra,
            }
            for day, value in enumerate(latencies)
        ]
    )


def _current(latency: float, vram: float = 14.0, clip: float = 31.0) -> dict[str, float]:
    return {
        "latency_p50_s": latency,
        "latency_p95_s": latency * 1.2,
        "peak_vram_gb": vram,
        "clip_score": clip,
    }


NOISY_RUNS = (1 + np.random.default_rng(3).normal(0, 0.04, 8)).round(3).tolist()  # 4% jitter around 1 s


def _status(checks: list, metric: str) -> str:
    return next(c.status for c in checks if c.metric == metric)


def test_a_planted_slowdown_is_caught_and_named_with_both_values() -> None:
    checks = detect_regressions(_history(NOISY_RUNS), _current(1.5), SERIES)
    regressed = [c for c in checks if c.status == "regressed"]
    assert [c.metric for c in regressed] == ["latency_p50_s", "latency_p95_s"]
    message = regressed[0].message
    baseline = float(np.median(NOISY_RUNS[-5:]))
    assert "latency_p50_s regressed: 1.5 s now" in message and f"{baseline:.3g} s baseline" in message


def test_noise_is_not_caught() -> None:
    history = _history(NOISY_RUNS)
    for run in (1 + np.random.default_rng(11).normal(0, 0.04, 20)).tolist():
        checks = detect_regressions(
            history, _current(run, vram=14.0 + run / 10, clip=31.0 - (run - 1) * 5), SERIES
        )
        assert all(c.status == "ok" for c in checks), [c.message for c in checks if c.status != "ok"]


def test_a_noisy_window_widens_the_tolerance() -> None:
    jittery = [0.7, 1.3, 1.0, 0.75, 1.25]  # a service whose latency swings +-30%
    threshold = Threshold(metric="latency_p50_s", worse="higher", relative=0.20)
    assert (
        _status(detect_regressions(_history(jittery), _current(1.3), SERIES, [threshold]), "latency_p50_s")
        == "ok"
    )
    assert _status(
        detect_regressions(_history(jittery), _current(3.0), SERIES, [threshold]), "latency_p50_s"
    ) == ("regressed")


def test_vram_and_clip_score_regressions() -> None:
    history = _history(NOISY_RUNS)
    checks = detect_regressions(history, _current(1.0, vram=16.0, clip=29.0), SERIES)
    assert _status(checks, "peak_vram_gb") == "regressed"
    assert _status(checks, "clip_score") == "regressed"
    checks = detect_regressions(history, _current(1.0, vram=14.3, clip=30.5), SERIES)
    assert _status(checks, "peak_vram_gb") == "ok" and _status(checks, "clip_score") == "ok"


def test_no_baseline_until_enough_runs_and_missing_metrics_are_not_judged() -> None:
    checks = detect_regressions(_history([1.0, 1.0]), _current(5.0) | {"peak_vram_gb": None}, SERIES)
    assert _status(checks, "latency_p50_s") == "no baseline"
    assert _status(checks, "peak_vram_gb") == "not measured"


def test_regressed_runs_and_other_series_stay_out_of_the_baseline() -> None:
    history = pd.concat(
        [
            _history([1.0, 1.0, 1.0]),
            _history([3.0, 3.0, 3.0], status="regressed").assign(created_at=lambda f: f["created_at"] + "x"),
            _history([3.0, 3.0, 3.0], series="other").assign(created_at=lambda f: f["created_at"] + "y"),
        ]
    )
    checks = detect_regressions(history, _current(3.0), SERIES, DEFAULT_THRESHOLDS)
    assert _status(checks, "latency_p50_s") == "regressed"


def test_history_store_appends_and_reads_back(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path / "results")
    assert store.load().empty
    store.append({"series": SERIES, "status": "ok", "latency_p50_s": 1.0})
    store.append({"series": SERIES, "status": "regressed", "latency_p50_s": 2.0})
    lines = store.path.read_text().splitlines()
    assert (
        len(lines) == 2
        and json.loads(lines[0])["latency_p50_s"] == 1.0
        and "created_at" in json.loads(lines[1])
    )
    assert store.load()["latency_p50_s"].tolist() == [1.0, 2.0]
    store.path.write_text(store.path.read_text() + "{broken\n")
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        store.load()
