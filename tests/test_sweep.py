"""Sweeps (lmpipe/sweep.py) through the CLI a user runs, on tiny repos: trials are DVC experiments under one
MLflow sweep run, upstream stages come from DVC's run cache, pruning and a SIGKILL'd sweep resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, clean_env, make_repo, mlflow_runs, sh, tiny_params
from lmpipe.params_file import update_params_file

LMPIPE = str(Path(sys.executable).parent / "lmpipe")


def _sweep_repo(tmp_path: Path, tiny_data: Path, sweep: dict, name: str = "tiny") -> Path:
    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
    (repo / "sweeps").mkdir(exist_ok=True)
    (repo / "sweeps" / f"{name}.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    sh(repo, "git", "add", "sweeps")
    sh(repo, "git", "commit", "-qm", "sweep file")
    return repo


def _sweep(repo: Path, *args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([LMPIPE, "sweep", *args], cwd=repo, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)


def _comments(repo: Path) -> list[str]:
    """params.yaml's comments in order, full-line and end-of-line ones."""
    return [ln[ln.index("#"):] for ln in (repo / "params.yaml").read_text().splitlines() if "#" in ln]


def _exp_metrics(repo: Path) -> dict[str, dict]:
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    return {r["name"]: r["data"] for rev in shown for e in rev.get("experiments") or [] for r in e.get("revs") or []
            if r.get("name")}


GRID = {"space": {"finetune.learning_rate": {"type": "categorical", "choices": [0.005, 0.0005]},
                  "finetune.strategy": {"type": "categorical", "choices": ["freeze"]}},
        "sampler": "grid", "objective": "val_accuracy", "direction": "maximize", "seed": 0}


@pytest.mark.slow  # four DVC experiments through the sweep CLI: the default suite's longest test (about 2 min on CI)
def test_grid_sweep_runs_each_point_as_a_dvc_experiment_under_one_mlflow_run(tmp_path, tiny_data):
    repo = _sweep_repo(tmp_path, tiny_data, GRID)
    # params.yaml as users keep it: the project's own, with its comments, at the tiny values
    (repo / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    update_params_file(repo / "params.yaml", tiny_params())
    sh(repo, "git", "commit", "-qam", "params.yaml with its comments")
    comments = _comments(repo)
    assert len(comments) > 50
    res = _sweep(repo, "sweeps/tiny.yaml")
    assert res.returncode == 0, res.stderr[-3000:]

    # every grid point exactly once, each a DVC experiment carrying its params and metrics
    exps = _exp_metrics(repo)
    trials = {n: d for n, d in exps.items() if n.startswith("tiny-t")}
    assert len(trials) == 2
    points = {(d["params"]["params.yaml"]["data"]["finetune"]["learning_rate"],
               d["params"]["params.yaml"]["data"]["finetune"]["strategy"]) for d in trials.values()}
    assert points == {(0.005, "freeze"), (0.0005, "freeze")}
    assert all("metrics/finetune.json" in d["metrics"] for d in trials.values())

    # MLflow: one sweep run, the two pipeline runs under it with their objective; pretrain ran once
    runs = mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    sweep = [r for r in runs if r.data.tags.get("lmpipe.kind") == "sweep"]
    assert len(sweep) == 1 and sweep[0].info.status == "FINISHED"
    parent = sweep[0]
    assert parent.data.tags["sweep.sampler"] == "grid" and parent.data.tags["optuna.study"].startswith("tiny-")
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trial_runs) == 2 and all(r.data.tags["optuna.state"] == "COMPLETE" for r in trial_runs)
    objectives = {r.data.tags["dvc.exp_name"]: r.data.metrics["objective"] for r in trial_runs}
    for name, value in objectives.items():
        assert value == trials[name]["metrics"]["metrics/finetune.json"]["data"]["classifier"]["val_accuracy"]
    assert [r for r in runs if r.data.tags.get("lmpipe.stage") == "pretrain"].__len__() == 1
    # the best trial on the sweep run, and Optuna's plots as artifacts
    best = parent.data.tags["sweep.best_exp"]
    assert parent.data.metrics["best_val_accuracy"] == max(objectives.values()) == objectives[best]
    assert parent.data.params["best.finetune.strategy"] == \
        trials[best]["params"]["params.yaml"]["data"]["finetune"]["strategy"]
    import mlflow

    arts = {a.path for a in mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/history.html", "optuna/history.png"} <= arts

    # the same command again: the study is complete, nothing runs
    again = _sweep(repo, "sweeps/tiny.yaml", "--apply-best")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len([n for n in _exp_metrics(repo) if n.startswith("tiny-t")]) == 2
    assert f"applied {best}" in again.stdout
    applied = yaml.safe_load((repo / "params.yaml").read_text())["finetune"]
    assert (applied["learning_rate"], applied["strategy"]) == \
        tuple(trials[best]["params"]["params.yaml"]["data"]["finetune"][k] for k in ("learning_rate", "strategy"))
    # the trial's params.yaml (written by experiments.write_params) and the deploy.publish flip kept every comment
    assert _comments(repo) == comments
    assert yaml.safe_load((repo / "params.yaml").read_text())["deploy"]["publish"] is True


@pytest.fixture(scope="module")
def bad_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("bad") / "repo", tiny_params())
    (repo / "sweeps").mkdir(exist_ok=True)
    return repo


@pytest.mark.parametrize("edit,expected", [
    ({"space": {"finetune.nope": {"type": "int", "low": 1, "high": 2}}}, "space.finetune.nope: not a params.yaml key"),
    ({"space": {"finetune.learning_rate": {"type": "float", "low": 0.1, "high": 0.01}}},
     "space.finetune.learning_rate: empty range (low 0.1 >= high 0.01)"),
    ({"space": {"finetune.learning_rate": {"type": "float", "low": 0.001, "high": 0.01}}},
     "space.finetune.learning_rate: the grid sampler needs listed values"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"objective": "test_accuracy"}, "objective: Input should be 'val_accuracy', 'val_f1_macro' or 'val_loss'"),
    ({"space": {"finetune.strategy": {"type": "categorical", "choices": ["full", "quantum"]}}},
     "space.finetune.strategy='quantum': finetune.strategy: Input should be"),
])
def test_bad_sweep_file_is_one_line_and_runs_nothing(bad_repo, edit, expected):
    repo = bad_repo
    path = repo / "sweeps" / f"bad-{abs(hash(expected))}.yaml"
    path.write_text(yaml.safe_dump({**GRID, **edit}, sort_keys=False))
    res = _sweep(repo, str(path.relative_to(repo)), timeout=120)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("lmpipe: error:")]
    assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr
    assert not (repo / "metrics").exists() and not (repo / "mlflow.db").exists()
    assert not (repo / ".lmpipe" / "sweeps").exists()


def _first_grid_point(sweep: dict) -> dict:
    """The point lmpipe's grid walk proposes first for this sweep (its order is seeded)."""
    import optuna

    from lmpipe.sweep import SweepFile, _next_grid_point

    return _next_grid_point(optuna.create_study(), SweepFile.model_validate(sweep))


@pytest.mark.slow  # tiny pipelines, one killed
def test_pruned_trial_and_a_killed_sweep_resume_to_n_trials(tmp_path, tiny_data):
    """Trial 0 (lr 1e-9) keeps its initial validation loss; the trial at lr 1.0 diverges, its loss at the first
    evaluation above trial 0's at the same step: the median pruner stops it, Optuna and MLflow mark it pruned,
    no DVC experiment is saved. Before that, the sweep is SIGKILLed during that trial, and the same command
    completes the study."""
    sweep = {"fixed": {"finetune.max_steps": 12, "finetune.eval_every": 4},
             "space": {"finetune.learning_rate": {"type": "categorical", "choices": [1e-9, 1.0]}}, "sampler": "grid",
             "objective": "val_loss", "direction": "minimize", "pruner": "median"}
    sweep["seed"] = next(s for s in range(50) if _first_grid_point({**sweep, "seed": s})["finetune.learning_rate"] == 1e-9)
    repo = _sweep_repo(tmp_path, tiny_data, sweep)

    # 1) start the sweep; kill it (the whole process group) once its second trial is running
    proc = subprocess.Popen([LMPIPE, "sweep", "sweeps/tiny.yaml"], cwd=repo, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("sweep tiny: trial 1 "):
            time.sleep(3)  # inside the trial's dvc repro
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    assert "trial 0 COMPLETE" in "".join(seen)

    # 2) the same command: trial 0 is not re-run, the interrupted one runs again, 2 trials finish
    res = _sweep(repo, "sweeps/tiny.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "was interrupted; queued again" in res.stdout and "sweep tiny: trial 0 " not in res.stdout
    import optuna

    storage = f"sqlite:///{repo / '.lmpipe' / 'sweeps' / 'tiny.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert (states.count("COMPLETE"), states.count("PRUNED"), states.count("FAIL")) == (1, 1, 1)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert [t.params["finetune.learning_rate"] for t in pruned] == [1.0]
    assert pruned[0].user_attrs["pruned_at_step"] == 4

    # no DVC experiment for the pruned or the killed trial; MLflow marks the pruned one
    exps = {n for n in _exp_metrics(repo) if n.startswith("tiny-t")}
    complete = {t.user_attrs["dvc_exp"] for t in trials if t.state.name == "COMPLETE"}
    assert exps == complete and len(exps) == 1
    runs = mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    by_exp = {r.data.tags.get("dvc.exp_name"): r for r in runs if r.data.tags.get("lmpipe.kind") == "summary"}
    assert by_exp[pruned[0].user_attrs["dvc_exp"]].data.tags["optuna.state"] == "PRUNED"
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no").stdout.strip() == ""  # workspace intact


@pytest.mark.slow  # three tiny pipelines; the deployments test also runs the sweep flow, through a worker
def test_sweep_flow_runs_trials_as_tasks_two_at_a_time(tmp_path, tiny_data, harness, flow_env):
    """The Prefect sweep flow (parallel 2) on a real Prefect API: the first trial runs alone (it fills DVC's
    run cache), the other two side by side in their own worktrees; every trial is a DVC experiment, pretrain
    ran once, and the MLflow sweep run and each trial's pipeline run carry the flow run id."""
    from prefect.client.orchestration import get_client

    from flows.sweep import sweep as sweep_flow

    spec = {"space": {"finetune.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "sampler": "random", "n_trials": 3, "objective": "val_accuracy", "direction": "maximize", "seed": 1,
            "parallel": 2}
    repo = _sweep_repo(tmp_path, tiny_data, spec)
    state = sweep_flow(sweep="tiny", workspace=str(repo), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert sorted(t["state"] for t in summary["trials"]) == ["COMPLETE"] * 3
    assert {r["number"] for r in summary["ran"]} == {0, 1, 2}

    trials = {n for n in _exp_metrics(repo) if n.startswith("tiny-t")}
    assert trials == {"tiny-t000", "tiny-t001", "tiny-t002"}
    runs = mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    assert len([r for r in runs if r.data.tags.get("lmpipe.stage") == "pretrain"]) == 1
    (parent,) = [r for r in runs if r.data.tags.get("lmpipe.kind") == "sweep"]
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert parent.info.status == "FINISHED" and flow_run_id
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trial_runs) == 3 and {r.data.tags["prefect.flow_run_id"] for r in trial_runs} == {flow_run_id}
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {t.info.run_id for t in trial_runs}]
    assert {r.data.tags.get("prefect.flow_run_id") for r in stage_runs} == {flow_run_id}

    # the tasks, as Prefect recorded them: trial-0 finished before trial-1 and trial-2 started, and those two
    # overlapped (parallel 2)
    import asyncio

    async def task_runs():
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    spans = {t.name: (t.start_time, t.end_time) for t in asyncio.run(task_runs()) if t.name.startswith("trial-")}
    assert set(spans) == {"trial-0", "trial-1", "trial-2"}
    assert spans["trial-0"][1] <= min(spans["trial-1"][0], spans["trial-2"][0])
    assert max(spans["trial-1"][0], spans["trial-2"][0]) < min(spans["trial-1"][1], spans["trial-2"][1])
    assert sh(repo, "git", "status", "--porcelain", "--untracked-files=no").stdout.strip() == ""


@pytest.mark.parametrize("sweep", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_shipped_sweeps_validate_against_params_and_their_profile(sweep):
    """Every bound and choice of a shipped sweep is a valid value with its profile and fixed keys applied."""
    from lmpipe.sweep import load_sweep

    assert load_sweep(ROOT / "sweeps" / sweep, ROOT).space
