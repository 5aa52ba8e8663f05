"""One pipeline execution = one MLflow run named after it (`execution_name`), and the lineage read back from it.

    lmpipe lineage models:/lmpipe-sst2@champion      # or models:/NAME/VERSION, or an MLflow run id

However the pipeline ran (`dvc repro`, `dvc exp run`, `make smoke`, the Prefect flow), its stage runs
nest under one pipeline run (tag lmpipe.kind=summary; named after the experiment, or workspace@<commit>): the flow and lmpipe's experiments open it before
the first stage; under plain DVC the evaluate stage opens it and adopts the stage runs of this execution.
It carries every param, the headline metrics under plain names (accuracy, f1_macro, perplexity,
benefit_accuracy, ...) so they lead the MLflow compare view, the upstream figures as the artifact
`upstream_metrics.json`, the run's `dvc.lock`, the clean splits as MLflow datasets, and per stage
`stage.<name>.run_id` and `stage.<name>` = ran | cached (cached: DVC served the stage's output, and its
run belongs to the execution that produced it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmpipe.config import Params
from lmpipe.params import flatten
from lmpipe.errors import LmpipeError
from lmpipe.names import HEADLINE, STAGES, parse_model_uri
from lmpipe.tracking import PARENT_ENV
# Imported inside functions (start-up cost, docs/results.md#start-up): mlflow and pandas where used: experiments and
# sweep import this module, and a bad profile or sweep file is reported before they load.

KIND_TAG, KIND = "lmpipe.kind", "summary"
PARENT_TAG = "mlflow.parentRunId"
# tags a stage run passes on to the pipeline run it opens or joins
INHERITED_TAGS = ("prefect.flow_run_id", "prefect.flow_run_name", "prefect.deployment", "dvc.exp_name",
                  "git.commit", "git.dirty")
DATA_TAG = "dvc.dep.lmpipe-data"


def stage_run_ids(params: Params, root: Path) -> dict[str, str]:
    """The MLflow run that produced each stage's current output (its metrics file names it)."""
    out = {}
    for stage in STAGES:
        path = root / getattr(params, stage).metrics
        try:
            run_id = json.loads(path.read_text()).get("mlflow_run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if run_id:
            out[stage] = run_id
    return out


def _all_params(params: Params) -> dict[str, str]:
    flat = flatten(params.model_dump())
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in flat.items()}


def _log_datasets(client, run_id: str, params: Params, root: Path) -> None:
    """The clean splits as MLflow datasets (name, digest, schema) so the runs table's Dataset column shows them."""
    import mlflow
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for split, context in (("train", "training"), ("validation", "validation"), ("test", "test")):
        path = root / params.clean.out_dir / f"labeled_{split}.parquet"
        if not path.is_file():
            continue
        ds = mlflow.data.from_pandas(pd.read_parquet(path), source=str(path.relative_to(root)),
                                     name=f"labeled_{split}", targets="label")
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def execution_name(tags: dict[str, str]) -> str:
    """What a pipeline run is called in the MLflow UI: the DVC experiment it ran as (`lmpipe smoke`'s name, a sweep
    trial's `<sweep>-tNNN`, a flow's `prefect-<flow run>`, `dvc exp run`'s), else `workspace@<commit>`."""
    if tags.get("dvc.exp_name"):
        return tags["dvc.exp_name"]
    commit = tags.get("git.commit") or "unknown"
    return f"workspace@{commit[:7]}"  # its git.dirty tag says whether tracked files differed from the commit


class PipelineRun:
    """The MLflow run one pipeline execution's stage runs nest under: opened by whoever starts the execution
    (lmpipe's experiments, the Prefect flow; under plain `dvc repro` the evaluate stage), joined by the
    stages after it (deploy), filled once the figures exist (`summarize`). The one home of that run."""

    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, client, experiment_id: str, tags: dict[str, str], start_time: int | None = None) -> PipelineRun:
        """A new pipeline run named after the execution (`execution_name`); start_time (ms) when the execution
        began before this call."""
        run = client.create_run(experiment_id, run_name=execution_name(tags), tags={KIND_TAG: KIND, **tags},
                                start_time=start_time)
        return cls(client, run.info.run_id)

    @classmethod
    def for_stage(cls, client, stage_run, params: Params, root: Path) -> tuple[PipelineRun, bool]:
        """The execution's run for a stage that summarizes it (evaluate): the one named by $LMPIPE_PARENT_RUN_ID
        (a flow or an experiment opened it), else a new one that starts when this execution's first stage run
        started (plain `dvc repro`: it then spans the stages up to this one's end; deploy joins it after).
        Returns (run, whether this stage opened it)."""
        parent = os.environ.get(PARENT_ENV)
        if parent:
            return cls(client, parent), False
        starts = [stage_run.info.start_time]
        for run_id in stage_run_ids(params, root).values():
            try:
                run = client.get_run(run_id)
            except Exception:  # produced against another tracking store
                continue
            if PARENT_TAG not in run.data.tags:  # ran in this execution (cached ones have their parent)
                starts.append(run.info.start_time)
        tags = {k: v for k, v in stage_run.data.tags.items() if k in INHERITED_TAGS}
        return cls.open(client, stage_run.info.experiment_id, tags, min(starts)), True

    def join(self, stage: str, stage_run, root: Path) -> None:
        """A stage after the summary (deploy) nests under this run and is recorded on it, with dvc.lock as now."""
        if stage_run.data.tags.get(PARENT_TAG) != self.run_id:
            self.client.set_tag(stage_run.info.run_id, PARENT_TAG, self.run_id)
        self.client.set_tag(self.run_id, f"stage.{stage}.run_id", stage_run.info.run_id)
        self.client.set_tag(self.run_id, f"stage.{stage}", "ran")
        self.log_lock(root)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """Ends the run now (the one who opened it ends it)."""
        self.client.set_terminated(self.run_id, status)

    def summarize(self, params: Params, root: Path, eval_metrics: dict[str, Any]) -> None:
        """Fill the run: params, headline metrics, stage runs (adopting this execution's), artifacts."""
        _log_summary(self.client, self.run_id, params, root, eval_metrics)

    def log_lock(self, root: Path) -> None:
        """The checkout's dvc.lock (every stage's dependency and output hashes) as an artifact of the run."""
        lock = root / "dvc.lock"
        if lock.is_file():
            self.client.log_text(self.run_id, lock.read_text(), "dvc.lock")


def _log_summary(client, summary_id: str, params: Params, root: Path, eval_metrics: dict[str, Any]) -> None:
    """Fill the pipeline run: params, headline metrics, stage runs (adopting this execution's), artifacts."""
    from mlflow.entities import Metric, Param

    summary = client.get_run(summary_id)
    # 1) every param, once (a run's params cannot change)
    items = [Param(k, v[:6000]) for k, v in _all_params(params).items() if k not in summary.data.params]
    for i in range(0, len(items), 100):
        client.log_batch(summary_id, params=items[i:i + 100])
    # 2) headline metrics under plain names
    metrics = []
    for name, (section, key) in HEADLINE.items():
        value = (eval_metrics.get(section) or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.append(Metric(name, float(value), 0, 0))
    if metrics:
        client.log_batch(summary_id, metrics=metrics)
    # 3) stage runs: a run without a parent ran in this execution (adopt it); one with another parent was
    #    served from DVC's cache and belongs to the execution that produced it
    tags = {}
    for stage, run_id in stage_run_ids(params, root).items():
        try:
            run = client.get_run(run_id)
        except Exception:  # produced against another tracking store
            continue
        parent = run.data.tags.get(PARENT_TAG)
        if parent is None and run_id != summary_id:
            client.set_tag(run_id, PARENT_TAG, summary_id)
            parent = summary_id
        tags[f"stage.{stage}.run_id"] = run_id
        tags[f"stage.{stage}"] = "ran" if parent == summary_id else "cached"
        if stage == "clean" and DATA_TAG in run.data.tags:
            tags["dvc.data_hash"] = run.data.tags[DATA_TAG]
    for key, value in tags.items():
        client.set_tag(summary_id, key, value)
    # 4) artifacts: upstream figures (reachable, not drowning the headline) and the execution's dvc.lock
    upstream = {}
    for stage in STAGES:
        path = root / getattr(params, stage).metrics
        if path.is_file():
            upstream[stage] = json.loads(path.read_text())
    client.log_dict(summary_id, upstream, "upstream_metrics.json")
    PipelineRun(client, summary_id).log_lock(root)
    _log_datasets(client, summary_id, params, root)


# ---- lineage: read an execution back -------------------------------------------------------------------

def _model_version(client, ref: str):
    parsed = parse_model_uri(ref)
    if parsed is None:
        raise LmpipeError(f"{ref}: expected models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id")
    name, alias, version = parsed
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except Exception as e:
        raise LmpipeError(f"{ref}: no such registered model version ({str(e).splitlines()[0][:200]})") from None


def pipeline_run_of(client, run):
    """The pipeline run an MLflow run belongs to (itself when it is one)."""
    seen = set()
    while run.data.tags.get(KIND_TAG) != KIND:
        parent = run.data.tags.get(PARENT_TAG)
        if not parent or parent in seen:
            return None
        seen.add(parent)
        run = client.get_run(parent)
    return run


def lineage(client, ref: str) -> dict[str, Any]:
    """Everything recorded about the execution behind a model version or run, as a dict."""
    out: dict[str, Any] = {"ref": ref}
    if ref.startswith("models:/"):
        mv = _model_version(client, ref)
        out["model"] = {"name": mv.name, "version": mv.version, "aliases": list(mv.aliases or []),
                        "run_id": mv.run_id}
        start = client.get_run(mv.run_id)
    else:
        try:
            start = client.get_run(ref)
        except Exception:
            raise LmpipeError(f"{ref}: no such MLflow run in this tracking store") from None
    summary = pipeline_run_of(client, start)
    if summary is None:
        raise LmpipeError(f"{ref}: run {start.info.run_id} belongs to no pipeline run (logged before lineage existed?)")
    tags = summary.data.tags
    out.update(pipeline_run=summary.info.run_id, git_commit=tags.get("git.commit"), git_dirty=tags.get("git.dirty"),
               data_hash=tags.get("dvc.data_hash"), prefect_flow_run=tags.get("prefect.flow_run_id"),
               prefect_flow_run_name=tags.get("prefect.flow_run_name"), dvc_exp=tags.get("dvc.exp_name"),
               metrics={k: summary.data.metrics[k] for k in HEADLINE if k in summary.data.metrics})
    stages = []
    for stage in STAGES:
        run_id = tags.get(f"stage.{stage}.run_id")
        if not run_id:
            continue
        run = client.get_run(run_id)
        stages.append({"stage": stage, "run_id": run_id, "status": tags.get(f"stage.{stage}", "ran"),
                       "dvc_stage_hash": run.data.tags.get("dvc.stage_hash"),
                       "git_commit": run.data.tags.get("git.commit")})
    out["stages"] = stages
    return out


def format_lineage(info: dict[str, Any]) -> str:
    lines = []
    if "model" in info:
        m = info["model"]
        aliases = f" (aliases: {', '.join(m['aliases'])})" if m["aliases"] else ""
        lines.append(f"model          {m['name']} version {m['version']}{aliases}, logged by run {m['run_id']}")
    lines += [f"pipeline run   {info['pipeline_run']}",
              f"git commit     {info['git_commit']} (dirty: {info['git_dirty']})",
              f"data           remote://lmpipe-data {info['data_hash'] or '(not run under DVC)'}",
              f"prefect        {info['prefect_flow_run'] or '-'}"
              + (f" ({info['prefect_flow_run_name']})" if info.get("prefect_flow_run_name") else ""),
              f"dvc experiment {info['dvc_exp'] or '-'}"]
    if info["metrics"]:
        lines.append("metrics        " + ", ".join(f"{k} {v:.4f}" for k, v in info["metrics"].items()))
    lines.append("stages")
    for s in info["stages"]:
        lines.append(f"  {s['stage']:<9} run {s['run_id']}  {s['status']:<6}  dvc {s['dvc_stage_hash'] or '-'}")
    return "\n".join(lines)
