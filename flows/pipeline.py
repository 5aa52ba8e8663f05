"""The Prefect flow: one task per DVC stage, DVC decides what runs, MLflow records the lineage.

    python -m flows.pipeline                                  # plain `dvc repro` of the workspace
    python -m flows.pipeline --profile smoke                  # a DVC experiment in its own git worktree
    python -m flows.pipeline --set pretrain.learning_rate=3e-4 --stages clean tokenize pretrain

Without overrides or a profile the flow runs the workspace (`dvc repro --single-item <stage>` per
task), holding a file lock so a second flow run on the same workspace waits. With them, the run is a
DVC experiment: the committed HEAD is checked out into `.lmpipe/worktrees/<flow run>` (sharing the
DVC cache), params are applied there, the stages run there, and `dvc exp save` records the
experiment, so `dvc exp show` lists it and the user's params.yaml and outputs are never touched.

SIGTERM (a worker cancelling the run, `timeout`, a pod being stopped) stops the running stage (its last
checkpoint stays; a re-run resumes from it), the flow run ends Crashed, and the process exits within
seconds. Without PREFECT_API_URL the temporary Prefect API runs in a session of its own (a signal sent to
the flow's process group does not take it down before the run's state is recorded) and ends with the flow.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

# The ephemeral API's telemetry heartbeat only phones home (often offline here) and, racing the flow's
# own writes to Prefect's SQLite database, logged "database is locked" tracebacks; set it to true to keep it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from filelock import FileLock  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.deployments import run_deployment  # noqa: E402
from prefect.exceptions import ObjectNotFound  # noqa: E402
from prefect.states import Cancelled  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED  # noqa: E402

from lmpipe import experiments, placement  # noqa: E402
from lmpipe.errors import ConfigError, LmpipeError  # noqa: E402
from lmpipe.experiments import prepare, resolve_profile  # noqa: E402
from lmpipe.names import DVC  # noqa: E402
from lmpipe.params import flatten, parse_override  # noqa: E402
from lmpipe.processes import stop_group  # noqa: E402
from lmpipe.tracking import PARENT_ENV, TAGS_ENV, check_health, check_reachable, git_info, tracking_uri  # noqa: E402
# Imported inside functions (start-up cost, docs/results.md#start-up): prefect.server where used: only a flow started
# without PREFECT_API_URL starts a temporary server.

ROOT = Path(__file__).resolve().parents[1]


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message is the stage's own error line."""


def stage_names(workspace: Path) -> list[str]:
    """Stages in dvc.yaml order (which is the pipeline order)."""
    return list(yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"])


def _error_line(output: str, stage: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for prefix in (f"{stage}: error:", "lmpipe: error:", "ERROR:"):
        hits = [ln for ln in lines if ln.startswith(prefix)]
        if hits:
            return hits[0] if prefix != "ERROR:" else hits[-1]
    return lines[-1] if lines else f"{stage}: failed with no output"


def _metrics_run_id(workspace: Path, stage: str) -> str | None:
    try:
        params = yaml.safe_load((workspace / "params.yaml").read_text())
        return json.loads((workspace / params[stage]["metrics"]).read_text()).get("mlflow_run_id")
    except (OSError, KeyError, TypeError, ValueError):
        return None


@task(name="dvc-stage", retries=1, retry_delay_seconds=2, task_run_name="{stage}")
def dvc_stage(stage: str, workspace: str, force: bool, env: dict[str, str], upstream: bool = False,
              share: bool = False) -> dict[str, Any]:
    """Run one DVC stage (`dvc repro --single-item`), relay its output, report ran vs cached.
    upstream=True also reproduces the stages it depends on (a fresh experiment worktree has no outputs).
    share=True (stages placed on other hosts, lmpipe.placement): inputs missing here come from the DVC remote,
    and the outputs and run cache go to it."""
    logger = get_run_logger()
    ws = Path(workspace)
    cmd = [*DVC, "repro", *([] if upstream else ["--single-item"]), *(["--pull"] if share else []), stage] + \
        (["--force"] if force else [])
    t0 = time.perf_counter()
    # its own session: the flow decides when the stage stops (see stop_stage), whoever signals the flow
    proc = subprocess.Popen(cmd, cwd=ws, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    lines = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)  # live on the worker's console (progress bars included)
            sys.stdout.flush()
        code = proc.wait()
    except BaseException:  # SIGTERM (Prefect's TerminationSignal), Ctrl-C, a crash of the flow itself
        stop_stage(proc, stage)
        raise
    output = "".join(lines)
    # into the Prefect logs once the stage ends, so that on failure the stage's own error line comes first
    kept = [ln.rstrip() for ln in lines if ln.strip() and "\r" not in ln]  # no progress-bar redraws
    if code != 0:
        message = _error_line(output, stage)
        logger.error(message)
        for ln in kept[-200:]:
            logger.info(ln)
        raise StageFailed(message)
    for ln in kept:
        logger.info(ln)
    if share:
        placement.push(ws, stage, env={**os.environ, **env})
    ran = f"Running stage '{stage}'" in output
    return {"stage": stage, "ran": ran, "cached": not ran, "seconds": round(time.perf_counter() - t0, 2),
            "mlflow_run_id": _metrics_run_id(ws, stage)}


POLL_S = 2.0
"""How often the flow looks at a placed stage's flow run."""


@task(name="placed-stage", retries=1, retry_delay_seconds=2, task_run_name="{stage}@{pool}")
def placed_stage(stage: str, pool: str, workspace: str, force: bool, env: dict[str, str], timeout_s: float,
                 key: str) -> dict[str, Any]:
    """Run one stage on a worker of `pool` (a run of the deployment lmpipe-stage/<pool>, flows/stage.py), wait
    for it, then take its dvc.lock entry into this checkout and pull its outputs. `timeout_s` bounds the wait for
    a worker to start it (a stage that runs is waited for as long as it runs); a run that did not start in time is
    cancelled, so it never runs later for nobody. A retry of this task reuses `key`, so a retry that lands on the
    same host resumes the stage from the checkpoint the stopped try left there."""
    logger = get_run_logger()
    ws = Path(workspace)
    name = f"lmpipe-stage/{pool}"
    t0 = time.perf_counter()
    if not force and placement.up_to_date(ws, stage):
        run_id = _metrics_run_id(ws, stage)
        logger.info(f"{stage}: up to date here; not handed to pool {pool}")
        return {"stage": stage, "ran": False, "cached": True, "seconds": round(time.perf_counter() - t0, 2),
                "mlflow_run_id": run_id, "pool": pool, "where": placement.where(_run_facts(run_id))}
    logger.info(f"{stage}: handed to pool {pool} ({name}); waiting up to {timeout_s:g} s for a worker of pool {pool} "
                "to start it")
    child = run_deployment(name, timeout=0, flow_run_name=f"{stage}@{pool}", tags=["lmpipe", "stage"], parameters={
        "stage": stage, "commit": placement.commit(ws), "params_yaml": (ws / "params.yaml").read_text(),
        "lock_yaml": placement.read_lock(ws), "key": key, "env": env, "force": force})
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(child.id).state
            if state is not None and state.is_final():
                break
            if (state is None or state.is_scheduled() or state.is_pending()) and time.monotonic() > deadline:
                client.set_flow_run_state(child.id, Cancelled(message=f"no worker of pool {pool} started it in "
                                                                      f"{timeout_s:g} s"), force=True)
                raise StageFailed(f"{stage}: no worker of pool {pool} started it within {timeout_s:g} s (flow run "
                                  f"{child.name} was {state.name if state else 'unknown'}, now cancelled): start one "
                                  f"there: prefect worker start --pool {pool}")
            time.sleep(POLL_S)
        if not state.is_completed():
            raise StageFailed(f"{stage}: {state.name.lower()} on pool {pool} (flow run {child.name}): {state.message}")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[placement.REPORT_KEY.format(stage=stage)])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[child.id])))
    if not artifacts:
        raise StageFailed(f"{stage}: flow run {child.name} on pool {pool} left no report")
    report = placement.read_report(artifacts[0].data)
    placement.set_lock_entry(ws, stage, report["lock"])
    placement.pull(ws, stage, env={**os.environ, **env})
    run_id = _metrics_run_id(ws, stage)
    where = placement.where({**report["facts"], **_run_facts(run_id)})  # the stage process's own facts first
    logger.info(f"{stage}: {'ran' if report['result']['ran'] else 'cached'} on {where}; outputs pulled here")
    return {"stage": stage, "ran": report["result"]["ran"], "cached": not report["result"]["ran"],
            "seconds": round(time.perf_counter() - t0, 2), "mlflow_run_id": run_id, "pool": pool, "where": where,
            "flow_run": child.name}


def check_deployments(pools: set[str]) -> None:
    """Every pool a stage is handed to has its deployment lmpipe-stage/<pool>: else ConfigError, one line, before
    any stage runs (a pool name's typo, deployments never registered, no Prefect server)."""
    with get_client(sync_client=True) as client:
        for pool in sorted(pools):
            try:
                client.read_deployment_by_name(f"lmpipe-stage/{pool}")
            except ObjectNotFound:
                raise ConfigError(f"placement.pools names pool {pool!r}, which has no deployment lmpipe-stage/{pool}: "
                                  "add the pool to flows/deployments.py POOLS and prefect.yaml, then run "
                                  "`python -m flows.deployments`") from None


STOP_GRACE_S = 8.0  # a stage told to stop gets this long before SIGKILL (a checkpoint save in flight)
EXIT_DEADLINE_S = 12.0  # after a termination signal the flow process is gone within this, state recorded or not


def stop_stage(proc: subprocess.Popen, stage: str) -> None:
    """Stop a running stage (dvc and the stage process, one session): SIGTERM, then SIGKILL after
    STOP_GRACE_S. Checkpoints are complete or absent (lmpipe.checkpoints), so the last one stays loadable."""
    _exit_deadline()
    if proc.poll() is None:
        print(f"lmpipe: stopping stage {stage} (its last checkpoint stays; a re-run resumes from it)",
              file=sys.stderr, flush=True)
        stop_group(proc.pid, STOP_GRACE_S, alive=lambda: proc.poll() is None)


_deadline_started = threading.Event()


def _exit_deadline() -> None:
    """The flow process exits within EXIT_DEADLINE_S of being told to stop, even when the Prefect API it
    would report the final state to is gone (its client otherwise retries for minutes)."""
    if _deadline_started.is_set():
        return
    _deadline_started.set()

    def expire() -> None:
        time.sleep(EXIT_DEADLINE_S)
        print("lmpipe: stopped; the Prefect API did not take the run's final state in time", file=sys.stderr,
              flush=True)
        os._exit(143)

    threading.Thread(target=expire, daemon=True, name="lmpipe-exit-deadline").start()


class Terminated(BaseException):
    """SIGTERM reached the flow process (re-raised by Prefect once it has recorded the run as Crashed)."""


def _on_sigterm(signum, frame) -> None:
    _exit_deadline()
    raise Terminated()


def _session_ephemeral_api() -> None:
    """Without PREFECT_API_URL: start Prefect's temporary API server now, in a session of its own that ends
    with this process (Linux: PR_SET_PDEATHSIG), and register it where Prefect's clients look for it (as
    prefect.testing.utilities.prefect_test_harness does). A SIGTERM to the flow's process group (`timeout`,
    a terminal) then stops the flow while the API stays up to record the run as Crashed."""
    from prefect.server.api.server import SubprocessASGIServer

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return
    if SubprocessASGIServer._instances.get(None) is not None:
        return  # already started in this process (a test harness, a second flow call)

    def die_with_parent() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: the server still stops at exit (atexit)
            pass

    class SessionServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):
            real = subprocess.Popen

            def popen(*args, **kwargs):
                return real(*args, start_new_session=True, preexec_fn=die_with_parent, **kwargs)

            subprocess.Popen = popen
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real

    server = object.__new__(SessionServer)
    server.__init__()
    SubprocessASGIServer._instances[None] = server
    server.start()


def _run_facts(run_id: str | None) -> dict[str, str]:
    """The hardware tags (host.*) of a stage's MLflow run; {} when there is none."""
    if not run_id:
        return {}
    import mlflow

    try:
        tags = mlflow.MlflowClient().get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - the report loses a cell, the run stands
        return {}
    return {k: v for k, v in tags.items() if k.startswith("host.")}


def check_services(root: Path) -> None:
    """The Prefect API (PREFECT_API_URL, when set) and the MLflow server (an http MLFLOW_TRACKING_URI) answer;
    else ServiceError, one line, before anything starts."""

    api = os.environ.get("PREFECT_API_URL")
    if api:
        check_health(f"Prefect API {api}", api.rstrip("/") + "/health", "start it (`lmpipe services up` or "
                     "`prefect server start`) or unset PREFECT_API_URL to use a temporary local one")
    check_reachable(tracking_uri(root))


def report_markdown(results: list[dict[str, Any]], metrics: dict, parent_run_id: str | None, exp_name: str | None) -> str:
    lines = ["# lmpipe pipeline", ""]
    if exp_name:
        lines += [f"DVC experiment: `{exp_name}`", ""]
    if parent_run_id:
        lines += [f"MLflow parent run: `{parent_run_id}`", ""]
    lines += ["| stage | status | seconds | where | MLflow run |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['stage']} | {'ran' if r['ran'] else 'cached'} | {r['seconds']} | {r.get('where', '')} | "
                     f"`{r['mlflow_run_id']}` |")
    if metrics:

        lines += ["", "| metric | value |", "|---|---|"]
        for k, v in flatten(metrics).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"


def check_inputs(root: Path, overrides: dict[str, Any], profile: str | None, stages: list[str] | None):
    """Validate params + profile + overrides and the stage names; raises ConfigError."""

    _, params = prepare(root, overrides, resolve_profile(root, profile))
    unknown = sorted(set(stages or []) - set(stage_names(root)))
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {stage_names(root)}")
    return params


@flow(name="lmpipe-pipeline", log_prints=True)
def pipeline(overrides: dict[str, Any] | None = None, profile: str | None = None, stages: list[str] | None = None,
             force: bool = False, workspace: str | None = None, retries: int = 1) -> dict[str, Any]:
    """clean -> tokenize -> pretrain -> finetune -> evaluate -> deploy, each a DVC stage."""
    root = Path(workspace or os.environ.get("LMPIPE_WORKSPACE") or ROOT).resolve()
    overrides = dict(overrides or {})
    profile_path = experiments.resolve_profile(root, profile)
    raw, params = experiments.prepare(root, overrides, profile_path)  # fail before any stage
    is_exp = bool(overrides or profile_path)
    run_name = flow_run.get_name() or "local"
    exp_name = f"prefect-{run_name}" if is_exp else None

    tags = {"prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": run_name,
            **git_info(root)}
    if deployment.get_name():
        tags["prefect.deployment"] = deployment.get_name()
    if exp_name:
        tags["dvc.exp_name"] = exp_name

    lock = FileLock(str(root / ".dvc" / "tmp" / "lmpipe-flow.lock")) if not is_exp else None
    if lock:
        (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
        lock.acquire()  # a second flow on the same workspace waits here
    try:
        with experiments.workspace(root, exp_name, raw, params, tags, **{TAGS_ENV: json.dumps(tags)}) as ws:
            return _run_stages(ws, params, stages, force, retries)
    finally:
        if lock:
            lock.release()


def _run_stages(ws, params, stages: list[str] | None, force: bool, retries: int) -> dict[str, Any]:
    """The stages of one execution, each a task; the pipeline run's summary; the experiment saved."""
    wt, parent, is_exp = ws.path, ws.run, ws.name is not None
    env = {k: ws.env[k] for k in (PARENT_ENV, TAGS_ENV, "MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "PATH")}
    results: list[dict[str, Any]] = []
    wanted = [s for s in stage_names(wt) if s in (stages or stage_names(wt))]
    elsewhere = placement.placed(params, wanted)
    placement.check(wt, elsewhere)
    check_deployments(set(elsewhere.values()))
    for i, stage in enumerate(wanted):
        if stage in elsewhere:
            res = placed_stage.with_options(retries=retries)(
                stage, elsewhere[stage], str(wt), force, env, params.placement.stage_timeout_s,
                f"{flow_run.get_id() or 'local'}-{stage}")
        else:
            res = dvc_stage.with_options(retries=retries)(stage, str(wt), force, env,
                                                          upstream=is_exp and i == 0 and bool(stages),
                                                          share=bool(elsewhere))
            res["where"] = placement.where(_run_facts(res["mlflow_run_id"]))
        results.append(res)
        parent.tag(f"stage.{stage}", "ran" if res["ran"] else "cached")
        parent.tag(f"stage.{stage}.where", res["where"])
        if res["mlflow_run_id"]:
            parent.tag(f"stage.{stage}.run_id", res["mlflow_run_id"])
    metrics = {}
    eval_path = wt / params.evaluate.metrics
    if eval_path.is_file() and any(r["stage"] == "evaluate" for r in results):
        metrics = json.loads(eval_path.read_text())
        if not next(r for r in results if r["stage"] == "evaluate")["ran"]:
            # DVC served evaluate from its cache: this execution's pipeline run still gets the figures
            parent.summarize(params, wt, metrics)
        for key in ("mlflow_run_id", "pipeline_run_id"):
            metrics.pop(key, None)
        metrics.get("classifier", {}).pop("confusion_matrix", None)
    parent.log_lock(wt)
    if is_exp and not stages:
        ws.save()
    elif is_exp:
        # DVC cannot save an experiment whose later stages have no outputs yet: keep the worktree
        ws.keep("partial pipeline: DVC cannot save it as an experiment")
        get_run_logger().warning(f"partial pipeline: experiment not saved; results stay in {wt}")
    create_markdown_artifact(key="lmpipe-pipeline-report",
                             markdown=report_markdown(results, metrics, parent.run_id, ws.name),
                             description="metrics, ran vs cached stages, MLflow run ids")
    ws.status = "FINISHED"
    return {"stages": results, "metrics": metrics, "parent_run_id": parent.run_id, "exp_name": ws.name}


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="profile name under profiles/ or a YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted params override")
    parser.add_argument("--stages", nargs="+", default=None, help="run only these stages")
    parser.add_argument("--force", action="store_true", help="re-run stages even if DVC has them cached")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        check_inputs(ROOT, overrides, args.profile, args.stages)  # one line, exit 2, before Prefect starts
        check_services(ROOT)
        signal.signal(signal.SIGTERM, _on_sigterm)  # Prefect's own handler wraps this one during the run
        _session_ephemeral_api()
        state = pipeline(overrides=overrides, profile=args.profile, stages=args.stages, force=args.force,
                         return_state=True)
    except LmpipeError as e:
        print(f"lmpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print("lmpipe: stopped by SIGTERM; the flow run is marked Crashed, the stage that was running kept its "
              "last checkpoint (a re-run resumes from it)", file=sys.stderr, flush=True)
        return 143
    if state.is_failed():
        print(f"lmpipe: flow failed: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    for r in result["stages"]:
        print(f"{r['stage']:>9}: {'ran' if r['ran'] else 'cached'} ({r['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
