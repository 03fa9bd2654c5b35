"""`LocalHost`: this machine, with `bash -c` subprocesses, plain file copies and no tunnel."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from flows.box.hosts.base import CommandResult, Host, decode_output, timeout_message
from flows.errors import CommandTimeout, HostError


class LocalHost(Host):
    """This machine: commands in `bash -c` subprocesses, files copied, ports used as they are."""

    def __init__(self) -> None:
        self.name = "local"
        self.is_remote = False

    def run(self, command: str, timeout: float = 60.0, stdin: str | None = None) -> CommandResult:
        # Its own session, so a timeout kills the whole process group, not just bash.
        proc = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(None if stdin is None else stdin.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):  # a detached grandchild may still hold the pipes
                proc.communicate(timeout=2)
            proc.kill()
            proc.wait()
            raise CommandTimeout(timeout_message(self.name, command, timeout)) from None
        return CommandResult(command, proc.returncode, decode_output(out), decode_output(err))

    def put(self, local: Path, remote: str) -> None:
        if not Path(local).is_file():
            raise HostError(f"cannot upload {local}: no such local file")
        _copy(
            Path(local), Path(remote).expanduser(), f"uploading {local} to {remote} (its folder must exist)"
        )

    def get(self, remote: str, local: Path) -> None:
        _copy(Path(remote).expanduser(), Path(local), f"downloading {remote} to {local}")

    @contextmanager
    def forward(self, remote_port: int, local_port: int = 0) -> Iterator[int]:
        """Nothing to tunnel: the service port is already local."""
        yield remote_port

    def close(self) -> None:
        pass


def _copy(source: Path, dest: Path, what: str) -> None:
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise HostError(f"{what} failed: {exc}") from exc
