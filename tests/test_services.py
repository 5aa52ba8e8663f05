"""`lmpipe services up|status|down` for real: a PostgreSQL cluster, an MLflow server and a Prefect server on it,
in a temporary state dir on free loopback ports. The slow test simulates two hosts (two clones) sharing
those services and one DVC remote."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from helpers import ROOT, clean_env, start, stop

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
    from lmpipe.processes import group_members

    return group_members(pgid)


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
    from lmpipe.team.services import Layout, running

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

    from lmpipe.team.services import Layout, db_url

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


@pytest.mark.slow
def test_two_hosts_share_services_and_a_dvc_remote(tmp_path: Path, tiny_data: Path, state_dir: Path):
    """Host A runs the pipeline and pushes; host B (a separate clone with its own DVC cache) pulls and has
    nothing to reproduce; one MLflow server holds both hosts' runs; B's champion leads back to A's runs; a
    worker on B runs a deployment run created on A."""
    import mlflow

    from helpers import STAGES, make_repo, sh, tiny_params

    env = exported(lmpipe_services("up", state_dir, *FREE_PORTS).stdout)
    uri, api = env["MLFLOW_TRACKING_URI"], env["PREFECT_API_URL"]
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    home = tmp_path / "prefect-home"
    home.mkdir()
    prefect_env = dict(PREFECT_API_URL=api, PREFECT_HOME=str(home), PREFECT_CLI_PROMPT="false",
                       PREFECT_SERVER_ANALYTICS_ENABLED="false")

    # host A: the pipeline against the shared MLflow server, dvc.lock committed, outputs pushed to the remote
    a = make_repo(tmp_path / "host-a", tiny_params(), tiny_data)
    sh(a, "dvc", "remote", "add", "-d", "shared", str(remote))
    sh(a, "git", "commit", "-qam", "DVC remote: shared")
    ran_at = sh(a, "git", "rev-parse", "HEAD").stdout.strip()
    first = sh(a, "dvc", "repro", MLFLOW_TRACKING_URI=uri)
    assert all(f"Running stage '{s}'" in first.stdout for s in STAGES), first.stdout
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "pipeline run on host A")
    sh(a, "dvc", "push")
    assert not (a / "mlflow.db").exists()  # nothing went to the local default store

    # host B: its own clone and DVC cache; pull, then nothing to reproduce
    b = tmp_path / "host-b"
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    assert not (b / ".dvc" / "cache").exists()
    sh(b, sys.executable, "-m", "lmpipe.cli", "data", "link", str(tiny_data))  # machine-local, not in git
    sh(b, "dvc", "pull")
    repro = sh(b, "dvc", "repro", MLFLOW_TRACKING_URI=uri)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert all(f"Stage '{s}' didn't change, skipping" in repro.stdout for s in STAGES), repro.stdout
    assert "Data and pipelines are up to date." in repro.stdout

    # one server, A's six stage runs; B's pulled metrics files name exactly those runs
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    stage_runs = {r.data.tags["lmpipe.stage"]: r.info.run_id for r in runs if "lmpipe.stage" in r.data.tags}
    assert sorted(stage_runs) == sorted(STAGES) and len([r for r in runs if "lmpipe.stage" in r.data.tags]) == 6
    params = tiny_params()
    for stage in STAGES:
        pulled = json.loads((b / params[stage]["metrics"]).read_text())
        assert pulled["mlflow_run_id"] == stage_runs[stage], stage

    # lineage asked on host B: the champion was produced by host A's runs, at a commit B has
    info = json.loads(sh(b, sys.executable, "-m", "lmpipe.cli", "lineage", "models:/lmpipe-sst2@champion", "--json",
                         MLFLOW_TRACKING_URI=uri).stdout)
    assert {s["stage"]: s["run_id"] for s in info["stages"]} == stage_runs
    assert info["git_commit"] == ran_at
    sh(b, "git", "merge-base", "--is-ancestor", ran_at, "HEAD")

    # Prefect: deployments registered from A for the workers' checkout (B's path), a run created on A, a
    # worker on B takes it and completes it (every stage cached: B pulled them)
    res = subprocess.run([sys.executable, "-m", "flows.deployments", "--workspace", str(b)], cwd=a,
                         env=clean_env(**prefect_env), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    created = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run",
                              "lmpipe-pipeline/on-demand"], cwd=a, env=clean_env(**prefect_env),
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout).group(1)

    worker_log = tmp_path / "worker-b.log"
    worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--limit", "1",
                     "--name", "host-b"], b,
                    clean_env(**prefect_env, MLFLOW_TRACKING_URI=uri, PREFECT_WORKER_QUERY_SECONDS="2"), worker_log)
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as pc:
            deadline = time.monotonic() + 600
            while not (state := pc.read_flow_run(flow_run_id).state) or not state.is_final():
                assert worker.poll() is None, f"worker exited:\n{worker_log.read_text()[-4000:]}"
                assert time.monotonic() < deadline, f"flow run still {state.name if state else None}"
                time.sleep(3)
            assert state.is_completed(), f"{state.name}: {state.message}\n{worker_log.read_text()[-4000:]}"
            assert pc.read_flow_run(flow_run_id).work_pool_name == "cpu"
    finally:
        stop(worker)
    assert "host-b" in worker_log.read_text()

    # the worker's execution on B is in the same server: a pipeline run of that flow run, every stage
    # cached and pointing at A's stage runs
    (b_run,) = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert b_run.info.run_name == "workspace@" + b_run.data.tags["git.commit"][:7]  # a plain run of the workspace
    for stage in STAGES:
        assert b_run.data.tags[f"stage.{stage}"] == "cached"
        assert b_run.data.tags[f"stage.{stage}.run_id"] == stage_runs[stage]
    assert len(client.search_runs([exp.experiment_id], "tags.`lmpipe.stage` != ''", max_results=1000)) == 6
