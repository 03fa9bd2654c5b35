"""The report's charts: matplotlib figures drawn off-screen, embedded as SVG data URIs (no files, no
scripts), so the HTML stays one self-contained file."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from evaluation.metrics import TimingSummary
from evaluation.report.parts import COLORS, TONES, VERDICT_TONE
from evaluation.results import EvaluationResult
from evaluation.stats import Outcome, outcome, verdict

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure


def chart(title: str, figure: Figure, caption: str) -> dict[str, str]:
    return {"title": title, "uri": figure_uri(figure), "caption": caption}


def figure_uri(figure: Figure) -> str:
    """An SVG data URI of a matplotlib figure (closed afterwards)."""
    return svg_uri(figure_svg(figure))


def svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


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


def category_chart(result: EvaluationResult) -> Figure:
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


def latency_chart(generations: pd.DataFrame) -> Figure:
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


def score_chart(generations: pd.DataFrame) -> Figure:
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


def vram_chart(timing: dict[str, TimingSummary]) -> Figure:
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


def trend_chart(history: pd.DataFrame) -> Figure:
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


def trend_caption(history: pd.DataFrame) -> str:
    regressed = int((history.get("status") == "regressed").sum()) if "status" in history else 0
    return f"{len(history)} runs of this series; red: runs that regressed ({regressed})"


class VerdictZones(BaseModel):
    """Where the mean difference would fall, for a CI as wide as this one, to pass, fail or be
    inconclusive (`evaluation.stats.verdict` read along one axis): the numbers behind `verdict_chart`."""

    mean_diff: float
    ci_low: float
    ci_high: float
    margin: float
    fail_below: float  # a mean below this, with this CI's width, is "worse"
    pass_above: float  # a mean above this, with this CI's width, passes
    outcome: Outcome

    def zone_of(self, mean: float) -> Outcome:
        return "fail" if mean < self.fail_below else "pass" if mean > self.pass_above else "inconclusive"


def verdict_zones(mean_diff: float, ci_low: float, ci_high: float, margin: float) -> VerdictZones:
    """The three zones for the mean difference, keeping this CI's offsets from it.

    With `a` = mean - ci_low and `b` = ci_high - mean: a pass needs ci_low > -margin, so mean > a - margin;
    a fail needs ci_high < 0 and the CI's centre below -margin, so mean < min(-b, -margin - (b - a) / 2).
    """
    below, above = mean_diff - ci_low, ci_high - mean_diff
    return VerdictZones(
        mean_diff=mean_diff,
        ci_low=ci_low,
        ci_high=ci_high,
        margin=margin,
        fail_below=min(-above, -margin - (above - below) / 2),
        pass_above=below - margin,
        outcome=outcome(verdict(ci_low, ci_high, margin)),
    )


ZONE_TONE: dict[Outcome, str] = {"pass": "good", "inconclusive": "muted", "fail": "bad"}


def verdict_chart(zones: VerdictZones) -> Figure:
    """The CI of the mean difference against the margin: the interval, the -margin line and, shaded, where
    the mean would have to be (for a CI this wide) to pass, be inconclusive or fail."""
    figure, axes = _figure(6.4, 2.2)
    z = zones
    span = max(z.ci_high, 0.0) - min(z.ci_low, -z.margin, z.fail_below)
    pad = 0.25 * max(span, z.margin, 0.5)
    left, right = min(z.ci_low, -z.margin, z.fail_below) - pad, max(z.ci_high, 0.0, z.pass_above) + pad
    for start, end, name in (
        (left, z.fail_below, "fail"),
        (z.fail_below, z.pass_above, "inconclusive"),
        (z.pass_above, right, "pass"),
    ):
        if end > start:
            axes.axvspan(start, end, color=TONES[ZONE_TONE[name]], alpha=0.13, linewidth=0)
            axes.text((start + end) / 2, 1.32, name, ha="center", va="center", fontsize=9,
                      color=TONES[ZONE_TONE[name]], fontweight="bold")  # fmt: skip
    axes.axvline(0, color="#0f172a", linewidth=1)
    axes.axvline(-z.margin, color=TONES["bad"], linewidth=1.2, linestyle="--")
    axes.text(-z.margin, 0.55, f" -margin ({-z.margin:g})", color=TONES["bad"], fontsize=8, va="center")
    axes.errorbar(
        [z.mean_diff], [1.0],
        xerr=[[z.mean_diff - z.ci_low], [z.ci_high - z.mean_diff]],
        fmt="o", color=TONES[ZONE_TONE[z.outcome]], ecolor=TONES[ZONE_TONE[z.outcome]],
        elinewidth=3, capsize=6, markersize=8,
    )  # fmt: skip
    axes.set_xlim(left, right)
    axes.set_ylim(0.4, 1.5)
    axes.set_yticks([])
    axes.spines[["left"]].set_visible(False)
    axes.set_xlabel(
        f"mean CLIP difference (candidate - baseline) and its 95% CI: {z.outcome.upper()}",
        fontsize=9,
        color="#334155",
    )
    return figure


def figure_svg(figure: Figure) -> str:
    """The SVG text of a matplotlib figure (cleared afterwards)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight")
    figure.clear()
    return buffer.getvalue()
