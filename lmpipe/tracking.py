"""MLflow tracking for stage runs: one run per stage, tagged with git and DVC lineage.

Tracking URI: MLFLOW_TRACKING_URI if set, else sqlite:///<repo root>/mlflow.db.
Open the UI with:  mlflow ui --backend-store-uri sqlite:///mlflow.db

Environment read here (set by the Prefect flow, see flows/pipeline.py):
  LMPIPE_PARENT_RUN_ID   nest stage runs under this MLflow run
  LMPIPE_RUN_TAGS        JSON object of extra tags (prefect.flow_run_id, ...)

A tracking server (http URI) is checked before a stage computes anything (`check_reachable`). Metrics
logged while training are buffered through an outage by lmpipe/metric_log.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from lmpipe.config import Params
from lmpipe.errors import ServiceError
from lmpipe.host import hardware
from lmpipe.params import flatten
# Imported inside functions (start-up cost, docs/results.md#start-up): requests, mlflow and dvc's internals where
# used: tracking_uri() is on the light CLI path.

log = logging.getLogger(__name__)

PARENT_ENV = "LMPIPE_PARENT_RUN_ID"
TAGS_ENV = "LMPIPE_RUN_TAGS"


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI, else the checkout's mlflow.db. In DVC's temporary experiment workspaces
    (`dvc exp run --temp/--queue`) DVC_ROOT names the checkout the experiment belongs to."""
    base = Path(os.environ.get("DVC_ROOT") or root)
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(base / 'mlflow.db').resolve()}"


def reason(e: BaseException) -> str:
    """A connection failure in a few words (`connection refused`), for one-line errors."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Read timed out",
                   "Max retries exceeded", "Connection reset", "Remote end closed"):
        if marker in text:
            return marker.lower()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def check_health(service: str, url: str, hint: str, timeout: float = 5.0) -> None:
    """GET url must answer 2xx, else ServiceError: `<service> does not answer (<reason>); <hint>`."""
    import requests

    try:
        requests.get(url, timeout=timeout).raise_for_status()
    except requests.RequestException as e:
        raise ServiceError(f"{service} does not answer ({reason(e)}); {hint}") from None


def check_reachable(uri: str) -> None:
    """An http(s) tracking URI must answer its /health endpoint; a local store needs no server."""
    if uri.startswith(("http://", "https://")):
        check_health(f"MLflow tracking server {uri}", uri.rstrip("/") + "/health",
                     "start it (`lmpipe services up`) or unset MLFLOW_TRACKING_URI to use the local mlflow.db")


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    if tracking_uri(root).startswith(("http://", "https://")):
        # a call against a server that went away fails within seconds (MLflow's default retries for minutes);
        # training metrics do not depend on it (MetricLog buffers them)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # mlflow.data.from_pandas hints meant for model signatures (our label column is int on purpose)
    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    with _first_use_lock(db):
        client = mlflow.MlflowClient()
        exp = client.get_experiment_by_name(experiment)  # the first call creates (migrates) a new store
        if exp is None:
            # artifacts next to the sqlite store, not wherever the process runs (DVC temp dirs vanish)
            location = (db.parent / "mlartifacts").resolve().as_uri() if db else None
            try:
                exp_id = client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created concurrently by another stage process (a server store)
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _first_use_lock(db: Path | None):
    """A file lock beside a SQLite store while a process opens it: two stages starting at once (`dvc queue
    start -j 2`, two flows) otherwise both run MLflow's schema migrations on a new mlflow.db and break it
    (`table _alembic_tmp_model_versions already exists`). Server stores need none."""
    if db is None:
        return nullcontext()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


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


def dep_tag(path: str) -> str:
    """MLflow tag for a DVC dependency (tag keys cannot hold ':'): remote://lmpipe-data -> dvc.dep.lmpipe-data."""
    return "dvc.dep." + re.sub(r"^remote://", "", path).replace(":", "_")


def dvc_lineage(stage: str, root: Path) -> dict[str, str]:
    """DVC's own record of this stage execution, computed by DVC's code in this process:

    - `dvc.stage_hash`: the run-cache key DVC files this execution under (`.dvc/cache/runs/<k[:2]>/<k>`),
      i.e. the hash of the command, every dependency's hash, the params and the output paths;
    - `dvc.dep.<path>`: each file/directory dependency's hash as dvc.lock records it (a folder's `.dir`
      hash included), e.g. `dvc.dep.lmpipe-data` for the input data.

    Empty outside DVC (`python -m stages.X`). DVC holds the repo lock while the stage runs; reading the
    stage definition and hashing dependencies (from DVC's state cache) does not need it."""
    if not os.environ.get("DVC_STAGE"):
        return {}
    try:
        from dvc.repo import Repo
        from dvc.stage.cache import _can_hash, _get_stage_hash

        with Repo(str(root)) as repo:
            target = next(s for s in repo.index.stages if getattr(s, "name", None) == stage)
            tags = {}
            for dep in target.deps:
                dep.save()
                if dep.hash_info and isinstance(dep.hash_info.value, str):
                    tags[dep_tag(dep.def_path)] = dep.hash_info.value
            if _can_hash(target):
                tags["dvc.stage_hash"] = _get_stage_hash(target)
            return tags
    except Exception as e:  # lineage must never fail a training run
        log.warning("DVC lineage for %s unavailable: %s", stage, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return {}


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
    tags = {"lmpipe.stage": stage, **git_info(root), **dvc_lineage(stage, root), **hardware(params.common.device),
            "host.workspace": str(root), **extra_tags()}
    if os.environ.get("DVC_EXP_NAME"):  # `dvc exp run` names the experiment this run belongs to
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    if run_id:
        run = mlflow.start_run(run_id=run_id)
    else:
        run = mlflow.start_run(run_name=stage, tags=tags)
    status = "FINISHED"
    try:
        if not run_id:
            mlflow.log_params(run_params(stage, params))
        else:
            mlflow.set_tags(tags)
        yield run
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        try:
            mlflow.end_run(status)
        except Exception as e:  # the server went away: the stage's own outcome (and error line) stands
            log.warning("MLflow run %s not marked %s: %s", run.info.run_id, status, reason(e))
