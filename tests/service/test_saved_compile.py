"""Compiled functions built by the compile step and only loaded by the service (service/saved_compile.py,
service/compile_step.py).

Small modules (CPU, Inductor's C++ backend) check each path of `SavedCompile`: the step (build mode) saves a
static function per signature and a dynamic-shape one per call form; the service loads every file at once,
traces nothing, runs a shape no function accepts uncompiled and counts it, skips a damaged file that the next
step builds again. tiny-sd15 checks the whole of it through the real compile step (`serve --compile-only`,
built once per checkout: tests/support/compiled.py) and a real service.
The GPU side (CUDA graphs from a loaded function) is in tests/service/test_accel.py, `bench/aot_probe.py` and
`sdxl-deploy bench-gpu`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch
from torch import nn
from torch._dynamo.utils import compilation_time_metrics

from service.accel import is_compiled, plan_speed
from service.saved_compile import available, saved_compile, signature
from service.settings import ServiceSettings
from service.warmup import dynamic_warmup_size
from tests.support.compiled import compiled_cache, copy_of, run_step, service_env
from tests.support.servers import thread_server
from tests.support.small_modules import Conv

pytestmark = pytest.mark.skipif(not available(), reason="this torch cannot save compiled functions (< 2.10)")


def _passes_through(forward: Callable[..., Any]) -> Callable[..., Any]:
    """A decorator like diffusers' `apply_lora_scale` on the UNet's forward."""

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return forward(self, *args, **kwargs)

    return wrapper


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    @_passes_through
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * scale


class Breaks(Net):
    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()  # cannot be compiled whole
        return self.b(y) * scale


def _net(cls: type[nn.Module] = Net) -> Any:
    torch.manual_seed(0)
    return cls().eval()


def _tracings() -> int:
    """How many times Dynamo has traced Python bytecode in this process."""
    return len(compilation_time_metrics.get("bytecode_tracing", []))


@torch.no_grad()
def test_the_step_saves_a_function_per_signature_and_the_service_loads_them_all_tracing_nothing(
    tmp_path: Path,
) -> None:
    net, small, large = _net(), torch.randn(3, 8), torch.randn(5, 8)
    expected = net(small, scale=2.0)
    step = saved_compile(net, tmp_path, "net", "default", build=True)
    assert is_compiled(net)
    for x in (small, large, small):
        net(x, scale=2.0)
    assert len(step.compiled) == 2 and step.loaded == []  # each signature compiled once, then reused
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == sorted(step.compiled)  # no partial file left
    assert signature((small,), {"scale": 1.0}) != signature((small,), {"scale": 2.0})
    no_grad = signature((small,), {})
    with torch.enable_grad():
        assert signature((small,), {}) != no_grad  # grad mode is part of the signature

    before = _tracings()
    served = saved_compile(net, tmp_path, "net", "default")  # the service's start: every file, loaded at once
    assert sorted(served.loaded) == sorted(step.compiled) and served.compiled == []
    torch.testing.assert_close(net(small, scale=2.0), expected)
    assert _tracings() == before and served.uncompiled_calls == 0  # loaded: Dynamo traced nothing
    # the weights are read at each call, not baked in: a fine-tune of the same architecture reuses the file
    net.b.bias.add_(1.0)
    torch.testing.assert_close(net(small, scale=2.0), expected + 2.0)


@torch.no_grad()
def test_one_dynamic_function_serves_every_size_from_its_first_call_and_nothing_compiles_in_the_service(
    tmp_path: Path,
) -> None:
    net = _net(Conv)
    step = saved_compile(net, tmp_path, "conv", "default", build=True)
    step.recording = True  # a one-image warm-up generation
    net(torch.randn(2, 4, 16, 16))
    step.recording = False
    net(torch.randn(4, 4, 16, 16))  # a coalesced batch: static only
    built = step.build_dynamic()
    assert [(f.covers, f.dynamic) for f in built] == [("2x4xHxW", True)]
    assert [(f.covers, f.dynamic) for f in step.functions] == [
        ("2x4x16x16", False),
        ("4x4x16x16", False),
        ("2x4xHxW", True),
    ]  # static ones first: a call takes the exact function where there is one

    again = saved_compile(net, tmp_path, "conv", "default", build=True)  # the next release's step
    again.recording = True
    net(torch.randn(2, 4, 16, 16))
    assert [(f.covers, f.source) for f in again.build_dynamic()] == [("2x4xHxW", "loaded")]
    assert again.compiled == []  # nothing changed: everything reused

    served = saved_compile(net, tmp_path, "conv", "default")
    assert served.covers() == ["conv 2x4x16x16", "conv 4x4x16x16", "conv 2x4xHxW"]
    before = _tracings()
    with torch.compiler.set_stance("fail_on_recompile"):  # torch's own guard: nothing may compile
        for h, w in ((24, 40), (40, 24), (64, 64), (16, 16)):
            x = torch.randn(2, 4, h, w)
            torch.testing.assert_close(net(x), net.forward(x))
        assert served.uncompiled_calls == 0
        odd = torch.randn(3, 4, 24, 24)  # a batch no function was built for: answered at once, uncompiled
        torch.testing.assert_close(net(odd), net.forward(odd))
        net(odd)
    assert served.uncompiled == {"conv 3x4x24x24": 2} and served.compiled == []
    assert _tracings() == before and len(list(tmp_path.glob("*.bin"))) == 3


@torch.no_grad()
def test_a_damaged_file_is_skipped_by_the_service_and_built_again_by_the_step(tmp_path: Path) -> None:
    net, x, y = _net(), torch.randn(3, 8), torch.randn(5, 8)
    step = saved_compile(net, tmp_path, "net", "default", build=True)
    net(x)
    saved_x = tmp_path / step.compiled[0]
    saved_x.write_bytes(b"not a compiled function")

    served = saved_compile(net, tmp_path, "net", "default")
    assert served.loaded == [] and len(served.problems) == 1 and saved_x.name in served.problems[0]
    torch.testing.assert_close(net(x), net.forward(x))  # its shape runs uncompiled until the step runs
    assert served.uncompiled_calls == 1

    rebuilt = saved_compile(net, tmp_path, "net", "default", build=True)
    net(x)
    assert rebuilt.compiled == [saved_x.name]  # could not load it: compiled again
    # a file whose function does not take its signature's calls (a foreign one) is compiled again too
    saved_x.with_suffix(".json").rename(rebuilt.path_for(signature((y,), {})).with_suffix(".json"))
    saved_x.rename(rebuilt.path_for(signature((y,), {})))
    again = saved_compile(net, tmp_path, "net", "default", build=True)
    torch.testing.assert_close(net(y), net.forward(y))
    assert again.loaded == [] and again.compiled == [rebuilt.path_for(signature((y,), {})).name]
    assert saved_compile(net, tmp_path, "net", "default").problems == []


@torch.no_grad()
def test_a_call_that_cannot_be_compiled_whole_runs_under_plain_compile_in_the_step_only(
    tmp_path: Path,
) -> None:
    net, x = _net(Breaks), torch.randn(3, 8)
    expected = net(x)
    step = saved_compile(net, tmp_path, "breaks", "default", build=True)
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(net(x), expected)
    assert len(step.problems) == 1 and "cannot be compiled whole" in step.problems[0]  # tried once
    saved = [p.name for p in tmp_path.iterdir() if p.suffix != ".claim"]  # its build claim may stay: no file
    assert step.compiled == [] and saved == [] and step._plain is not None
    served = saved_compile(net, tmp_path, "breaks", "default")
    torch.testing.assert_close(net(x), expected)
    assert served.uncompiled_calls == 1 and served._plain is None


def test_save_compiled_is_on_with_compile_and_can_be_turned_off(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    assert plan_speed(ServiceSettings(cache_dir=tmp_path, compile="on"), cpu).save_compiled
    assert not plan_speed(
        ServiceSettings(cache_dir=tmp_path, compile="on", save_compiled="off"), cpu
    ).save_compiled
    assert not plan_speed(
        ServiceSettings(cache_dir=tmp_path, save_compiled="on"), cpu
    ).save_compiled  # no compile
    assert ServiceSettings(save_compiled="false").save_compiled == "off"


# ----- tiny-sd15 through the real compile step and a real service --------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test process to ask builds the functions: minutes of CPU
def test_the_compile_step_builds_static_and_dynamic_functions_and_a_second_run_reuses_them(
    model_cache: Path, tmp_path: Path
) -> None:
    folder, built = compiled_cache(model_cache)
    covers = {(f.module, f.covers, f.dynamic) for f in built.functions}
    # the default size (512 px: latents 64x64, the ready size too: one static function) and one function for
    # every other size
    assert covers == {("unet", "2x4x64x64", False), ("unet", "2x4xHxW", True)}
    assert built.built and built.compiled == 2 and built.reused == 0 and built.problems == []
    assert built.peak_vram_gb is None and built.compile_s > 0  # CPU: no GPU memory to report

    again = run_step(model_cache, copy_of(folder, tmp_path / "cc"))  # a release that changes nothing
    assert again.compiled == 0 and again.reused == 2 and again.problems == []
    assert {f.file for f in again.functions} == {f.file for f in built.functions}


@pytest.mark.parametrize(
    ("default", "ready", "expected"),
    [(1024, "", (512, 512)), (1024, "512x512,832x1216", (576, 576)), (512, "", (256, 256))],
)
def test_the_dynamic_warm_up_size_is_one_no_static_function_covers(
    default: int, ready: str, expected: tuple[int, int]
) -> None:
    """Half the default size, or the next multiple of 64 up where the default or a ready size has it."""
    spec = SimpleNamespace(default_size=default, min_size=256, max_size=2048)
    engine = SimpleNamespace(spec=spec, settings=ServiceSettings(model="tiny-sd15", ready_sizes=ready))
    assert dynamic_warmup_size(engine) == expected  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_service_loads_the_functions_and_serves_a_size_it_never_saw_compiled_from_its_first_request(
    model_cache: Path, tmp_path: Path
) -> None:
    """What a restart does too: the service loads everything the step built, compiles nothing (torch's
    `fail_on_recompile` stance held while it serves), answers 320x192 (outside the default size) through the
    dynamic function at once, and a size no function accepts (288 px: latents 36, not a multiple of the
    UNet's 8) uncompiled, counted in /metrics."""
    folder, _ = compiled_cache(model_cache)
    env = service_env(model_cache, copy_of(folder, tmp_path / "cc"))
    settings = ServiceSettings(
        model="tiny-sd15",
        **{k.removeprefix("SDXL_").lower(): v for k, v in env.items() if k.startswith("SDXL_")},
    )
    with thread_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        health = client.get("/health").json()
        compiles, startup = health["compiles"], health["startup"]
        assert {(f["covers"], f["source"]) for f in compiles["functions"]} == {
            ("2x4x64x64", "loaded"),
            ("2x4xHxW", "loaded"),
        }, compiles
        assert startup["compiled_functions"] == 0 and startup["loaded_functions"] == 2, startup
        assert startup["warnings"] == [] and compiles["problems"] == []
        # the warm-up made the dynamic function's first call too (slow on a GPU), at half the default size
        assert startup["compiled_shapes"] == ["base 512x512 x1", "base 256x256 x1"], startup
        assert compiles["uncompiled"] == {}, compiles
        with torch.compiler.set_stance("fail_on_recompile"):
            for width, height in ((320, 192), (288, 288)):
                request = {
                    "prompt": "a red bicycle",
                    "width": width,
                    "height": height,
                    "num_inference_steps": 2,
                }
                assert client.post("/generate", json=request).status_code == 200
        compiles = client.get("/health").json()["compiles"]
        assert compiles["uncompiled"] == {"unet 2x4x36x36": 2}, (
            compiles
        )  # one call per step, none for 320x192
        metrics = client.get("/metrics").text
        assert re.search(r"^sdxl_uncompiled_calls_total 2\.0$", metrics, re.M), metrics
        assert 'sdxl_compile_shape{shape="unet 2x4xHxW",state="compiled"} 1.0' in metrics, metrics
        assert 'sdxl_compile_shape{shape="unet 2x4x36x36",state="uncompiled"} 1.0' in metrics, metrics
