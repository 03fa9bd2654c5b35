"""The release environment on the box and preflight's version checks.

A "box python" here is a real venv that sees the test environment's packages less some (tests/support/boxenv.py);
the deploys are real runbook flows against the local host, with the user's SD1.5 stand-in as the current
service. A wheelhouse made from the installed packages stands in for a box without a package index.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from flows.box.compat import BOX_STACK, KNOWN_BROKEN, MIN_PYTHON, assess_stack
from flows.box.hosts import LocalHost
from flows.box.procs import find_service
from flows.config.target import Target
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.deploy import Release, check_compile
from flows.stages.rollback import current_answers
from tests.support.boxenv import box_python, wheel_of_installed
from tests.support.flows import is_legacy, summary_of

REPO = Path(__file__).resolve().parents[2]
STACK = {
    "torch": "2.14.1",
    "diffusers": "0.42.1",
    "transformers": "5.24.0",
    "accelerate": "1.15.0",
    "pip": "25",
}


def _imports(python: str, module: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["env", "-u", "PYTHONPATH", python, "-c", f"import {module}; print({module}.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=120,
    )


# --- the version policy ----------------------------------------------------------------------------


def test_a_supported_stack_passes_with_nothing_to_fix() -> None:
    verdict = assess_stack("3.11.7", STACK, "12.4", True, has_gpu=True)
    assert verdict.refusals == [] and verdict.fixes == [] and verdict.notes == []


def test_the_yanked_transformers_is_fixed_in_the_release_not_refused() -> None:
    verdict = assess_stack("3.11.7", STACK | {"transformers": "4.57.0"}, "12.4", True, has_gpu=True)
    assert verdict.refusals == [] and verdict.fixes == ["transformers==4.57.1"]
    assert "offload_state_dict" in verdict.notes[0] and "installs transformers==4.57.1" in verdict.notes[0]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"torch": "2.4.1"}, "torch 2.4.1 at /box/python; the service needs torch >= 2.5.1"),
        ({"diffusers": "0.34.0"}, "`/box/python -m pip install 'diffusers>=0.35.1'`"),
        ({"diffusers": None}, "no diffusers at /box/python"),
        ({"pip": None}, "/box/python has no pip"),
    ],
)
def test_incompatible_packages_are_refused_with_the_fix_named(change: dict, expected: str) -> None:
    verdict = assess_stack("3.11.7", STACK | change, "12.4", True, has_gpu=True, python="/box/python")
    assert len(verdict.refusals) == 1 and expected in verdict.refusals[0], verdict.refusals


def test_cuda_problems_are_refused_when_the_box_has_a_gpu() -> None:
    cpu_build = assess_stack("3.11.7", STACK, None, False, has_gpu=True)
    assert "CPU-only build" in cpu_build.refusals[0]
    old_driver = assess_stack("3.11.7", STACK, "12.8", False, has_gpu=True)
    assert "cannot use the GPU" in old_driver.refusals[0] and "driver" in old_driver.refusals[0]
    old_cuda = assess_stack("3.11.7", STACK, "11.7", True, has_gpu=True)
    assert "CUDA 11.7, older than 11.8" in old_cuda.refusals[0]
    old_python = assess_stack("3.10.12", STACK, "12.4", True, has_gpu=True)
    assert f"older than {MIN_PYTHON}" in old_python.refusals[0]
    no_gpu = assess_stack("3.11.7", STACK, None, False, has_gpu=False)
    assert no_gpu.refusals == [] and "run on the CPU" in no_gpu.notes[0]


def test_pyproject_states_the_tested_bounds() -> None:
    """pyproject's lower bounds are the oldest tested stack (flows.box.compat) and the release pins."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bounds = {Requirement(r).name: Requirement(r).specifier for r in project["dependencies"]}
    for req in BOX_STACK:
        assert f">={req.minimum}" in {str(s) for s in bounds[req.dist]}, (req.dist, bounds[req.dist])
    for broken in KNOWN_BROKEN:
        assert not bounds[broken.dist].contains(broken.version)
    assert project["requires-python"] == f">={MIN_PYTHON}"
    pins = [Requirement(line) for line in _pins()]
    assert pins, "service/requirements.txt pins nothing"
    for pin in pins:
        version = next(iter(pin.specifier)).version
        assert f">={version}" in {str(s) for s in bounds[pin.name]}, (pin.name, bounds[pin.name])


def test_the_tests_run_the_pinned_release_dependencies() -> None:
    """`make test` installs service/requirements.txt's pins: what the tests run is what the box gets."""
    from importlib.metadata import version

    for line in _pins():
        pin = Requirement(line)
        assert pin.specifier.contains(version(pin.name)), f"installed {pin.name} {version(pin.name)} != {pin}"


def _pins() -> list[str]:
    text = (REPO / "service" / "requirements.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# --- on a box ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_box_python_without_pydantic_settings_deploys_from_a_wheelhouse(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    """The box lacks pydantic-settings and has no package index: the release environment brings it from
    the uploaded wheelhouse, the service runs with the release's python, the box's python is unchanged."""
    host, target = legacy
    box = box_python(tmp_path / "box-python", leave_out=("pydantic-settings",))
    box_site = Path(box).parents[1] / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    box_before = sorted(p.name for p in (box_site / "site-packages").iterdir())
    assert _imports(box, "pydantic_settings").returncode != 0
    wheelhouse = tmp_path / "wheelhouse"
    wheel_of_installed("pydantic-settings", wheelhouse)
    new = target.new.model_copy(update={"python": box, "wheelhouse": str(wheelhouse)})

    state = deploy_sdxl(
        target=target.model_copy(update={"new": new}),
        wheel=wheel,
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )

    summary = summary_of(state)
    assert state.is_completed(), state.message
    release = Path(new.install_dir) / "releases" / summary["release_id"]
    python = str(release / "venv" / "bin" / "python")
    assert str(release / "venv") in _imports(python, "pydantic_settings").stdout  # the release brought it
    assert str(Path(box).parents[1]) in _imports(python, "torch").stdout  # torch is the box's
    assert (Path(new.install_dir) / "wheelhouse" / next(wheelhouse.iterdir()).name).exists()
    process = find_service(host, new.port, new.pid_file)
    assert process is not None and python in process.cmdline, process  # the supervisor runs it
    assert sorted(p.name for p in (box_site / "site-packages").iterdir()) == box_before  # box untouched
    assert _imports(box, "pydantic_settings").returncode != 0
    assert any("no NVIDIA GPU" in warning for warning in summary["warnings"])


@pytest.mark.slow
def test_preflight_refuses_an_incompatible_diffusers_before_anything_changes(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    """The box's diffusers is 0.30.0 (its metadata relabelled): refused at preflight, nothing touched."""
    host, target = legacy
    box = box_python(tmp_path / "box-python", versions={"diffusers": "0.30.0"})
    process = find_service(host, target.current.port)
    new = target.new.model_copy(update={"python": box})

    state = deploy_sdxl(
        target=target.model_copy(update={"new": new}),
        wheel=wheel,
        runs_dir=str(tmp_path / "runs"),
        return_state=True,
    )

    assert state.is_failed() and "stage 'preflight' failed: PreflightRefused" in state.message
    assert f"diffusers 0.30.0 at {box}" in state.message
    assert f"`{box} -m pip install 'diffusers>=0.35.1'`" in state.message
    summary = summary_of(state)
    assert [s["name"] for s in summary["stages"]] == ["preflight"] and not summary["rolled_back"]
    assert not Path(target.paths.backup_root).exists() and not Path(new.install_dir, "releases").exists()
    assert find_service(host, target.current.port) == process and is_legacy(
        current_answers(host, target.current)
    )


def test_a_failed_compile_check_is_a_warning_naming_the_fallback(tmp_path: Path) -> None:
    """The release's python cannot run the check (here: it has no `service`): reported, not raised."""
    python = box_python(tmp_path / "box-python")
    release = Release(
        release_id="r", path=str(tmp_path), site="", wheel_sha256="", reused=False, python=python
    )
    check = check_compile.fn(LocalHost(), release, "cpu")
    assert not check.ok and "No module named 'service'" in (check.error or "")
    assert check.warning() and "the service will serve uncompiled" in check.warning()
