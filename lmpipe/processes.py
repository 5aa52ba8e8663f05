"""Processes and ports, one home each: stopping a process group (SIGTERM, then SIGKILL after a grace period) and
picking a free local port. Used by the flow (a running stage), the team services and the tests and benchmarks
that start servers.

    from lmpipe.processes import free_port, stop_group
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (a server and the workers it forked), from /proc."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            found.append(int(stat.split("/")[2]))
    return found


def stop_group(pgid: int, grace: float, kill_wait: float = 10.0, alive: Callable[[], bool] | None = None) -> bool:
    """SIGTERM the process group `pgid` leads, SIGKILL it when it is still alive after `grace` seconds; True once
    nothing is left (within `kill_wait` of the SIGKILL). `alive` tells whether it still runs: by default any live
    member in /proc; a parent passes its child's `poll() is None`, which also reaps it."""
    running = alive or (lambda: bool(group_members(pgid)))
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not running():
                return True
            time.sleep(0.1)
    return not running()


def port_free(host: str, port: int) -> bool:
    """Nothing listens on host:port (a bind succeeds)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1", avoid: set[int] = frozenset()) -> int:
    """A port nothing listens on and not in `avoid` (ports picked for servers that have not bound yet)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port
