"""The Prefect flow on real Prefect (test harness API), real DVC repos and a real MLflow store."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from conftest import STAGES, make_repo, mlflow_runs, sh, tiny_params


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(monkeypatch):
    for key in ("MLFLOW_TRACKING_URI", "LMPIPE_DATA_DIR", "LMPIPE_PARENT_RUN_ID", "LMPIPE_RUN_TAGS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                           GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1").items():
        monkeypatch.setenv(key, value)


def _runs(repo: Path):
    return mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")


def test_flow_experiment_then_all_cached(tmp_path, tiny_data, harness, flow_env):
    from flows.pipeline import pipeline

    base = tiny_params()
    repo = make_repo(tmp_path / "repo", base)
    before = (repo / "params.yaml").read_text()
    overrides = {"pretrain.learning_rate": 0.002}

    first = pipeline(overrides=overrides, workspace=str(repo))
    assert [r["stage"] for r in first["stages"]] == STAGES and all(r["ran"] for r in first["stages"])
    assert (repo / "params.yaml").read_text() == before          # user's params untouched
    assert first["exp_name"] in sh(repo, "dvc", "exp", "ls").stdout  # experiment saved and listed
    assert first["metrics"]["classifier"]["accuracy"] >= 0
    import httpx
    from prefect.settings import PREFECT_API_URL

    # plain REST call: this prefect/fastapi pair rejects the client's null limit/offset/sort defaults
    resp = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                      json={"artifacts": {"key": {"any_": ["lmpipe-pipeline-report"]}},
                            "limit": 10, "offset": 0, "sort": "CREATED_DESC"})
    resp.raise_for_status()
    arts = resp.json()
    report = arts[0]["data"]
    assert "classifier.accuracy" in report and "| pretrain | ran |" in report and first["parent_run_id"] in report

    runs = _runs(repo)
    parent = next(r for r in runs if r.info.run_id == first["parent_run_id"])
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["dvc.exp_name"] == first["exp_name"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags.get("lmpipe.stage")]
    assert sorted(r.data.tags["lmpipe.stage"] for r in children) == sorted(STAGES)
    assert all(r.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] for r in children)
    pre = next(r for r in children if r.data.tags["lmpipe.stage"] == "pretrain")
    assert pre.data.params["pretrain.learning_rate"] == "0.002"

    # same experiment again: DVC's run cache serves every stage, no new stage runs appear
    n_stage_runs = len([r for r in runs if r.data.tags.get("lmpipe.stage")])
    second = pipeline(overrides=overrides, workspace=str(repo))
    assert all(r["cached"] for r in second["stages"]), second["stages"]
    runs2 = _runs(repo)
    assert len([r for r in runs2 if r.data.tags.get("lmpipe.stage")]) == n_stage_runs
    parent2 = next(r for r in runs2 if r.info.run_id == second["parent_run_id"])
    for stage in STAGES:
        assert parent2.data.tags[f"stage.{stage}"] == "cached"
        first_id = next(r["mlflow_run_id"] for r in first["stages"] if r["stage"] == stage)
        assert parent2.data.tags[f"stage.{stage}.run_id"] == first_id


def test_flow_stage_failure_stops_pipeline(tmp_path, tiny_data, harness, flow_env):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo", tiny_params())
    state = pipeline(overrides={"clean.labeled.train.label_column": "sentiment"}, workspace=str(repo),
                     retries=0, return_state=True)
    assert state.is_failed()
    assert "clean: error:" in state.message and "'sentiment'" in state.message
    # the stage's error line is the first log line of the failed task run
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    import time

    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        for _ in range(60):  # logs are shipped to the API in batches
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200, offset=0)
            if any("Task run failed" in lg.message for lg in logs):
                break
            time.sleep(0.5)
    task_logs = [lg for lg in logs if lg.task_run_id]
    assert task_logs and task_logs[0].message.startswith("clean: error:") and "'sentiment'" in task_logs[0].message
    stages_run = {r.data.tags.get("lmpipe.stage") for r in _runs(repo)} - {None}
    assert stages_run == {"clean"}  # tokenize and later never started


def test_two_flows_on_one_workspace_serialise(tmp_path, tiny_data, harness, flow_env):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo", tiny_params())
    results: list = [None, None]

    def go(i: int) -> None:
        results[i] = pipeline(workspace=str(repo), stages=["clean", "tokenize"], return_state=True)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    states = [r for r in results if r is not None]
    assert len(states) == 2 and all(s.is_completed() for s in states), [s.message for s in states if s]
    outcomes = sorted(tuple(r["ran"] for r in s.result()["stages"]) for s in states)
    assert outcomes == [(False, False), (True, True)]  # one ran, the other waited and found it cached
    sh(repo, "dvc", "status")  # workspace consistent: dvc can read it
    assert "clean" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
