"""The comparison report's context: verdict and gate first, then speed and cost, charts, categories, the
history trend and every prompt's images, from an evaluation run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluation.compare import quality_gate
from evaluation.prompts import builtin_categories
from evaluation.report.charts import (
    category_chart,
    chart,
    figure_svg,
    latency_chart,
    score_chart,
    svg_uri,
    trend_caption,
    trend_chart,
    verdict_chart,
    verdict_zones,
    vram_chart,
)
from evaluation.report.parts import (
    VERDICT_TONE,
    banner,
    cards,
    files,
    gate_row,
    load_history,
    settings_text,
    timing_header,
    timing_row,
    when,
)
from evaluation.results import RESULT_FILE, TABLES, ServiceInfo, load_result, load_table

VERDICT_CHART = "verdict.svg"  # the CI against the margin, also embedded in report.html


def comparison_context(run_dir: Path, history_file: str | Path | None) -> dict[str, Any]:
    result = load_result(run_dir)
    generations = load_table(run_dir, "generations")
    prompts = load_table(run_dir, "prompts")
    base, cand = result.services["baseline"], result.services["candidate"]
    o = result.overall
    passed, detail = quality_gate(result)
    cand_timing = result.timing.get("candidate")
    requests = len(generations[generations["role"] == "candidate"])
    failed = cand_timing.errors if cand_timing else requests
    gate_rows = [
        gate_row(
            "CLIP score: candidate not worse than baseline by more than the margin",
            f"margin {result.margin:g} CLIP points",
            f"diff {o.mean_diff:+.2f}, 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}]",
            {"worse": "fail", "inconclusive": "inconclusive"}.get(result.verdict, "pass"),
        ),
        gate_row(
            "Every candidate request answered with an image",
            "0 failures",
            f"{requests - failed}/{requests} answered",
            "pass" if not failed else "fail",
        ),
        gate_row(
            "Quality gate (both of the above)", "", detail.split(":", 1)[0], "pass" if passed else "fail"
        ),
    ]
    about = builtin_categories()
    history = load_history(history_file or result.history_file)
    charts = [
        chart(
            "CLIP score difference by category",
            category_chart(result),
            f"candidate minus baseline, mean and 95% CI; dashed line: -margin ({result.margin:g})",
        ),
        chart("Latency per image", latency_chart(generations), "wall time of each /generate call"),
        chart("CLIP score per image", score_chart(generations), "each dot is one image (prompt x seed)"),
        chart("Peak VRAM", vram_chart(result.timing), "highest peak_vram_gb reported by the service"),
    ]
    if history is not None:
        charts.append(
            chart("History: CLIP score and p95 latency", trend_chart(history), trend_caption(history))
        )
    zones = verdict_zones(o.mean_diff, o.ci_low, o.ci_high, result.margin)
    svg = figure_svg(verdict_chart(zones))
    (run_dir / VERDICT_CHART).write_text(svg, encoding="utf-8")
    verdict_picture = {
        "title": "The verdict: the CI against the margin",
        "uri": svg_uri(svg),
        "file": VERDICT_CHART,
        "caption": (
            f"mean difference {o.mean_diff:+.2f} with its 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}]; dashed: "
            f"-margin ({-result.margin:g}); shaded: where the mean would have to fall, for a CI this wide, "
            f"to fail (below {zones.fail_below:+.2f}), be inconclusive, or pass (above {zones.pass_above:+.2f})"
        ),
    }
    return {
        "verdict_chart": verdict_picture,
        "title": f"{cand.model} vs {base.model}",
        "kind": "Quality comparison",
        "created_at": when(result.created_at),
        "banner": banner(result.stand_ins, [base.model, cand.model], result.random_weights, result.scorer),
        "verdict": {
            "label": result.verdict,
            "tone": VERDICT_TONE[result.verdict],
            "sentence": (
                f"{cand.model} (candidate) scores {o.candidate_mean:.2f} against {o.baseline_mean:.2f} for "
                f"{base.model} (baseline): {o.mean_diff:+.2f} points, 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}], "
                f"wins {o.win_rate:.0%} of {o.n} prompts."
            ),
        },
        "kpis": [
            {
                "label": f"Baseline · {base.model}",
                "value": f"{o.baseline_mean:.2f}",
                "note": "mean CLIP score",
            },
            {
                "label": f"Candidate · {cand.model}",
                "value": f"{o.candidate_mean:.2f}",
                "note": "mean CLIP score",
            },
            {
                "label": "Difference",
                "value": f"{o.mean_diff:+.2f}",
                "note": f"CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}]",
            },
            {"label": "Win rate", "value": f"{o.win_rate:.0%}", "note": f"of {o.n} prompts"},
        ],
        "gate_rows": gate_rows,
        "timing_header": timing_header(result.price_per_hour),
        "timing_rows": [
            timing_row(f"{role} · {result.services[role].model}", t) for role, t in result.timing.items()
        ],
        "charts": charts,
        "category_rows": [
            {
                "category": c.category,
                "about": about.get(c.category, ""),
                "n": c.n,
                "baseline": f"{c.baseline_mean:.2f}",
                "candidate": f"{c.candidate_mean:.2f}",
                "diff": f"{c.mean_diff:+.2f}",
                "ci": f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}]",
                "win": f"{c.win_rate:.0%}",
                "verdict": c.verdict,
                "tone": VERDICT_TONE[c.verdict],
            }
            for c in result.categories
        ],
        "columns": [("baseline", base.model), ("candidate", cand.model)],
        "cards": cards(
            run_dir, generations, prompts.set_index("prompt_id")["diff"].to_dict(), ["baseline", "candidate"]
        ),
        "meta": [
            ("Scorer", result.scorer),
            (
                "Prompts x seeds",
                f"{result.prompts} x {len(result.seeds)} (seeds {', '.join(map(str, result.seeds))})",
            ),
            ("Request", settings_text(result.settings)),
            ("Baseline", _service_text(base)),
            ("Candidate", _service_text(cand)),
            ("Run directory", result.run_dir),
        ],
        "files": files(run_dir, TABLES, RESULT_FILE),
    }


def _service_text(info: ServiceInfo) -> str:
    """Model, address, device, and the opt-ins that change its images (what an opt-in comparison compares)."""
    text = f"{info.model} at {info.url} ({info.device or '?'})"
    if info.quality_options:
        text += f"; opt-ins that change images: {', '.join(info.quality_options)}"
    return text
