"""Compiles off the request path (issue 18): once ready, a shape with no compiled function is answered
uncompiled at once and compiled on the compile thread (`saved_compile.BackgroundCompiler`); later calls use
the compiled function; a compile that fails leaves the shape uncompiled with a warning; the `ready_sizes`
are compiled before `/ready`, and `/health` and `/metrics` say which shapes are compiled or compiling.

Small modules on the CPU (Inductor's C++ backend) check the mechanism; one real service (tiny-sd15, compile forced
on, one ready size: two UNet compiles, a few minutes on a 2-core CPU) checks the ready sizes end to end.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from service.saved_compile import REQUEST_SWITCH_S, BackgroundCompiler, available, saved_compile
from tests.support.servers import settings_for, thread_server

pytestmark = pytest.mark.skipif(not available(), reason="this torch cannot save compiled functions (< 2.10)")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Breaks(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.relu(self.a(x))
        torch._dynamo.graph_break()  # cannot be compiled whole
        return self.b(y)


def _ready(cls: type[Net], cache: Path, warnings: list[str]) -> tuple[Net, Any]:
    """A module compiled for batch 3 before "ready", then with the compile thread attached."""
    torch.manual_seed(0)
    net = cls().eval()
    call = saved_compile(net, cache, cls.__name__.lower(), "default")
    net(torch.randn(3, 8))  # before ready: compiled in the call (the warm-up)
    call.background = BackgroundCompiler(on_failure=warnings.append)
    return net, call


@torch.no_grad()
def test_a_new_shape_is_answered_uncompiled_at_once_and_compiled_aside(tmp_path: Path) -> None:
    warnings: list[str] = []
    net, call = _ready(Net, tmp_path, warnings)
    x = torch.randn(5, 8)
    compiled_before = list(call.compiled)
    answer = net(x)
    # answered before its compile finished: nothing was compiled in the call, the shape is still waiting
    assert call.shapes["net 5x8"] in ("queued", "compiling") and call.compiled == compiled_before
    assert call.uncompiled_calls == 1
    torch.testing.assert_close(answer, net.forward(x))
    assert call.background.wait_idle(120)
    assert call.shapes == {"net 3x8": "compiled", "net 5x8": "compiled"} and len(call.compiled) == 2

    # later calls at that shape run the compiled function (same numbers up to rounding)
    traced = len(call.compiled)
    torch.testing.assert_close(net(x), answer)
    assert call.uncompiled_calls == 1 and len(call.compiled) == traced and warnings == []


@torch.no_grad()
def test_a_request_beside_a_compile_gets_the_gil_in_short_turns(tmp_path: Path) -> None:
    """While a compile runs, a request's GIL switch interval is 20 us (not 5 ms per torch op), then restored."""
    net, call = _ready(Net, tmp_path, [])
    compiler = call.background
    default = sys.getswitchinterval()
    with compiler.request_running():
        assert sys.getswitchinterval() == default  # nothing compiling: untouched
    net(torch.randn(5, 8))
    with compiler.request_running():
        assert sys.getswitchinterval() == pytest.approx(REQUEST_SWITCH_S)
    assert sys.getswitchinterval() == default
    assert compiler.wait_idle(120)


@torch.no_grad()
def test_a_failed_compile_leaves_the_shape_uncompiled_with_a_warning(tmp_path: Path) -> None:
    warnings: list[str] = []
    net, call = _ready(Breaks, tmp_path, warnings)  # batch 3 ran under plain torch.compile (before ready)
    x = torch.randn(5, 8)
    torch.testing.assert_close(net(x), net.forward(x))
    assert call.background.wait_idle(120)
    assert call.shapes["breaks 5x8"] == "failed"
    assert len(warnings) == 1 and "breaks 5x8" in warnings[0] and "stays uncompiled" in warnings[0]
    for _ in range(2):  # tried once: the shape stays on the uncompiled path, no compile in any call
        torch.testing.assert_close(net(x), net.forward(x))
    assert call.uncompiled_calls == 3 and call.background.idle() and len(warnings) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_ready_sizes_are_compiled_before_ready_and_health_counts_them(
    model_cache: Path, tmp_path: Path
) -> None:
    """A real service (tiny-sd15, compile forced on for the UNet, ready size 256x256): the first time `/ready`
    answers 200, `/health` lists the default size (512 px: latents 64x64) and the ready size (32x32) as
    compiled, nothing compiling, and its start-up facts count the two functions the warm-up compiled and
    saved; a request at the ready size then runs compiled, nothing uncompiled."""
    cache = tmp_path / "compile-cache"
    settings = settings_for(
        "tiny-sd15",
        model_cache,
        device="cpu",
        compile="on",
        compile_vae=False,  # the VAE decoder at 512 px is the slowest CPU compile
        fuse_qkv="off",
        channels_last="off",
        cudnn_benchmark="off",
        warmup_on_load="on",
        ready_sizes="256x256",
        coalesce="off",
        compile_cache_dir=cache,
    )
    with thread_server(settings, wait=False) as url, httpx.Client(base_url=url, timeout=60) as client:
        deadline = time.monotonic() + 850
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.5)
        health = client.get("/health").json()
        compiles, startup = health["compiles"], health["startup"]
        assert set(compiles["compiled"]) == {"unet 2x4x64x64", "unet 2x4x32x32"}, compiles
        assert compiles["compiling"] == [] and compiles["failed"] == [], compiles
        assert startup["phase"] == "ready" and startup["compile"] is True and startup["warnings"] == []
        assert (
            startup["compiled_shapes"] == ["base 512x512 x1", "base 256x256 x1"] and startup["warmup_s"] > 0
        )
        assert startup["compiled_functions"] == 2 and startup["loaded_functions"] == 0  # the UNet's CFG calls
        assert startup["compile_fallbacks"] == []
        assert len(list((cache / "saved").glob("unet-*.bin"))) == 2
        request = {
            "prompt": "a red bicycle",
            "width": 256,
            "height": 256,
            "num_inference_steps": 2,
            "seed": 1,
        }
        assert client.post("/generate", json=request).status_code == 200
        metrics = client.get("/metrics").text
        assert re.search(r"^sdxl_uncompiled_calls_total 0\.0$", metrics, re.M), metrics
        assert 'sdxl_compile_shape{shape="unet 2x4x32x32",state="compiled"} 1.0' in metrics, metrics
        assert client.get("/health").json()["compiles"]["compiling"] == []
