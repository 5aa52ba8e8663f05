"""Stages on the hardware they need (lmpipe/placement.py): one flow run, two hosts, one DVC remote.

Host A and host B are two clones of one repo with their own DVC caches and data links; they share a local DVC
remote, a Prefect server and A's MLflow store, nothing else. A's worker serves pool `cpu`, B's pool `gpu` (on CPU
here: its stage deployment's env says LMPIPE_DEVICE=cpu, as an operator's would on a host without CUDA).
params.yaml puts pretrain and finetune on `gpu`. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
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


def _stage_runs(repo: Path) -> dict[str, list]:
    runs: dict[str, list] = {s: [] for s in STAGES}
    for r in mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}"):
        if r.data.tags.get("lmpipe.stage") in runs:
            runs[r.data.tags["lmpipe.stage"]].append(r)
    return runs


@pytest.mark.slow
def test_stages_run_on_their_pools_through_a_dvc_remote(tmp_path, tiny_data):
    params = tiny_params()
    params["placement"] = {"pools": {s: "gpu" for s in ON_GPU}, "stage_timeout_s": 600}
    (tmp_path / "a").mkdir()
    host_a = _host(make_repo(tmp_path / "a", params, tiny_data), tiny_data, tmp_path / "remote")
    subprocess.run(["git", "clone", "-q", str(host_a), str(tmp_path / "b")], check=True)
    host_b = _host(tmp_path / "b", tiny_data, tmp_path / "remote")

    workers = []
    with prefect_server(tmp_path) as (api, home):
        try:
            res = subprocess.run([sys.executable, "-m", "flows.deployments", "--workspace", "worker"], cwd=host_a,
                                 env=prefect_env(home, api), capture_output=True, text=True, timeout=300)
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
                for host, pool in ((host_a, "cpu"), (host_b, "gpu")):
                    log = tmp_path / f"worker-{pool}.log"
                    env = prefect_env(home, api, LMPIPE_WORKSPACE=str(host), PREFECT_WORKER_QUERY_SECONDS="2")
                    workers.append((start([sys.executable, "-m", "prefect", "worker", "start", "--pool", pool,
                                           "--name", f"host-{pool}"], host, env, log), log))

                on_demand = client.read_deployment_by_name("lmpipe-pipeline/on-demand")
                first = client.create_flow_run_from_deployment(on_demand.id, parameters={})
                state = wait_final(client, first.id, RUN_TIMEOUT, *workers)
                assert state.is_completed(), f"{state.name}: {state.message}"
                stage_flows = client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["lmpipe-stage"])))
                assert sorted(r.name for r in stage_flows) == sorted(f"{s}@gpu" for s in ON_GPU)
                assert all(r.state.is_completed() for r in stage_flows)

                # the second run: everything is up to date on A, nothing runs and nothing is handed out
                second = client.create_flow_run_from_deployment(on_demand.id, parameters={})
                state = wait_final(client, second.id, RUN_TIMEOUT, *workers)
                assert state.is_completed(), f"{state.name}: {state.message}"
                assert len(client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=["lmpipe-stage"])))) == len(ON_GPU)
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
        assert tags["host.pool"] == pool, (stage, tags)
        assert tags["host.workspace"].startswith(str(host)), (stage, tags["host.workspace"])
        assert tags["host.device"] == "cpu" and tags["host.cpu"] and tags["host.torch"]
        assert tags["prefect.flow_run_id"] == str(first.id)  # the flow run that started it, on either host
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
    assert rows and "pool gpu" in rows[0] and str(host_b) in rows[0], report[-1].data
