"""Small file operations on a host (local or SSH), built on `Host.run`, `put` and `get`.

Every path is quoted with `q`; every command is POSIX sh with coreutils (what any GPU box has).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

from pydantic import BaseModel

from flows.box.hosts import Host, q
from flows.errors import CommandFailed, HostCommandError, HostError

Answer = TypeVar("Answer", bound=BaseModel)


def run_checked(host: Host, command: str, what: str, timeout: float = 60.0) -> str:
    """Run `command`; return stdout, or raise `CommandFailed` naming `what` with the exit code and stderr.

    The one way to run a command that must succeed (`Host.run` returns a non-zero exit instead).
    """
    result = host.run(command, timeout=timeout)
    if not result.ok:
        detail = (result.stderr or result.stdout).strip()[-800:]
        raise CommandFailed(f"{what} failed on {host.name} (exit {result.exit_code}): {detail}")
    return result.stdout


def json_answer(stdout: str, model: type[Answer]) -> Answer:
    """A box command's answer: its last non-empty stdout line, one JSON object, parsed into `model` (the lines
    before it are the command's own output, warnings included). `ValueError` when there is no such line or it
    does not fit (pydantic's `ValidationError` is one)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the command printed nothing")
    return model.model_validate_json(lines[-1])


def remote_child(folder: str, local_file: PurePath) -> str:
    """The box's path (POSIX) for a local file (a Windows or POSIX path) copied into `folder` there."""
    return str(PurePosixPath(folder) / local_file.name)


def home_dir(host: Host) -> str:
    """The host user's `$HOME`."""
    home = run_checked(host, 'printf %s "$HOME"', "reading $HOME").strip()
    if not home.startswith("/"):
        raise HostCommandError(f"$HOME on {host.name} is not an absolute path: {home!r}")
    return home


def make_dirs(host: Host, *paths: str) -> None:
    """`mkdir -p` each path."""
    run_checked(host, f"mkdir -p -- {q(*paths)}", f"creating {', '.join(paths)}")


def exists(host: Host, path: str) -> bool:
    return host.run(f"test -e {q(path)}").ok


def read_text(host: Host, path: str) -> str | None:
    """The file's text, or None when it does not exist (exit 1). Any other failure (a command killed with
    a dying link, say) raises HostError: a read that failed is not a file that is absent."""
    result = host.run(f"test -f {q(path)} && cat -- {q(path)}")
    if result.ok:
        return result.stdout
    if result.exit_code == 1:
        return None
    raise HostError(
        f"reading {path} on {host.name} failed (exit {result.exit_code}): {result.stderr.strip()[:300]}"
    )


def write_text(host: Host, path: str, text: str) -> None:
    """Write a file atomically (upload beside it, then rename), readable by its owner only (0600)."""
    parent = str(PurePosixPath(path).parent)
    make_dirs(host, parent)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "upload"
        local.write_bytes(text.encode("utf-8"))  # the box's bytes as given: no CRLF, no code page on Windows
        host.put(local, f"{path}.tmp")
    run_checked(
        host, f"chmod 600 -- {q(f'{path}.tmp')} && mv -f -- {q(f'{path}.tmp', path)}", f"writing {path}"
    )


def file_size(host: Host, path: str) -> int | None:
    result = host.run(f"test -f {q(path)} && wc -c < {q(path)}")
    return int(result.stdout.strip()) if result.ok else None


@dataclass(frozen=True)
class Digest:
    """sha256 and size of one file."""

    sha256: str
    size: int


def digests(host: Host, paths: list[str]) -> dict[str, Digest | None]:
    """sha256 and size of each file in one round trip; None for a file that is missing."""
    if not paths:
        return {}
    script = (
        f"for f in {q(*paths)}; do "
        'if [ -f "$f" ]; then printf "%s %s\\n" "$(sha256sum < "$f" | cut -c1-64)" "$(wc -c < "$f")"; '
        "else echo -; fi; done"
    )
    lines = run_checked(host, script, "hashing files", timeout=600).splitlines()
    if len(lines) != len(paths):
        raise HostCommandError(f"hashing files on {host.name}: expected {len(paths)} lines, got {lines!r}")
    found: dict[str, Digest | None] = {}
    for path, line in zip(paths, lines, strict=True):
        if line.strip() == "-":
            found[path] = None
        else:
            sha, size = line.split()
            found[path] = Digest(sha, int(size))
    return found


def free_disk_gb(host: Host, path: str) -> float:
    """Free space (GB) of the filesystem that holds `path` (or its nearest existing parent)."""
    script = f'd={q(path)}; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done; df -Pk -- "$d" | tail -n 1'
    fields = run_checked(host, script, f"checking free disk at {path}").split()
    return int(fields[3]) / 1024**2


def tail_bytes(host: Host, path: str, offset: int, limit: int = 1_000_000) -> tuple[str, int]:
    """Text appended to `path` since byte `offset` (at most `limit` bytes) and the new offset."""
    result = host.run(f"test -f {q(path)} && tail -c +{offset + 1} -- {q(path)} | head -c {limit}")
    if not result.ok:
        return "", offset
    data = result.stdout
    return data, offset + len(data.encode())
