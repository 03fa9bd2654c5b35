"""Box interpreters and wheelhouses for the release-environment tests, made offline from the test venv.

`box_python` makes a real virtual environment whose site-packages links every package of the running
environment except the ones left out (and this project, which a real box does not have): a box python
that has torch, diffusers & co. but, say, no pydantic-settings. `wheel_of_installed` packs an installed
distribution back into a wheel (its RECORD's files, with a fresh RECORD), so a test's wheelhouse needs no
package index.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

SITE = Path(sysconfig.get_paths()["purelib"])


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def box_python(root: Path, leave_out: tuple[str, ...] = (), versions: dict[str, str] | None = None) -> str:
    """A venv at `root` seeing this environment's packages less `leave_out`; `versions` relabels a
    distribution's installed version (its metadata only), to play a box with an older release."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    dropped = {_normal(name) for name in leave_out} | {"sdxl_deploy"}
    relabel = {_normal(name): version for name, version in (versions or {}).items()}
    for entry in SITE.iterdir():
        name = _normal(entry.name)
        if any(name == d or name.startswith((f"{d}_", f"{d}.")) or f"_{d}_" in name for d in dropped):
            continue  # the package, its dist-info (name-version), this project's editable-install hooks
        is_info = entry.name.endswith(".dist-info")
        dist = _normal(entry.name.removesuffix(".dist-info").rsplit("-", 1)[0]) if is_info else None
        if dist in relabel:
            meta = shutil.copytree(entry, site / entry.name) / "METADATA"
            meta.write_text(
                re.sub(r"(?m)^Version: .*$", f"Version: {relabel[dist]}", meta.read_text(), count=1)
            )
            continue
        (site / entry.name).symlink_to(entry)
    return str(python)


def wheel_of_installed(dist_name: str, out_dir: Path) -> Path:
    """Pack the installed distribution `dist_name` into a wheel in `out_dir` (pure-Python ones)."""
    dist = metadata.distribution(dist_name)
    wheel_meta = dist.read_text("WHEEL") or ""
    tag = re.search(r"(?m)^Tag: (.+)$", wheel_meta)
    name, version = _normal(dist.metadata["Name"]), dist.version
    target = out_dir / f"{name}-{version}-{tag.group(1).strip() if tag else 'py3-none-any'}.whl"
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
    records: list[tuple[str, str, str]] = []
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as wheel:
        for file in dist.files or []:
            path = str(file)
            if path.startswith("..") or "__pycache__" in path or Path(path).name in skip:
                continue
            data = Path(dist.locate_file(file)).read_bytes()
            wheel.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append((path, f"sha256={digest}", str(len(data))))
        record = f"{name}-{version}.dist-info/RECORD"
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([*records, (record, "", "")])
        wheel.writestr(record, buffer.getvalue())
    return target
