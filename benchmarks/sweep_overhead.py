"""Sweep overhead: what `lmpipe sweep` adds to each trial beyond the stages DVC runs.

    .venv/bin/python benchmarks/sweep_overhead.py [--trials 12]

Builds a temporary git + DVC repo from the project's tracked files with the smoke profile applied, runs
`dvc repro` once (clean, tokenize and pretrain are then in DVC's cache), commits, and runs a sweep of
`finetune.*` (learning rate x strategy, random sampler, no pruner) through the CLI a user types. Per trial,
from the trial's MLflow pipeline run: the trial's wall time (`trial_seconds`), the `dvc repro` inside it
(`repro_seconds`: the finetune, evaluate and deploy processes and DVC's own checks) and the finetune stage's
own run (MLflow start -> end). Overhead = trial wall - dvc repro: worktree, params, `dvc exp save`, Optuna
and MLflow bookkeeping. Target: <= 5 s a trial, and 0 pretrain executions. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from flow_overhead import build_repo  # noqa: E402  (same temporary repo: tracked files + smoke profile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    args = ap.parse_args()
    os.environ.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="bench",
                      GIT_COMMITTER_EMAIL="b@b", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    bindir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        repo = build_repo(Path(tmp) / "repo")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, check=True, capture_output=True)
        fill = time.perf_counter() - t0
        sweep = {"space": {"finetune.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                           "finetune.strategy": {"type": "categorical", "choices": ["full", "freeze", "llrd", "lora"]}},
                 "sampler": "random", "n_trials": args.trials, "objective": "val_accuracy", "direction": "maximize",
                 "pruner": "none", "seed": 0}
        (repo / "sweeps" / "bench.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "results + sweep"]):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        t0 = time.perf_counter()
        subprocess.run([str(bindir / "lmpipe"), "sweep", "sweeps/bench.yaml"], cwd=repo, check=True,
                       capture_output=True)
        sweep_wall = time.perf_counter() - t0

        client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
        exp = client.get_experiment_by_name("lmpipe")
        runs = client.search_runs([exp.experiment_id], max_results=5000)
        (parent,) = [r for r in runs if r.data.tags.get("lmpipe.kind") == "sweep"]
        trials = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                        key=lambda r: int(r.data.tags["sweep.trial"]))
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in {t.info.run_id for t in trials}]
        pretrain_runs = sum(r.data.tags.get("lmpipe.stage") == "pretrain" for r in stages)
        rows = []
        for t in trials:
            ft = [r for r in stages if r.data.tags.get("mlflow.parentRunId") == t.info.run_id
                  and r.data.tags.get("lmpipe.stage") == "finetune"]
            ft_s = (ft[0].info.end_time - ft[0].info.start_time) / 1000 if ft else float("nan")
            wall, repro = t.data.metrics["trial_seconds"], t.data.metrics["repro_seconds"]
            rows.append({"trial": int(t.data.tags["sweep.trial"]), "strategy": t.data.params.get("finetune.strategy"),
                         "wall_s": wall, "repro_s": repro, "finetune_s": round(ft_s, 2),
                         "overhead_s": round(wall - repro, 2)})

    print(f"cache fill (dvc repro, smoke profile): {fill:.1f} s;  sweep of {len(rows)} trials: {sweep_wall:.1f} s")
    print(f"{'trial':>5} {'strategy':>9} {'wall s':>8} {'dvc repro s':>12} {'finetune run s':>15} {'overhead s':>11}")
    for r in rows:
        print(f"{r['trial']:>5} {r['strategy']:>9} {r['wall_s']:>8.1f} {r['repro_s']:>12.1f} {r['finetune_s']:>15.1f} "
              f"{r['overhead_s']:>11.2f}")
    over = [r["overhead_s"] for r in rows]
    print(f"pretrain executions during the sweep: {pretrain_runs} (target 0)")
    print(f"overhead per trial: median {statistics.median(over):.2f} s, max {max(over):.2f} s (target <= 5 s beyond "
          f"dvc repro);  mean trial wall {statistics.mean(r['wall_s'] for r in rows):.1f} s, of which finetune run "
          f"{statistics.mean(r['finetune_s'] for r in rows):.1f} s")
    print(json.dumps({"trials": len(rows), "pretrain_executions": pretrain_runs, "sweep_wall_s": round(sweep_wall, 1),
                      "overhead_median_s": statistics.median(over), "overhead_max_s": max(over),
                      "trial_wall_mean_s": round(statistics.mean(r["wall_s"] for r in rows), 2),
                      "repro_mean_s": round(statistics.mean(r["repro_s"] for r in rows), 2),
                      "finetune_mean_s": round(statistics.mean(r["finetune_s"] for r in rows), 2)}))


if __name__ == "__main__":
    main()
