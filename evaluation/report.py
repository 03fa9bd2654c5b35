"""The self-contained HTML report of a run directory: verdict and gate table first, then speed and cost,
charts, categories, the history trend, and every prompt's images side by side with their scores.

Everything is inside the one file (images as base64 data URIs, charts as inline SVG images rendered with
matplotlib), so it opens from disk with nothing else running. Thumbnails link to the full-size images in
the run directory.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from evaluation.compare import EvaluationResult, ServiceInfo
    from evaluation.regression import RegressionRun

TEMPLATE = "report.html.jinja"
REPORT_FILE = "report.html"
THUMBNAIL_PX = 320
COLORS = {"baseline": "#64748b", "candidate": "#4f46e5", "deployed": "#4f46e5"}
TONES = {"good": "#15803d", "ok": "#b45309", "bad": "#b91c1c", "muted": "#94a3b8"}
VERDICT_TONE = {"better": "good", "not worse within margin": "ok", "inconclusive": "muted", "worse": "bad"}
REAL_MODELS_NOTE = (
    "Real quality numbers come from the real models: run the same evaluation between the SD1.5 and "
    "SDXL services on the GPU box, scored by ViT-L-14 with OpenAI weights."
)


def render_report(run_dir: str | Path, history_file: str | Path | None = None) -> Path:
    """Write `<run_dir>/report.html` for an evaluation or a regression run directory; return its path."""
    import jinja2

    run_dir = Path(run_dir)
    if (run_dir / "evaluation.json").is_file():
        context = _comparison_context(run_dir, history_file)
    elif (run_dir / "regression.json").is_file():
        context = _regression_context(run_dir, history_file)
    else:
        raise FileNotFoundError(
            f"{run_dir} holds neither evaluation.json nor regression.json: not a run directory"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    path = run_dir / REPORT_FILE
    path.write_text(env.get_template(TEMPLATE).render(**context), encoding="utf-8")
    return path


# ---------------------------------------------------------------- contexts


def _comparison_context(run_dir: Path, history_file: str | Path | None) -> dict[str, Any]:
    import pandas as pd

    from evaluation.compare import load_result, quality_gate
    from evaluation.prompts import builtin_categories

    result: EvaluationResult = load_result(run_dir)
    generations = pd.read_parquet(run_dir / "generations.parquet")
    prompts = pd.read_parquet(run_dir / "prompts.parquet")
    base, cand = result.services["baseline"], result.services["candidate"]
    o = result.overall
    passed, detail = quality_gate(result)
    cand_timing = result.timing.get("candidate")
    requests = len(generations[generations["role"] == "candidate"])
    failed = cand_timing.errors if cand_timing else requests
    gate_rows = [
        _gate(
            "CLIP score: candidate not worse than baseline by more than the margin",
            f"margin {result.margin:g} CLIP points",
            f"diff {o.mean_diff:+.2f}, 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}]",
            "pass" if result.verdict != "worse" else "fail",
        ),
        _gate(
            "Every candidate request answered with an image",
            "0 failures",
            f"{requests - failed}/{requests} answered",
            "pass" if not failed else "fail",
        ),
        _gate("Quality gate (both of the above)", "", detail.split(":", 1)[0], "pass" if passed else "fail"),
    ]
    about = builtin_categories()
    history = _load_history(history_file or result.history_file)
    charts = [
        _chart(
            "CLIP score difference by category",
            _category_chart(result),
            f"candidate minus baseline, mean and 95% CI; dashed line: -margin ({result.margin:g})",
        ),
        _chart("Latency per image", _latency_chart(generations), "wall time of each /generate call"),
        _chart("CLIP score per image", _score_chart(generations), "each dot is one image (prompt x seed)"),
        _chart("Peak VRAM", _vram_chart(result.timing), "highest peak_vram_gb reported by the service"),
    ]
    if history is not None:
        charts.append(
            _chart("History: CLIP score and p95 latency", _trend_chart(history), _trend_caption(history))
        )
    return {
        "title": f"{cand.model} vs {base.model}",
        "kind": "Quality comparison",
        "created_at": _when(result.created_at),
        "banner": _banner(result.stand_ins, [base.model, cand.model], result.random_weights, result.scorer),
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
        "timing_header": [
            "",
            "images",
            "p50 latency",
            "p95 latency",
            "steps/s",
            "images/h",
            "peak VRAM",
            f"cost per 1k images at ${result.price_per_hour:.2f}/h",
        ],
        "timing_rows": [
            _timing_row(f"{role} · {result.services[role].model}", t) for role, t in result.timing.items()
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
        "cards": _cards(
            run_dir, generations, prompts.set_index("prompt_id")["diff"].to_dict(), ["baseline", "candidate"]
        ),
        "meta": [
            ("Scorer", result.scorer),
            (
                "Prompts x seeds",
                f"{result.prompts} x {len(result.seeds)} (seeds {', '.join(map(str, result.seeds))})",
            ),
            ("Request", _settings_text(result.settings)),
            ("Baseline", _service_text(base)),
            ("Candidate", _service_text(cand)),
            ("Run directory", result.run_dir),
        ],
        "files": _files(run_dir, ["generations", "prompts", "categories", "timing"], "evaluation.json"),
    }


def _service_text(info: ServiceInfo) -> str:
    """Model, address, device, and the opt-ins that change its images (what an opt-in comparison compares)."""
    text = f"{info.model} at {info.url} ({info.device or '?'})"
    if info.quality_options:
        text += f"; opt-ins that change images: {', '.join(info.quality_options)}"
    return text


def _regression_context(run_dir: Path, history_file: str | Path | None) -> dict[str, Any]:
    import pandas as pd

    from evaluation.regression import load_regression_run

    run: RegressionRun = load_regression_run(run_dir)
    generations = pd.read_parquet(run_dir / "generations.parquet")
    history = _load_history(history_file or run.history_file, run.series)
    tone = "ok" if run.accepted else "bad" if run.regressed else "good"
    label = "accepted as new baseline" if run.accepted else "regression" if run.regressed else "no regression"
    m = run.metrics
    charts = [_chart("Latency per image", _latency_chart(generations), "wall time of each /generate call")]
    if history is not None:
        charts.append(
            _chart("History: CLIP score and p95 latency", _trend_chart(history), _trend_caption(history))
        )
    charts.append(
        _chart("CLIP score per image", _score_chart(generations), "each dot is one image (prompt x seed)")
    )
    return {
        "title": f"{run.service.model} regression benchmark",
        "kind": "Regression benchmark",
        "created_at": _when(run.created_at),
        "banner": _banner(run.stand_ins, [run.service.model], run.random_weights, run.scorer),
        "verdict": {"label": label, "tone": tone, "sentence": run.message()},
        "kpis": [
            {"label": "CLIP score", "value": _num(m.get("clip_score"), "{:.2f}"), "note": "mean over images"},
            {
                "label": "p95 latency",
                "value": _num(m.get("latency_p95_s"), "{:.2f} s"),
                "note": f"p50 {_num(m.get('latency_p50_s'), '{:.2f} s')}",
            },
            {
                "label": "Peak VRAM",
                "value": _num(m.get("peak_vram_gb"), "{:.1f} GB"),
                "note": "max over requests",
            },
            {
                "label": "Cost per 1k images",
                "value": _num(
                    None if m.get("cost_per_image") is None else m["cost_per_image"] * 1000, "${:.3g}"
                ),
                "note": f"at ${run.price_per_hour:.2f}/h",
            },
        ],
        "gate_rows": [_check_row(c, {t.metric: t for t in run.thresholds}.get(c.metric)) for c in run.checks],
        "timing_header": [
            "",
            "images",
            "p50 latency",
            "p95 latency",
            "steps/s",
            "images/h",
            "peak VRAM",
            f"cost per 1k images at ${run.price_per_hour:.2f}/h",
        ],
        "timing_rows": [
            _timing_row(f"{run.service.model}", t) for t in _timing_of(generations, run.price_per_hour)
        ],
        "charts": charts,
        "category_rows": [],
        "columns": [("deployed", run.service.model)],
        "cards": _cards(run_dir, generations, {}, ["deployed"]),
        "meta": [
            ("Scorer", run.scorer),
            ("Series", run.series),
            ("Request", _settings_text(run.settings)),
            ("Service", f"{run.service.model} at {run.service.url} ({run.service.device or '?'})"),
            ("History", run.history_file),
            ("Run directory", run.run_dir),
        ],
        "files": _files(run_dir, ["generations"], "regression.json"),
    }


# ---------------------------------------------------------------- pieces


def _gate(check: str, threshold: str, observed: str, result: str, title: str = "") -> dict[str, str]:
    return {"check": check, "threshold": threshold, "observed": observed, "result": result, "title": title}


METRIC_LABELS = {
    "latency_p50_s": "p50 latency",
    "latency_p95_s": "p95 latency",
    "peak_vram_gb": "Peak VRAM",
    "clip_score": "CLIP score",
    "errors": "Failed requests",
}


def _check_row(check: Any, threshold: Any) -> dict[str, str]:
    """A regression check as a gate row: limit with its direction and unit, now vs baseline."""
    unit = f" {threshold.unit}" if threshold and threshold.unit else ""
    label = METRIC_LABELS.get(check.metric, check.metric)
    if check.status in ("no baseline", "not measured"):
        observed = check.message.split(": ", 1)[-1]
        return _gate(label, "", observed, "n/a", check.message)
    bound = "≥" if threshold and threshold.worse == "lower" else "≤"
    limit = _num(check.limit, "{:.3g}") + unit
    observed = f"{_num(check.current, '{:.3g}')}{unit} now vs {_num(check.baseline, '{:.3g}')}{unit} baseline"
    if check.runs:
        observed += f" (median of {check.runs} runs)"
    return _gate(
        label, f"{bound} {limit}", observed, "pass" if check.status == "ok" else "fail", check.message
    )


def _when(iso: str) -> str:
    return iso.replace("T", " ")[:16] + " UTC" if iso.endswith("+00:00") else iso


def _num(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or value != value else pattern.format(value)


def _timing_row(label: str, t: Any) -> list[str]:
    return [
        label,
        f"{t.images}" + (f" ({t.errors} failed)" if t.errors else ""),
        _num(t.latency_p50_s, "{:.2f} s"),
        _num(t.latency_p95_s, "{:.2f} s"),
        _num(t.steps_per_s, "{:.1f}"),
        _num(t.images_per_hour, "{:,.0f}"),
        _num(t.peak_vram_gb, "{:.1f} GB"),
        _num(None if t.cost_per_image is None else t.cost_per_image * 1000, "${:.3g}"),
    ]


def _timing_of(generations: pd.DataFrame, price_per_hour: float) -> Iterable[Any]:
    from evaluation.compare import timing_table

    return timing_table(generations, price_per_hour).values()


def _settings_text(settings: Any) -> str:
    size = f"{settings.width or 'default'}x{settings.height or 'default'}"
    refiner = {None: "service default", True: "on", False: "off"}[settings.use_refiner]
    return (
        f"{size} px, {settings.num_inference_steps} steps, guidance {settings.guidance_scale:g}, "
        f"refiner {refiner}, {settings.output_format}"
    )


def _banner(stand_ins: bool, models: list[str], random_scorer: bool, scorer: str) -> dict[str, str] | None:
    if not stand_ins:
        return None
    what = []
    if any(m.startswith(("tiny-", "synthetic-")) for m in models):
        what.append(
            f"the images come from random-weight stand-in models ({', '.join(models)}), so they are noise"
        )
    if random_scorer:
        what.append(
            f"the CLIP scorer is {scorer.replace(' (random weights)', '')} with random weights, so the scores are noise too"
        )
    return {
        "title": "Random-weight stand-ins: these numbers say nothing about image quality",
        "text": "This run checks the machinery end to end: " + "; ".join(what) + ". " + REAL_MODELS_NOTE,
    }


def _files(run_dir: Path, tables: list[str], result_file: str) -> list[str]:
    names = [f"{t}.{ext}" for t in tables for ext in ("csv", "parquet")] + [result_file]
    return [name for name in names if (run_dir / name).is_file()]


def image_data_uri(path: Path, max_side: int = THUMBNAIL_PX) -> str:
    """A data URI of the image: as is when small, else a JPEG thumbnail of at most `max_side` px."""
    from PIL import Image

    with Image.open(path) as image:
        if max(image.size) <= max_side and image.format in ("PNG", "JPEG", "WEBP"):
            mime, data = Image.MIME[image.format], path.read_bytes()
        else:
            thumb = image.convert("RGB")
            thumb.thumbnail((max_side, max_side))
            buffer = io.BytesIO()
            thumb.save(buffer, format="JPEG", quality=85)
            mime, data = "image/jpeg", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _cards(run_dir: Path, generations: pd.DataFrame, diffs: dict[int, float], roles: list[str]) -> list[dict]:
    """One card per prompt: its category, difference, and each role's images with scores."""
    cards = []
    for prompt_id, group in generations.groupby("prompt_id", sort=True):
        first = group.iloc[0]
        diff = diffs.get(prompt_id)
        columns = []
        for role in roles:
            shots = []
            for _, row in group[group["role"] == role].sort_values("seed").iterrows():
                ok = isinstance(row["image"], str) and (run_dir / row["image"]).is_file()
                shots.append(
                    {
                        "seed": int(row["seed"]),
                        "src": image_data_uri(run_dir / row["image"]) if ok else None,
                        "href": row["image"] if ok else None,
                        "score": _num(row.get("score"), "{:.1f}"),
                        "error": None if ok else str(row["error"] or "no image"),
                    }
                )
            columns.append({"role": role, "shots": shots})
        cards.append(
            {
                "id": int(prompt_id),
                "prompt": first["prompt"],
                "category": first["category"],
                "diff": None if diff is None else f"{diff:+.1f}",
                "tone": None if diff is None else ("good" if diff > 0 else "bad" if diff < 0 else "muted"),
                "columns": columns,
            }
        )
    return cards


def _load_history(history_file: str | Path | None, series: str | None = None) -> pd.DataFrame | None:
    """The history's runs of `series` (default: of its latest run's series); None when there are none."""
    from evaluation.history import read_history

    if not history_file or not Path(history_file).is_file():
        return None
    frame = read_history(history_file)
    if frame.empty or "series" not in frame:
        return None
    frame = frame[frame["series"] == (series or frame["series"].iloc[-1])]
    return frame if len(frame) else None


# ---------------------------------------------------------------- charts


def _chart(title: str, figure: Figure, caption: str) -> dict[str, str]:
    return {"title": title, "uri": figure_uri(figure), "caption": caption}


def figure_uri(figure: Figure) -> str:
    """An SVG data URI of a matplotlib figure (closed afterwards)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    figure.clear()
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue().encode()).decode()


def _figure(width: float = 6.4, height: float = 3.2) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    axes = figure.subplots()
    axes.spines[["top", "right"]].set_visible(False)
    axes.tick_params(colors="#334155", labelsize=9)
    for spine in axes.spines.values():
        spine.set_color("#cbd5e1")
    axes.grid(axis="x", color="#e2e8f0", linewidth=0.8)
    axes.set_axisbelow(True)
    return figure, axes


def _empty(axes: Any, text: str) -> None:
    axes.text(
        0.5, 0.5, text, ha="center", va="center", color="#64748b", fontsize=10, transform=axes.transAxes
    )
    axes.set_xticks([])
    axes.set_yticks([])
    axes.spines[["left", "bottom"]].set_visible(False)


def _category_chart(result: EvaluationResult) -> Figure:
    rows = [("overall", result.overall)] + [(c.category, c) for c in result.categories]
    figure, axes = _figure(6.4, 0.9 + 0.34 * len(rows))
    labels = [name for name, _ in rows][::-1]
    stats = [s for _, s in rows][::-1]
    y = range(len(rows))
    colors = [TONES[VERDICT_TONE[s.verdict]] for s in stats]
    axes.barh(y, [s.mean_diff for s in stats], color=colors, alpha=0.35, height=0.62)
    axes.errorbar(
        [s.mean_diff for s in stats],
        list(y),
        xerr=[[s.mean_diff - s.ci_low for s in stats], [s.ci_high - s.mean_diff for s in stats]],
        fmt="o",
        color="#0f172a",
        ecolor="#334155",
        elinewidth=1.4,
        capsize=3,
        markersize=4,
    )
    axes.axvline(0, color="#0f172a", linewidth=1)
    axes.axvline(-result.margin, color=TONES["bad"], linewidth=1, linestyle="--")
    axes.set_yticks(list(y), labels)
    axes.get_yticklabels()[-1].set_fontweight("bold")
    axes.set_xlabel("CLIP score difference (candidate - baseline)", fontsize=9, color="#334155")
    return figure


def _latency_chart(generations: pd.DataFrame) -> Figure:
    import numpy as np

    ok = generations[generations["latency_s"].notna()]
    roles = list(dict.fromkeys(ok["role"]))
    figure, axes = _figure(6.4, 0.9 + 0.6 * max(len(roles), 1))
    if not roles:
        _empty(axes, "no successful request")
        return figure
    data = [ok.loc[ok["role"] == role, "latency_s"].astype(float).to_numpy() for role in roles]
    box = axes.boxplot(
        data,
        orientation="horizontal",
        widths=0.5,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "#0f172a"},
    )
    rng = np.random.default_rng(0)
    for i, (role, values) in enumerate(zip(roles, data, strict=True), start=1):
        box["boxes"][i - 1].set(facecolor=COLORS.get(role, "#4f46e5"), alpha=0.25, edgecolor=COLORS.get(role))
        axes.scatter(
            values,
            i + rng.uniform(-0.12, 0.12, len(values)),
            s=14,
            color=COLORS.get(role),
            alpha=0.8,
            zorder=3,
        )
    models = {role: ok.loc[ok["role"] == role, "model"].iloc[0] for role in roles}
    axes.set_yticks(range(1, len(roles) + 1), [f"{role}\n{models[role]}" for role in roles])
    axes.set_xlabel("seconds per image", fontsize=9, color="#334155")
    axes.set_xlim(left=0)
    return figure


def _score_chart(generations: pd.DataFrame) -> Figure:
    import numpy as np

    ok = generations[generations["score"].notna()]
    roles = list(dict.fromkeys(ok["role"]))
    figure, axes = _figure(6.4, 0.9 + 0.6 * max(len(roles), 1))
    if not roles:
        _empty(axes, "no scored image")
        return figure
    rng = np.random.default_rng(1)
    for i, role in enumerate(roles, start=1):
        values = ok.loc[ok["role"] == role, "score"].astype(float).to_numpy()
        axes.scatter(
            values, i + rng.uniform(-0.15, 0.15, len(values)), s=16, color=COLORS.get(role), alpha=0.75
        )
        axes.plot([values.mean()] * 2, [i - 0.3, i + 0.3], color="#0f172a", linewidth=2)
    models = {role: ok.loc[ok["role"] == role, "model"].iloc[0] for role in roles}
    axes.set_yticks(range(1, len(roles) + 1), [f"{role}\n{models[role]}" for role in roles])
    axes.set_ylim(0.4, len(roles) + 0.6)
    axes.set_xlabel("CLIP score (bar: mean)", fontsize=9, color="#334155")
    return figure


def _vram_chart(timing: dict[str, Any]) -> Figure:
    figure, axes = _figure(6.4, 1.8)
    measured = {role: t.peak_vram_gb for role, t in timing.items() if t.peak_vram_gb is not None}
    if not measured:
        _empty(axes, "no GPU memory reported (the services ran on CPU)")
        return figure
    roles = list(measured)
    bars = axes.barh(
        range(len(roles)), list(measured.values()), color=[COLORS.get(r) for r in roles], height=0.55
    )
    axes.bar_label(bars, fmt="%.1f GB", padding=4, fontsize=9, color="#0f172a")
    axes.set_yticks(range(len(roles)), roles)
    axes.set_xlabel("peak VRAM (GB)", fontsize=9, color="#334155")
    return figure


def _trend_chart(history: pd.DataFrame) -> Figure:
    import pandas as pd
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 3.4))
    top, bottom = figure.subplots(2, 1, sharex=True)
    when = pd.to_datetime(history["created_at"], utc=True, format="ISO8601")
    bad = history.get("status", pd.Series(["ok"] * len(history))) == "regressed"
    for axes, column, label in (
        (top, "clip_score", "CLIP score"),
        (bottom, "latency_p95_s", "p95 latency (s)"),
    ):
        axes.spines[["top", "right"]].set_visible(False)
        axes.tick_params(labelsize=8, colors="#334155")
        axes.grid(axis="y", color="#e2e8f0", linewidth=0.8)
        if column not in history:
            continue
        values = history[column].astype(float)
        axes.plot(when, values, color=COLORS["candidate"], linewidth=1.5, marker="o", markersize=4)
        axes.scatter(when[bad], values[bad], color=TONES["bad"], s=40, zorder=3, label="regressed")
        axes.set_ylabel(label, fontsize=9, color="#334155")
    if bad.any():
        top.legend(fontsize=8, frameon=False)
    figure.autofmt_xdate()
    return figure


def _trend_caption(history: pd.DataFrame) -> str:
    regressed = int((history.get("status") == "regressed").sum()) if "status" in history else 0
    return f"{len(history)} runs of this series; red: runs that regressed ({regressed})"
