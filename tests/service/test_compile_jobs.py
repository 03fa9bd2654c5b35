"""The compile step in several processes side by side (`compile_jobs`, service/compile_step.py): each function
is built by the process that claims it first (service/saved_compile.py); the others run that call uncompiled,
skip it, and the reports merge into one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.compile_step import merge
from service.saved_compile import available, saved_compile, signature
from service.schema import CompiledFunction, CompileReport
from tests.support.compiled import compiled_cache, copy_of, run_step
from tests.support.small_modules import Conv

pytestmark = pytest.mark.skipif(not available(), reason="this torch cannot save compiled functions (< 2.10)")

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


class Sibling:
    """Another process of the compile step, holding the claim on building one file until it is stopped."""

    def __init__(self, claim: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(claim)], stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout is not None and self.process.stdout.readline() == "held\n"

    def stop(self) -> None:  # dies without releasing anything itself: the kernel drops its lock
        self.process.kill()
        self.process.wait()


@torch.no_grad()
def test_a_function_another_step_process_claimed_runs_uncompiled_here_and_is_left_to_it(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    net, x = Conv().eval(), torch.randn(1, 4, 16, 16)
    expected = net(x)
    step = saved_compile(net, tmp_path, "conv", "default", build=True)
    static = step.path_for(signature((x,), {}))
    sibling = Sibling(static.with_suffix(".claim"))
    try:
        torch.testing.assert_close(net(x), expected)  # answered at once, uncompiled
        assert step.functions == [] and not static.exists() and step.problems == []
    finally:
        sibling.stop()
    # the sibling died without saving: the claim is free again, and this process builds the function itself
    torch.testing.assert_close(net(x), expected)
    assert static.is_file() and step.compiled == [static.name]


@torch.no_grad()
def test_a_dynamic_function_another_process_claimed_is_skipped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, x = Conv().eval(), torch.randn(1, 4, 16, 16)
    step = saved_compile(net, tmp_path, "conv", "default", build=True)
    step.recording = True
    sibling = Sibling(step.path_for(signature((x,), {})).with_suffix(".claim"))
    try:
        net(x)
    finally:
        sibling.stop()
    (form,) = step.forms
    sibling = Sibling(step.path_for(form).with_suffix(".claim"))
    try:
        assert step.build_dynamic() == [] and step.problems == []
    finally:
        sibling.stop()
    assert [f.dynamic for f in step.build_dynamic()] == [True]


def _function(file: str, source: str, dynamic: bool = False) -> CompiledFunction:
    return CompiledFunction(
        module="unet", covers="2x4xHxW" if dynamic else "2x4x64x64", dynamic=dynamic, file=file, source=source
    )


def test_the_jobs_reports_merge_into_one_with_each_function_once() -> None:
    first = CompileReport(
        model="sdxl",
        built=True,
        functions=[_function("static.bin", "compiled"), _function("dynamic.bin", "loaded", dynamic=True)],
        load_s=20.0,
        peak_vram_gb=15.5,
        problems=["vae-decoder 1x4x129x129: cannot be compiled whole and saved (x)"],
    )
    second = CompileReport(
        model="sdxl",
        built=True,
        functions=[
            _function("static.bin", "loaded"),
            _function("dynamic.bin", "compiled", dynamic=True),
            _function("old.bin", "loaded"),
        ],
        load_s=24.0,
        peak_vram_gb=16.0,
        problems=["vae-decoder 1x4x129x129: cannot be compiled whole and saved (x)"],
    )
    merged = merge([first, second], seconds=300.0)
    assert {(f.file, f.source) for f in merged.functions} == {
        ("static.bin", "compiled"),
        ("dynamic.bin", "compiled"),
        ("old.bin", "loaded"),  # on disk before this step: reused
    }
    assert (merged.compiled, merged.reused, merged.jobs) == (2, 1, 2)
    assert merged.load_s == 24.0 and merged.compile_s == 276.0
    assert merged.peak_vram_gb == 31.5  # both processes held the model at once
    assert len(merged.problems) == 1


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test process to ask builds the functions: minutes of CPU
def test_two_jobs_of_the_real_step_load_what_is_built_and_report_once(
    model_cache: Path, tmp_path: Path
) -> None:
    """`SDXL_COMPILE_JOBS=2` through `serve --compile-only`: two processes, each loading tiny-sd15, on a folder
    the step built: every function is reused, each listed once, nothing compiled again."""
    folder, built = compiled_cache(model_cache)
    again = run_step(model_cache, copy_of(folder, tmp_path / "cc"), extra_env={"SDXL_COMPILE_JOBS": "2"})
    assert again.jobs == 2 and again.built and again.problems == []
    assert sorted(f.file for f in again.functions) == sorted(f.file for f in built.functions)
    assert again.compiled == 0 and again.reused == len(built.functions)
