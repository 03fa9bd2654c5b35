"""The model registry: one name (or path) in, one `ModelSpec` out, whatever the source.

Every spec is loaded by the same `from_pretrained` path (see `service.engine`): hub ids for the real
models, local folders for generated ones (written once with `save_pretrained`) and for user folders.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from service.schema import Backend


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's parts come from and what sizes it serves."""

    name: str
    backend: Backend
    base: str
    refiner: str | None = None
    vae: str | None = None
    tiny_vae: str | None = None  # the family's tiny autoencoder, loaded only with SDXL_TINY_VAE=on
    default_size: int = 1024
    min_size: int = 512
    max_size: int = 2048
    generated: bool = False
    single_file: bool = False
    description: str = ""

    @property
    def approx_download_gb(self) -> float:
        """Disk the weights need on the GPU box (used by preflight); generated models are small."""
        if self.generated:
            return 0.1 if self.name.startswith("tiny") else 15.0
        return {"sd15": 4.3, "sdxl": 14.0}[self.backend]


# Tiny autoencoders (TAESD) trained for each family's latents: the opt-in fast decoder (SDXL_TINY_VAE=on)
TINY_VAES: dict[Backend, str] = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}

REGISTRY: dict[str, ModelSpec] = {
    "sd15": ModelSpec(
        name="sd15",
        backend="sd15",
        base="stable-diffusion-v1-5/stable-diffusion-v1-5",
        tiny_vae=TINY_VAES["sd15"],
        default_size=512,
        min_size=256,
        max_size=1024,
        description="Stable Diffusion 1.5 (real weights from the hub).",
    ),
    "sdxl": ModelSpec(
        name="sdxl",
        backend="sdxl",
        base="stabilityai/stable-diffusion-xl-base-1.0",
        refiner="stabilityai/stable-diffusion-xl-refiner-1.0",
        vae="madebyollin/sdxl-vae-fp16-fix",
        tiny_vae=TINY_VAES["sdxl"],
        default_size=1024,
        min_size=512,
        max_size=2048,
        description="SDXL 1.0 base + refiner with the fp16-safe VAE (real weights from the hub).",
    ),
}

# Size ranges of the models this project generates itself (random weights).
_GENERATED_SIZES = {"tiny": (64, 1024), "synthetic": (256, 2048)}
# The family of each generated model (`service.builders.SPECS` builds them), known without importing torch.
GENERATED_FAMILIES: dict[str, Backend] = {
    "tiny-sd15": "sd15",
    "tiny-sdxl": "sdxl",
    "synthetic-sd15": "sd15",
    "synthetic-sdxl": "sdxl",
}


def known_models() -> dict[str, str]:
    """Every registry name with a one-line description."""
    from service.builders import GENERATED_MODELS

    return {**{n: s.description for n, s in REGISTRY.items()}, **GENERATED_MODELS}


def resolve_model(name: str, cache_dir: Path, refiner: str | None = None) -> ModelSpec:
    """Turn a registry name or a path into a spec; generated models are built into `cache_dir` once."""
    from service.builders import GENERATED_MODELS, ensure_model

    if name in REGISTRY:
        spec = REGISTRY[name]
    elif name in GENERATED_MODELS:
        spec = spec_from_path(ensure_model(name, cache_dir, **_build_options(name)))
    else:
        require_model_exists(name)
        spec = spec_from_path(Path(name).expanduser())
    return replace(spec, refiner=refiner) if refiner else spec


def require_model_exists(name: str) -> None:
    """`ValueError` naming `name`, the known models and the nearest one, when it is neither a known model nor
    an existing path: what `resolve_model` refuses, found without building or reading a model."""
    if name in REGISTRY or name in GENERATED_FAMILIES or Path(name).expanduser().exists():
        return
    known = sorted([*REGISTRY, *GENERATED_FAMILIES])
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(
        f"model={name!r} is neither a known model ({', '.join(known)}) nor an existing path{hint}"
    )


def family_spec(name: str, backend: Backend, base: str, *, generated: bool = False) -> ModelSpec:
    """A spec from a model's name and family alone: its default size and the range its kind serves (no file
    is read, nothing is built). What the control side validates requests against before the box loads it."""
    return _sized(ModelSpec(name=name, backend=backend, base=base, generated=generated), generated=generated)


def family_of_pipeline(class_name: str) -> Backend:
    """The family a diffusers folder belongs to, from `model_index.json`'s `_class_name`."""
    return "sdxl" if "XL" in class_name else "sd15"


def _build_options(name: str) -> dict[str, object]:
    """Full-size synthetic models are built on the GPU in float16 (fast, half the disk)."""
    import torch

    if name.startswith("synthetic") and torch.cuda.is_available():
        return {"device": "cuda", "dtype": torch.float16}
    return {}


def spec_from_path(path: Path) -> ModelSpec:
    """A spec for a local model: a generated model folder, a diffusers folder or a .safetensors file."""
    path = path.resolve()
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise ValueError(
                f"model={str(path)!r}: a single-file checkpoint must end in .safetensors or .ckpt"
            )
        backend = _backend_of_checkpoint(path)
        return _sized(
            ModelSpec(name=path.stem, backend=backend, base=str(path), single_file=True), generated=False
        )
    marker = path / "MODEL.json"
    if marker.is_file():  # a folder written by `sdxl-deploy models build` (base/ and maybe refiner/)
        info = json.loads(marker.read_text())
        refiner, tiny_vae = path / "refiner", path / "tiny_vae"
        spec = ModelSpec(
            name=info.get("name", path.name),
            backend=info["backend"],
            base=str(path / "base"),
            refiner=str(refiner) if (refiner / "model_index.json").is_file() else None,
            tiny_vae=str(tiny_vae) if (tiny_vae / "config.json").is_file() else None,
            generated=bool(info.get("generated", False)),
            description=info.get("description", ""),
        )
        return _sized(spec, generated=spec.generated)
    index = path / "model_index.json"
    if index.is_file():
        backend = family_of_pipeline(json.loads(index.read_text()).get("_class_name", ""))
        return family_spec(path.name, backend, str(path))
    raise ValueError(
        f"model={str(path)!r} is a folder without model_index.json or MODEL.json: not a diffusers model"
    )


def _sized(spec: ModelSpec, *, generated: bool) -> ModelSpec:
    """Give a spec its backend's default size and the range its kind supports (and, for a user's model,
    its family's published tiny autoencoder)."""
    default = 1024 if spec.backend == "sdxl" else 512
    if generated:
        lo, hi = _GENERATED_SIZES["tiny" if spec.name.startswith("tiny") else "synthetic"]
    else:
        lo, hi = (512, 2048) if spec.backend == "sdxl" else (256, 1024)
        spec = replace(spec, tiny_vae=TINY_VAES[spec.backend])
    return replace(spec, default_size=default, min_size=lo, max_size=hi)


# SDXL single-file checkpoints carry a second text encoder under this key prefix; SD1.5 ones do not.
SDXL_CHECKPOINT_KEY = "conditioner.embedders.1"


def _backend_of_checkpoint(path: Path) -> Backend:
    """SDXL checkpoints carry a second text encoder (`SDXL_CHECKPOINT_KEY`)."""
    if path.suffix != ".safetensors":
        return "sd15"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        return "sdxl" if any(k.startswith(SDXL_CHECKPOINT_KEY) for k in keys) else "sd15"
