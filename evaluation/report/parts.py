"""The pieces both kinds of report share: the palette, number and date formats, gate and timing rows, the
stand-in banner, the image cards (thumbnails as data URIs) and the history of a series."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.history import read_history
from evaluation.metrics import TimingSummary
from evaluation.results import STAND_IN_PREFIXES, GenerationSettings

if TYPE_CHECKING:
    import pandas as pd

THUMBNAIL_PX = 320
COLORS = {"baseline": "#64748b", "candidate": "#4f46e5", "deployed": "#4f46e5"}
TONES = {"good": "#15803d", "ok": "#b45309", "bad": "#b91c1c", "muted": "#94a3b8"}
VERDICT_TONE = {"better": "good", "not worse within margin": "ok", "inconclusive": "muted", "worse": "bad"}
TIMING_HEADER = ["", "images", "p50 latency", "p95 latency", "steps/s", "images/h", "peak VRAM"]
REAL_MODELS_NOTE = (
    "Real quality numbers come from the real models: run the same evaluation between the SD1.5 and "
    "SDXL services on the GPU box, scored by ViT-L-14 with OpenAI weights."
)


def gate_row(check: str, threshold: str, observed: str, result: str, title: str = "") -> dict[str, str]:
    return {"check": check, "threshold": threshold, "observed": observed, "result": result, "title": title}


def when(iso: str) -> str:
    return iso.replace("T", " ")[:16] + " UTC" if iso.endswith("+00:00") else iso


def num(value: float | None, pattern: str) -> str:
    return "n/a" if value is None or value != value else pattern.format(value)


def timing_header(price_per_hour: float) -> list[str]:
    return [*TIMING_HEADER, f"cost per 1k images at ${price_per_hour:.2f}/h"]


def timing_row(label: str, t: TimingSummary) -> list[str]:
    return [
        label,
        f"{t.images}" + (f" ({t.errors} failed)" if t.errors else ""),
        num(t.latency_p50_s, "{:.2f} s"),
        num(t.latency_p95_s, "{:.2f} s"),
        num(t.steps_per_s, "{:.1f}"),
        num(t.images_per_hour, "{:,.0f}"),
        num(t.peak_vram_gb, "{:.1f} GB"),
        num(None if t.cost_per_image is None else t.cost_per_image * 1000, "${:.3g}"),
    ]


def settings_text(settings: GenerationSettings) -> str:
    size = f"{settings.width or 'default'}x{settings.height or 'default'}"
    refiner = {None: "service default", True: "on", False: "off"}[settings.use_refiner]
    return (
        f"{size} px, {settings.num_inference_steps} steps, guidance {settings.guidance_scale:g}, "
        f"refiner {refiner}, {settings.output_format}"
    )


def banner(stand_ins: bool, models: list[str], random_scorer: bool, scorer: str) -> dict[str, str] | None:
    if not stand_ins:
        return None
    what = []
    if any(m.startswith(STAND_IN_PREFIXES) for m in models):
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


def files(run_dir: Path, tables: list[str] | tuple[str, ...], result_file: str) -> list[str]:
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


def cards(run_dir: Path, generations: pd.DataFrame, diffs: dict[int, float], roles: list[str]) -> list[dict]:
    """One card per prompt: its category, difference, and each role's images with scores."""
    result = []
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
                        "score": num(row.get("score"), "{:.1f}"),
                        "error": None if ok else str(row["error"] or "no image"),
                    }
                )
            columns.append({"role": role, "shots": shots})
        result.append(
            {
                "id": int(prompt_id),
                "prompt": first["prompt"],
                "category": first["category"],
                "diff": None if diff is None else f"{diff:+.1f}",
                "tone": None if diff is None else ("good" if diff > 0 else "bad" if diff < 0 else "muted"),
                "columns": columns,
            }
        )
    return result


def load_history(history_file: str | Path | None, series: str | None = None) -> pd.DataFrame | None:
    """The history's runs of `series` (default: of its latest run's series); None when there are none."""
    if not history_file or not Path(history_file).is_file():
        return None
    frame = read_history(history_file)
    if frame.empty or "series" not in frame:
        return None
    frame = frame[frame["series"] == (series or frame["series"].iloc[-1])]
    return frame if len(frame) else None
