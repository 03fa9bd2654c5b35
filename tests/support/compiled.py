"""tiny-sd15's compiled functions on the CPU, built once by the real compile step (`serve --compile-only`).

A CPU compile of the tiny UNet takes minutes, so the step builds the fewest functions that prove the mechanism:
one static function (the default size, which the ready size repeats: the step compiles a signature once) and one
dynamic-shape function; the folder is built once per checkout, torch and diffusers and shared by every test process
(a file lock makes the others wait for the first): `.cache/test-compiled/<key>`, where the key hashes the
code that decides what is built and how (`BUILD_CODE`), the versions and the settings below. Tests that change files work on a copy (`copy_of`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import diffusers
import torch
from filelock import FileLock

from service.schema import CompileReport

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-sd15"
# the default size of tiny-sd15 (512 px): the deploy's ready sizes reach the step, and add no signature (another
# static function per signature is proven by the small modules of tests/service/test_saved_compile.py)
READY_SIZES = "512x512"
# CPU, compile forced on; the VAE decoder left out (its compiles would double the minutes, and its calls
# go through the same SavedCompile as the UNet's)
ENV = {
    "SDXL_DEVICE": "cpu",
    "SDXL_COMPILE": "on",
    "SDXL_COMPILE_VAE": "false",
    "SDXL_FUSE_QKV": "off",
    "SDXL_CHANNELS_LAST": "off",
    "SDXL_CUDNN_BENCHMARK": "off",
    "SDXL_COALESCE": "off",
    "SDXL_READY_SIZES": READY_SIZES,
}


# what the step builds (signatures, forms, file format) and the model it builds them for
BUILD_CODE = ("saved_compile.py", "warmup.py", "accel.py", "builders.py")


def _key() -> str:
    digest = hashlib.sha256(f"{torch.__version__} {diffusers.__version__} {sorted(ENV.items())}".encode())
    for name in BUILD_CODE:
        digest.update((REPO / "service" / name).read_bytes())
    return digest.hexdigest()[:16]


def compiled_cache(model_cache: Path) -> tuple[Path, CompileReport]:
    """The compile cache folder the step built for `ENV` (its `saved/` holds the functions) and the step's
    report from when it built them (a later test process reuses the folder; the report is the builder's)."""
    root = REPO / ".cache" / "test-compiled"
    root.mkdir(parents=True, exist_ok=True)
    folder = root / _key()
    report_file = folder / "report.json"
    with FileLock(str(root / f"{folder.name}.lock")):
        if not report_file.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            report = run_step(model_cache, folder)
            report_file.write_text(report.model_dump_json())
    return folder, CompileReport.model_validate_json(report_file.read_text())


def service_env(model_cache: Path, compile_cache: Path) -> dict[str, str]:
    """The environment of a service (or step) with `ENV`'s settings and this compile cache."""
    return {
        **ENV,
        "SDXL_COMPILE_CACHE_DIR": str(compile_cache),
        "SDXL_DEPLOY_CACHE": str(model_cache),
        "HF_HUB_OFFLINE": "1",
    }


def run_step(
    model_cache: Path, compile_cache: Path, timeout: float = 1200, extra_env: dict[str, str] | None = None
) -> CompileReport:
    """Run the compile step (`sdxl-deploy serve --compile-only`) in a process of its own; its report."""
    env = {**os.environ, **service_env(model_cache, compile_cache), **(extra_env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "sdxl_deploy.cli", "serve", "--model", MODEL, "--compile-only"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return CompileReport.model_validate(json.loads(result.stdout.strip().splitlines()[-1]))


def copy_of(compile_cache: Path, to: Path) -> Path:
    """A private copy of a built compile cache (for tests that damage or add files)."""
    shutil.copytree(compile_cache, to)
    return to
