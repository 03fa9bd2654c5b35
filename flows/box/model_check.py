"""What `new.model` names on the box, and whether the app's requests fit it: checked in preflight, so a dry run
refuses what the real run would fail on, and a real run refuses it before anything is stopped.

The service loads three kinds of model (`service.models.resolve_model`): a known name (the registry and the
generated models), a diffusers folder (`model_index.json`, or `MODEL.json` from `sdxl-deploy models build`) or
a `.safetensors` / `.ckpt` file. A folder or file is looked for on the box and its family read from its own
files there. What it loads from the hub (a known model's repos, a refiner or tiny VAE `new.env` names) is asked
for through the box's own python, hub endpoint, environment (`new.env`) and token; on a box set to work offline
(HF_HUB_OFFLINE) its hub cache must hold it. The app's request and the ready sizes are validated by the service's
own request schema and its bounds for the model (`service.params.resolve_params`, what `/generate` runs), the
settings `new.env` passes by the service's settings model (`flows/config/service_env.py`), the criteria's
thresholds by their ranges (`flows.evidence.gates.criteria_problems`).
"""

from __future__ import annotations

import difflib
import json
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from flows.box.common import run_logger
from flows.box.hostfs import home_dir, json_answer, read_text
from flows.box.hosts import Host, q
from flows.config.secrets import resolve_secret
from flows.config.service_env import service_settings
from flows.config.target import Target, expand_home
from flows.errors import PreflightRefused
from flows.evidence.gates import criteria_problems
from service.errors import ValidationFailed
from service.models import (
    GENERATED_FAMILIES,
    REGISTRY,
    SDXL_CHECKPOINT_KEY,
    ModelSpec,
    family_of_pipeline,
    family_spec,
)
from service.params import resolve_params
from service.schema import GenerateRequest
from service.settings import ServiceSettings

KNOWN_MODELS: tuple[str, ...] = (*REGISTRY, *GENERATED_FAMILIES)
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")

# Reads a safetensors header (8 bytes of length, then JSON) on the box: whether it holds SDXL's second encoder.
_CHECKPOINT_SCRIPT = """\
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    keys = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
print(json.dumps(any(k.startswith(sys.argv[2]) for k in keys)))
"""

# Asks the box's hub (or, offline, its hub cache) for each repo; the token, if any, arrives on stdin.
_HUB_SCRIPT = """\
import json, sys
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
token = sys.stdin.read().strip() or None
out = {"offline": bool(constants.HF_HUB_OFFLINE), "endpoint": constants.ENDPOINT,
       "cache": constants.HF_HUB_CACHE, "missing": {}, "error": None}
for repo in sys.argv[1:]:
    try:
        if out["offline"]:
            snapshot_download(repo, revision="main", local_files_only=True, token=token)
        else:
            HfApi(token=token).model_info(repo, revision="main", timeout=20)
    except GatedRepoError:
        out["missing"][repo] = "gated: new.hub_token has no access to it"
    except (RepositoryNotFoundError, RevisionNotFoundError):
        out["missing"][repo] = "no such repo (or new.hub_token may not read it)"
    except Exception as exc:
        if out["offline"]:
            out["missing"][repo] = "not in the hub cache"
        else:
            out["error"] = f"{type(exc).__name__}: {exc}"[:300]
            break
print(json.dumps(out))
"""


class HubAnswer(BaseModel):
    """What `_HUB_SCRIPT` prints: where the box asked (its hub, or its cache offline) and what it lacks."""

    offline: bool
    endpoint: str
    cache: str
    missing: dict[str, str]  # repo -> why it cannot load
    error: str | None  # the hub could not be asked at all


class NewModel(BaseModel):
    """`new.model` as the box has it: its kind, the spec requests are validated against, and the model whose
    measured memory need applies (its own; a folder's or file's family's published model otherwise)."""

    kind: Literal["known", "folder", "file"]
    spec: ModelSpec
    measured_as: str
    hub: str | None = None  # where its hub repos were found: the box's hub endpoint, or its hub cache
    warnings: list[str] = Field(default_factory=list)  # what /generate would warn the app's request of

    def describe(self) -> str:
        """`sdxl`, or `/models/x (sdxl family)` for a folder or file."""
        return self.spec.name if self.kind == "known" else f"{self.spec.base} ({self.spec.backend} family)"


def check_new_model(host: Host, target: Target) -> NewModel:
    """`new.model` on the box, the app's requests against it, the settings `new.env` passes the service and
    the criteria's thresholds; `PreflightRefused` naming each field and value, and what would be accepted, when
    the real run would fail on any (or judge a gate no deploy can pass). What `/generate` would warn the app's
    request of (options the model ignores) is logged and kept in `NewModel.warnings`."""
    settings, problems = service_settings(target.new)
    problems += criteria_problems(target.criteria, target.workload.size)
    try:
        model = check_model(host, target, settings)
    except PreflightRefused as refused:
        raise PreflightRefused("; ".join([str(refused), *problems])) from None
    request_problems, model.warnings = check_requests(target, model.spec, settings)
    problems = request_problems + problems
    if problems:
        raise PreflightRefused("; ".join(problems))
    for warning in model.warnings:
        run_logger().warning(warning)
    return model


def check_model(host: Host, target: Target, settings: ServiceSettings | None = None) -> NewModel:
    """What `new.model` is on the box: a known name, or a folder or file there; and what the service loads
    besides with `settings` (default: those `new.env` sets) found on the box's hub or disk."""
    settings = settings or service_settings(target.new)[0]
    name = target.new.model
    if name in REGISTRY:
        model = NewModel(kind="known", spec=REGISTRY[name], measured_as=name)
    elif name in GENERATED_FAMILIES:
        spec = family_spec(name, GENERATED_FAMILIES[name], name, generated=True)
        model = NewModel(kind="known", spec=spec, measured_as=name)
    elif not name.startswith(("/", "~/")):
        raise PreflightRefused(_not_known(name, host))
    else:
        model = _path_model(host, target, name)
    model.hub = check_sources(host, target, model, settings)
    return model


def _path_model(host: Host, target: Target, name: str) -> NewModel:
    """A folder or checkpoint file on the box, its family read from its own files."""
    path = expand_home(name, home_dir(host)) if name.startswith("~") else name
    found = host.run(f"if [ -d {q(path)} ]; then echo folder; elif [ -f {q(path)} ]; then echo file; fi")
    kind = found.stdout.strip()
    if kind == "folder":
        spec = _folder_spec(host, path)
    elif kind == "file":
        spec = _file_spec(host, target, path)
    else:
        raise PreflightRefused(
            f"new.model: {name!r} does not exist on {host.name}; accepted: a known name "
            f"({', '.join(KNOWN_MODELS)}), or a diffusers folder or a {'/'.join(CHECKPOINT_SUFFIXES)} file there"
        )
    measured = spec.name if spec.generated and spec.name in GENERATED_FAMILIES else spec.backend
    return NewModel(kind=kind, spec=spec, measured_as=measured)


def loaded_sources(model: NewModel, settings: ServiceSettings) -> dict[str, str]:
    """What the service loads besides a folder's or file's own weights, as it chooses with `settings`
    (`service.prefetch.hub_sources`): a registry model's repos, and the refiner and tiny VAE `new.env` names;
    each with the target's field that names it."""
    spec, registry = model.spec, model.spec.name in REGISTRY and model.kind == "known"
    tiny = {"off": None, "on": spec.tiny_vae}.get(settings.tiny_vae, settings.tiny_vae)
    sources: dict[str, str] = {spec.base: "new.model"} if registry else {}
    if tiny:
        sources[tiny] = "new.env.SDXL_TINY_VAE"
    elif registry and spec.vae:
        sources[spec.vae] = "new.model"
    if spec.backend == "sdxl" and settings.load_refiner:
        if settings.refiner:
            sources[settings.refiner] = "new.env.SDXL_REFINER"
        elif registry and spec.refiner:
            sources[spec.refiner] = "new.model"
    return sources


def check_sources(host: Host, target: Target, model: NewModel, settings: ServiceSettings) -> str | None:
    """`loaded_sources` on the box: a path must exist there, a hub repo on its hub (`check_hub_repos`).
    Returns where the hub repos were found (None when none is loaded from the hub)."""
    sources = loaded_sources(model, settings)
    for source, field in sources.items():
        if source.startswith(("/", "~")):
            path = expand_home(source, home_dir(host)) if source.startswith("~") else source
            if not host.run(f"test -e {q(path)}").ok:
                raise PreflightRefused(
                    f"{field}: {source!r} does not exist on {host.name}; accepted: a hub repo id, or a folder there"
                )
    hub = {source: field for source, field in sources.items() if not source.startswith(("/", "~"))}
    return check_hub_repos(host, target, hub) if hub else None


def _not_known(name: str, host: Host) -> str:
    """The refusal of a name that is neither known nor a path, with the nearest known names."""
    near = difflib.get_close_matches(name, KNOWN_MODELS, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    if "/" in name.strip("/"):
        hint += ": a hub repo id is served through a known name, or from a folder on the box that holds it"
    return (
        f"new.model: {name!r} is not a known model{hint}; accepted: a known name ({', '.join(KNOWN_MODELS)}), "
        f"or the absolute (or ~/) path of a diffusers folder or a {'/'.join(CHECKPOINT_SUFFIXES)} file on "
        f"{host.name}"
    )


def _read_json(host: Host, path: str) -> dict[str, Any] | None:
    """A JSON object file on the box, None when absent; a file that is not one is refused, naming it."""
    text = read_text(host, path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise PreflightRefused(f"new.model: {path} on {host.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PreflightRefused(f"new.model: {path} on {host.name} is not a JSON object")
    return data


def _folder_spec(host: Host, path: str) -> ModelSpec:
    """A folder's spec from its own files: `MODEL.json` (a built model), else `model_index.json` (diffusers)."""
    folder = PurePosixPath(path)
    info = _read_json(host, str(folder / "MODEL.json"))
    if info is not None:
        backend = info.get("backend")
        if backend not in ("sd15", "sdxl"):
            raise PreflightRefused(
                f"new.model: {folder / 'MODEL.json'} on {host.name} names backend {backend!r}, not sd15 or sdxl"
            )
        name = str(info.get("name", folder.name))
        return family_spec(name, backend, path, generated=bool(info.get("generated", False)))
    index = _read_json(host, str(folder / "model_index.json"))
    if index is None:
        raise PreflightRefused(
            f"new.model: {path!r} is a folder on {host.name} without model_index.json or MODEL.json: "
            "not a diffusers model"
        )
    return family_spec(folder.name, family_of_pipeline(str(index.get("_class_name", ""))), path)


def _file_spec(host: Host, target: Target, path: str) -> ModelSpec:
    """A single-file checkpoint's spec; a .safetensors file's family read from its header with the box's python."""
    file = PurePosixPath(path)
    if file.suffix not in CHECKPOINT_SUFFIXES:
        raise PreflightRefused(
            f"new.model: {path!r} is a file on {host.name}; a single-file checkpoint must end in "
            f"{' or '.join(CHECKPOINT_SUFFIXES)}"
        )
    if file.suffix == ".ckpt":
        return family_spec(file.stem, "sd15", path)
    result = host.run(f"{q(target.new.python)} -c {q(_CHECKPOINT_SCRIPT)} {q(path, SDXL_CHECKPOINT_KEY)}")
    answer = result.stdout.strip().splitlines()[-1:] if result.ok else []
    if answer not in (["true"], ["false"]):
        detail = (result.stderr or result.stdout).strip()[-300:]
        raise PreflightRefused(
            f"new.model: {path!r} on {host.name} is not a readable safetensors file: {detail}"
        )
    return family_spec(file.stem, "sdxl" if answer == ["true"] else "sd15", path)


def check_hub_repos(host: Host, target: Target, repos: dict[str, str]) -> str:
    """Where the box finds these hub repos (each with the target's field that names it): its hub endpoint
    (asked with its own env and `new.hub_token`), or its hub cache when it works offline; `PreflightRefused`
    naming each repo it lacks and its field, or the hub it cannot reach. Returns "hub <endpoint>" or
    "hub cache <folder>"."""
    new = target.new
    fields = list(dict.fromkeys(repos.values()))
    named = f"new.model: {new.model!r}" if "new.model" in fields else f"{fields[0]}: the service"
    token = resolve_secret(new.hub_token) if new.hub_token else None
    env = q(*(f"{k}={v}" for k, v in new.env.items()))
    command = f"env -u PYTHONPATH {env} {q(new.python)} -c {q(_HUB_SCRIPT)} {q(*repos)}"
    result = host.run(command, timeout=120, stdin=f"{token}\n" if token else None)
    try:
        answer = json_answer(result.stdout, HubAnswer)
    except ValueError:
        detail = (result.stderr or result.stdout).strip()[-300:]
        raise PreflightRefused(
            f"{named} loads from the hub, but asking the hub with {new.python} on {host.name} "
            f"failed (exit {result.exit_code}): {detail}"
        ) from None
    where = f"hub cache {answer.cache}" if answer.offline else f"hub {answer.endpoint}"
    if answer.error:
        raise PreflightRefused(
            f"{named} loads {', '.join(repos)} from the hub, which {host.name} cannot reach "
            f"at {answer.endpoint} ({answer.error}); set HF_ENDPOINT in new.env to a hub it reaches, "
            "or HF_HUB_OFFLINE=1 with the files in its hub cache"
        )
    if answer.missing:
        offline = " (the box works offline: HF_HUB_OFFLINE)" if answer.offline else ""
        subjects = {"new.model": repr(new.model), "new.env.SDXL_REFINER": "its refiner"}
        problems = []
        for field in fields:
            lacks = [f"{repo}: {why}" for repo, why in answer.missing.items() if repos[repo] == field]
            if lacks:
                subject = subjects.get(field, "its tiny VAE")
                problems.append(f"{field}: {subject} loads from the {where}{offline}: {'; '.join(lacks)}")
        raise PreflightRefused("; ".join(problems))
    return where


def check_requests(target: Target, spec: ModelSpec, settings: ServiceSettings) -> tuple[list[str], list[str]]:
    """The app's request and `new.ready_sizes` against the model's own request schema and bounds, with the
    service's `settings`: the problems (what `/generate` refuses with 422, and the fields it would ignore, each
    with the nearest known name as its `warnings` give it), each naming the field and value, and the warnings
    `/generate` would answer the request with (options the loaded model ignores), each naming
    `workload.app_request`."""
    field = "workload.app_request"
    # Read without validation, so an unknown field is named beside a refused value.
    unknown = GenerateRequest.model_construct(**target.workload.app_request).unknown_fields()
    problems = []
    if unknown:
        accepted = ", ".join(GenerateRequest.model_fields)
        problems.append(
            f"{field}: unknown fields {', '.join(unknown)}, which /generate would ignore; accepted: {accepted}"
        )
    problems += _ready_size_problems(target, spec)
    try:
        request = GenerateRequest.model_validate(target.workload.app_request)
    except ValidationError as exc:
        refused = [
            f"{field}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        ]
        return refused + problems, []
    refiner = spec.refiner is not None or settings.refiner is not None or spec.generated
    try:
        params = resolve_params(
            request,
            spec,
            refiner_loaded=spec.backend == "sdxl" and settings.load_refiner and refiner,
            restorer_loaded=settings.face_restorer is not None,
            max_prompt_chars=settings.max_prompt_chars,
            cfg_cutoff=settings.cfg_cutoff,
        )
    except ValidationFailed as exc:
        return [f"{field}.{exc}", *problems], []
    return problems, [f"{field}: {warning}" for warning in params.warnings]


def _ready_size_problems(target: Target, spec: ModelSpec) -> list[str]:
    """Sizes set in `new.ready_sizes` outside the model's range (by default they are the app request's size,
    checked with the request)."""
    problems = []
    for size in target.new.ready_sizes or []:
        width, height = (int(v) for v in size.lower().split("x"))
        if not all(spec.min_size <= v <= spec.max_size for v in (width, height)):
            problems.append(
                f"new.ready_sizes: {size!r} is outside {spec.min_size}-{spec.max_size} px, the sizes "
                f"{spec.name} serves"
            )
    return problems
