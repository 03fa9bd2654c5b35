"""A local Hugging Face hub for tests: tiny random weights in git repos laid out like the real hub repos,
served by `olah` (a real hub mirror server, fully offline) and reached by the real `huggingface_hub`
client through `HF_ENDPOINT`.

Why olah runs from its own small virtual environment (`.cache/olah-venv`, built here on first use) and not
from the project's: `pip install --dry-run olah==0.5.4` into the project's environment would downgrade
psutil 7 -> 5.9 (olah needs fastapi-utils, which pins psutil<6; accelerate uses psutil) and ties our
fastapi/pydantic/huggingface_hub to olah's lower bounds. It is a separate server process anyway, so it
keeps its own dependencies and the service's stay untouched.

Repos carry the real ids (from `service.models`) and the real diffusers layout: `*.fp16.safetensors`
beside the plain weights only where the real repo ships them (SD1.5, SDXL base and refiner), plain weights
only for `madebyollin/sdxl-vae-fp16-fix` and the TAESD repos. Left out: the real repos' single-file
checkpoints, ONNX/OpenVINO exports, `.bin` copies and images. Weights are git-LFS pointer files with the
object under `.git/lfs/objects/aa/bb/<oid>`, as olah reads them (git-lfs itself is not needed).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from filelock import FileLock

from service.models import REGISTRY, TINY_VAES
from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
OLAH = "olah==0.5.4"
OLAH_VENV = REPO / ".cache" / "olah-venv"
# Test-only repos (not on the real hub), for the "missing file" errors.
WEIGHTLESS_TAESD = "sdxl-deploy-tests/taesd-without-weights"
NO_SUCH_REPO = "sdxl-deploy-tests/no-such-repo"
SD15 = REGISTRY["sd15"].base
SDXL_BASE = REGISTRY["sdxl"].base
SDXL_REFINER = REGISTRY["sdxl"].refiner
SDXL_VAE = REGISTRY["sdxl"].vae
TAESD, TAESDXL = TINY_VAES["sd15"], TINY_VAES["sdxl"]


def olah_python(venv: Path = OLAH_VENV) -> Path:
    """The interpreter of olah's own virtual environment, created (once, under a file lock) if missing."""
    python, stamp = venv / "bin" / "python", venv / f".installed-{OLAH}"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(venv.parent / f".{venv.name}.lock")):
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", OLAH], check=True)
            stamp.touch()
    return python


# ----- the repos ----------------------------------------------------------------------------------


def _save_pipeline(pipe, folder: Path, *, fp16: bool) -> None:
    """save_pretrained, plus the `fp16` variant files beside the plain ones where the real repo has them."""
    if fp16:
        pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
        pipe.to(torch.float32)
    pipe.save_pretrained(folder)  # last, so the configs are the plain ones


def _sd15(folder: Path) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from service.builders import build_model

    base, _ = build_model("tiny-sd15")
    # The real repo ships a safety checker and its feature extractor; the service loads it without them.
    tiny = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    torch.manual_seed(3)
    config = CLIPConfig(
        text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 4}, projection_dim=32
    )
    base.register_modules(
        safety_checker=StableDiffusionSafetyChecker(config),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
    )
    base.register_to_config(requires_safety_checker=True)
    _save_pipeline(base, folder, fp16=True)


def _sdxl_base(folder: Path) -> None:
    from service.builders import build_model

    _save_pipeline(build_model("tiny-sdxl")[0], folder, fp16=True)


def _sdxl_refiner(folder: Path) -> None:
    from service.builders import build_model

    _save_pipeline(build_model("tiny-sdxl")[1], folder, fp16=True)


def _sdxl_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    from service.builders import model_spec

    torch.manual_seed(4)  # the fp16-fix VAE: the SDXL VAE retrained so it needs no float32 upcast
    AutoencoderKL(**model_spec("tiny-sdxl").vae, force_upcast=False).save_pretrained(folder)


def _taesd(name: str) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        from service.builders import build_tiny_vae

        build_tiny_vae(name).save_pretrained(folder)

    return write


def _taesd_without_weights(folder: Path) -> None:
    _taesd("tiny-sd15")(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()


REPOS: dict[str, Callable[[Path], None]] = {
    SD15: _sd15,
    SDXL_BASE: _sdxl_base,
    SDXL_REFINER: _sdxl_refiner,
    SDXL_VAE: _sdxl_vae,
    TAESDXL: _taesd("tiny-sdxl"),
    TAESD: _taesd("tiny-sd15"),
    WEIGHTLESS_TAESD: _taesd_without_weights,
}
_GIT = [
    "git",
    "-c",
    "user.name=sdxl-deploy tests",
    "-c",
    "user.email=tests@localhost",
    "-c",
    "core.hooksPath=/dev/null",
]
_LFS_ATTRIBUTES = (
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)


def write_git_repo(folder: Path, repo_id: str) -> None:
    """Turn a folder of model files into a git repo as olah serves it: weights as git-LFS pointers."""
    lfs = folder / ".git" / "lfs" / "objects"
    subprocess.run([*_GIT, "init", "-q", "-b", "main", str(folder)], check=True)
    for path in sorted(folder.rglob("*")):
        if (
            path.is_file()
            and ".git" not in path.relative_to(folder).parts
            and path.suffix in (".safetensors", ".bin")
        ):
            data = path.read_bytes()
            oid = hashlib.sha256(data).hexdigest()
            obj = lfs / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            path.write_text(
                f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
            )
    (folder / ".gitattributes").write_text(_LFS_ATTRIBUTES)
    (folder / "README.md").write_text(
        f"---\nlibrary_name: diffusers\n---\n# {repo_id} (tiny random-weight stand-in, tests/support/hub_mirror.py)\n"
    )
    subprocess.run([*_GIT, "-C", str(folder), "add", "-A"], check=True)
    subprocess.run([*_GIT, "-C", str(folder), "commit", "-q", "-m", f"tiny {repo_id}"], check=True)


def build_mirror(root: Path) -> Path:
    """Write every repo of `REPOS` under `root/models/<org>/<repo>`; returns `root` (olah's mirrors-path)."""
    for repo_id, write in REPOS.items():
        folder = root / "models" / repo_id
        folder.mkdir(parents=True)
        write(folder)
        write_git_repo(folder, repo_id)
    return root


# ----- the server ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mirror:
    """A running olah: `url` is what HF_ENDPOINT points at."""

    url: str
    root: Path
    log: Path

    def env(self, hf_home: Path, *, offline: bool = False) -> dict[str, str]:
        """The environment a client (the service) needs to download through this mirror into `hf_home`."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_XET": "1",
        }


@contextmanager
def olah_server(mirrors: Path, workdir: Path, *, timeout: float = 90.0) -> Iterator[Mirror]:
    """Run olah (offline, serving the git repos under `mirrors`) on a free loopback port; stop it by PID."""
    python = olah_python()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'repos-path = "{workdir / "cache"}"\n'
        f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
        f'mirrors-path = ["{mirrors}"]\n'
        "[accessibility]\noffline = true\n"
    )
    log = workdir / "olah.log"
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "olah.server", "-c", str(config), "--log-path", str(workdir / "logs")],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_serving(url, proc, log, timeout)
        yield Mirror(url=url, root=mirrors, log=log)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"olah exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/api/models/{SDXL_VAE}/revision/main", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(
        f"olah not serving {url} after {timeout} s:\n{log.read_text(errors='replace')[-3000:]}"
    )


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirror]:
    """The mirror, built once per test session and served by one olah for the whole session."""
    root = build_mirror(tmp_path_factory.mktemp("hub-mirror"))
    with olah_server(root, tmp_path_factory.mktemp("olah")) as mirror:
        yield mirror


def main() -> None:
    """`python -m tests.support.hub_mirror [DIR]`: build the mirror into DIR (default .cache/hub-mirror, reused when
    it exists) and serve it until Ctrl-C, printing the environment a service needs to load from it."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / ".cache" / "hub-mirror").resolve()
    mirrors = root / "mirrors"
    if not (mirrors / "models").is_dir():
        print(f"building the tiny hub repos into {mirrors} ...", flush=True)
        build_mirror(mirrors)
    with olah_server(mirrors, root / "olah") as mirror:
        env = mirror.env(root / "hf-home")
        print("serving " + ", ".join(REPOS) + f" at {mirror.url}\nin another shell:")
        print("  " + " ".join(f"{k}={v}" for k, v in env.items()) + " SDXL_DTYPE=bfloat16 \\")
        print("    .venv/bin/sdxl-deploy serve --model sdxl\nCtrl-C stops the mirror.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
