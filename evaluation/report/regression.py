"""The regression report's context: the run's verdict and each metric's check against its baseline, speed
and cost, the latency, history and score charts, and the deployed service's images, from a regression
run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.compare import timing_table
from evaluation.history import MetricCheck, Threshold
from evaluation.report.charts import chart, latency_chart, score_chart, trend_caption, trend_chart
from evaluation.report.parts import (
    banner,
    cards,
    files,
    gate_row,
    load_history,
    num,
    settings_text,
    timing_header,
    timing_row,
    when,
)
from evaluation.results import REGRESSION_FILE, load_regression_run, load_table

METRIC_LABELS = {
    "latency_p50_s": "p50 latency",
    "latency_p95_s": "p95 latency",
    "peak_vram_gb": "Peak VRAM",
    "clip_score": "CLIP score",
    "errors": "Failed requests",
}


def regression_context(run_dir: Path, history_file: str | Path | None) -> dict[str, Any]:
    run = load_regression_run(run_dir)
    generations = load_table(run_dir, "generations")
    history = load_history(history_file or run.history_file, run.series)
    tone = "ok" if run.accepted else "bad" if run.regressed else "good"
    label = "accepted as new baseline" if run.accepted else "regression" if run.regressed else "no regression"
    m = run.metrics
    charts = [chart("Latency per image", latency_chart(generations), "wall time of each /generate call")]
    if history is not None:
        charts.append(
            chart("History: CLIP score and p95 latency", trend_chart(history), trend_caption(history))
        )
    charts.append(
        chart("CLIP score per image", score_chart(generations), "each dot is one image (prompt x seed)")
    )
    thresholds = {t.metric: t for t in run.thresholds}
    return {
        "title": f"{run.service.model} regression benchmark",
        "kind": "Regression benchmark",
        "created_at": when(run.created_at),
        "banner": banner(run.stand_ins, [run.service.model], run.random_weights, run.scorer),
        "verdict": {"label": label, "tone": tone, "sentence": run.message()},
        "kpis": [
            {"label": "CLIP score", "value": num(m.get("clip_score"), "{:.2f}"), "note": "mean over images"},
            {
                "label": "p95 latency",
                "value": num(m.get("latency_p95_s"), "{:.2f} s"),
                "note": f"p50 {num(m.get('latency_p50_s'), '{:.2f} s')}",
            },
            {
                "label": "Peak VRAM",
                "value": num(m.get("peak_vram_gb"), "{:.1f} GB"),
                "note": "max over requests",
            },
            {
                "label": "Cost per 1k images",
                "value": num(
                    None if m.get("cost_per_image") is None else m["cost_per_image"] * 1000, "${:.3g}"
                ),
                "note": f"at ${run.price_per_hour:.2f}/h",
            },
        ],
        "gate_rows": [_check_row(c, thresholds.get(c.metric)) for c in run.checks],
        "timing_header": timing_header(run.price_per_hour),
        "timing_rows": [
            timing_row(f"{run.service.model}", t)
            for t in timing_table(generations, run.price_per_hour).values()
        ],
        "charts": charts,
        "category_rows": [],
        "columns": [("deployed", run.service.model)],
        "cards": cards(run_dir, generations, {}, ["deployed"]),
        "meta": [
            ("Scorer", run.scorer),
            ("Series", run.series),
            ("Request", settings_text(run.settings)),
            ("Service", f"{run.service.model} at {run.service.url} ({run.service.device or '?'})"),
            ("History", run.history_file),
            ("Run directory", run.run_dir),
        ],
        "files": files(run_dir, ["generations"], REGRESSION_FILE),
    }


def _check_row(check: MetricCheck, threshold: Threshold | None) -> dict[str, str]:
    """A regression check as a gate row: limit with its direction and unit, now vs baseline."""
    unit = f" {threshold.unit}" if threshold and threshold.unit else ""
    label = METRIC_LABELS.get(check.metric, check.metric)
    if check.status in ("no baseline", "not measured"):
        observed = check.message.split(": ", 1)[-1]
        return gate_row(label, "", observed, "n/a", check.message)
    bound = "≥" if threshold and threshold.worse == "lower" else "≤"
    limit = num(check.limit, "{:.3g}") + unit
    observed = f"{num(check.current, '{:.3g}')}{unit} now vs {num(check.baseline, '{:.3g}')}{unit} baseline"
    if check.runs:
        observed += f" (median of {check.runs} runs)"
    return gate_row(
        label, f"{bound} {limit}", observed, "pass" if check.status == "ok" else "fail", check.message
    )
