"""Deploy: quality gate, MLflow model registry, champion alias, export for serving.

    python -m stages.deploy           # what `dvc repro deploy` runs

When classifier.accuracy in evaluate.metrics reaches deploy.min_accuracy, the classifier is logged
as an MLflow pyfunc model, registered under deploy.model_name, and the alias (champion) moves to the
new version only if it beats the current holder's accuracy. The model is exported to deploy.out_dir.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlflow

from lmpipe.config import Params
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, read_json, write_json
from lmpipe.lineage import PARENT_TAG, log_lock
from lmpipe.registry import register
from lmpipe.stage import run_stage


def deploy(params: Params, root: Path, run) -> None:
    cfg = params.deploy
    eval_path = root / params.evaluate.metrics
    if not eval_path.is_file():
        raise DataError(f"{eval_path}: missing; run the evaluate stage first (dvc repro evaluate)")
    ev = read_json(eval_path)
    acc, f1 = float(ev["classifier"]["accuracy"]), float(ev["classifier"]["f1_macro"])
    model_dir = root / params.finetune.out_dir
    result = {"accuracy": acc, "min_accuracy": cfg.min_accuracy, "gate_passed": acc >= cfg.min_accuracy,
              "mlflow_run_id": run.info.run_id}
    mlflow.log_metrics({"accuracy": acc, "f1_macro": f1})
    _join_pipeline_run(run, ev.get("pipeline_run_id"), root)

    with atomic_dir(root / cfg.out_dir) as out:
        if not result["gate_passed"]:
            (out / "GATE_FAILED").write_text(f"accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}\n")
            mlflow.set_tag("deploy.gate", "failed")
            print(f"deploy: gate failed: accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}; not registered")
        else:
            result.update(register(model_dir, cfg.model_name, cfg.alias, acc, f1, run))
            version, promote = result["version"], result["promoted"]
            mlflow.set_tags({"deploy.gate": "passed", "deploy.version": version, "deploy.promoted": str(promote)})
            shutil.copytree(model_dir, out / "model")  # the deployable model, exported
            (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            old_version, old_acc = result["previous_champion"], result["previous_champion_accuracy"]
            verdict = f"{cfg.alias} -> v{version}" if promote else f"{cfg.alias} stays v{old_version} ({old_acc:.4f})"
            print(f"deploy: registered {cfg.model_name} v{version} (accuracy {acc:.4f}); {verdict}")
    write_json(root / cfg.metrics, result)


def _join_pipeline_run(run, evaluate_pipeline_run: str | None, root: Path) -> None:
    """Nest under the execution's pipeline run (the flow's, or the one evaluate opened) and record this run there."""
    client = mlflow.MlflowClient()
    parent = run.data.tags.get(PARENT_TAG) or evaluate_pipeline_run
    if not parent:
        return
    if PARENT_TAG not in run.data.tags:
        client.set_tag(run.info.run_id, PARENT_TAG, parent)
    client.set_tag(parent, "stage.deploy.run_id", run.info.run_id)
    client.set_tag(parent, "stage.deploy", "ran")
    log_lock(client, parent, root)  # now with evaluate's entry


def main(argv: list[str] | None = None) -> int:
    return run_stage("deploy", deploy, argv)


if __name__ == "__main__":
    sys.exit(main())
