"""Which stacks on the box the service runs on: the versions tested, the known-broken ones and their fixes.

The box's python provides torch (with CUDA), diffusers, transformers and accelerate; each release brings
the rest in its own virtual environment (`service/requirements.txt`). Preflight reads the box's versions
and `assess_stack` sorts what it finds into refusals (torch, diffusers, CUDA, python, pip: the deploy
stops before anything changes, and the message names the fix), fixes (a package the release environment
installs over the box's, e.g. transformers 4.57.1 over the yanked 4.57.0) and notes.

The minimums are the oldest stack the tests ran on (`make test-seed`: torch 2.5.1, diffusers 0.35.1,
transformers 4.57.1, accelerate 1.10.1, python 3.11); `pyproject.toml` states the same bounds (a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from packaging.version import InvalidVersion, Version

MIN_PYTHON = "3.11"
MIN_CUDA = "11.8"


@dataclass(frozen=True)
class Requirement:
    """One package the box provides: the oldest version tested, and the release's fix when it is too old.

    `fix` None: the deploy refuses (the package is too big or too tied to the box to replace per release);
    else the requirement the release environment installs over the box's version.
    """

    dist: str
    minimum: str
    fix: str | None = None


BOX_STACK: tuple[Requirement, ...] = (
    Requirement("torch", "2.5.1"),
    Requirement("diffusers", "0.35.1"),
    Requirement("transformers", "4.57.1", fix="transformers==4.57.1"),
    Requirement("accelerate", "1.10.1", fix="accelerate==1.10.1"),
)


@dataclass(frozen=True)
class KnownBroken:
    """A release known not to work with the service, why, and what the release environment installs."""

    dist: str
    version: str
    why: str
    fix: str


KNOWN_BROKEN: tuple[KnownBroken, ...] = (
    KnownBroken(
        "transformers",
        "4.57.0",
        "a yanked release; beside diffusers 0.35.1 loading SDXL fails with `TypeError: "
        "CLIPTextModelWithProjection.__init__() got an unexpected keyword argument 'offload_state_dict'`",
        "transformers==4.57.1",
    ),
)


@dataclass
class StackVerdict:
    """What preflight concluded about the box's stack."""

    refusals: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)  # requirements the release environment installs
    notes: list[str] = field(default_factory=list)


def _version(text: str | None) -> Version | None:
    try:
        return Version(text) if text else None
    except InvalidVersion:
        return None


def assess_stack(
    python_version: str | None,
    packages: dict[str, str | None],
    torch_cuda: str | None,
    cuda_available: bool | None,
    has_gpu: bool,
    python: str = "python3",
) -> StackVerdict:
    """Sort the box's versions into refusals (with the fix named), release fixes and notes."""
    verdict = StackVerdict()
    py = _version(python_version)
    if py is not None and py < Version(MIN_PYTHON):
        verdict.refusals.append(
            f"python {python_version} at {python} is older than {MIN_PYTHON}, the oldest tested: point "
            f"new.python at a python >= {MIN_PYTHON} that has torch"
        )
    if packages.get("pip") is None:
        verdict.refusals.append(
            f"{python} has no pip (the release environment is built with it): install pip into it, "
            "e.g. `apt-get install python3-pip`"
        )
    for req in BOX_STACK:
        found = packages.get(req.dist)
        version = _version(found)
        broken = next((b for b in KNOWN_BROKEN if b.dist == req.dist and b.version == found), None)
        if broken:
            verdict.fixes.append(broken.fix)
            verdict.notes.append(
                f"{req.dist} {found} on the box is known broken ({broken.why}): the release environment "
                f"installs {broken.fix}"
            )
        elif version is None or version < Version(req.minimum):
            have = f"{req.dist} {found}" if found else f"no {req.dist}"
            if req.fix:
                verdict.fixes.append(req.fix)
                verdict.notes.append(
                    f"{have} on the box (oldest tested {req.minimum}): the release environment installs {req.fix}"
                )
            else:
                verdict.refusals.append(
                    f"{have} at {python}; the service needs {req.dist} >= {req.minimum}: "
                    f"`{python} -m pip install '{req.dist}>={req.minimum}'`"
                    + (" (a CUDA build that matches the driver)" if req.dist == "torch" else "")
                )
    if has_gpu and packages.get("torch"):
        cuda = _version(torch_cuda)
        if cuda is None:
            verdict.refusals.append(
                f"torch {packages['torch']} at {python} is a CPU-only build but the box has an NVIDIA GPU: "
                "install a CUDA build of torch that matches the driver"
            )
        elif cuda < Version(MIN_CUDA):
            verdict.refusals.append(
                f"torch {packages['torch']} is built for CUDA {torch_cuda}, older than {MIN_CUDA}: "
                "install a torch build for CUDA >= 11.8 that matches the driver"
            )
        elif cuda_available is False:
            verdict.refusals.append(
                f"torch {packages['torch']} (CUDA {torch_cuda}) cannot use the GPU "
                "(torch.cuda.is_available() is False; usually a driver older than that CUDA): update the "
                "driver or install a torch build for the driver's CUDA version"
            )
    elif not has_gpu:
        verdict.notes.append("no NVIDIA GPU found (nvidia-smi): the service will run on the CPU")
    return verdict
