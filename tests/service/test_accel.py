"""Speed settings (service/accel.py): every switch's on/off path on tiny models, same images either way.

CPU tests load tiny-sdxl and check what each setting does to the loaded modules and that the image stays
the same (same seed) within a stated tolerance. torch.compile is checked for its wiring on the CPU (a real
CPU compile of even a tiny UNet takes minutes); the real compile, CUDA graphs and the persisted cache run in
the `gpu`-marked tests, which `sdxl-deploy bench-gpu` runs on the GPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from service import saved_compile
from service.accel import is_compiled, plan_speed, saved_compiles
from service.engine import Engine
from service.schema import GenerateRequest
from service.settings import ServiceSettings
from service.worker import Job
from tests.support.engines import load_engine

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Eager techniques only reorder floating-point work: on the CPU in float32 the 8-bit image may move by a
# level here and there, never more than this.
MAX_LEVELS, MAX_MEAN_LEVELS = 2, 0.05
ALL_OFF = {
    "sdpa": "off",
    "fuse_qkv": "off",
    "channels_last": "off",
    "cudnn_benchmark": "off",
    "compile": "off",
    "cuda_graphs": "off",
    "warmup_on_load": "off",
}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """As conftest's, repeated so the GPU machine can run this file with `--noconftest` (no SSH/Prefect)."""
    path = Path(os.environ.get("SDXL_DEPLOY_CACHE", REPO / ".cache" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _engine(model_cache: Path, model: str = "tiny-sdxl", **overrides: object) -> Engine:
    """A loaded engine with every speed switch off unless `overrides` turns it on."""
    return load_engine(model_cache, model, **{**ALL_OFF, **overrides})


def _image(engine: Engine, *, size: int = 64, steps: int = 3, seed: int = 7) -> np.ndarray:
    req = GenerateRequest(
        prompt="a red bicycle", num_inference_steps=steps, width=size, height=size, seed=seed
    )
    params = engine.params(req)
    return np.asarray(engine.generate(params, Job()).image).astype(np.int16)


def _processors(engine: Engine) -> set[type]:
    modules = (engine.base.unet, engine.refiner.unet, engine.base.vae)
    return {type(p) for m in modules for p in m.attn_processors.values()}


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> np.ndarray:
    """The image with every speed technique off (classic attention, eager, float32 on the CPU)."""
    return _image(_engine(model_cache))


def _assert_close(image: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(image - reference)
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MAX_MEAN_LEVELS, (diff.max(), diff.mean())


# ----- the plan: what auto means where ----------------------------------------------------------------


def test_auto_is_plain_eager_on_the_cpu_and_everything_on_cuda(tmp_path: Path) -> None:
    settings = ServiceSettings(model="tiny-sdxl", cache_dir=tmp_path)
    cpu = plan_speed(settings, CPU)
    assert cpu.sdpa and not (cpu.fuse_qkv or cpu.channels_last or cpu.cudnn_benchmark)
    assert not (cpu.compile or cpu.cuda_graphs or cpu.warmup) and cpu.cache_dir is None
    cuda = plan_speed(settings, CUDA)
    assert cuda.sdpa and cuda.fuse_qkv and cuda.channels_last and cuda.cudnn_benchmark
    assert cuda.compile and cuda.compile_vae and cuda.cuda_graphs and cuda.warmup
    assert cuda.compile_mode == "reduce-overhead"
    assert cuda.cache_dir == str(tmp_path / "torch-compile")


def test_each_switch_turns_off_on_cuda(tmp_path: Path) -> None:
    off = plan_speed(ServiceSettings(model="tiny-sdxl", cache_dir=tmp_path, **ALL_OFF), CUDA)
    assert not any((off.sdpa, off.fuse_qkv, off.channels_last, off.cudnn_benchmark, off.compile, off.warmup))
    graphs_off = plan_speed(ServiceSettings(cache_dir=tmp_path, cuda_graphs="off"), CUDA)
    assert graphs_off.compile and not graphs_off.cuda_graphs and graphs_off.compile_mode == "default"
    no_vae = plan_speed(ServiceSettings(cache_dir=tmp_path, compile_vae=False), CUDA)
    assert no_vae.compile and not no_vae.compile_vae
    custom = plan_speed(ServiceSettings(cache_dir=tmp_path, compile_cache_dir=tmp_path / "cc"), CUDA)
    assert custom.cache_dir == str(tmp_path / "cc")


def test_switches_read_true_false_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDXL_COMPILE", "false")
    monkeypatch.setenv("SDXL_FUSE_QKV", "1")
    monkeypatch.setenv("SDXL_CUDA_GRAPHS", "OFF")
    settings = ServiceSettings()
    assert (settings.compile, settings.fuse_qkv, settings.cuda_graphs) == ("off", "on", "off")
    with pytest.raises(ValueError, match="compile"):
        ServiceSettings(compile="sometimes")


def test_compiled_text_encoders_are_auto_for_sd15_only_and_need_compile(tmp_path: Path) -> None:
    auto = ServiceSettings(cache_dir=tmp_path)
    assert plan_speed(auto, CUDA, "sd15").compile_text_encoders
    assert not plan_speed(auto, CUDA, "sdxl").compile_text_encoders
    assert not plan_speed(auto, CPU, "sd15").compile_text_encoders
    forced = ServiceSettings(cache_dir=tmp_path, compile_text_encoders="on")
    assert plan_speed(forced, CUDA, "sdxl").compile_text_encoders
    assert not plan_speed(forced.model_copy(update={"compile": "off"}), CUDA, "sdxl").compile_text_encoders
    off = ServiceSettings(cache_dir=tmp_path, compile_text_encoders="false")
    assert not plan_speed(off, CUDA, "sd15").compile_text_encoders


def test_conflicting_settings_are_resolved_and_explained(tmp_path: Path) -> None:
    sliced = plan_speed(ServiceSettings(cache_dir=tmp_path, attention_slicing=True), CUDA)
    assert not sliced.sdpa and not sliced.fuse_qkv and "attention_slicing" in sliced.notes[0]
    offload = plan_speed(ServiceSettings(cache_dir=tmp_path, cpu_offload=True), CUDA)
    assert not offload.compile and not offload.cuda_graphs and "cpu_offload" in " ".join(offload.notes)
    graphs_cpu = plan_speed(ServiceSettings(cache_dir=tmp_path, cuda_graphs="on", compile="on"), CPU)
    assert graphs_cpu.compile and not graphs_cpu.cuda_graphs and "cuda_graphs" in " ".join(graphs_cpu.notes)
    fuse_classic = plan_speed(ServiceSettings(cache_dir=tmp_path, sdpa="off", fuse_qkv="on"), CPU)
    assert not fuse_classic.fuse_qkv and "fuse_qkv needs sdpa" in fuse_classic.notes[0]


# ----- each eager switch, on the tiny model, same image -------------------------------------------------


def test_every_module_keeps_the_requested_dtype(model_cache: Path) -> None:
    """Img2Img.from_pipe used to cast the shared base modules back to float32 (bf16 requested)."""
    engine = _engine(model_cache, dtype="bfloat16", sdpa="on")
    modules = [getattr(engine.base, n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")]
    assert {m.dtype for m in [*modules, engine.refiner.unet]} == {torch.bfloat16}
    assert engine.img2img.unet is engine.base.unet
    assert _image(engine).shape == (64, 64, 3)  # base -> refiner hand-over in one dtype


def test_all_off_runs_the_classic_attention_processor(model_cache: Path) -> None:
    engine = _engine(model_cache)
    assert _processors(engine) == {AttnProcessor}
    assert engine.speed is not None and not engine.speed.compile and engine.startup.facts().warmup_s is None


def test_sdpa_on_sets_the_sdpa_processor_and_keeps_the_image(
    model_cache: Path, reference: np.ndarray
) -> None:
    engine = _engine(model_cache, sdpa="on")
    assert _processors(engine) == {AttnProcessor2_0}
    _assert_close(_image(engine), reference)


def test_fuse_qkv_fuses_every_attention_and_keeps_the_image(model_cache: Path, reference: np.ndarray) -> None:
    engine = _engine(model_cache, sdpa="on", fuse_qkv="on")
    assert _processors(engine) == {FusedAttnProcessor2_0}
    attention = [m for m in engine.base.unet.modules() if type(m).__name__ == "Attention"]
    assert attention and all(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in attention)
    # the refiner shares the base's VAE: fused once, not twice
    assert engine.refiner.vae is engine.base.vae
    _assert_close(_image(engine), reference)


def test_channels_last_changes_the_layout_and_keeps_the_image(
    model_cache: Path, reference: np.ndarray
) -> None:
    engine = _engine(model_cache, channels_last="on")
    conv = engine.base.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert engine.refiner.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_close(_image(engine), reference)


def test_cudnn_benchmark_stays_off_without_cuda(model_cache: Path) -> None:
    before = torch.backends.cudnn.benchmark
    engine = _engine(model_cache, cudnn_benchmark="on")
    assert engine.speed is not None and not engine.speed.cudnn_benchmark
    assert torch.backends.cudnn.benchmark == before


def test_compile_wraps_unets_and_vae_decoder_and_uses_the_cache_dir(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache = tmp_path / "compile-cache"
    engine = _engine(model_cache, compile="on", compile_cache_dir=cache)
    assert engine.speed is not None and engine.speed.compile and engine.speed.compile_mode == "default"
    assert is_compiled(engine.base.unet) and is_compiled(engine.refiner.unet)
    assert is_compiled(engine.base.vae.decoder) and not is_compiled(engine.base.text_encoder)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and cache.is_dir()
    # saved whole by default (SDXL_SAVE_COMPILED); off, or a torch older than 2.10: plain torch.compile
    if saved_compile.available():
        assert {c.label for c in saved_compiles((engine.base, engine.refiner))} == {"unet", "vae-decoder"}
        assert len(saved_compiles((engine.base, engine.refiner))) == 3  # base and refiner UNets, one decoder
    else:  # the seed stack (torch 2.5): compiled all the same, nothing saved, and it says why
        assert not saved_compiles((engine.base, engine.refiner))
        assert any("save_compiled needs torch >= 2.10" in note for note in engine.speed.notes)
    plain = _engine(model_cache, compile="on", compile_cache_dir=cache, save_compiled="off")
    assert is_compiled(plain.base.unet) and not saved_compiles((plain.base, plain.refiner))
    # the pipelines still see the same module objects (so save_pretrained, .config etc. keep working)
    assert engine.img2img.unet is engine.base.unet


def test_compile_text_encoders_wraps_every_text_encoder_once(model_cache: Path) -> None:
    engine = _engine(model_cache, compile="on", compile_text_encoders="on")
    assert is_compiled(engine.base.text_encoder) and is_compiled(engine.base.text_encoder_2)
    assert engine.refiner.text_encoder_2 is engine.base.text_encoder_2  # shared, compiled once


def test_compile_off_and_compile_vae_off_leave_modules_plain(model_cache: Path) -> None:
    engine = _engine(model_cache, compile="on", compile_vae=False)
    assert is_compiled(engine.base.unet) and not is_compiled(engine.base.vae.decoder)
    plain = _engine(model_cache)
    assert not is_compiled(plain.base.unet) and not is_compiled(plain.base.vae.decoder)


def test_the_compile_step_builds_nothing_where_compiled_functions_cannot_be_saved_and_says_so(
    model_cache: Path, tmp_path: Path
) -> None:
    """The seed stack's torch (2.5) cannot save compiled functions, nor can `save_compiled=off`: the step
    (`serve --compile-only`) has nothing to build and says what the service does instead (compile its sizes
    before /ready in its own process); compile off on a CPU: nothing to build, served uncompiled."""
    from service.compile_step import build

    cannot_save = "off" if saved_compile.available() else "auto"  # the seed stack: auto is off there
    settings = ServiceSettings(
        model="tiny-sd15",
        cache_dir=model_cache,
        device="cpu",
        compile="on",
        save_compiled=cannot_save,
        compile_cache_dir=tmp_path / "cc",
    )
    report = build(settings)
    assert not report.built and report.functions == [] and report.compiled == 0
    assert "cannot save compiled functions" in report.note and "before /ready" in report.note
    assert not (tmp_path / "cc" / saved_compile.FOLDER).exists()
    off = build(ServiceSettings(model="tiny-sd15", cache_dir=model_cache, device="cpu"))
    assert not off.built and off.note.startswith("nothing to build") and "serves uncompiled" in off.note
    assert off.load_s == 0.0  # decided from the settings and the device: the model was not loaded


def test_warmup_on_load_generates_before_ready(model_cache: Path, reference: np.ndarray) -> None:
    engine = _engine(model_cache, warmup_on_load="on")
    # what the deploy flow (`startup.warmup_s`) and the benchmarks read from /health
    facts = engine.startup.facts()
    assert facts.warmup_s is not None and facts.warmup_s > 0
    assert facts.compiled_shapes == ["base 1024x1024 x1", "base + refiner 1024x1024 x1"]
    assert (
        facts.milestones["base_loaded"]
        <= facts.milestones["warmup_started"]
        <= facts.milestones["warmup_done"]
    )
    assert facts.phase == "warming_up" and not facts.compile  # ready is the service's to say (ServiceState)
    _assert_close(_image(engine), reference)  # warming up leaves no state behind


# ----- GPU: the real compile, CUDA graphs, the persisted cache -----------------------------------------


@pytest.fixture(scope="module")
def gpu_worker() -> Iterator[ThreadPoolExecutor]:
    """One GPU worker thread for every GPU test here, as the service has one: torch keeps its CUDA-graph trees
    in the thread-local state of the thread that first used them, so a second thread cannot record any."""
    with ThreadPoolExecutor(max_workers=1) as worker:
        yield worker


def _unet_inputs(engine: Engine, size: int) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Fixed random inputs of one CFG UNet call of the base model at `size` px."""
    unet = engine.base.unet
    gen = torch.Generator("cpu").manual_seed(0)
    latent = size // 8
    args = {
        "sample": torch.randn(2, 4, latent, latent, generator=gen),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, engine.base.text_encoder_2.config.projection_dim, generator=gen),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32),
        },
    }
    return _to(args, engine.device, engine.dtype)


def _to(value: object, device: torch.device, dtype: torch.dtype) -> object:
    if isinstance(value, dict):
        return {k: _to(v, device, dtype) for k, v in value.items()}
    assert isinstance(value, torch.Tensor)
    return value.to(device=device, dtype=dtype)


@pytest.mark.gpu
@gpu
def test_gpu_compiled_cuda_graphs_match_eager_and_fill_the_cache(
    model_cache: Path, tmp_path: Path, gpu_worker: ThreadPoolExecutor
) -> None:
    """tiny-sdxl on CUDA in float32: eager vs compile + CUDA graphs + fused QKV + channels_last, loaded,
    warmed up and run on one worker thread as in the service. One UNet call agrees to 1e-3 relative, the
    same-seed image to a level on average; graph replays are bit-identical; the cache is on disk. A second
    engine on the same cache (a restart) loads every saved compiled function, compiles nothing, runs them as
    CUDA graphs and draws the same pixels."""
    eager = _engine(model_cache, device="cuda", dtype="float32", sdpa="on")
    reference = _image(eager, size=1024)  # tiny-sdxl's default size: what warm-up compiled
    inputs = _unet_inputs(eager, 1024)
    with torch.no_grad():
        expected = eager.base.unet(**inputs).sample
    cache = tmp_path / "cc"

    def load_and_run() -> tuple[Engine, list[np.ndarray], torch.Tensor]:
        fast = _engine(
            model_cache,
            device="cuda",
            dtype="float32",
            sdpa="on",
            fuse_qkv="on",
            channels_last="on",
            compile="on",
            cuda_graphs="on",
            warmup_on_load="on",
            compile_cache_dir=cache,
        )
        images = [_image(fast, size=1024) for _ in range(3)]
        with torch.no_grad():
            unet_out = fast.base.unet(**inputs, return_dict=False)[0].clone()  # a tuple, as pipelines ask
        return fast, images, unet_out

    def graphed_functions() -> int:
        """Functions this thread's CUDA-graph tree has taken in (each compiled call replayed as graphs)."""
        from torch._inductor.cudagraph_trees import get_manager

        manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        return 0 if manager is None else len(manager.ids_to_funcs)

    fast, images, got = gpu_worker.submit(load_and_run).result()
    graphed = gpu_worker.submit(graphed_functions).result()
    # a second engine on the same cache: what a restart does (SDXL_SAVE_COMPILED, auto on with compile)
    again, images_again, got_again = gpu_worker.submit(load_and_run).result()
    graphed_again = gpu_worker.submit(graphed_functions).result() - graphed
    assert fast.startup.facts().warmup_s is not None and is_compiled(fast.base.unet)
    assert np.array_equal(images[1], images[2])  # graph replays are deterministic
    diff = np.abs(images[2] - reference)
    assert diff.mean() <= 1.0 and diff.max() <= 16, (diff.mean(), diff.max())
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-3, rel
    assert any(Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", cache)).rglob("*"))
    # the second engine loaded the compiled UNets and VAE decoder whole, and their CUDA graphs draw the same
    first = saved_compiles((fast.base, fast.refiner, fast.img2img))
    second = saved_compiles((again.base, again.refiner, again.img2img))
    assert sorted(f for c in first for f in c.compiled) == sorted(f for c in second for f in c.loaded)
    assert len(first) == 3 and not any(c.compiled or c.problems for c in second)
    assert np.array_equal(images_again[2], images[2])
    assert graphed >= 4 and graphed_again == graphed  # the loaded functions run as CUDA graphs too
    torch.testing.assert_close(got_again, got)


@pytest.mark.gpu
@gpu
def test_gpu_compiled_text_encoder_keeps_what_it_encoded(
    model_cache: Path, gpu_worker: ThreadPoolExecutor
) -> None:
    """tiny-sd15 on CUDA in float32, text encoder compiled with CUDA graphs: the embeddings kept from its
    first calls survive its later graph replays (which reuse the graph's output memory) and match eager."""
    from service.embeddings import TextEmbeddings

    def load(**speed: object) -> Engine:
        return _engine(model_cache, "tiny-sd15", device="cuda", dtype="float32", **speed)

    texts = ["a red bicycle", "a blue boat", "", "a green tractor"]

    def encode(engine: Engine, store: TextEmbeddings, text: str) -> torch.Tensor:
        return store.call_kwargs(engine.base, [text], None, guided=False)["prompt_embeds"]

    def compiled_run() -> tuple[dict[str, torch.Tensor], bool]:
        fast = load(compile="on", cuda_graphs="on", compile_text_encoders="on")
        kept = {text: encode(fast, fast.embeddings, text) for text in texts}
        churn = TextEmbeddings(0)
        for _ in range(3):  # eager warm-up, recording, replays
            for text in texts:
                encode(fast, churn, text)
        return kept, is_compiled(fast.base.text_encoder)

    kept, compiled = gpu_worker.submit(compiled_run).result()
    assert compiled
    eager = load()
    for text in texts:
        expected = encode(eager, TextEmbeddings(0), text)
        assert torch.allclose(kept[text], expected, rtol=1e-3, atol=1e-4), text
        assert not kept[text].requires_grad
