"""Deployments on a real Prefect server: `python -m flows.deployments` registers the pools and the
deployments of prefect.yaml, a local process worker picks up an `on-demand` run, and the run lands
in the workspace's MLflow store and DVC experiments. All traffic stays on 127.0.0.1."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, SHARED_DATA, STAGES, make_repo, prefect_env, prefect_server, sh, start, stop, tail

RUN_TIMEOUT = 720  # seconds for the smoke pipeline through the worker (2 shared CPU cores)
SWEEP = {"profile": "smoke", "fixed": {"finetune.max_steps": 4, "finetune.eval_every": 2},
         "space": {"finetune.learning_rate": {"type": "categorical", "choices": [0.001, 0.0001]}},
         "sampler": "grid", "objective": "val_accuracy", "direction": "maximize"}


@pytest.mark.slow
def test_deployments_and_process_worker(tmp_path):
    # the workspace: a git + DVC repo of the project; the deployment files are copied in first
    # (make_repo copies only tracked files, and commits whatever is in dest)
    dest = tmp_path / "repo"
    (dest / "flows").mkdir(parents=True)
    shutil.copy2(ROOT / "prefect.yaml", dest / "prefect.yaml")
    shutil.copy2(ROOT / "flows" / "deployments.py", dest / "flows" / "deployments.py")
    (dest / "sweeps").mkdir()
    (dest / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    repo = make_repo(dest, None)

    worker_log = tmp_path / "worker.log"
    worker = None
    with prefect_server(tmp_path) as (api, home):
        try:
            # register pools + deployments (twice: idempotent)
            for _ in range(2):
                res = subprocess.run([sys.executable, "-m", "flows.deployments", "--workspace", str(repo)], cwd=repo,
                                     env=prefect_env(home, api), capture_output=True, text=True, timeout=300)
                assert res.returncode == 0, f"flows.deployments failed:\n{res.stdout}\n{res.stderr}"
            lines = res.stdout.splitlines()
            assert len(lines) == 8, res.stdout  # 2 pools, the heartbeat automation, 5 deployments
            assert any(ln.startswith("work pool gpu:") for ln in lines)
            assert any(ln.startswith("deployment lmpipe-pipeline/nightly:") and "0 2 * * *" in ln for ln in lines)

            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
                # registered twice, one automation, its window from params.yaml (placement.silent_after_s)
                zombies = [a for a in client.read_automations() if a.name == "lmpipe: crash silent flow runs"]
                assert len(zombies) == 1 and zombies[0].trigger.within.total_seconds() == 600, zombies
                cpu, gpu = client.read_work_pool("cpu"), client.read_work_pool("gpu")
                assert cpu.type == gpu.type == "process"
                assert gpu.base_job_template["variables"]["properties"]["env"]["default"]["LMPIPE_DEVICE"] == "cuda"
                assert cpu.base_job_template["variables"]["properties"]["env"]["default"]["LMPIPE_DEVICE"] == "cpu"

                nightly = client.read_deployment_by_name("lmpipe-pipeline/nightly")
                assert nightly.work_pool_name == "gpu"
                assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
                assert nightly.job_variables["env"] == {"LMPIPE_DEVICE": "cuda", "LMPIPE_POOL": "gpu"}  # every GPU visible
                on_demand = client.read_deployment_by_name("lmpipe-pipeline/on-demand")
                assert on_demand.work_pool_name == "cpu" and not on_demand.schedules
                assert on_demand.job_variables["env"] == {"LMPIPE_DEVICE": "cpu", "LMPIPE_POOL": "cpu"}
                sweep_dep = client.read_deployment_by_name("lmpipe-sweep/on-demand")
                assert sweep_dep.work_pool_name == "cpu" and not sweep_dep.schedules
                for dep in (nightly, on_demand, sweep_dep):  # local checkout, nothing cloned or built
                    assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]

                flow_run = client.create_flow_run_from_deployment(
                    on_demand.id, parameters={"profile": "smoke", "workspace": str(repo)})

                worker_env = prefect_env(home, api, LMPIPE_DATA_DIR=str(SHARED_DATA), LMPIPE_WORKSPACE=str(repo),
                                          PREFECT_WORKER_QUERY_SECONDS="2")
                worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "cpu", "--limit", "1",
                                 "--name", "test-worker"], repo, worker_env, worker_log)
                deadline = time.monotonic() + RUN_TIMEOUT
                while True:
                    state = client.read_flow_run(flow_run.id).state
                    if state is not None and state.is_final():
                        break
                    assert worker.poll() is None, f"worker exited:\n{tail(worker_log)}"
                    assert time.monotonic() < deadline, f"flow run still {state.name if state else None}:\n{tail(worker_log)}"
                    time.sleep(5)
                assert state.is_completed(), f"flow run {state.name}: {state.message}\n{tail(worker_log)}"
                run_name = client.read_flow_run(flow_run.id).name

                # the sweep deployment, as `prefect deployment run 'lmpipe-sweep/on-demand' -p sweep=tiny` creates it
                sweep_run = client.create_flow_run_from_deployment(sweep_dep.id, parameters={"sweep": "tiny"})
                deadline = time.monotonic() + RUN_TIMEOUT
                while not (state := client.read_flow_run(sweep_run.id).state) or not state.is_final():
                    assert worker.poll() is None, f"worker exited:\n{tail(worker_log)}"
                    assert time.monotonic() < deadline, f"sweep flow run still {state.name if state else None}"
                    time.sleep(5)
                assert state.is_completed(), f"sweep flow run {state.name}: {state.message}\n{tail(worker_log)}"
            # docs/prefect.md's command, as a user types it (no client-side patch: prefect 3.9.1 + fastapi < 0.151)
            ls = subprocess.run([str(Path(sys.executable).parent / "prefect"), "flow-run", "ls", "--flow-name",
                                 "lmpipe-pipeline"], cwd=repo, env={**prefect_env(home, api), "COLUMNS": "250"},  # no truncated cells
                                capture_output=True,
                                text=True, timeout=120)
            assert ls.returncode == 0, ls.stdout + ls.stderr
            assert run_name in ls.stdout and "COMPLETED" in ls.stdout, ls.stdout
        finally:
            stop(worker)

    # MLflow: the execution's pipeline run carries the deployment, the six stage runs hang under it
    with sqlite3.connect(repo / "mlflow.db") as db:
        parents = db.execute(
            "SELECT r.run_uuid, t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'prefect.deployment' AND r.run_uuid IN (SELECT run_uuid FROM tags WHERE key = 'lmpipe.kind' "
            "AND value = 'summary') AND r.run_uuid NOT IN "
            "(SELECT run_uuid FROM tags WHERE key = 'sweep.trial')").fetchall()  # the sweep's trials: below
        assert [p[1] for p in parents] == ["on-demand"], parents
        stages = db.execute(
            "SELECT s.value FROM tags p JOIN tags s ON s.run_uuid = p.run_uuid "
            "WHERE p.key = 'mlflow.parentRunId' AND p.value = ? AND s.key = 'lmpipe.stage'", (parents[0][0],)).fetchall()
    assert sorted(s[0] for s in stages) == sorted(STAGES)

    # DVC: the run was an experiment (profile=smoke), saved under the flow run's name
    exps = sh(repo, "dvc", "exp", "ls").stdout
    assert f"prefect-{run_name}" in exps

    # the sweep: one MLflow sweep run tagged with its flow run, two trials saved as DVC experiments, and no
    # pretrain under them (the smoke pipeline above left it in DVC's run cache)
    assert "tiny-t000" in exps and "tiny-t001" in exps
    with sqlite3.connect(repo / "mlflow.db") as db:
        (sweep_parent,) = db.execute("SELECT run_uuid FROM tags WHERE key = 'lmpipe.kind' AND value = 'sweep'").fetchall()
        tags = dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", sweep_parent).fetchall())
        trials = [r[0] for r in db.execute("SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?",
                                           sweep_parent)]
        trial_stages = db.execute(
            f"SELECT value FROM tags WHERE key = 'lmpipe.stage' AND run_uuid IN (SELECT run_uuid FROM tags WHERE "
            f"key = 'mlflow.parentRunId' AND value IN ({','.join('?' * len(trials))}))", trials).fetchall()
    assert tags["prefect.flow_run_id"] == str(sweep_run.id) and tags["prefect.deployment"] == "on-demand"
    assert len(trials) == 2 and sorted(s[0] for s in trial_stages) == sorted(["finetune", "evaluate", "deploy"] * 2)
