"""Which files a model source has, and which of them to load: the fp16 variant only where the source ships it.

A source is a local diffusers folder or a Hugging Face repo id. Its file list comes from the folder, from
the hub (`HfApi.list_repo_files`, at `HF_ENDPOINT`) or, offline (`HF_HUB_OFFLINE=1`, or the hub
unreachable), from the cached snapshot. `plan_load` turns that list into the `from_pretrained` arguments
(`variant`, `use_safetensors`) and the weight files each component will read, so loading follows the repo
instead of guessing and reading an error message. A missing repo or file is a `ModelFilesMissing` naming
both.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The half-precision weights hub repos ship beside the plain ones (`*.fp16.safetensors`).
HALF_VARIANT = "fp16"
# Weight file stems diffusers and transformers read; other files (single-file checkpoints such as
# `sd_xl_base_1.0.safetensors` or `sdxl.vae.safetensors`) are not part of a diffusers load.
_WEIGHT_STEMS = frozenset({"diffusion_pytorch_model", "model", "pytorch_model"})
_WEIGHT_EXTENSIONS = (".safetensors", ".bin")
# Pipeline components without weights (their folders hold configs and vocabularies only).
_NO_WEIGHTS = ("Tokenizer", "Scheduler", "Processor", "FeatureExtractor")
# The other files a load reads from a component folder: configs, tokenizer vocabularies and merges,
# scheduler and feature-extractor settings (not the ONNX/OpenVINO/Flax exports some repos ship beside them).
_SMALL_FILES = (".json", ".txt", ".model")
ROOT = "."  # the component name of a single model (its files sit at the top of the repo)
# Hub loads name the branch: the hub's default anyway, and mirrors that serve local git repos (olah, in the
# tests) answer only the revision routes (`/api/models/<id>/revision/main`), not the bare `/api/models/<id>`.
HUB_REVISION = "main"


class ModelFilesMissing(OSError):
    """A model source (hub repo or folder) lacks something the load needs; the message names both."""


@dataclass(frozen=True)
class SourceFiles:
    """The files of one source, and where the list came from."""

    source: str
    where: str  # "folder /x", "hub http://...", "hub cache /snapshot (offline)"
    files: frozenset[str]
    folder: Path | None = None  # the files on disk (a local folder or a cached snapshot), else on the hub
    on_hub: bool = True  # a hub repo (online or cached), not a local folder
    from_cache: bool = False  # listed from the cached snapshot (offline, or the hub unreachable)

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the source (downloaded into the hub cache when it is only on the hub)."""
        if self.folder is not None:
            return json.loads((self.folder / name).read_text(encoding="utf-8"))
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.source, name, revision=HUB_REVISION)
        return json.loads(Path(path).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class LoadPlan:
    """What `from_pretrained` is asked for, and the weight files each component reads."""

    source: str
    where: str
    variant: str | None
    use_safetensors: bool | None
    revision: str | None = None  # the hub branch (None for a local folder)
    files: dict[str, list[str]] = field(default_factory=dict)  # component (ROOT for a model) -> files

    @property
    def kwargs(self) -> dict[str, Any]:
        """The `from_pretrained` keyword arguments of this plan."""
        out: dict[str, Any] = {"use_safetensors": self.use_safetensors}
        if self.revision:
            out["revision"] = self.revision
        if self.variant:
            out["variant"] = self.variant
        return out

    def describe(self) -> str:
        """One line for the log: the variant, then each component's files."""
        kind = f"{self.variant} variant" if self.variant else "plain weights"
        parts = [f"{name}: {', '.join(files)}" for name, files in self.files.items()]
        return f"{kind} from {self.where} ({'; '.join(parts)})"


def list_files(source: str) -> SourceFiles:
    """The files of a local folder, of a hub repo (online), or of its cached snapshot (offline)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = frozenset(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        return SourceFiles(source, f"folder {path}", files, path, on_hub=False)
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ModelFilesMissing(
            f"{source!r} is neither an existing model folder nor a hub repo id ('org/name')"
        ) from None
    if not hub_offline(constants):
        endpoint = constants.ENDPOINT
        try:
            return SourceFiles(
                source, f"hub {endpoint}", frozenset(HfApi().list_repo_files(source, revision=HUB_REVISION))
            )
        except RepositoryNotFoundError as exc:  # also gated repos without access
            raise ModelFilesMissing(
                f"hub repo {source!r} was not found at {endpoint} (a wrong id, or a gated/private repo "
                f"that needs HF_TOKEN): {type(exc).__name__}"
            ) from exc
        except RevisionNotFoundError as exc:
            raise ModelFilesMissing(f"hub repo {source!r} has no branch 'main' at {endpoint}") from exc
        except Exception as exc:  # network down, hub error: the cache may still hold the repo
            log.warning("Could not list %s on %s (%s); trying the local hub cache", source, endpoint, exc)
    return _cached_snapshot(source)


def _cached_snapshot(source: str) -> SourceFiles:
    """The files of the cached snapshot of `main` (only what earlier loads downloaded: just what they need)."""
    from huggingface_hub import constants, try_to_load_from_cache

    for marker in ("model_index.json", "config.json"):  # a pipeline, or a single model
        cached = try_to_load_from_cache(source, marker, revision=HUB_REVISION)
        if isinstance(cached, str):
            folder = Path(cached).parent
            files = frozenset(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            return SourceFiles(source, f"hub cache {folder} (offline)", files, folder, from_cache=True)
    raise ModelFilesMissing(
        f"hub repo {source!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and the hub "
        "cannot be asked (HF_HUB_OFFLINE=1 or unreachable): start once with the hub reachable to "
        "download it"
    )


def plan_load(source: str, *, half: bool, skip: Collection[str] = ()) -> LoadPlan:
    """Which weights to load from `source`: the fp16 variant when `half` and every component that is
    loaded (all but `skip`, the components passed in already) has it; plain weights otherwise."""
    return _plan(list_files(source), half, skip)


def files_to_load(
    found: SourceFiles, *, half: bool, skip: Collection[str] = ()
) -> tuple[LoadPlan, list[str]]:
    """The plan of a listed source, and every file of it that loading that plan reads: the plan's weights,
    and the small files (configs, tokenizer vocabularies, scheduler settings) of each loaded component, with
    `model_index.json` for a pipeline. What `service.prefetch` downloads before the service starts."""
    plan = _plan(found, half, skip)
    if "model_index.json" in found.files:
        index = found.read_json("model_index.json")
        folders = [
            name
            for name, entry in index.items()
            if not name.startswith("_")
            and name not in skip
            and isinstance(entry, list)
            and entry[-1] is not None
        ]
        wanted = {"model_index.json"}
    else:
        folders, wanted = [""], set()
    for folder in folders:
        for path in found.files:
            directory, name = posixpath.split(path)
            if directory == folder and name.endswith(_SMALL_FILES):
                wanted.add(path)
    for files in plan.files.values():
        wanted.update(files)
    return plan, sorted(wanted)


def _plan(found: SourceFiles, half: bool, skip: Collection[str]) -> LoadPlan:
    source = found.source
    components = _components(found, skip)
    weights = {name: _weights(found.files, name) for name in components}
    for name, library in components.items():
        if not weights[name]:
            expected = "model" if library == "transformers" else "diffusion_pytorch_model"
            raise ModelFilesMissing(
                f"{_named(source)} has no file {_path(name, expected + '.safetensors')} "
                f"(nor any other {name if name != ROOT else 'model'} weights); listed from {found.where}"
            )
    variant = HALF_VARIANT if half and all(HALF_VARIANT in w for w in weights.values()) else None
    chosen = {name: w[variant] if variant else w.get(None, []) for name, w in weights.items()}
    for name, files in chosen.items():
        if not files:  # only variant files (say only fp16) and a float32 load: not what the user asked
            raise ModelFilesMissing(
                f"{_named(source)} has no plain weights for {name} (only the variants "
                f"{sorted(k for k in weights[name] if k)}); load it in half precision (SDXL_DTYPE)"
            )
    safetensors = all(any(f.endswith(".safetensors") for f in files) for files in chosen.values())
    picked = {
        name: [f for f in files if f.endswith(".safetensors")] if safetensors else files
        for name, files in chosen.items()
    }
    revision = HUB_REVISION if found.on_hub else None
    return LoadPlan(source, found.where, variant, True if safetensors else None, revision, picked)


def _components(found: SourceFiles, skip: Collection[str]) -> dict[str, str]:
    """Component folder -> library ("diffusers"/"transformers") of every weight-bearing part to load."""
    if "model_index.json" in found.files:
        index = found.read_json("model_index.json")
        out: dict[str, str] = {}
        for name, entry in index.items():
            if name.startswith("_") or name in skip or not isinstance(entry, list) or entry[-1] is None:
                continue
            library, class_name = entry[0], entry[-1]
            if any(marker in class_name for marker in _NO_WEIGHTS):
                if not any(f.startswith(f"{name}/") for f in found.files):
                    raise ModelFilesMissing(
                        f"{_named(found.source)} has no files under {name}/ (its {class_name})"
                    )
                continue
            if f"{name}/config.json" not in found.files:
                raise ModelFilesMissing(f"{_named(found.source)} has no file {name}/config.json")
            out[name] = "transformers" if library == "transformers" else "diffusers"
        return out
    if "config.json" in found.files:
        return {ROOT: "diffusers"}
    raise ModelFilesMissing(
        f"{_named(found.source)} has no file model_index.json (a pipeline) nor config.json (a single "
        f"model); listed from {found.where}"
    )


def _weights(files: Collection[str], component: str) -> dict[str | None, list[str]]:
    """The weight files of one component folder by variant (None: the plain weights)."""
    folder = "" if component == ROOT else component
    out: dict[str | None, list[str]] = {}
    for path in sorted(files):
        directory, name = posixpath.split(path)
        ext = next((e for e in _WEIGHT_EXTENSIONS if name.endswith(e)), None)
        if directory != folder or ext is None:
            continue
        # diffusion_pytorch_model[-00001-of-00002] or diffusion_pytorch_model.fp16[-00001-of-00002]
        parts = name.removesuffix(ext).split(".")
        if parts[0].split("-")[0] not in _WEIGHT_STEMS or len(parts) > 2:
            continue
        variant = parts[1].split("-")[0] if len(parts) == 2 else None
        out.setdefault(variant, []).append(path)
    return out


def _named(source: str) -> str:
    return f"model folder {source!r}" if Path(source).expanduser().is_dir() else f"hub repo {source!r}"


def _path(component: str, name: str) -> str:
    return name if component == ROOT else f"{component}/{name}"


def hub_offline(constants: Any) -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it: `is_offline_mode()` (read at call time) where the release
    has it, else the `HF_HUB_OFFLINE` constant of older releases (0.36, the seed box's)."""
    is_offline_mode = getattr(constants, "is_offline_mode", None)
    return bool(is_offline_mode() if is_offline_mode is not None else constants.HF_HUB_OFFLINE)
