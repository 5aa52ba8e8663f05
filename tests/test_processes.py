"""lmpipe/processes.py on real processes: a group that exits on SIGTERM, one that ignores it, and ports."""

from __future__ import annotations

import socket
import subprocess
import time

from lmpipe.processes import free_port, group_members, port_free, stop_group


def _group(script: str) -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(proc.pid)) < 2 and time.monotonic() < deadline:  # bash and its sleep
        time.sleep(0.05)
    return proc


def test_a_group_that_obeys_sigterm_stops_within_the_grace():
    proc = _group("sleep 60 & wait")
    t0 = time.monotonic()
    assert stop_group(proc.pid, grace=10, alive=lambda: proc.poll() is None)
    assert time.monotonic() - t0 < 5 and proc.returncode == -15


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace_with_every_member():
    proc = _group("trap '' TERM; sleep 60 & trap '' TERM; wait; sleep 60")
    members = group_members(proc.pid)
    t0 = time.monotonic()
    assert stop_group(proc.pid, grace=0.5)
    assert 0.5 <= time.monotonic() - t0 < 5
    assert group_members(proc.pid) == [] and len(members) >= 2
    proc.wait(timeout=5)
    assert proc.returncode == -9


def test_a_group_already_gone_is_stopped():
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    assert stop_group(proc.pid, grace=1)


def test_free_port_is_bindable_and_avoids_what_it_is_told():
    port = free_port()
    assert port_free("127.0.0.1", port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free("127.0.0.1", port)
        assert free_port(avoid={port}) != port
