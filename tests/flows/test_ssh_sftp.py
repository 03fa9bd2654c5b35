"""An sshd that offers no SFTP subsystem: file transfers fail with what to set on the box."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.errors import HostError
from tests.support.sshd import SSHServer, running


class NoSftpServer(SSHServer):
    """The test sshd with its `Subsystem sftp` line left out."""

    def _write_config(self) -> None:
        super()._write_config()
        lines = self.config.read_text().splitlines()
        self.config.write_text("\n".join(line for line in lines if not line.startswith("Subsystem")) + "\n")


@pytest.fixture
def no_sftp(tmp_path: Path) -> Iterator[SSHServer]:
    yield from running(tmp_path, NoSftpServer)


def test_no_sftp_subsystem_says_what_to_set_in_sshd_config(no_sftp: SSHServer, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with no_sftp.host() as host:
        assert host.run("echo ok").stdout.strip() == "ok"  # commands work; only file transfer needs SFTP
        with pytest.raises(HostError) as failed:
            host.put(tmp_path / "file", "/tmp/never-written")
    message = str(failed.value)
    assert message.startswith(f"opening SFTP on {host.name} failed (")
    assert "the server offers no SFTP subsystem" in message and "Subsystem sftp internal-sftp" in message
