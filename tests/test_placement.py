"""Stages on the hardware they need (lmpipe/placement.py): one flow run, two hosts, one DVC remote.

Host A and host B are two clones of one repo with their own DVC caches and data links; they share a local DVC
remote, a Prefect server and A's MLflow store, nothing else. A's worker serves pool `cpu`, B's pool `gpu` (on CPU
here: its stage deployment's env says LMPIPE_DEVICE=cpu, as an operator's would on a host without CUDA).
params.yaml puts pretrain and finetune on `gpu`. Host B dies mid-pretrain and comes back: Prefect's heartbeat
automation marks its flow run Crashed, the flow hands pretrain out again, and it resumes from its checkpoint.
All traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import (STAGES, make_repo, mlflow_runs, prefect_env, prefect_server, sh, start, stop, tiny_params,
                     wait_final)

RUN_TIMEOUT = 900  # seconds for the tiny pipeline across two workers (2 shared CPU cores)
ON_GPU = ("pretrain", "finetune")


def _host(path: Path, data: Path, remote: Path) -> Path:
    sh(path, sys.executable, "-m", "lmpipe.cli", "data", "link", str(data))
    sh(path, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    return path


def _worker(host: Path, pool: str, home: Path, api: str, folder: Path, suffix: str = "") -> tuple:
    """A process worker of `pool` running flows from the checkout `host`; its flow runs beat every 30 s (the
    params' silent_after_s is 60 here)."""
    log = folder / f"worker-{pool}{suffix}.log"
    env = prefect_env(home, api, LMPIPE_WORKSPACE=str(host), PREFECT_WORKER_QUERY_SECONDS="2",
                      PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")
    return start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", f"host-{pool}"],
                 host, env, log), log


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and every process under it (its flow run, dvc, the stage: some in sessions of their
    own), as a host that loses power would."""
    import psutil

    root = psutil.Process(proc.pid)
    procs = [*root.children(recursive=True), root]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
    proc.wait()


def _stage_runs(repo: Path) -> dict[str, list]:
    runs: dict[str, list] = {s: [] for s in STAGES}
    for r in mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}"):
        if r.data.tags.get("lmpipe.stage") in runs:
            runs[r.data.tags["lmpipe.stage"]].append(r)
    return runs


@pytest.mark.slow
def test_stages_run_on_their_pools_through_a_dvc_remote(tmp_path, tiny_data):
    params = tiny_params()
    params["placement"] = {"pools": {s: "gpu" for s in ON_GPU}, "stage_timeout_s": 600, "silent_after_s": 60}
    # long enough to be stopped between checkpoints (tiny steps take milliseconds)
    params["pretrain"].update(max_steps=400, checkpoint_every=25, eval_every=200, log_every=50)
    (tmp_path / "a").mkdir()
    host_a = _host(make_repo(tmp_path / "a", params, tiny_data), tiny_data, tmp_path / "remote")
    subprocess.run(["git", "clone", "-q", str(host_a), str(tmp_path / "b")], check=True)
    host_b = _host(tmp_path / "b", tiny_data, tmp_path / "remote")

    workers = []
    with prefect_server(tmp_path) as (api, home):
        try:
            res = subprocess.run([sys.executable, "-m", "flows.deployments", "--workspace", "worker"], cwd=host_a,
                                 env=prefect_env(home, api, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30"),
                                 capture_output=True, text=True, timeout=300)
            assert res.returncode == 0, res.stdout + res.stderr
            assert "deployment lmpipe-stage/gpu" in res.stdout, res.stdout

            from prefect.client.orchestration import get_client
            from prefect.client.schemas.actions import DeploymentUpdate
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                gpu_stage = client.read_deployment_by_name("lmpipe-stage/gpu")
                client.update_deployment(gpu_stage.id, DeploymentUpdate(
                    job_variables={"env": {"LMPIPE_DEVICE": "cpu", "LMPIPE_POOL": "gpu"}}))
                workers = [_worker(host_a, "cpu", home, api, tmp_path), _worker(host_b, "gpu", home, api, tmp_path)]

                on_demand = client.read_deployment_by_name("lmpipe-pipeline/on-demand")
                first = client.create_flow_run_from_deployment(on_demand.id, parameters={})
                # host B dies mid-pretrain (its worker and everything under it), then comes back
                placed = host_b / ".lmpipe" / "placed"
                deadline = time.monotonic() + RUN_TIMEOUT
                while not any(placed.glob("*/checkpoints/pretrain/*/checkpoint-*/trainer_state.json")):
                    assert time.monotonic() < deadline, "pretrain on host B left no checkpoint"
                    assert not client.read_flow_run(first.id).state.is_final(), "the flow ended before the kill"
                    time.sleep(0.05)
                _kill_tree(workers[1][0])
                workers[1] = _worker(host_b, "gpu", home, api, tmp_path, "again")
                state = wait_final(client, first.id, RUN_TIMEOUT, *workers)
                assert state.is_completed(), f"{state.name}: {state.message}"
                stage_flows = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["lmpipe-stage"])))
                states = sorted((r.name, r.state.type.value) for r in stage_flows)
                assert states == [("finetune@gpu", "COMPLETED"), ("pretrain@gpu", "COMPLETED"),
                                  ("pretrain@gpu", "CRASHED")], states

                # the second run: everything is up to date on A, nothing runs and nothing is handed out
                second = client.create_flow_run_from_deployment(on_demand.id, parameters={})
                state = wait_final(client, second.id, RUN_TIMEOUT, *workers)
                assert state.is_completed(), f"{state.name}: {state.message}"
                assert len(client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["lmpipe-stage"])))) == len(states)
                report = [a for a in client.read_artifacts() if a.key == "lmpipe-pipeline-report"]
        finally:
            for proc, _ in workers:
                stop(proc)

    # each stage ran exactly once, on its pool's host, and its MLflow run says where
    runs = _stage_runs(host_a)
    assert {s: len(r) for s, r in runs.items()} == {s: 1 for s in STAGES}
    for stage, (run,) in runs.items():
        tags = run.data.tags
        host, pool = (host_b, "gpu") if stage in ON_GPU else (host_a, "cpu")
        assert (tags["host.pool"], tags["host.worker"]) == (pool, f"host-{pool}"), (stage, tags)
        assert tags["host.workspace"].startswith(str(host)), (stage, tags["host.workspace"])
        assert tags["host.device"] == "cpu" and tags["host.cpu"] and tags["host.torch"]
        assert tags["prefect.flow_run_id"] == str(first.id)  # the flow run that started it, on either host
    # the stopped pretrain went on from its checkpoint on B, in the same MLflow run
    resumed = Path(runs["pretrain"][0].data.tags.get("pretrain.resumed_from", ""))
    assert resumed.name.startswith("checkpoint-") and resumed.is_relative_to(host_b / ".lmpipe" / "placed"), resumed
    # A's dvc.lock names B's outputs; A's workspace has them and the remote has everything (its run cache too)
    lock = yaml.safe_load((host_a / "dvc.lock").read_text())["stages"]
    assert list(lock) == STAGES
    assert "up to date" in sh(host_a, "dvc", "status").stdout
    cloud = json.loads(sh(host_a, "dvc", "status", "--cloud", "--json").stdout or "{}")
    assert cloud == {}, cloud
    assert any((tmp_path / "remote" / "runs").rglob("*")), "no run cache pushed"
    # B's placed worktrees went once their stage was done; its own checkout is untouched
    assert not list((host_b / ".lmpipe" / "placed").glob("*"))
    assert not (host_b / "dvc.lock").exists()
    # the flow's report names where each stage ran
    rows = [ln for ln in report[-1].data.splitlines() if ln.startswith("| pretrain |")]
    assert rows and "pool gpu · worker host-gpu" in rows[0] and str(host_b) in rows[0], report[-1].data
