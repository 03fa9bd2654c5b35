"""Probe, random weights (timings only, never quality): can ONE compiled SDXL UNet, built ahead of time in its
own process, be loaded by another process and serve every image size without recompiling?

The full-size SDXL base UNet (published architecture, `service.builders.model_spec`, random weights) in bf16
with fused QKV and channels_last, called as the pipeline calls it (CFG batch 2, `return_dict=False`, under
`torch.no_grad`), at each size in SIZES:
- `eager`: plain eager, and each shape captured as a CUDA graph by hand;
- `dyn-compile`: one whole-graph compile with the latent's H and W marked dynamic, through the ahead-of-time
  compile `service/saved_compile.py` uses (same options, guard filter and external data), saved to a file;
- `dyn-load`: a fresh process with empty Inductor / Triton caches loads that file and calls it at every size
  under `set_stance("fail_on_recompile")`: plain, each shape captured as a CUDA graph by hand, and loaded
  again with reduce-overhead's CUDA-graph trees;
- `static`: the same compile with `dynamic=False` at 1024x1024, saved, loaded back, timed;
- `aoti-build` / `aoti-load` (when asked, or with --aoti-on-failure): `torch.export` with `Dim` ranges for H
  and W, AOTInductor package, loaded in a fresh process.
Every measurement is one JSON line, printed and appended to OUT/probe.jsonl as it comes (a run cut short
keeps its figures); a table is printed last and OUT/aot_probe.json written.

    python3 -m bench.aot_probe --out DIR [--phases eager,dyn-compile,dyn-load,static] [--budget 560]

Ran on an H100 (torch 2.11, 2026-12-07): the figures are in docs/BENCHMARKS.md ("Compiling as a build step").
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024),
    (512, 512),
    (832, 1216),
    (1216, 832),
    (768, 1344),
)  # W x H
EXAMPLE = (832, 1216)  # the compile's example: non-square, so H and W cannot be duck-sized into one symbol
STEADY = 10  # calls per steady-state median
PHASES = ("eager", "dyn-compile", "dyn-load", "static")
MIN_LEFT_S = {
    "eager": 60,
    "dyn-compile": 300,
    "dyn-load": 90,
    "static": 150,
    "aoti-build": 300,
    "aoti-load": 90,
}
ARTIFACT = {"dyn-compile": "unet-dynamic.bin", "dyn-load": "unet-dynamic.bin", "static": "unet-static.bin"}
ARTIFACT.update({"aoti-build": "unet-dynamic.pt2", "aoti-load": "unet-dynamic.pt2"})
NEEDS = {"dyn-load": "dyn-compile", "aoti-load": "aoti-build"}  # a phase that loads what another built
Kwargs = dict[str, Any]

_out: Path = Path(".")
_phase = "driver"


def emit(what: str, **fields: Any) -> None:
    """One measurement: printed, and appended to OUT/probe.jsonl."""
    line = json.dumps({"phase": _phase, "what": what, **fields}, default=str)
    print(line, flush=True)
    with (_out / "probe.jsonl").open("a", encoding="utf-8") as file:
        file.write(line + "\n")


def error(what: str, exc: BaseException, **fields: Any) -> None:
    traceback.print_exc()
    emit(what, error=f"{type(exc).__name__}: {exc}"[:1500], **fields)


def label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def memory() -> dict[str, float]:
    """This process's peak CUDA memory since the last call (GiB), then reset."""
    import torch

    gib = {
        "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "now_alloc_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
    }
    torch.cuda.reset_peak_memory_stats()
    return gib


def build_unet() -> Any:
    """The SDXL base UNet as bench/unet.py sets it up (the service's CUDA speed set-up, uncompiled)."""
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from diffusers import UNet2DConditionModel

    from service.builders import model_spec

    inductor_config.fx_graph_cache = True  # what service.accel.use_compile_cache sets
    functorch_config.enable_autograd_cache = True
    inductor_config.conv_1x1_as_mm = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**model_spec("synthetic-sdxl").unet)
    unet = unet.to(torch.bfloat16).eval()
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    return unet


def unet_inputs(size: tuple[int, int]) -> Kwargs:
    """What the SDXL pipeline hands the UNet for one image with CFG at `size` (width x height)."""
    import torch

    from service.builders import model_spec

    width, height = size
    gen = torch.Generator("cuda").manual_seed(0)
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    cross = model_spec("synthetic-sdxl").unet["cross_attention_dim"]
    return {
        "sample": torch.randn(2, 4, height // 8, width // 8, generator=gen, **bf16),
        "timestep": torch.tensor(500.0, device="cuda"),
        "encoder_hidden_states": torch.randn(2, 77, cross, generator=gen, **bf16),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 1280, generator=gen, **bf16),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2, **bf16),
        },
        "return_dict": False,
    }


def timed(call: Callable[[], Any], n: int, step: bool = False) -> list[float]:
    """Milliseconds of `n` synchronised calls (`step`: a new CUDA-graph-tree step before each)."""
    import torch

    ms = []
    for _ in range(n):
        if step:
            torch.compiler.cudagraph_mark_step_begin()
        torch.cuda.synchronize()
        started = time.perf_counter()
        call()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - started) * 1000)
    return ms


def time_sizes(
    variant: str,
    call: Callable[[Kwargs], Any],
    sizes: tuple[tuple[int, int], ...] = SIZES,
    step: bool = False,
    check: Callable[[Kwargs], bool] | None = None,
) -> dict[str, Any]:
    """First call, calls 2-3 and the steady median at each size; the first output per size (plain only)."""
    outputs: dict[str, Any] = {}
    for size in sizes:
        kw = unet_inputs(size)
        try:
            if check is not None:
                started = time.perf_counter()
                accepted = check(kw)
                emit(
                    "guard_check",
                    variant=variant,
                    size=label(size),
                    accepted=accepted,
                    ms=round((time.perf_counter() - started) * 1000, 3),
                )
                if not accepted:
                    continue
            once = functools.partial(call, kw)
            first = timed(once, 1, step)[0]
            if not step:
                outputs[label(size)] = once()[0].float().cpu()
            warm = timed(once, 2, step)
            steady = statistics.median(timed(once, STEADY, step))
        except Exception as exc:  # noqa: BLE001 - a size failing is a finding, not the end of the probe
            error("calls", exc, variant=variant, size=label(size))
            continue
        emit(
            "calls",
            variant=variant,
            size=label(size),
            first_call_s=round(first / 1000, 3),
            calls_2_3_s=round(sum(warm) / 1000, 3),
            steady_ms=round(steady, 2),
        )
    return outputs


def graph_sizes(
    variant: str, call: Callable[[Kwargs], Any], sizes: tuple[tuple[int, int], ...] = SIZES
) -> None:
    """Each shape captured by hand as one CUDA graph (2 warm-ups, 1 capture, one shared pool), then replayed."""
    import torch

    pool = torch.cuda.graph_pool_handle()
    graphs = []
    for size in sizes:
        kw = unet_inputs(size)
        try:
            started = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    call(kw)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                call(kw)
            torch.cuda.synchronize()
            record_s = time.perf_counter() - started
            graph.replay()
            steady = statistics.median(timed(graph.replay, STEADY))
        except Exception as exc:  # noqa: BLE001
            error("cuda_graph", exc, variant=variant, size=label(size))
            continue
        graphs.append((kw, graph))
        emit(
            "cuda_graph",
            variant=variant,
            size=label(size),
            record_s=round(record_s, 3),
            steady_ms=round(steady, 2),
        )
    emit("memory", stage=f"{variant} + hand CUDA graphs", **memory())
    del graphs


def rel_errors(variant: str, unet: Any, outputs: dict[str, Any]) -> None:
    """||out - eager|| / ||eager|| per size (same weights, same inputs)."""
    import torch

    for size in SIZES:
        if label(size) in outputs:
            ref = unet(**unet_inputs(size))[0].float().cpu()
            err = float((outputs[label(size)] - ref).norm() / ref.norm())
            emit("rel_err", variant=variant, size=label(size), rel_err=round(err, 5))
    torch.cuda.empty_cache()


def aot_compile(unet: Any, kw: Kwargs, mode: str, dynamic: bool | None) -> Any:
    """`service.saved_compile.SavedCompile._compile`'s compile, `dynamic` as given."""
    import torch

    from service.saved_compile import _saveable_guards

    options = {**torch._inductor.list_mode_options(mode), "guard_filter_fn": _saveable_guards}
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = torch.compile(unet.forward, fullgraph=True, dynamic=dynamic, options=options)
    return compiled.aot_compile(((), kw))


def save(fn: Any, unet: Any, path: Path) -> None:
    from service.saved_compile import _wrapped_functions

    if "external_data" in inspect.signature(fn.save_compiled_function).parameters:
        fn.save_compiled_function(str(path), external_data=_wrapped_functions(unet))
    else:
        fn.save_compiled_function(str(path))


def load(unet: Any, path: Path, cudagraphs: bool) -> Any:
    """`SavedCompile._load`: Inductor's CUDA-graph option is read when the function is loaded."""
    import torch

    from service.saved_compile import _wrapped_functions

    extra: Kwargs = {}
    if "external_data" in inspect.signature(torch.compiler.load_compiled_function).parameters:
        extra["external_data"] = _wrapped_functions(unet)
    with path.open("rb") as file, torch._inductor.config.patch({"triton.cudagraphs": cudagraphs}):
        return torch.compiler.load_compiled_function(file, **extra)


def phase_eager(_: Path, __: str) -> None:
    import torch

    from bench.measure import environment

    emit("environment", **environment())
    unet = build_unet()
    emit("memory", stage="built", **memory())
    with torch.no_grad():
        time_sizes("eager", lambda kw: unet(**kw))
        emit("memory", stage="eager calls", **memory())
        graph_sizes("eager", lambda kw: unet(**kw))


def phase_dyn_compile(path: Path, mode: str) -> None:
    import torch
    import torch.fx.experimental._config as fx_config

    unet = build_unet()
    memory()
    fx_config.use_duck_shape = False  # equal H and W must not become one symbol
    fn = None
    for marker in ("mark_dynamic", "maybe_mark_dynamic"):
        kw = unet_inputs(EXAMPLE)
        for dim in (2, 3):
            getattr(torch._dynamo, marker)(kw["sample"], dim)
        torch._dynamo.reset()
        started = time.perf_counter()
        try:
            with torch.no_grad():
                fn = aot_compile(unet, kw, mode, dynamic=None)
        except Exception as exc:  # noqa: BLE001
            error("compile", exc, marker=marker, s=round(time.perf_counter() - started, 1))
            if "constraint" not in f"{type(exc).__name__} {exc}".lower():
                break  # only a dim the trace specialised is worth a second try with the lenient marker
            continue
        emit(
            "compile",
            marker=marker,
            mode=mode,
            example=label(EXAMPLE),
            s=round(time.perf_counter() - started, 1),
        )
        break
    if fn is None:
        raise SystemExit(1)
    emit("memory", stage="compile", **memory())
    started = time.perf_counter()
    save(fn, unet, path)
    emit("save", s=round(time.perf_counter() - started, 2), mib=round(path.stat().st_size / 2**20, 1))
    with torch.no_grad():
        for size in SIZES:
            emit(
                "guard_check_in_compiler",
                size=label(size),
                accepted=fn.guard_check(unet, **unet_inputs(size)),
            )


def phase_dyn_load(path: Path, _: str) -> None:
    import torch

    unet = build_unet()
    memory()
    started = time.perf_counter()
    fn = load(unet, path, cudagraphs=False)
    emit("load", variant="aot dynamic", s=round(time.perf_counter() - started, 2))
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):

        def check(kw: Kwargs) -> bool:
            if fn.guard_check(unet, **kw):
                return True
            from torch._dynamo.aot_compile import bind_locals

            f_locals = bind_locals(fn._artifacts.signature, unet, **kw)
            emit("guard_failure", reason=str(fn._artifacts.guard_manager.check_verbose(f_locals))[:1500])
            return False

        fn.disable_guard_check()  # checked once per size by `check`, as SavedCompile checks before calling
        outputs = time_sizes("aot dynamic", lambda kw: fn(unet, **kw), check=check)
        emit("memory", stage="load + plain calls", **memory())
        graph_sizes("aot dynamic", lambda kw: fn(unet, **kw))
        torch.cuda.empty_cache()
        started = time.perf_counter()
        fn_cg = load(unet, path, cudagraphs=True)
        emit("load", variant="aot dynamic, CUDA-graph trees", s=round(time.perf_counter() - started, 2))
        fn_cg.disable_guard_check()
        time_sizes("aot dynamic, CUDA-graph trees", lambda kw: fn_cg(unet, **kw), step=True)
        emit("memory", stage="CUDA-graph trees", **memory())
        counters = torch._dynamo.utils.counters["inductor"]
        emit("inductor_counters", **{k: v for k, v in counters.items() if "cudagraph" in k})
        rel_errors("aot dynamic", unet, outputs)


def phase_static(path: Path, mode: str) -> None:
    import torch

    unet = build_unet()
    memory()
    size = (1024, 1024)
    torch._dynamo.reset()
    started = time.perf_counter()
    with torch.no_grad():
        fn = aot_compile(unet, unet_inputs(size), mode, dynamic=False)
    emit("compile", variant="aot static", size=label(size), s=round(time.perf_counter() - started, 1))
    emit("memory", stage="static compile", **memory())
    save(fn, unet, path)
    emit("save", variant="aot static", mib=round(path.stat().st_size / 2**20, 1))
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        plain = load(unet, path, cudagraphs=False)
        emit(
            "guard_check",
            variant="aot static",
            size="512x512",
            accepted=plain.guard_check(unet, **unet_inputs((512, 512))),
        )
        plain.disable_guard_check()
        time_sizes("aot static", lambda kw: plain(unet, **kw), sizes=(size,))
        graph_sizes("aot static", lambda kw: plain(unet, **kw), sizes=(size,))
        trees = load(unet, path, cudagraphs=True)
        trees.disable_guard_check()
        time_sizes("aot static, CUDA-graph trees", lambda kw: trees(unet, **kw), sizes=(size,), step=True)
        emit("memory", stage="static load + calls", **memory())


def aoti_shapes() -> Kwargs:
    from torch.export import Dim

    h, w = Dim("h", min=8, max=24), Dim("w", min=8, max=24)  # latent 64..192 in steps of 8
    return {
        "sample": {2: 8 * h, 3: 8 * w},
        "timestep": None,
        "encoder_hidden_states": None,
        "added_cond_kwargs": {"text_embeds": None, "time_ids": None},
        "return_dict": None,
    }


def phase_aoti_build(path: Path, _: str) -> None:
    import torch

    unet = build_unet()
    memory()
    started = time.perf_counter()
    with torch.no_grad():
        program = torch.export.export(
            unet, (), kwargs=unet_inputs(EXAMPLE), dynamic_shapes=aoti_shapes(), strict=False
        )
    emit("export", s=round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    emit(
        "compile",
        variant="aoti dynamic",
        s=round(time.perf_counter() - started, 1),
        mib=round(path.stat().st_size / 2**20, 1),
    )
    emit("memory", stage="aoti build", **memory())


def phase_aoti_load(path: Path, _: str) -> None:
    import torch

    started = time.perf_counter()
    runner = torch._inductor.aoti_load_package(str(path))
    emit("load", variant="aoti dynamic", s=round(time.perf_counter() - started, 2))
    with torch.no_grad():
        outputs = time_sizes("aoti dynamic", lambda kw: runner(**kw))
        emit("memory", stage="aoti load + calls", **memory())
        graph_sizes("aoti dynamic", lambda kw: runner(**kw))
        rel_errors("aoti dynamic", build_unet(), outputs)


RUN: dict[str, Callable[[Path, str], None]] = {
    "eager": phase_eager,
    "dyn-compile": phase_dyn_compile,
    "dyn-load": phase_dyn_load,
    "static": phase_static,
    "aoti-build": phase_aoti_build,
    "aoti-load": phase_aoti_load,
}


def records() -> list[Kwargs]:
    path = _out / "probe.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines]


def dynamic_served_all() -> bool:
    done = {
        r["size"]
        for r in records()
        if r["what"] == "calls" and r.get("variant") == "aot dynamic" and "steady_ms" in r
    }
    return len(done) == len(SIZES)


def drive(phases: list[str], budget: float, mode: str, aoti_on_failure: bool) -> None:
    """Each phase in a fresh child process with its own empty Inductor and Triton caches."""
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="aot-probe-"))
    failed: set[str] = set()
    queue = list(phases)
    while queue:
        phase = queue.pop(0)
        left = budget - (time.perf_counter() - started)
        if left < MIN_LEFT_S[phase] or NEEDS.get(phase) in failed:
            emit("skipped", child=phase, left_s=round(left))
            continue
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{phase}"),
            "TRITON_CACHE_DIR": str(work / f"triton-{phase}"),
        }
        command = [
            sys.executable,
            "-m",
            "bench.aot_probe",
            "--out",
            str(_out),
            "--phase",
            phase,
            "--artifact",
            str(work / ARTIFACT.get(phase, "none")),
            "--mode",
            mode,
        ]
        child_started = time.perf_counter()
        try:
            rc: int | str = subprocess.run(command, env=env, timeout=left, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        emit("child", child=phase, rc=rc, wall_s=round(time.perf_counter() - child_started, 1))
        if rc != 0:
            failed.add(phase)
        if phase == "dyn-load" and aoti_on_failure and (rc != 0 or not dynamic_served_all()):
            queue = ["aoti-build", "aoti-load", *queue]
    summary = records()
    (_out / "aot_probe.json").write_text(
        json.dumps({"records": summary}, indent=1, default=str), encoding="utf-8"
    )
    print(table(summary))


def table(rows: list[Kwargs]) -> str:
    """Every measurement as one line: phase, what, variant / stage, size, then its figures."""
    keys = ("phase", "what", "variant", "stage", "size", "child", "marker")
    out = [f"{'phase':12} {'what':22} {'variant / stage':40} {'size':10} figures"]
    for r in rows:
        if r["what"] == "environment":
            out.append(
                f"environment: {r.get('gpu')} torch {r.get('torch')} diffusers {r.get('diffusers')} "
                f"cuda {r.get('cuda')} driver {r.get('driver')}"
            )
            continue
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k not in keys)
        out.append(
            f"{r['phase']:12} {r['what']:22} {str(r.get('variant') or r.get('stage') or r.get('child') or ''):40} "
            f"{str(r.get('size') or ''):10} {figures}"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    global _out, _phase
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(RUN)}")
    parser.add_argument("--budget", type=float, default=560.0, help="seconds for all phases together")
    parser.add_argument(
        "--mode", default="reduce-overhead", help="compile mode whose options are compiled in"
    )
    parser.add_argument(
        "--aoti-on-failure", action="store_true", help="AOTInductor if the dynamic load fails"
    )
    parser.add_argument("--phase", choices=list(RUN), help=argparse.SUPPRESS)
    parser.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _out = args.out
    _out.mkdir(parents=True, exist_ok=True)
    if args.phase:
        _phase = args.phase
        RUN[args.phase](args.artifact, args.mode)
    else:
        drive([p for p in args.phases.split(",") if p], args.budget, args.mode, args.aoti_on_failure)


if __name__ == "__main__":
    main()
