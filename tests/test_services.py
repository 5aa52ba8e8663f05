"""`lmpipe services up|status|down` for real: a PostgreSQL cluster, an MLflow server and a Prefect server on it,
in a temporary state dir on free loopback ports. The slow test simulates two hosts (two clones) sharing
those services and one DVC remote."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, clean_env

FREE_PORTS = ["--set", "services.postgres_port=0", "--set", "services.mlflow_port=0",
              "--set", "services.prefect_port=0"]


def lmpipe_services(action: str, state: Path, *args: str, cwd: Path = ROOT, check: bool = True):
    env = clean_env(PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API_URL")}
    res = subprocess.run([sys.executable, "-m", "lmpipe.cli", "services", action, "--state-dir", str(state), *args],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, f"services {action} failed:\n{res.stdout}\n{res.stderr}"
    return res


def exported(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)$", stdout, re.M))


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def group_alive(pgid: int) -> list[int]:
    from lmpipe.services import _group_members

    return _group_members(pgid)


@pytest.fixture
def state_dir():
    """A state dir the postgres user can enter (pytest's tmp_path sits under a root-only folder)."""
    path = Path(tempfile.mkdtemp(prefix="lmpipe-services-"))
    path.chmod(0o755)
    yield path
    # whatever a failed test left running in it is stopped, by its own pid files
    if (path / "ports.json").exists():
        lmpipe_services("down", path, check=False)
    subprocess.run(["rm", "-rf", str(path)])


def pids(state: Path) -> dict[str, int | None]:
    from lmpipe.services import Layout, running

    return running(Layout(state))


@pytest.mark.slow  # ~75 s: the first start of MLflow and Prefect migrates their databases
def test_services_up_status_down(state_dir: Path):
    # up: three services, the exports to use
    res = lmpipe_services("up", state_dir, *FREE_PORTS)
    env = exported(res.stdout)
    assert set(env) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}, res.stdout
    assert env["MLFLOW_TRACKING_URI"].startswith("http://127.0.0.1:") and env["PREFECT_API_URL"].endswith("/api")
    started = pids(state_dir)
    assert all(started.values()), f"{started}\n{res.stdout}\n{(state_dir / 'prefect.log').read_text()[-3000:]}"

    # up again: nothing new, the same exports
    again = lmpipe_services("up", state_dir, *FREE_PORTS)
    assert "services: already running" in again.stdout and exported(again.stdout) == env
    assert pids(state_dir) == started

    # status: each running, its pid and URL
    status = lmpipe_services("status", state_dir).stdout.splitlines()
    assert [ln.split(":")[0] for ln in status] == ["postgres", "mlflow", "prefect"]
    for line, (name, pid) in zip(status, started.items()):
        assert f"{name}: running  pid {pid}" in line, status
    assert env["MLFLOW_TRACKING_URI"] in status[1] and env["PREFECT_API_URL"] in status[2]

    # a real MLflow run through the server lands in PostgreSQL (read back with psycopg2, not through MLflow)
    import mlflow
    import psycopg2

    from lmpipe.services import Layout, db_url

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp_id = client.create_experiment("services-test")
    run = client.create_run(exp_id, run_name="probe")
    for step in range(3):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    client.log_param(run.info.run_id, "stage", "pretrain")
    client.set_terminated(run.info.run_id)
    pg_port = int(re.search(r"127\.0\.0\.1:(\d+)", status[0]).group(1))
    with psycopg2.connect(db_url(Layout(state_dir), pg_port, "mlflow")) as conn, conn.cursor() as cur:
        cur.execute("SELECT name, status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cur.fetchone() == ("probe", "FINISHED")
        cur.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss' ORDER BY step",
                    (run.info.run_id,))
        assert cur.fetchall() == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
        cur.execute("SELECT value FROM params WHERE run_uuid = %s AND key = 'stage'", (run.info.run_id,))
        assert cur.fetchone() == ("pretrain",)

    # Prefect answers on its own database
    assert requests.get(f"{env['PREFECT_API_URL']}/health", timeout=10).json() is True
    with psycopg2.connect(db_url(Layout(state_dir), pg_port, "prefect")) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM alembic_version")
        assert cur.fetchone()[0] == 1

    # down stops exactly those: every process of each server's session, and the postmaster
    res = lmpipe_services("down", state_dir)
    assert res.stdout.splitlines() == [f"prefect: stopped (pid {started['prefect']})",
                                       f"mlflow: stopped (pid {started['mlflow']})",
                                       f"postgres: stopped (pid {started['postgres']})"], res.stdout
    for name, pid in started.items():
        assert not alive(pid), f"{name} pid {pid} still running"
        if name != "postgres":
            assert group_alive(pid) == [], f"{name}'s workers still running"
    assert all(v is None for v in pids(state_dir).values())
    assert all("stopped" in ln for ln in lmpipe_services("status", state_dir).stdout.splitlines())

    # a stale pid file naming some other process: down leaves that process alone
    other = subprocess.Popen(["sleep", "60"])
    try:
        (state_dir / "mlflow.pid").write_text(f'{{"pid": {other.pid}, "start": "1", "cmdline": ["mlflow"]}}')
        res = lmpipe_services("down", state_dir)
        assert "mlflow: not running (stale pid file removed)" in res.stdout and other.poll() is None
    finally:
        other.send_signal(signal.SIGTERM)
        other.wait()


def test_port_in_use_is_one_line(state_dir: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = lmpipe_services("up", state_dir, "--set", f"services.postgres_port={port}", check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"services.postgres_port: 127.0.0.1:{port} is in use" in err[0], res.stderr
