"""End to end on the real tools: a temporary git + DVC repo built from the project, `dvc repro`,
MLflow runs per stage, the registry alias, the HTTP server, and a no-op second `dvc repro`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from helpers import SHARED_DATA, STAGES, clean_env, free_port, make_repo, mlflow_runs, sh, stage_runs, tiny_params

def test_dvc_repro_end_to_end_then_noop(tmp_path, tiny_data):
    repo = make_repo(tmp_path / "repo", tiny_params())
    head = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()

    first = sh(repo, "dvc", "repro")
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first.stdout

    # outputs; the reported accuracy is the share of matching rows in the confusion plot's data
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    assert ev["lm"]["perplexity"] > 1
    rows = (repo / "plots" / "confusion.csv").read_text().splitlines()
    assert rows[0] == "actual,predicted" and len(rows) - 1 == ev["test_examples"]
    hits = sum(a == b for a, b in (r.split(",") for r in rows[1:]))
    assert ev["classifier"]["accuracy"] == pytest.approx(hits / (len(rows) - 1))
    assert ev["benefit"]["accuracy"] == pytest.approx(ev["classifier"]["accuracy"] - ev["scratch_baseline"]["accuracy"])
    assert (repo / "models" / "pretrain" / "model.safetensors").is_file()
    assert (repo / "plots" / "pretrain_loss.csv").is_file()
    assert (repo / "models" / "deploy" / "model" / "config.json").is_file()
    # metrics and plots are DVC outputs: dvc.lock (staged for commit by DVC) records them, the cache holds them
    assert "dvc.lock" in sh(repo, "git", "diff", "--cached", "--name-only").stdout
    recorded = {o["path"]: o["md5"] for st in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values()
                for o in st.get("outs", [])}
    for path in ("metrics/eval.json", "plots/confusion.csv", "plots/confusion.png", "plots/pretrain_loss.csv"):
        md5 = recorded[path]
        assert (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path

    # exactly one finished MLflow run per stage, with DVC's own lineage; the id is in each metrics file
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    data_hash = next(d["md5"] for d in lock["clean"]["deps"] if d["path"] == "remote://lmpipe-data")
    assert data_hash.endswith(".dir")
    runs = stage_runs(repo)
    for stage in STAGES:
        assert len(runs[stage]) == 1, stage
        run = runs[stage][0]
        assert run.info.status == "FINISHED" and run.info.run_name == stage
        assert run.data.tags["git.commit"] == head and run.data.tags["git.dirty"] in ("true", "false")
        key = run.data.tags["dvc.stage_hash"]  # the run-cache key DVC filed this execution under
        assert (repo / ".dvc" / "cache" / "runs" / key[:2] / key).is_dir(), stage
        for dep in lock[stage]["deps"]:  # every file and folder dependency as dvc.lock records it
            tag = "dvc.dep." + dep["path"].removeprefix("remote://")
            assert run.data.tags[tag] == dep["md5"], (stage, dep["path"])
        metrics_file = repo / yaml.safe_load((repo / "params.yaml").read_text())[stage]["metrics"]
        assert json.loads(metrics_file.read_text())["mlflow_run_id"] == run.info.run_id
    assert runs["clean"][0].data.tags["dvc.dep.lmpipe-data"] == data_hash
    assert runs["pretrain"][0].data.params["pretrain.hidden_size"] == "16"
    assert runs["pretrain"][0].data.params["common.seed"] == "1337"

    # one pipeline execution = one top-level run, named after it, with every stage run nested under it
    summaries = [r for r in mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}") if r.data.tags.get("lmpipe.kind") == "summary"]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary.info.run_name == f"workspace@{head[:7]}" and "mlflow.parentRunId" not in summary.data.tags
    # it spans the execution: from the first stage run's start to the end of evaluate (which opened it)
    assert summary.info.start_time == min(runs[s][0].info.start_time for s in STAGES) == runs["clean"][0].info.start_time
    assert summary.info.end_time >= runs["evaluate"][0].info.start_time and summary.info.status == "FINISHED"
    assert all(runs[s][0].data.tags["mlflow.parentRunId"] == summary.info.run_id for s in STAGES)
    assert all(summary.data.tags[f"stage.{s}"] == "ran" for s in STAGES)
    assert summary.data.metrics["accuracy"] == pytest.approx(ev["classifier"]["accuracy"])
    assert summary.data.metrics["perplexity"] == pytest.approx(ev["lm"]["perplexity"])
    assert summary.data.metrics["benefit_accuracy"] == pytest.approx(ev["benefit"]["accuracy"])
    assert not [k for k in summary.data.metrics if k.startswith("upstream")]  # upstream figures: an artifact
    assert summary.data.params["pretrain.learning_rate"] == "0.002"
    assert summary.data.tags["dvc.data_hash"] == data_hash
    contexts = {i.dataset.name: [t.value for t in i.tags] for i in summary.inputs.dataset_inputs}
    assert contexts == {"labeled_train": ["training"], "labeled_validation": ["validation"], "labeled_test": ["test"]}
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"dvc.lock", "upstream_metrics.json"} <= artifacts
    logged_lock = yaml.safe_load(Path(client.download_artifacts(summary.info.run_id, "dvc.lock", str(tmp_path))).read_text())
    assert logged_lock["stages"]["clean"] == lock["clean"]

    # lineage of the champion: the exact commit, data hash and every stage's run
    out = sh(repo, sys.executable, "-m", "lmpipe.cli", "lineage", "models:/lmpipe-sst2@champion", "--json").stdout
    info = json.loads(out)
    assert info["git_commit"] == head and info["data_hash"] == data_hash
    assert info["pipeline_run"] == summary.info.run_id and info["model"]["aliases"] == ["champion"]
    assert {s["stage"]: s["run_id"] for s in info["stages"]} == {s: runs[s][0].info.run_id for s in STAGES}
    assert {s["stage"]: s["dvc_stage_hash"] for s in info["stages"]} == {
        s: runs[s][0].data.tags["dvc.stage_hash"] for s in STAGES}
    text = sh(repo, sys.executable, "-m", "lmpipe.cli", "lineage", "models:/lmpipe-sst2/1").stdout
    assert head in text and data_hash in text and runs["pretrain"][0].info.run_id in text
    bad = subprocess.run([sys.executable, "-m", "lmpipe.cli", "lineage", "models:/lmpipe-sst2@nobody"], cwd=repo,
                         env=clean_env(), capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("lmpipe: error: models:/lmpipe-sst2@nobody")
    assert len(bad.stderr.strip().splitlines()) == 1

    # lmpipe compare: the workspace (with this run's metrics) against HEAD (none yet); no param differs
    cmp = json.loads(sh(repo, sys.executable, "-m", "lmpipe.cli", "compare", "--json").stdout)
    assert cmp["columns"][:4] == ["experiment", "accuracy", "f1_macro", "perplexity"], cmp["columns"]
    workspace = next(r for r in cmp["rows"] if r[0] == "workspace")
    assert workspace[1:4] == [pytest.approx(ev["classifier"]["accuracy"]), pytest.approx(ev["classifier"]["f1_macro"]),
                              pytest.approx(ev["lm"]["perplexity"])]
    assert len(cmp["rows"]) == 2 and cmp["rows"][0][0] == "workspace"  # then HEAD (by its branch), no metrics yet
    assert cmp["rows"][1][1:4] == [None, None, None]

    # registry: champion alias points at the registered version
    mv = client.get_model_version_by_alias("lmpipe-sst2", "champion")
    assert float(mv.tags["accuracy"]) == pytest.approx(ev["classifier"]["accuracy"])

    # served endpoint answers with real predictions from the registry model
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "serve", "--port", str(port)], cwd=repo,
                            env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        texts = ["a moving and beautiful film", "a dull and lifeless mess"]
        r = requests.post(f"{base}/predict", json={"texts": texts}, timeout=30)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert len(preds) == 2
        for p in preds:
            assert p["label"] in ("negative", "positive") and 0.5 <= p["score"] <= 1.0
        for bad in ({}, {"texts": []}, {"texts": [1]}, {"texts": [""]}, {"text": ["x"]}):
            assert requests.post(f"{base}/predict", json=bad, timeout=10).status_code == 422, bad
        assert requests.post(f"{base}/predict", data="not json", timeout=10,
                             headers={"content-type": "application/json"}).status_code == 400  # not JSON
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    # second repro: nothing runs, no new MLflow runs
    n_before = len(mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}"))
    second = sh(repo, "dvc", "repro")
    assert "Running stage" not in second.stdout
    assert len(mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")) == n_before


@pytest.mark.slow  # two full dvc repro runs; the e2e test covers the no-op re-run
def test_param_change_reruns_only_dependent_stages(tmp_path, tiny_data):
    repo = make_repo(tmp_path / "repo", tiny_params())
    sh(repo, "dvc", "repro")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 7
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(repo, "dvc", "repro").stdout
    ran = [s for s in STAGES if f"Running stage '{s}'" in out]
    # evaluate reads the changed section; deploy follows because eval.json names the new evaluate run
    assert ran[0] == "evaluate" and not set(ran) & {"clean", "tokenize", "pretrain", "finetune"}


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data")
def test_make_smoke_is_a_dvc_experiment_that_leaves_params_untouched(tmp_path):
    """`make smoke` = `lmpipe smoke`: the smoke profile on the real data, as a DVC experiment."""
    repo = make_repo(tmp_path / "repo", None, SHARED_DATA)
    before = (repo / "params.yaml").read_text()
    res = sh(repo, sys.executable, "-m", "lmpipe.cli", "smoke", "--name", "smoke-test", timeout=900)
    assert "Running stage 'deploy'" in res.stdout
    assert (repo / "params.yaml").read_text() == before
    assert not (repo / "metrics").exists()  # the workspace is untouched; results live in the experiment
    assert not list((repo / ".lmpipe" / "worktrees").iterdir())  # its worktree is gone

    # dvc exp show lists it with the profile's params and its eval metrics
    exps = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    smoke = next(r for rev in exps for e in rev.get("experiments") or [] for r in e.get("revs") or []
                 if r.get("name") == "smoke-test")
    pre = smoke["data"]["params"]["params.yaml"]["data"]["pretrain"]
    assert pre["max_steps"] == 30 and pre["hidden_size"] == 32
    ev = smoke["data"]["metrics"]["metrics/eval.json"]["data"]
    assert ev["test_examples"] == 872 and ev["lm"]["perplexity"] > 1  # all of SST-2 dev was scored
    assert "accuracy" in ev["scratch_baseline"]

    # its MLflow runs landed in the repo's own store, under one pipeline run, with usable artifacts
    runs = stage_runs(repo)
    assert all(len(runs[s]) == 1 for s in STAGES), {s: len(r) for s, r in runs.items()}
    parents = {runs[s][0].data.tags.get("mlflow.parentRunId") for s in STAGES}
    assert len(parents) == 1 and None not in parents
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    summary = mlflow.get_run(parents.pop())
    assert summary.info.run_name == "smoke-test" and summary.data.tags["dvc.exp_name"] == "smoke-test"
    assert summary.data.metrics["accuracy"] == pytest.approx(ev["classifier"]["accuracy"])
    model = mlflow.pyfunc.load_model("models:/lmpipe-sst2-smoke@champion")
    assert len(model.predict(["a fine film"])) == 1
