"""Speed: plan the speed settings for a device and apply them to loaded pipelines.

Each technique is one setting (the "Speed" block of `ServiceSettings`); `auto` turns it on where it helps
(CUDA) and off on the CPU, so tests and CPU boxes run plain eager diffusers. What each one bought is measured
by the benchmark (`sdxl-deploy bench-gpu`, docs/BENCHMARKS.md), not assumed here.

- dtype: bfloat16 on CUDA (chosen by `engine.resolve_dtype`, setting `dtype`).
- sdpa: PyTorch's fused scaled-dot-product attention (diffusers' default; off = the classic processor).
- fuse_qkv: one matmul for q/k/v (self-attention) and k/v (cross-attention) instead of three / two.
- channels_last: NHWC UNet and VAE, the layout tensor-core convolutions want.
- cudnn_benchmark: cuDNN times its convolution algorithms once per shape and keeps the fastest.
- compile: `torch.compile` of the UNets (and the VAE decoder), with Inductor's cache persisted in
  `compile_cache_dir` so a restart reuses the compiled kernels instead of compiling for minutes.
- save_compiled: with compile, compiled modules are functions built by the compile step (`sdxl-deploy serve
  --compile-only`, `service/compile_step.py`) and kept on disk: static ones for the warm-up's sizes and one
  dynamic-shape function per call form for every other size (`service/saved_compile.py`); the service only
  loads them, and never compiles once ready.
- compile_text_encoders: with compile, the text encoders too (each text is encoded alone, batch 1, so one
  compiled shape; `service/embeddings.py` keeps the embeddings of recent texts).
- cuda_graphs: compile mode `reduce-overhead`: each UNet call is replayed as one CUDA graph, removing the
  CPU launch overhead (what limits SD1.5 at 512 px).
- warmup_on_load: short generations at the default size and the `ready_sizes` before `/ready`
  (`service/warmup.py`): they load the compiled functions' kernels and record their CUDA graphs (and build
  the functions when no compile step ran). Once ready, a shape no compiled function accepts runs uncompiled
  and is counted; nothing compiles in the serving process (`torch.compiler.set_stance`).
- coalesce: compatible requests waiting in the queue run as one batched call (`service/worker.py`), in
  batches of 2, 4, ... images up to `coalesce_max_images`; with compile on, each of those sizes is warmed up
  too (static shapes: each batch size is its own compiled graph).

Before anything is compiled, `checked_plan` compiles a tiny function (`service/compile_check.py`): when
torch.compile does not work on the device, the plan serves uncompiled and says so in its `warnings`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from service import saved_compile
from service.compile_check import compile_problem
from service.schema import CompiledFunction, CompileStatus
from service.settings import ServiceSettings, Toggle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedPlan:
    """The speed techniques in force for one loaded model (settings resolved against the device)."""

    sdpa: bool
    fuse_qkv: bool
    channels_last: bool
    cudnn_benchmark: bool
    compile: bool
    compile_vae: bool
    cuda_graphs: bool
    warmup: bool
    cache_dir: str | None
    coalesce_sizes: tuple[int, ...] = (1,)  # images per call the queue may form from waiting requests
    compile_text_encoders: bool = False
    save_compiled: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)  # settings resolved against each other
    warnings: tuple[str, ...] = field(default_factory=tuple)  # what the device could not do

    @property
    def compile_mode(self) -> str:
        """torch.compile mode: reduce-overhead records CUDA graphs; default does not."""
        return "reduce-overhead" if self.cuda_graphs else "default"

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "notes": list(self.notes),
            "warnings": list(self.warnings),
            "compile_mode": self.compile_mode,
        }


def _on(value: Toggle, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def plan_speed(
    settings: ServiceSettings, device: torch.device, backend: str = "sdxl", compile_error: str | None = None
) -> SpeedPlan:
    """Resolve the speed settings for `device`: auto = on for CUDA, off on the CPU (sdpa: on everywhere);
    coalescing's and compiled text encoders' auto is on for SD1.5 on CUDA only (measured: docs/BENCHMARKS.md).
    `compile_error`: why torch.compile does not work on the device; compile then stays off, with a warning."""
    cuda = device.type == "cuda"
    notes: list[str] = []
    warnings: list[str] = []
    sdpa = _on(settings.sdpa, True)
    fuse_qkv = _on(settings.fuse_qkv, cuda)
    if settings.attention_slicing and (sdpa or fuse_qkv):
        notes.append("attention_slicing keeps its own attention processor: sdpa and fuse_qkv not applied")
        sdpa = fuse_qkv = False
    if fuse_qkv and not sdpa:
        notes.append("fuse_qkv needs sdpa (its processor is SDPA-based): not applied")
        fuse_qkv = False
    compile_ = _on(settings.compile, cuda)
    if compile_ and compile_error:
        warnings.append(f"torch.compile does not work here ({compile_error}): serving uncompiled")
        compile_ = False
    if compile_ and settings.cpu_offload:
        notes.append("compile off: cpu_offload moves modules between devices at every call")
        compile_ = False
    cuda_graphs = _on(settings.cuda_graphs, compile_ and cuda)
    if cuda_graphs and not (compile_ and cuda):
        notes.append("cuda_graphs needs compile on a CUDA device: not applied")
        cuda_graphs = False
    save_compiled = compile_ and _on(settings.save_compiled, True)
    if save_compiled and not saved_compile.available():
        notes.append(f"save_compiled needs torch >= 2.10 (this is {torch.__version__}): not applied")
        save_compiled = False
    cache_dir = None
    if compile_:
        cache_dir = str(settings.compile_cache_dir or Path(settings.cache_dir) / "torch-compile")
    coalesce_sizes = (1,)
    if _on(settings.coalesce, cuda and backend == "sd15"):
        coalesce_sizes = tuple(2**i for i in range(settings.coalesce_max_images.bit_length()))
    return SpeedPlan(
        sdpa=sdpa,
        fuse_qkv=fuse_qkv,
        channels_last=_on(settings.channels_last, cuda),
        cudnn_benchmark=_on(settings.cudnn_benchmark, cuda) and cuda,
        compile=compile_,
        compile_vae=compile_ and settings.compile_vae,
        cuda_graphs=cuda_graphs,
        warmup=_on(settings.warmup_on_load, compile_),
        cache_dir=cache_dir,
        coalesce_sizes=coalesce_sizes,
        compile_text_encoders=compile_ and _on(settings.compile_text_encoders, backend == "sd15"),
        save_compiled=save_compiled,
        notes=tuple(notes),
        warnings=tuple(warnings),
    )


def checked_plan(settings: ServiceSettings, device: torch.device, backend: str = "sdxl") -> SpeedPlan:
    """`plan_speed`, after making sure torch.compile works on `device` when the plan compiles: if a tiny
    function does not compile and run there (`service/compile_check.py`), the plan serves uncompiled."""
    plan = plan_speed(settings, device, backend)
    if plan.compile:
        if plan.cache_dir:  # the check is the process's first compile: Inductor's caches must be set first
            use_compile_cache(plan.cache_dir)
        problem = compile_problem(device)
        if problem is not None:
            plan = plan_speed(settings, device, backend, compile_error=problem)
            for warning in plan.warnings:
                log.warning("speed: %s", warning)
    return plan


def use_compile_cache(cache_dir: str | Path) -> Path:
    """Point Inductor's on-disk caches (FX graphs, AOT autograd, Triton kernels) at `cache_dir`.

    Must run before the first compilation of the process. The setting wins over a `TORCHINDUCTOR_CACHE_DIR`
    already in the environment: torch itself puts its default (/tmp/torchinductor_<user>, gone after a
    reboot) there as soon as Inductor is first used, and child processes inherit it.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    # 1x1 convolutions as matmuls: Inductor fuses their epilogues (diffusers' SDXL compile recipe)
    inductor_config.conv_1x1_as_mm = True
    return path


def _modules(pipes: Iterable[Any], names: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Module]]:
    """(name, module) of each pipeline's modules of those names, each shared module once."""
    for name, module, _ in _indexed_modules(pipes, names):
        yield name, module


def _indexed_modules(
    pipes: Iterable[Any], names: tuple[str, ...]
) -> Iterator[tuple[str, torch.nn.Module, int]]:
    """`_modules` with the index of the pipeline each module was first found in."""
    seen: set[int] = set()
    for index, pipe in enumerate(pipes):
        if pipe is None:
            continue
        for name in names:
            module = getattr(pipe, name, None)
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                yield name, module, index


def apply_speed(plan: SpeedPlan, pipes: Iterable[Any], *, build: bool = False) -> list[str]:
    """Apply `plan` to the pipelines' UNets and VAEs in place (shared modules once); return what was done.
    `build`: the compile step's load (saved-compile calls compile what they meet; the service's only load)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    done: list[str] = []
    if plan.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        done.append("cudnn_benchmark")
    if plan.compile and plan.cache_dir:
        done.append(f"compile_cache={use_compile_cache(plan.cache_dir)}")
    pipes = list(pipes)
    for name, module, index in _indexed_modules(pipes, ("unet", "vae")):
        if hasattr(module, "set_attn_processor"):  # the tiny VAE (AutoencoderTiny) has no attention
            if not plan.sdpa and not plan.fuse_qkv:
                module.set_attn_processor(AttnProcessor())
            elif plan.sdpa and not plan.fuse_qkv:
                module.set_attn_processor(AttnProcessor2_0())
            if plan.fuse_qkv and not getattr(module, "_sdxl_deploy_fused", False):
                module.fuse_qkv_projections()  # sets the SDPA-based FusedAttnProcessor2_0
                module._sdxl_deploy_fused = True
        if plan.channels_last:
            module.to(memory_format=torch.channels_last)
        # dynamic=False: base and refiner UNets share forward's code object, so with automatic dynamic
        # shapes the refiner's first call turned into a slow symbolic-shape recompile (> 6 min on SDXL);
        # static shapes compile each (model, size) once, cached on disk.
        if plan.compile and name == "unet":  # the engine passes (base, refiner, img2img)
            _compile(plan, module, name, "refiner unet" if index == 1 else "unet", build=build)
        elif plan.compile_vae and name == "vae":
            _compile(plan, module.decoder, "vae-decoder", build=build)
        done.append(f"{name}:{'sdpa' if plan.sdpa else 'classic-attn'}{'+fused' if plan.fuse_qkv else ''}")
    if plan.compile_text_encoders:
        for name, module in _modules(pipes, ("text_encoder", "text_encoder_2")):
            # plain torch.compile: a saved text encoder (transformers' CLIP) refers to module aliases that only
            # the process which traced it has, so it cannot be loaded (torch 2.14)
            module.compile(mode=plan.compile_mode, fullgraph=False, dynamic=False)
            done.append(f"{name}:compiled")
    log.info("speed plan: %s; applied: %s", plan.as_dict(), ", ".join(done))
    return done


def _compile(
    plan: SpeedPlan, module: torch.nn.Module, label: str, name: str | None = None, *, build: bool = False
) -> None:
    """Compile `module`'s calls: saved whole on disk with `save_compiled`, else plain torch.compile."""
    if plan.save_compiled and plan.cache_dir:
        saved_compile.saved_compile(
            module, Path(plan.cache_dir) / saved_compile.FOLDER, label, plan.compile_mode, name, build=build
        )
    else:
        module.compile(mode=plan.compile_mode, fullgraph=False, dynamic=False)


def saved_compiles(pipes: Iterable[Any]) -> list[saved_compile.SavedCompile]:
    """The saved-compile calls of the pipelines' UNets and VAE decoders (what `_compile` saves; shared ones once)."""
    modules = [m if name == "unet" else m.decoder for name, m in _modules(pipes, ("unet", "vae"))]
    calls = (getattr(m, "_compiled_call_impl", None) for m in modules)
    return [c for c in calls if isinstance(c, saved_compile.SavedCompile)]


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` wrapped this module's call."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_status(pipes: Iterable[Any]) -> CompileStatus | None:
    """The saved-compile calls' functions, what each covers, and the shapes run uncompiled; None without."""
    calls = saved_compiles(pipes)
    if not calls:
        return None
    return CompileStatus(
        functions=[
            CompiledFunction(
                module=call.name, covers=f.covers, dynamic=f.dynamic, file=f.file, source=f.source
            )
            for call in calls
            for f in call.functions
        ],
        compiled=[cover for call in calls for cover in call.covers()],
        uncompiled={shape: count for call in calls for shape, count in call.uncompiled.items()},
        uncompiled_calls=sum(call.uncompiled_calls for call in calls),
        problems=[problem for call in calls for problem in call.problems],
    )
