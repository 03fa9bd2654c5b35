"""Process control on a host, by PID only: find, start detached, stop (TERM, wait, KILL).

A process is identified by its PID *and* its start time (field 22 of `/proc/<pid>/stat`), so a PID that
the kernel reused for another program is never signalled. Nothing here matches process names.
"""

from __future__ import annotations

import shlex
import time

from flows.box.hostfs import make_dirs, run_checked
from flows.box.hosts import Host, q
from flows.errors import HostCommandError, ProcessError
from flows.evidence.results import ProcessInfo


def process_info(host: Host, pid: int) -> ProcessInfo | None:
    """The live process with this PID, or None (gone, or a zombie)."""
    result = host.run(f"cat /proc/{int(pid)}/stat && echo && tr '\\0' ' ' < /proc/{int(pid)}/cmdline")
    if not result.ok:
        return None
    stat, _, cmdline = result.stdout.partition("\n")
    # Field 2 (comm) may contain spaces and parentheses: parse after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    state, pgid, start_ticks = fields[0], int(fields[2]), int(fields[19])
    if state in ("Z", "X"):
        return None
    return ProcessInfo(pid=pid, start_ticks=start_ticks, cmdline=cmdline.strip(), group_leader=pgid == pid)


def is_running(host: Host, info: ProcessInfo) -> bool:
    """True while the very process we recorded is alive (same PID and start time), or, for a group
    leader, while any process of its group still lives (children exiting after a TERM)."""
    now = process_info(host, info.pid)
    if now is not None:
        return now.start_ticks == info.start_ticks  # a different start time: the PID was reused
    # The leader is gone; the kernel never reuses a PID that still names a process group, so any
    # member of that group is one of its children.
    return info.group_leader and bool(group_members(host, info.pid))


def group_members(host: Host, pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    # "pid (comm) state ppid pgrp ..."; comm may hold spaces and ')', hence the greedy match.
    script = r"sed -n 's/^\([0-9]*\) (.*) \([A-Z]\) [0-9-]* \([0-9]*\) .*/\1 \2 \3/p' /proc/[0-9]*/stat 2>/dev/null"
    members = []
    for line in host.run(script).stdout.splitlines():
        pid, state, group = line.split()
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(pid))
    return members


def pid_from_file(host: Host, pid_file: str) -> int | None:
    """The PID written in `pid_file`, or None if it is missing or not a number."""
    result = host.run(f"cat -- {q(pid_file)}")
    text = result.stdout.strip() if result.ok else ""
    return int(text) if text.isdigit() else None


# Which PIDs have a listening TCP socket on the port: the socket inode from /proc/net/tcp{,6}
# (state 0A = LISTEN, local port in hex), then the process whose fd links to that inode.
_LISTENER_SCRIPT = """\
inodes=$(awk -v p=":$(printf '%04X' {port})" \
  '$4 == "0A" && substr($2, length($2) - 4) == p {{ print $10 }}' /proc/net/tcp /proc/net/tcp6 2>/dev/null)
for i in $inodes; do
  find /proc/[0-9]*/fd -maxdepth 1 -lname "socket:\\[$i\\]" -printf '%h\\n' 2>/dev/null
done | cut -d/ -f3 | sort -un
"""


def listener_pids(host: Host, port: int) -> list[int]:
    """PIDs of the processes listening on TCP `port` (any address)."""
    out = run_checked(host, _LISTENER_SCRIPT.format(port=int(port)), f"looking for a listener on port {port}")
    return [int(line) for line in out.split() if line.isdigit()]


def listening_ports(host: Host) -> set[int]:
    """Every TCP port something listens on (any address), from /proc/net/tcp{,6} in one round trip."""
    script = 'cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk \'$4 == "0A" { n = split($2, a, ":"); print a[n] }\''
    out = run_checked(host, script, "listing the listening ports")
    return {int(port, 16) for port in out.split()}


def find_service(host: Host, port: int, pid_file: str | None = None) -> ProcessInfo | None:
    """The service's process: from its pid file when that PID lives, else the listener on `port`."""
    if pid_file:
        pid = pid_from_file(host, pid_file)
        info = process_info(host, pid) if pid else None
        if info:
            return info
    for pid in listener_pids(host, port):
        info = process_info(host, pid)
        if info:
            # A worker child of the service holds the socket too; prefer the top of its group.
            leader = process_info(host, _pgid(host, pid)) if not info.group_leader else None
            return leader if leader and leader.group_leader else info
    return None


def _pgid(host: Host, pid: int) -> int:
    out = run_checked(host, f"cat /proc/{int(pid)}/stat", f"reading process {pid}")
    return int(out[out.rfind(")") + 2 :].split()[2])


def start_detached(
    host: Host,
    argv: list[str],
    *,
    workdir: str,
    log_file: str,
    pid_file: str,
    env: dict[str, str] | None = None,
    timeout_s: float = 15.0,
) -> ProcessInfo:
    """Start `argv` in its own session (survives the SSH channel), output appended to `log_file`.

    The child writes its own PID into `pid_file` (mode 0600) before it execs, so the PID is exact even
    where `setsid` forks.
    """
    log_dir, pid_dir = (p.rsplit("/", 1)[0] or "/" for p in (log_file, pid_file))
    make_dirs(host, log_dir, pid_dir, workdir)
    env_argv = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
    command = (
        f"cd -- {q(workdir)} && rm -f -- {q(pid_file)} && "
        f'{{ setsid sh -c \'m=$(umask); umask 077; echo $$ > "$0" || exit 1; umask "$m"; exec "$@"\' '
        f"{q(pid_file, *env_argv, *argv)} "
        f">> {q(log_file)} 2>&1 < /dev/null & }}"
    )
    run_checked(host, command, f"starting {shlex.join(argv)[:200]}")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = pid_from_file(host, pid_file)
        info = process_info(host, pid) if pid else None
        if info:
            return info
        if pid:  # wrote its PID and is already gone
            break
        time.sleep(0.1)
    raise ProcessError(f"{shlex.join(argv)[:200]} did not start on {host.name}; see {log_file}")


def stop_process(host: Host, info: ProcessInfo, timeout_s: float = 30.0) -> str:
    """Stop the recorded process (its whole group when it leads one): TERM, wait, then KILL.

    Returns what happened; does nothing when that process is already gone.
    """
    if not is_running(host, info):
        return f"{info.describe()} was not running"
    target = f"-{info.pid}" if info.group_leader else str(info.pid)
    started = time.monotonic()
    host.run(f"kill -s TERM -- {target}")
    if _wait_gone(host, info, timeout_s):
        return f"stopped {info.describe()} with TERM in {time.monotonic() - started:.1f} s"
    host.run(f"kill -s KILL -- {target}")
    if _wait_gone(host, info, 10.0):
        return f"killed {info.describe()} after {timeout_s:.0f} s without exiting on TERM"
    raise ProcessError(f"{info.describe()} is still running on {host.name} after KILL")


def _wait_gone(host: Host, info: ProcessInfo, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not is_running(host, info):
            return True
        time.sleep(0.2)
    return not is_running(host, info)


def wait_port_free(host: Host, port: int, timeout_s: float = 15.0) -> None:
    """Wait until nothing listens on `port`; raise naming who still holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        holders = listener_pids(host, port)
        if not holders:
            return
        if time.monotonic() > deadline:
            who = ", ".join(
                info.describe() if (info := process_info(host, p)) else f"PID {p}" for p in holders
            )
            raise HostCommandError(f"port {port} on {host.name} is still in use by {who}")
        time.sleep(0.2)
