"""The MLflow model registry: log the classifier as a pyfunc model, register it, move the alias.

The alias (`champion`) moves to a new version only when it beats the holder's test accuracy; every
registered version carries its accuracy, macro-F1, git commit and source run as tags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def champion(client, name: str, alias: str) -> tuple[str | None, float | None]:
    """(version, accuracy) of the alias holder, (None, None) when the alias is unset."""
    import mlflow

    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    acc = mv.tags.get("accuracy")
    return mv.version, float(acc) if acc is not None else None


def register(model_dir: Path, name: str, alias: str, accuracy: float, f1: float, run) -> dict[str, Any]:
    """Log `model_dir` as a pyfunc model in the active run, register it, and promote it when it wins."""
    import mlflow

    from lmpipe.serving import ClassifierPyfunc

    # 1) log + register (pyfunc wrapping the HF directory; requirements given, not inferred)
    info = mlflow.pyfunc.log_model(
        name="model", python_model=ClassifierPyfunc(), artifacts={"model_dir": str(model_dir)},
        registered_model_name=name,
        pip_requirements=["torch==2.13.0", "transformers>=5,<6", "peft>=0.17,<1", "pandas", "mlflow>=3,<4"],
        input_example=["a gripping, funny film"])
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {"accuracy": accuracy, "f1_macro": f1, "git.commit": run.data.tags.get("git.commit", ""),
                       "source_run_id": run.info.run_id}.items():
        client.set_model_version_tag(name, version, key, str(value))
    # 2) move the alias only when the new version beats the holder
    old_version, old_acc = champion(client, name, alias)
    promote = old_acc is None or accuracy > old_acc
    if promote:
        client.set_registered_model_alias(name, alias, version)
    return {"registered_model": name, "version": version, "promoted": promote, "previous_champion": old_version,
            "previous_champion_accuracy": old_acc, "model_uri": f"models:/{name}/{version}"}
