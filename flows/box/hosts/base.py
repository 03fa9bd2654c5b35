"""The host interface every runbook step is written against, what a command returns, and `q()`.

`Host.run` returns a non-zero exit instead of raising it; `flows.box.hostfs.run_checked` is the one way to
run a command that must succeed. The errors hosts raise live in `flows.errors`.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

READ_CHUNK = 64 * 1024  # bytes read from a pipe, channel or socket at a time
_H = TypeVar("_H", bound="Host")


def q(*parts: str | Path) -> str:
    """Shell-quote each part and join them with spaces: `f"cat -- {q(path)}"`."""
    return " ".join(shlex.quote(str(part)) for part in parts)


@dataclass(frozen=True)
class CommandResult:
    """What one shell command did."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Host(ABC):
    """A machine the runbook works on. A context manager: leaving it closes the connection."""

    name: str
    is_remote: bool

    @abstractmethod
    def run(self, command: str, timeout: float = 60.0, stdin: str | None = None) -> CommandResult:
        """Run a shell command (`bash -c`); a non-zero exit is returned, not raised (see `run_checked`).

        `stdin`: text the command reads on its standard input (how a secret reaches a box process without
        a command line or a file); empty otherwise."""

    @abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Upload a file (the remote parent folder must exist; `remote` may start with "~/")."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Download a file (`remote` may start with "~/")."""

    @abstractmethod
    def forward(self, remote_port: int, local_port: int = 0) -> AbstractContextManager[int]:
        """Reach the host's 127.0.0.1:`remote_port` from here; yields the local port to connect to."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; a later call opens a new one."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def decode_output(data: bytes) -> str:
    """A command's output as text (bytes that are not UTF-8 become U+FFFD, never an error)."""
    return data.decode("utf-8", errors="replace")


def timeout_message(name: str, command: str, timeout: float) -> str:
    """The `CommandTimeout` message both kinds of host give."""
    return (
        f"command on {name} did not finish within {timeout:g} s and was killed: {command[:200]!r}. "
        "Give it a longer timeout or look for what hangs on the host."
    )
