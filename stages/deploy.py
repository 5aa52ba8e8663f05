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
from lmpipe.serving import ClassifierPyfunc
from lmpipe.stage import run_stage


def champion_accuracy(client: mlflow.MlflowClient, name: str, alias: str) -> tuple[str | None, float | None]:
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    acc = mv.tags.get("accuracy")
    return mv.version, float(acc) if acc is not None else None


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

    with atomic_dir(root / cfg.out_dir) as out:
        if not result["gate_passed"]:
            (out / "GATE_FAILED").write_text(f"accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}\n")
            mlflow.set_tag("deploy.gate", "failed")
            print(f"deploy: gate failed: accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}; not registered")
        else:
            # 1) log + register (pyfunc wrapping the HF directory; requirements given, not inferred)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ClassifierPyfunc(), artifacts={"model_dir": str(model_dir)},
                model_config={"max_length": params.finetune.max_length},
                registered_model_name=cfg.model_name,
                pip_requirements=["torch==2.13.0", "transformers>=5,<6", "pandas", "mlflow>=3,<4"],
                input_example=["a gripping, funny film"])
            version = str(info.registered_model_version)
            client = mlflow.MlflowClient()
            for key, value in {"accuracy": acc, "f1_macro": f1, "git.commit": run.data.tags.get("git.commit", ""),
                               "source_run_id": run.info.run_id}.items():
                client.set_model_version_tag(cfg.model_name, version, key, str(value))
            # 2) move the alias only when the new version beats the holder
            old_version, old_acc = champion_accuracy(client, cfg.model_name, cfg.alias)
            promote = old_acc is None or acc > old_acc
            if promote:
                client.set_registered_model_alias(cfg.model_name, cfg.alias, version)
            result.update(registered_model=cfg.model_name, version=version, promoted=promote,
                          previous_champion=old_version, previous_champion_accuracy=old_acc,
                          model_uri=f"models:/{cfg.model_name}/{version}")
            mlflow.set_tags({"deploy.gate": "passed", "deploy.version": version, "deploy.promoted": str(promote)})
            # 3) export the deployable model
            shutil.copytree(model_dir, out / "model")
            (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            verdict = f"{cfg.alias} -> v{version}" if promote else f"{cfg.alias} stays v{old_version} ({old_acc:.4f})"
            print(f"deploy: registered {cfg.model_name} v{version} (accuracy {acc:.4f}); {verdict}")
    write_json(root / cfg.metrics, result)


def main(argv: list[str] | None = None) -> int:
    return run_stage("deploy", deploy, argv)


if __name__ == "__main__":
    sys.exit(main())
