"""The packages' layering (`.importlinter`), checked by import-linter over the real import graph: service imports
nothing of flows, evaluation, bench or sdxl_deploy; evaluation reaches the service only through its client and
schema; bench reaches flows only for its plain modules; nothing that ships imports bench; flows' floors import only
the floors below them and its evidence imports nothing of Prefect; no import cycle between the modules of a
package."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "flows", "evaluation", "bench", "sdxl_deploy")
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the packages under `root`, with the project's contracts."""
    return subprocess.run(
        [LINT_IMPORTS, "--config", str(root / ".importlinter"), "--no-cache"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layering_contracts_hold() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 kept, 0 broken" in result.stdout


def test_a_new_cycle_or_a_forbidden_import_breaks_them(tmp_path: Path) -> None:
    """The same contracts fail on a copy of the tree with an import cycle inside service (errors <-> app), an
    evaluation module that imports the engine, a service module that imports the CLI's package, a bench module
    that imports the runbook, a box module that imports a stage (a floor reaching up) and an evidence module that
    imports Prefect."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    with (tmp_path / "service" / "errors.py").open("a", encoding="utf-8") as errors:
        errors.write("\nimport service.app  # noqa: E402,F401\n")
    with (tmp_path / "evaluation" / "stats.py").open("a", encoding="utf-8") as stats:
        stats.write("\nimport service.engine  # noqa: E402,F401\n")
    with (tmp_path / "service" / "models.py").open("a", encoding="utf-8") as models:
        models.write("\nimport sdxl_deploy  # noqa: E402,F401\n")
    with (tmp_path / "bench" / "table.py").open("a", encoding="utf-8") as table:
        table.write("\nimport flows.runbooks.runbook  # noqa: E402,F401\n")
    with (tmp_path / "flows" / "box" / "procs.py").open("a", encoding="utf-8") as procs:
        procs.write("\nimport flows.stages.deploy  # noqa: E402,F401\n")
    with (tmp_path / "flows" / "evidence" / "results.py").open("a", encoding="utf-8") as results:
        results.write("\nimport prefect  # noqa: E402,F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "No cycles are allowed in service" in result.stdout, result.stdout
    assert "evaluation.stats -> service.engine" in result.stdout, result.stdout
    assert "service.models -> sdxl_deploy" in result.stdout, result.stdout
    assert "bench.table -> flows.runbooks.runbook" in result.stdout, result.stdout
    assert "flows.box.procs -> flows.stages.deploy" in result.stdout, result.stdout
    assert "flows.evidence.results -> prefect" in result.stdout, result.stdout
    assert "1 kept, 6 broken" in result.stdout, result.stdout


def test_the_floors_are_the_folder_list_and_the_architecture_page_draws_them() -> None:
    """flows/ holds its floors and nothing else, and docs/ARCHITECTURE.md draws them top to bottom in the order of
    the layers contract."""
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter", encoding="utf-8")
    layers = config["importlinter:contract:flows-floors"]["layers"].split()
    on_disk = {  # modules and packages (a folder left behind with only bytecode in it is neither)
        f"flows.{path.name.removesuffix('.py')}"
        for path in (REPO / "flows").iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py")
        or (path.is_dir() and (path / "__init__.py").exists())
    }
    assert on_disk == set(layers)
    page = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    picture = page.split("\n## flows/\n", 1)[1].split("```")[1]
    drawn = [
        name.removesuffix(".py").rstrip("/").replace("/", ".")
        for name in re.findall(r"^(flows/\w+(?:/|\.py))\s", picture, re.M)
    ]
    assert drawn == layers
