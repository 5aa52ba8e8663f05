"""MLflow tracking for stage runs: one run per stage, tagged with git and DVC lineage.

Tracking URI: MLFLOW_TRACKING_URI if set, else sqlite:///<repo root>/mlflow.db.
Open the UI with:  mlflow ui --backend-store-uri sqlite:///mlflow.db

Environment read here (set by the Prefect flow, see flows/pipeline.py):
  LMPIPE_PARENT_RUN_ID   nest stage runs under this MLflow run
  LMPIPE_RUN_TAGS        JSON object of extra tags (prefect.flow_run_id, ...)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from lmpipe.config import Params, flatten
from lmpipe.io import file_md5

log = logging.getLogger(__name__)

PARENT_ENV = "LMPIPE_PARENT_RUN_ID"
TAGS_ENV = "LMPIPE_RUN_TAGS"


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(root / 'mlflow.db').resolve()}"


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(tracking_uri(root))
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        location = None
        uri = tracking_uri(root)
        if uri.startswith("sqlite:///"):
            # artifacts next to the sqlite store, not wherever the process runs (DVC temp dirs vanish)
            location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # created concurrently by another stage process
            exp_id = client.get_experiment_by_name(experiment).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_info(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit, "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def _resolve_templates(value: str, raw_params: dict) -> str:
    flat = flatten(raw_params)
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(flat.get(m.group(1).strip(), m.group(0))), value)


def dvc_stage_hashes(stage: str, root: Path) -> dict[str, str]:
    """The stage's dependency hashes as DVC knows them (dvc.lock of the producing stages).

    DVC holds the repo lock while it runs a stage, so we read dvc.yaml/dvc.lock as files
    instead of opening a dvc Repo. Returns {} when the stage is not run under DVC.
    """
    dvc_yaml, dvc_lock, params_yaml = root / "dvc.yaml", root / "dvc.lock", root / "params.yaml"
    if not dvc_yaml.is_file():
        return {}
    try:
        spec = yaml.safe_load(dvc_yaml.read_text())["stages"][stage]
        raw_params = yaml.safe_load(params_yaml.read_text()) if params_yaml.is_file() else {}
        lock = yaml.safe_load(dvc_lock.read_text()) if dvc_lock.is_file() else {}
    except (KeyError, TypeError, yaml.YAMLError):
        return {}
    produced: dict[str, str] = {}
    for st in (lock or {}).get("stages", {}).values():
        for out in st.get("outs", []):
            produced[out["path"]] = out.get("md5", "")
    deps: dict[str, str] = {}
    for dep in spec.get("deps", []):
        path = _resolve_templates(str(dep), raw_params)
        if path in produced:
            deps[path] = produced[path]
        elif (root / path).is_file():
            deps[path] = file_md5(root / path)
    section_names = []
    for p in spec.get("params", []):
        section_names.extend(p if isinstance(p, list) else [p] if isinstance(p, str) else list(p))
    params_part = {name: raw_params.get(name) for name in section_names if isinstance(name, str)}
    blob = json.dumps({"deps": deps, "params": params_part}, sort_keys=True, default=str)
    out = {f"dvc.dep.{k}": v for k, v in deps.items()}
    out["dvc.stage_hash"] = hashlib.md5(blob.encode()).hexdigest()
    return out


def extra_tags() -> dict[str, str]:
    raw = os.environ.get(TAGS_ENV)
    if not raw:
        return {}
    try:
        tags = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; ignored", TAGS_ENV)
        return {}
    return {str(k): str(v) for k, v in tags.items()}


def run_params(stage: str, params: Params) -> dict[str, Any]:
    section = getattr(params, stage, None)
    flat = flatten({"common": params.common.model_dump()})
    if section is not None:
        flat.update(flatten({stage: section.model_dump()}))
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in flat.items()}


@contextmanager
def stage_run(stage: str, params: Params, root: Path, run_id: str | None = None) -> Iterator[Any]:
    """Open (or, with run_id, reattach to) the MLflow run for one stage."""
    import mlflow

    setup(root, params.common.experiment)
    tags = {"lmpipe.stage": stage, **git_info(root), **dvc_stage_hashes(stage, root), **extra_tags()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    if run_id:
        run = mlflow.start_run(run_id=run_id)
    else:
        run = mlflow.start_run(run_name=stage, tags=tags)
    with run:
        if not run_id:
            mlflow.log_params(run_params(stage, params))
        else:
            mlflow.set_tags(tags)
        yield run


def log_metrics_bounded(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    if clean:
        mlflow.log_metrics(clean, step=step)
