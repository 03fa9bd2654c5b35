"""The comparison: the same prompts and seeds sent to two services over HTTP, every image CLIP-scored.

`evaluate_services(...)` does it all and writes the run directory; its parts also work alone, for callers
that cannot have both services up at once (the deploy stops the old one before starting the new one):
`collect(url, role, ...)` for each service while it runs, then `score_generations(...)` and `summarize(...)`.

Run directory: `images/<role>/p<prompt>-s<seed>.<fmt>`, tables as Parquet and CSV (`generations`,
`prompts`, `categories`, `timing`), `evaluation.json` (the `EvaluationResult`) and `report.html`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
from pydantic import BaseModel, Field

from evaluation.metrics import DEFAULT_PRICE_PER_HOUR, TimingSummary, summarize_timing
from evaluation.prompts import Prompt, builtin_prompts
from evaluation.stats import PairedStats, Verdict, verdict

if TYPE_CHECKING:
    import pandas as pd

    from evaluation.clip_score import ClipScorer

log = logging.getLogger(__name__)

Role = Literal["baseline", "candidate", "deployed"]
ROLES: tuple[Role, ...] = ("baseline", "candidate")
DEFAULT_SEEDS = 2
DEFAULT_MARGIN = 1.0
STAND_IN_PREFIXES = ("tiny-", "synthetic-")
RESULT_FILE = "evaluation.json"
TABLES = ("generations", "prompts", "categories", "timing")
GENERATION_COLUMNS = (
    "role",
    "model",
    "prompt_id",
    "prompt",
    "category",
    "seed",
    "steps",
    "image",
    "resolution",
    "latency_s",
    "generation_s",
    "peak_vram_gb",
    "error",
)


class GenerationSettings(BaseModel):
    """The `/generate` fields shared by every request of a comparison (None = the service's default)."""

    num_inference_steps: int = Field(30, ge=1, le=150)
    width: int | None = Field(None, ge=64, le=2048)
    height: int | None = Field(None, ge=64, le=2048)
    guidance_scale: float = Field(7.5, ge=0, le=30)
    negative_prompt: str | None = None
    use_refiner: bool | None = None
    output_format: Literal["png", "jpeg", "webp"] = "png"

    def payload(self, prompt: str, seed: int) -> dict[str, Any]:
        body = self.model_dump(exclude_none=True)
        return {**body, "prompt": prompt, "seed": seed}


class ServiceInfo(BaseModel):
    role: Role
    url: str
    model: str
    backend: str | None = None
    device: str | None = None
    quality_options: list[str] = []  # opt-in settings in force that change its images (/health)

    @property
    def stand_in(self) -> bool:
        """A tiny or synthetic random-weight model: its images are noise."""
        return self.model.startswith(STAND_IN_PREFIXES)


class CategoryStats(PairedStats):
    category: str


class EvaluationResult(BaseModel):
    """What the deploy gate and the report need; the tables live next to it in `run_dir`."""

    verdict: Verdict
    margin: float
    overall: PairedStats
    categories: list[CategoryStats]
    timing: dict[str, TimingSummary]
    services: dict[str, ServiceInfo]
    scorer: str
    random_weights: bool
    prompts: int
    seeds: list[int]
    settings: GenerationSettings
    price_per_hour: float
    run_dir: str
    report: str | None = None
    history_file: str | None = None
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def baseline_score(self) -> float:
        return self.overall.baseline_mean

    @property
    def candidate_score(self) -> float:
        return self.overall.candidate_mean

    @property
    def stand_ins(self) -> bool:
        """True when the numbers come from random-weight stand-ins (models or scorer)."""
        return self.random_weights or any(s.stand_in for s in self.services.values())

    def headline(self) -> str:
        o = self.overall
        return (
            f"{self.verdict}: CLIP {o.candidate_mean:.2f} vs {o.baseline_mean:.2f} "
            f"(diff {o.mean_diff:+.2f}, 95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}], "
            f"win rate {o.win_rate:.0%}, {o.n} prompts x {len(self.seeds)} seeds, margin {self.margin:g})"
        )


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """K seeds (0..K-1) or an explicit list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    chosen = [int(s) for s in seeds]
    if not chosen:
        raise ValueError("seeds must not be empty")
    return chosen


def _http(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def service_info(url: str, role: Role, api_key: str | None = None) -> ServiceInfo:
    """Ask `/health` what the service serves; raises a clear error when it is not up and loaded.

    Only `/health` is required (the user's old SD1.5 script has no `/ready` and names no model).
    """
    with _http(url, api_key, 30) as http:
        try:
            response = http.get("/health")
            health = response.json() if response.is_success else None
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeError(f"{role} service at {url} did not answer GET /health: {exc}") from exc
    if not isinstance(health, dict):
        raise RuntimeError(
            f"{role} service at {url}: GET /health answered {response.status_code}, not a JSON 200"
        )
    if health.get("status") in ("loading", "unhealthy") or health.get("model_loaded") is False:
        raise RuntimeError(f"{role} service at {url} is not ready: /health says {health}")
    return ServiceInfo(
        role=role,
        url=url,
        model=str(health.get("model") or f"{role} service"),
        backend=health.get("backend"),
        device=health.get("device"),
        quality_options=[str(option) for option in health.get("quality_options") or []],
    )


def _generate(http: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    """POST /generate; the answer's JSON, which must carry a base64 `image` (new or old contract)."""
    response = http.post("/generate", json=payload)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success or not isinstance(body, dict):
        detail = body.get("error") if isinstance(body, dict) else response.text[:300]
        raise GenerationFailed(f"HTTP {response.status_code}: {detail}")
    if body.get("success") is False or not isinstance(body.get("image"), str):
        raise GenerationFailed(f"answer without an image: {str(body.get('error') or list(body))[:300]}")
    return body


class GenerationFailed(RuntimeError):
    """A `/generate` request that did not give an image."""


def collect(
    url: str,
    role: Role,
    prompts: Sequence[Prompt],
    seeds: int | Sequence[int],
    run_dir: str | Path,
    settings: GenerationSettings | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    on_image: Callable[[], None] | None = None,
) -> tuple[ServiceInfo, pd.DataFrame]:
    """Generate every prompt x seed on one service; save the images; one row per request.

    Works with this project's service and with the old SD1.5 script (which answers only `image` and
    `final_resolution`). A failed request is a row with `error` set, so one bad answer does not end the run.
    """
    import pandas as pd

    from service.client import decode_image

    settings = settings or GenerationSettings()
    info = service_info(url, role, api_key)
    image_dir = Path(run_dir) / "images" / role
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with _http(url, api_key, timeout) as http:
        for prompt_id, prompt in enumerate(prompts):
            for seed in seed_list(seeds):
                row: dict[str, Any] = dict.fromkeys(GENERATION_COLUMNS)
                row.update(
                    role=role,
                    model=info.model,
                    prompt_id=prompt_id,
                    prompt=prompt.text,
                    category=prompt.category,
                    seed=seed,
                    steps=settings.num_inference_steps,
                )
                started = time.perf_counter()
                try:
                    answer = _generate(http, settings.payload(prompt.text, seed))
                    latency = time.perf_counter() - started
                    image = decode_image(answer["image"])
                except (GenerationFailed, httpx.HTTPError, OSError, ValueError, binascii.Error) as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("%s %r seed %d: %s", role, prompt.text[:40], seed, row["error"])
                else:
                    path = image_dir / f"p{prompt_id:03d}-s{seed}.{(image.format or 'png').lower()}"
                    path.write_bytes(base64.b64decode(answer["image"]))
                    timings = answer.get("timings") or {}
                    row.update(
                        image=path.relative_to(run_dir).as_posix(),
                        resolution=answer.get("final_resolution") or f"{image.width}x{image.height}",
                        latency_s=latency,
                        generation_s=float(timings.get("total", latency)),
                        peak_vram_gb=answer.get("peak_vram_gb"),
                    )
                rows.append(row)
                if on_image:
                    on_image()
    return info, pd.DataFrame(rows)


def score_generations(generations: pd.DataFrame, run_dir: str | Path, scorer: ClipScorer) -> pd.DataFrame:
    """A copy of `generations` with a `score` column (NaN where the request failed).

    Images are read from the run directory one batch at a time (hundreds of 1024 px images add up).
    """
    from PIL import Image

    def load(relative: str) -> Image.Image:
        with Image.open(Path(run_dir) / relative) as image:
            return image.convert("RGB")

    scored = generations.copy()
    scored["score"] = float("nan")
    done = scored.index[scored["image"].notna()]
    for start in range(0, len(done), scorer.batch_size):
        batch = done[start : start + scorer.batch_size]
        images = [load(relative) for relative in scored.loc[batch, "image"]]
        scored.loc[batch, "score"] = scorer.score(images, list(scored.loc[batch, "prompt"]))
    return scored


def timing_table(
    generations: pd.DataFrame, price_per_hour: float = DEFAULT_PRICE_PER_HOUR
) -> dict[str, TimingSummary]:
    """Role -> latency percentiles, steps/s, images/h, peak VRAM and cost per image."""
    summaries = {}
    for role, group in generations.groupby("role", sort=False):
        ok = group[group["error"].isna()]
        summaries[str(role)] = summarize_timing(
            latency_s=ok["latency_s"].astype(float).tolist(),
            generation_s=ok["generation_s"].astype(float).tolist(),
            steps=ok["steps"].astype(int).tolist(),
            peak_vram_gb=[None if v is None or v != v else float(v) for v in ok["peak_vram_gb"]],
            errors=int(group["error"].notna().sum()),
            price_per_hour=price_per_hour,
        )
    return summaries


def summarize(
    generations: pd.DataFrame,
    services: dict[str, ServiceInfo],
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
    """Statistics of scored generations; writes the tables, `evaluation.json` and `report.html`."""
    import pandas as pd

    from evaluation.artifacts import publish_evaluation
    from evaluation.report import render_report
    from evaluation.stats import compare_scores, per_prompt

    run_dir = Path(run_dir)
    prompts_table = per_prompt(generations)
    overall, categories = compare_scores(prompts_table, margin)
    timing = timing_table(generations, price_per_hour)
    result = EvaluationResult(
        verdict=overall.verdict,
        margin=margin,
        overall=overall,
        categories=[CategoryStats(**row) for row in categories.to_dict("records")],
        timing=timing,
        services=services,
        scorer=scorer,
        random_weights=random_weights,
        prompts=int(generations["prompt_id"].nunique()),
        seeds=list(seeds),
        settings=settings,
        price_per_hour=price_per_hour,
        run_dir=str(run_dir),
        history_file=str(history_file) if history_file else None,
    )
    timing_frame = pd.DataFrame([{"role": role, **t.model_dump()} for role, t in timing.items()])
    for name, frame in zip(TABLES, (generations, prompts_table, categories, timing_frame), strict=True):
        frame.to_parquet(run_dir / f"{name}.parquet", index=False)
        frame.to_csv(run_dir / f"{name}.csv", index=False)
    result.report = str(run_dir / "report.html")
    save_result(result)
    render_report(run_dir)
    publish_evaluation(result)
    return result


def save_result(result: EvaluationResult) -> Path:
    path = Path(result.run_dir) / RESULT_FILE
    path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_result(run_dir: str | Path) -> EvaluationResult:
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not an evaluation run directory")
    return EvaluationResult.model_validate_json(path.read_text(encoding="utf-8"))


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

    from evaluation.clip_score import load_scorer

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
    result = summarize(
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


def quality_gate(result: EvaluationResult, margin: float | None = None) -> tuple[bool, str]:
    """Passed when the candidate is "better" or "not worse within margin" and none of its requests failed."""
    margin = result.margin if margin is None else margin
    o = result.overall
    call = verdict(o.ci_low, o.ci_high, margin)
    errors = result.timing["candidate"].errors if "candidate" in result.timing else 0
    detail = (
        f"{call}: CLIP {o.candidate_mean:.2f} vs {o.baseline_mean:.2f} (diff {o.mean_diff:+.2f}, "
        f"95% CI [{o.ci_low:+.2f}, {o.ci_high:+.2f}], margin {margin:g}, win rate {o.win_rate:.0%}, "
        f"{o.n} prompts x {len(result.seeds)} seeds)"
    )
    if errors:
        detail += f"; {errors} candidate request(s) failed"
    return call != "worse" and not errors, detail


def _progress_bar() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()
    )
