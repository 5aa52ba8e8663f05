"""One stage of a pipeline flow run that another host started: the flow of the deployments `lmpipe-stage/<pool>`.

The pipeline flow (flows/pipeline.py) starts a run of `lmpipe-stage/<pool>` for each stage that params
`placement.pools` puts on another pool (lmpipe.placement has the whole sequence); a worker of that pool runs it
here, in a worktree of the flow's commit in this worker's own checkout ($LMPIPE_WORKSPACE), and leaves its
dvc.lock entry and hardware facts as the artifact `lmpipe-placed-<stage>`. Not meant to be started by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a worker loads this file by path: flows.* from here

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from flows.pipeline import ROOT, dvc_stage  # noqa: E402
from lmpipe import experiments, placement  # noqa: E402
from lmpipe.host import hardware  # noqa: E402
from lmpipe.tracking import PARENT_ENV, TAGS_ENV  # noqa: E402

PASSED_ENV = (PARENT_ENV, TAGS_ENV, "MLFLOW_TRACKING_URI")
"""What the flow's host hands on: the pipeline run the stage's MLflow run hangs under, its tags, the store."""


@flow(name="lmpipe-stage", log_prints=True)
def stage(stage: str, commit: str, params_yaml: str, lock_yaml: str | None, key: str, env: dict[str, str],
          force: bool = False) -> dict[str, Any]:
    """Run `stage` here at `commit` with the flow's params.yaml and dvc.lock; push its outputs; report."""
    root = Path(os.environ.get("LMPIPE_WORKSPACE") or ROOT).resolve()
    placement.check_store(env.get("MLFLOW_TRACKING_URI"))
    wt = placement.worktree(root, key, commit)
    placement.write_inputs(wt, params_yaml, lock_yaml)
    own = experiments.env(root)  # this host's PATH and offline setting; the rest is the flow's
    stage_env = {"HF_HUB_OFFLINE": own["HF_HUB_OFFLINE"], "PATH": own["PATH"],
                 **{k: env[k] for k in PASSED_ENV if k in env}}
    result = dvc_stage.with_options(retries=0)(stage, str(wt), force, stage_env, share=True)
    # where it ran; the device facts are the stage process's own (its MLflow run's host.* tags): this process
    # never imports torch
    facts = {k: v for k, v in hardware().items() if k in ("host.name", "host.pool", "host.worker")}
    facts.update({"host.workspace": str(wt), "prefect.flow_run_id": str(flow_run.get_id() or "")})
    create_markdown_artifact(key=placement.REPORT_KEY.format(stage=stage),
                             markdown=placement.report(stage, result, placement.lock_entry(wt, stage), facts),
                             description=f"{stage} on {facts['host.name']}: its dvc.lock entry and hardware")
    get_run_logger().info(f"{stage}: {'ran' if result['ran'] else 'cached'} on {placement.where(facts)}")
    placement.remove(root, wt)  # done: outputs are in the remote and this host's cache
    return result
