"""The service's own generation path in this process with compilation off: the same-seed reference images the
served service is compared with, and the eager techniques switched on one by one (the ablation)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.images import image_diff
from bench.measure import cuda_sync, free_memory, p50
from bench.scenarios import Scenario, scenario_sizes

if TYPE_CHECKING:
    from bench.harness import Bench

# every speed switch off: the ablation turns them on one at a time
ALL_OFF = {
    "compile": "off",
    "cuda_graphs": "off",
    "fuse_qkv": "off",
    "channels_last": "off",
    "sdpa": "off",
    "cudnn_benchmark": "off",
    "warmup_on_load": "off",
}
ABLATION: tuple[tuple[str, dict[str, str]], ...] = (
    ("classic_attention", {}),
    ("sdpa", {"sdpa": "on"}),
    ("sdpa+fuse_qkv", {"sdpa": "on", "fuse_qkv": "on"}),
    ("sdpa+fuse_qkv+channels_last", {"sdpa": "on", "fuse_qkv": "on", "channels_last": "on"}),
    (
        "sdpa+fuse_qkv+channels_last+cudnn_benchmark",
        {"sdpa": "on", "fuse_qkv": "on", "channels_last": "on", "cudnn_benchmark": "on"},
    ),
)


def run_eager(bench: Bench, family: str, model_dir: Path) -> None:
    """The service's path with compilation off: reference images and the eager ablation."""
    from service.accel import apply_speed, plan_speed
    from service.engine import Engine
    from service.settings import ServiceSettings

    # every text encoded every time, like plain diffusers (the eager timings repeat one prompt)
    settings = ServiceSettings(
        model=str(model_dir), cache_dir=bench.c.work / "cache", prompt_cache_size=0, **ALL_OFF
    )
    engine = Engine(settings)
    started = time.perf_counter()
    engine.load()
    out: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 2), "dtype": str(engine.dtype)}
    first = bench.scenarios(family)[0]
    for label, flags in ABLATION if bench.c.ablation else ():
        plan = plan_speed(settings.model_copy(update={**ALL_OFF, **flags}), engine.device)
        apply_speed(plan, (engine.base, engine.refiner, engine.img2img))
        times = time_engine(
            engine, first, 2 if not bench.c.tiny else 1, tiny=bench.c.tiny, warm=label == "classic_attention"
        )
        out.setdefault("ablation_" + first.name, {})[label] = times
        bench.results.eager[family] = out
        bench.save()
    # reference images: the eager path with every eager technique on (what the service runs, minus compile)
    for s in bench.scenarios(family):
        times, image = time_engine(engine, s, 2, tiny=bench.c.tiny, keep_image=True)
        out[s.name] = times
        bench.references[s.name] = image
        if s.name in bench.baseline_images:
            floor = image_diff(image, bench.baseline_images[s.name])
            out[s.name]["vs_plain_fp16_same_seed"] = floor
            bench.dtype_floor[s.name] = floor["psnr_db"]
    bench.results.eager[family] = out
    del engine
    free_memory()


def time_engine(
    engine: Any, s: Scenario, reps: int, *, tiny: bool, keep_image: bool = False, warm: bool = True
) -> Any:
    """Seconds of `reps` calls of the engine on scenario `s` (and the last image, with `keep_image`)."""
    from service.schema import GenerateRequest
    from service.worker import Job

    steps, size = scenario_sizes(s, tiny)
    req = GenerateRequest(
        prompt=s.prompt,
        num_inference_steps=steps,
        width=size,
        height=size,
        seed=s.seed,
        use_refiner=s.use_refiner,
        refiner_split=s.refiner_split,
    )
    params = engine.params(req)
    if warm:
        engine.generate(params, Job())  # warm-up (cuDNN, allocator)
    runs = []
    result = None
    for _ in range(reps):
        cuda_sync()
        t0 = time.perf_counter()
        result = engine.generate(params, Job())
        cuda_sync()
        runs.append(time.perf_counter() - t0)
    times = {"p50_s": p50(runs), "runs_s": [round(x, 4) for x in runs]}
    if keep_image:
        assert result is not None
        return times, np.asarray(result.image)
    return times
