"""Compiled modules saved whole (service/saved_compile.py, `SDXL_SAVE_COMPILED`): a restart loads, not traces.

Small modules (CPU, Inductor's C++ backend) check each path of `SavedCompile`: compile and save, load in a new
instance without tracing, the weights read at call time, one file per input signature, a damaged or
mismatched file compiled again, and plain torch.compile for a call that cannot be compiled whole. The engine test compiles tiny-sd15's
UNet and VAE decoder, then restarts in a fresh process, which must load both and draw the same image.
The GPU side (CUDA graphs from a loaded function) is in tests/service/test_accel.py and `sdxl-deploy bench-gpu`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch._dynamo.utils import compilation_time_metrics

from service.accel import is_compiled, plan_speed, saved_compiles
from service.saved_compile import available, saved_compile, signature
from service.settings import ServiceSettings
from tests.support.engines import generate, load_engine

REPO = Path(__file__).resolve().parents[2]
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


def _net(cls: type[Net] = Net) -> Net:
    torch.manual_seed(0)
    return cls().eval()


def _tracings() -> int:
    """How many times Dynamo has traced Python bytecode in this process."""
    return len(compilation_time_metrics.get("bytecode_tracing", []))


@torch.no_grad()
def test_a_new_instance_loads_the_saved_function_and_traces_nothing(tmp_path: Path) -> None:
    net, x = _net(), torch.randn(3, 8)
    expected = net(x, scale=2.0)
    first = saved_compile(net, tmp_path, "net", "default")
    assert is_compiled(net)
    torch.testing.assert_close(net(x, scale=2.0), expected)
    assert len(first.compiled) == 1 and first.loaded == []
    assert [p.name for p in tmp_path.iterdir()] == first.compiled  # no partial file left behind

    second = saved_compile(net, tmp_path, "net", "default")  # what a restart does
    before = _tracings()
    torch.testing.assert_close(net(x, scale=2.0), expected)
    assert second.loaded == first.compiled and second.compiled == []
    assert _tracings() == before  # loaded: Dynamo traced nothing

    # the weights are read at each call, not baked in: a fine-tune of the same architecture reuses the file
    net.b.bias.add_(1.0)
    torch.testing.assert_close(net(x, scale=2.0), expected + 2.0)


@torch.no_grad()
def test_each_input_signature_gets_its_own_saved_function(tmp_path: Path) -> None:
    net = _net()
    call = saved_compile(net, tmp_path, "net", "default")
    small, large = torch.randn(3, 8), torch.randn(5, 8)
    for x in (small, large, small, large):
        net(x)
    assert len(call.compiled) == 2 and len(set(call.compiled)) == 2  # each compiled once, then reused
    assert signature((small,), {}) != signature((large,), {})
    assert signature((small,), {"scale": 1.0}) != signature((small,), {"scale": 2.0})
    no_grad = signature((small,), {})
    with torch.enable_grad():
        assert signature((small,), {}) != no_grad  # grad mode is part of the signature


@torch.no_grad()
def test_a_damaged_or_mismatched_file_is_compiled_again(tmp_path: Path) -> None:
    net, x, y = _net(), torch.randn(3, 8), torch.randn(5, 8)
    call = saved_compile(net, tmp_path, "net", "default")
    net(x)
    saved_x = tmp_path / call.compiled[0]

    # the file for y's signature holds x's function, whose guards reject y
    shutil.copy(saved_x, call.path_for(signature((y,), {})))
    again = saved_compile(net, tmp_path, "net", "default")
    torch.testing.assert_close(net(y), net.forward(y))
    # loaded, refused by its guards, compiled again (what /health's startup counts)
    assert again.loaded == again.compiled == [call.path_for(signature((y,), {})).name]

    saved_x.write_bytes(b"not a compiled function")
    fresh = saved_compile(net, tmp_path, "net", "default")
    torch.testing.assert_close(net(x), net.forward(x))
    assert fresh.loaded == [] and fresh.compiled == [saved_x.name]  # could not load it: compiled again
    reloaded = saved_compile(net, tmp_path, "net", "default")
    net(x)
    assert reloaded.loaded == [saved_x.name] and fresh.fallbacks == []  # the rewritten file loads


@torch.no_grad()
def test_a_call_that_cannot_be_compiled_whole_runs_under_plain_compile(tmp_path: Path) -> None:
    net, x = _net(Breaks), torch.randn(3, 8)
    expected = net(x)
    call = saved_compile(net, tmp_path, "breaks", "default")
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(net(x), expected)
    assert len(call.fallbacks) == 1 and call.fallbacks[0]  # tried once, not per call; the reason kept
    assert call.compiled == [] and not any(tmp_path.iterdir())
    assert is_compiled(net) and call._plain is not None


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


# ----- the service's own modules: compile, then a restart in a fresh process ---------------------------------

_RESTART = """
import json, sys
from pathlib import Path
import numpy as np
from service.accel import saved_compiles
from tests.support.engines import generate, load_engine
engine = load_engine(Path(sys.argv[1]), "tiny-sd15", **json.loads(sys.argv[2]))
np.save(sys.argv[3], generate(engine)[0])
calls = saved_compiles((engine.base, engine.refiner, engine.img2img))
print(json.dumps({c.label: {"loaded": c.loaded, "compiled": c.compiled} for c in calls}))
"""


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_restart_loads_the_saved_unet_and_vae_decoder_and_draws_the_same_image(
    model_cache: Path, tmp_path: Path
) -> None:
    off = {"sdpa": "on", "fuse_qkv": "off", "channels_last": "off", "cudnn_benchmark": "off"}
    speed = {**off, "compile": "on", "compile_cache_dir": str(tmp_path / "cc"), "warmup_on_load": "off"}
    eager = generate(load_engine(model_cache, "tiny-sd15", **off, compile="off"))[0]

    cold = load_engine(model_cache, "tiny-sd15", **speed)
    image = generate(cold)[0]
    calls = {c.label: c for c in saved_compiles((cold.base, cold.refiner, cold.img2img))}
    assert set(calls) == {"unet", "vae-decoder"}
    assert all(len(c.compiled) == 1 and not c.loaded for c in calls.values())
    diff = np.abs(image.astype(np.int16) - eager.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.05, (diff.max(), diff.mean())

    out = tmp_path / "restart.npy"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", _RESTART, str(model_cache), json.dumps(speed), str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    restarted = json.loads(done.stdout.strip().splitlines()[-1])
    assert restarted == {label: {"loaded": c.compiled, "compiled": []} for label, c in calls.items()}, (
        done.stderr[-3000:]
    )
    assert np.array_equal(np.load(out), image)  # the same compiled code, loaded: the same pixels
