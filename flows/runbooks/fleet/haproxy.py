"""A small client of HAProxy's runtime API (the `stats socket` with `level admin`): put a server in
drain, ready or maint, read `show stat`, wait for a drained server's sessions to end, wait for HAProxy's
own health check to see a server UP. The socket is on this machine, or on a host reached over SSH (a
python3 one-liner there sends the command: no socat needed)."""

from __future__ import annotations

import csv
import io
import socket
import time
from typing import Literal

from pydantic import BaseModel

from flows.box.hosts import Host, q
from flows.config.fleet import LoadBalancer
from flows.errors import BalancerError

ServerState = Literal["ready", "drain", "maint"]

_REMOTE_SEND = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_UNIX);s.settimeout(10);s.connect(sys.argv[1])\n"
    "s.sendall(sys.argv[2].encode()+b'\\n');out=b''\n"
    "while True:\n"
    "    b=s.recv(65536)\n"
    "    if not b: break\n"
    "    out+=b\n"
    "sys.stdout.write(out.decode())\n"
)


class ServerStat(BaseModel):
    """One server's row of `show stat` (the fields the fleet uses)."""

    name: str
    status: str  # UP, DOWN, DRAIN, MAINT, "UP 1/2" (going down), "DOWN 1/2" (coming up), NOLB ...
    scur: int  # current sessions
    req_tot: int  # HTTP requests answered
    hrsp_5xx: int
    rtime: int  # average response time (ms) over the last 1024 requests
    ttime: int  # average total session time (ms) over the last 1024 requests
    check_status: str

    @property
    def up(self) -> bool:
        """HAProxy's health check sees it up (a drained server that passes its check reads DRAIN)."""
        return self.status in ("UP", "DRAIN")


def _int(value: str | None) -> int:
    return int(value) if value and value.strip().lstrip("-").isdigit() else 0


class HAProxyAPI:
    """Commands to one backend through the runtime API socket."""

    def __init__(self, balancer: LoadBalancer, host: Host | None = None) -> None:
        self.balancer = balancer
        self.backend = balancer.backend
        self.host = host  # the host the socket is on (None: this machine)

    def command(self, line: str) -> str:
        """Send one runtime-API command; its answer."""
        if self.host is not None:
            result = self.host.run(
                f"python3 -c {q(_REMOTE_SEND)} {q(self.balancer.socket)} {q(line)}", timeout=30
            )
            if not result.ok:
                raise BalancerError(
                    f"HAProxy runtime API {self.balancer.socket} on {self.host.name}: {result.stderr.strip()}"
                )
            return result.stdout
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(self.balancer.socket)
                sock.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise BalancerError(f"HAProxy runtime API {self.balancer.socket}: {exc}") from exc
        return b"".join(chunks).decode()

    def set_state(self, server: str, state: ServerState) -> None:
        """`set server BACKEND/SERVER state drain|ready|maint` (HAProxy answers an empty line)."""
        answer = self.command(f"set server {self.backend}/{server} state {state}").strip()
        if answer:
            raise BalancerError(
                f"set server {self.backend}/{server} state {state}: HAProxy answered {answer!r}"
            )

    def stats(self) -> dict[str, ServerStat]:
        """`show stat` of the backend's servers, by server name."""
        text = self.command("show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        stats = {}
        for row in rows:
            if row.get("pxname") != self.backend or row.get("svname") in ("FRONTEND", "BACKEND"):
                continue
            stats[row["svname"]] = ServerStat(
                name=row["svname"],
                status=row.get("status", ""),
                scur=_int(row.get("scur")),
                req_tot=_int(row.get("req_tot")),
                hrsp_5xx=_int(row.get("hrsp_5xx")),
                rtime=_int(row.get("rtime")),
                ttime=_int(row.get("ttime")),
                check_status=row.get("check_status", ""),
            )
        if not stats:
            raise BalancerError(f"HAProxy has no backend {self.backend!r} with servers (show stat)")
        return stats

    def stat(self, server: str) -> ServerStat:
        stats = self.stats()
        if server not in stats:
            raise BalancerError(
                f"HAProxy backend {self.backend!r} has no server {server!r} (servers: {sorted(stats)})"
            )
        return stats[server]

    def servers_state(self) -> str:
        """`show servers state BACKEND`, as HAProxy prints it (for the record)."""
        return self.command(f"show servers state {self.backend}")

    def wait_drained(self, server: str, timeout_s: float, poll_s: float = 0.1) -> float:
        """Wait until the server has no current session; the seconds it took (BalancerError on timeout)."""
        started = time.monotonic()
        while True:
            stat = self.stat(server)
            if stat.scur == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise BalancerError(
                    f"{self.backend}/{server} still has {stat.scur} session(s) after {timeout_s:.0f} s of drain"
                )
            time.sleep(poll_s)

    def wait_up(self, server: str, timeout_s: float, poll_s: float = 0.1) -> float:
        """Wait until HAProxy's health check sees the server up; the seconds it took."""
        started = time.monotonic()
        while True:
            stat = self.stat(server)
            if stat.up:
                return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise BalancerError(
                    f"HAProxy's health check did not see {self.backend}/{server} up within {timeout_s:.0f} s "
                    f"(status {stat.status}, check {stat.check_status})"
                )
            time.sleep(poll_s)
