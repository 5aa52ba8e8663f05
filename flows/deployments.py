"""Register the work pools and deployments of prefect.yaml with the configured Prefect API.

    python -m flows.deployments                       # workers run the flow from this checkout
    python -m flows.deployments --workspace /srv/lmpipe  # ... or from another checkout (same path on every worker)

    python -m flows.deployments --workspace worker    # ... or each worker from its own $LMPIPE_WORKSPACE

Idempotent: re-running updates the `cpu` and `gpu` process pools (env LMPIPE_POOL=<pool>; gpu LMPIPE_DEVICE=cuda,
every GPU visible) and re-applies the deployments `lmpipe-pipeline/nightly` (cron, pool gpu),
`lmpipe-pipeline/on-demand` and `lmpipe-sweep/on-demand` (no schedule, pool cpu), and `lmpipe-stage/cpu`,
`lmpipe-stage/gpu` (one stage handed to that pool: lmpipe.placement) with `prefect deploy --all`. No image is
built or pushed: the pull step is `set_working_directory` to the workspace. The API is
PREFECT_API_URL (env or active Prefect profile); it must point at a running server.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect.automations import Automation
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, get_current_settings
from prefect.workers.process import ProcessWorker

from lmpipe.names import POOL_ENV
from lmpipe.params import load_params

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "prefect.yaml"
FLOWS = {"flows/pipeline.py:pipeline": "lmpipe-pipeline", "flows/sweep.py:sweep": "lmpipe-sweep",
         "flows/stage.py:stage": "lmpipe-stage"}
"""prefect.yaml entrypoint -> the flow's name (deployments are `<flow name>/<deployment name>`)."""
POOLS: dict[str, dict[str, str]] = {
    "cpu": {"LMPIPE_DEVICE": "cpu", POOL_ENV: "cpu"},
    "gpu": {"LMPIPE_DEVICE": "cuda", POOL_ENV: "gpu"},
}
"""Each pool's env defaults. No CUDA_VISIBLE_DEVICES: a gpu worker's runs see every GPU of its host
(`pretrain.nproc_per_node: auto`); a deployment or run chooses a subset with the job variable
env.CUDA_VISIBLE_DEVICES."""
WORKER = "worker"
"""--workspace worker: each worker runs the flows from its own checkout, $LMPIPE_WORKSPACE in its environment
(hosts whose checkouts live at different paths: lmpipe.placement)."""


class DeployError(RuntimeError):
    """Anything that stops the registration; the message is the one line printed on stderr."""


def pool_template(env: dict[str, str], existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """A process base job template whose `env` defaults include `env`.

    An existing pool's template is kept (other edits to it survive); only the env defaults are set.
    """
    template = copy.deepcopy(existing) if existing and existing.get("variables", {}).get("properties", {}).get("env") \
        else ProcessWorker.get_default_base_job_template()
    env_var = template["variables"]["properties"]["env"]
    env_var["default"] = {**(env_var.get("default") or {}), **env}
    return template


def api_url() -> str:
    url = PREFECT_API_URL.value()
    if not url:
        raise DeployError("PREFECT_API_URL is not set: start `prefect server start` and "
                          "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
    return url


def check_api(client, url: str) -> None:
    exc = client.api_healthcheck()
    if exc is not None:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DeployError(f"Prefect API at {url} is unreachable ({detail})")


def ensure_pools(client) -> list[str]:
    """Create or update the process pools; a pool of another type (e.g. kubernetes) is left alone."""
    lines = []
    for name, env in POOLS.items():
        try:
            existing = client.read_work_pool(name)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing.type != "process":
            lines.append(f"work pool {name}: exists with type {existing.type}, left unchanged")
            continue
        env_text = " ".join(f"{k}={v}" for k, v in env.items())
        description = f"lmpipe {name} process workers ({env_text})"
        if existing is None:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description,
                                                   base_job_template=pool_template(env)))
        else:  # a PATCH of these two fields only: pause state and concurrency limit stay as they are
            client.update_work_pool(name, WorkPoolUpdate(description=description,
                                                         base_job_template=pool_template(env, existing.base_job_template)))
        lines.append(f"work pool {name}: {'updated' if existing else 'created'} (process, {env_text})")
    return lines


ZOMBIES = "lmpipe: crash silent flow runs"
"""The automation that marks a flow run Crashed once its heartbeats stop (a worker host died): the pipeline flow
then retries the stage it had handed out, and the stage resumes from its checkpoint (lmpipe.placement)."""


def ensure_zombie_automation(silent_after_s: float) -> str:
    """Create or update ZOMBIES (Prefect's documented zombie detection, scoped to flow runs tagged `lmpipe`, which
    every deployment of prefect.yaml gives its runs): after a flow run's heartbeat, expect another event from it
    within `silent_after_s`, else set it Crashed. Flow runs beat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds
    (180 by default), so `silent_after_s` must be longer: checked here against this process's setting, which the
    workers should share."""
    beat = get_current_settings().flows.heartbeat_frequency
    if beat is None or silent_after_s <= beat:
        raise DeployError(f"placement.silent_after_s: {silent_after_s:g} s must exceed the flow runs' heartbeat "
                          f"(PREFECT_FLOWS_HEARTBEAT_FREQUENCY={beat}), or healthy runs would be marked Crashed")
    wanted = Automation(
        name=ZOMBIES, description="lmpipe (flows/deployments.py): an lmpipe flow run whose heartbeats stopped is Crashed",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.*"},
                             match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                             match_related=ResourceSpecification({"prefect.resource.id": "prefect.tag.lmpipe",
                                                                  "prefect.resource.role": "tag"}),
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=silent_after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {silent_after_s:g} s: its worker's host is gone")])
    try:
        existing = Automation.read(name=ZOMBIES)
    except ValueError:  # not there yet
        existing = None
    if existing is None:
        wanted.create()
    else:  # in place: there is never a moment without it
        wanted.id = existing.id
        wanted.update()
    return f"automation {ZOMBIES!r}: {'updated' if existing else 'created'} (Crashed after {silent_after_s:g} s silent)"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("─│╭╮╰╯ ")]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1].strip("│ ")


def run_prefect_deploy(workspace: Path | None, url: str) -> None:
    """`prefect deploy --all` of prefect.yaml, the pull step resolved to `workspace` at deploy time (None: left as
    `{{ $LMPIPE_WORKSPACE }}`, which each worker resolves from its own environment at run time)."""
    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_CLI_PROMPT": "false"}
    env.pop("LMPIPE_WORKSPACE", None)
    if workspace is not None:
        env["LMPIPE_WORKSPACE"] = str(workspace)
    cmd = [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
           "--prefect-file", str(PREFECT_FILE)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise DeployError(f"prefect deploy failed: {_last_line(res.stderr + chr(10) + res.stdout)}")


def describe(client, full: str) -> str:
    try:
        dep = client.read_deployment_by_name(full)
    except ObjectNotFound:
        raise DeployError(f"deployment {full} was not created (check prefect.yaml)") from None
    schedules = [s.schedule for s in dep.schedules]
    crons = [f"cron '{s.cron}' {s.timezone or 'UTC'}" for s in schedules if getattr(s, "cron", None)]
    sched = ", ".join(crons) or ("no schedule" if not schedules else f"{len(schedules)} schedule(s)")
    return f"deployment {full}: {dep.id} (pool {dep.work_pool_name}, {sched})"


def deploy(workspace: Path | None) -> list[str]:
    if not PREFECT_FILE.is_file():
        raise DeployError(f"{PREFECT_FILE} not found")
    if workspace is not None and (not (workspace / "flows" / "pipeline.py").is_file()
                                  or not (workspace / "dvc.yaml").is_file()):
        raise DeployError(f"--workspace: {workspace} is not an lmpipe checkout (needs flows/pipeline.py and dvc.yaml)")
    deployments = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    unknown = [d["entrypoint"] for d in deployments if d["entrypoint"] not in FLOWS]
    if unknown:
        raise DeployError(f"{PREFECT_FILE.name}: entrypoint {unknown[0]} is not one of {', '.join(FLOWS)}")
    names = [f"{FLOWS[d['entrypoint']]}/{d['name']}" for d in deployments]
    url = api_url()
    with get_client(sync_client=True) as client:
        check_api(client, url)
        lines = ensure_pools(client)
        lines.append(ensure_zombie_automation(load_params(ROOT / "params.yaml").placement.silent_after_s))
        run_prefect_deploy(workspace, url)
        lines += [describe(client, name) for name in names]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", default=os.environ.get("LMPIPE_WORKSPACE") or str(ROOT),
                        help="repo checkout the workers run the flow from (default: env LMPIPE_WORKSPACE, else this "
                             f"repo); `{WORKER}`: each worker's own $LMPIPE_WORKSPACE")
    args = parser.parse_args(argv)
    workspace = None if args.workspace == WORKER else Path(args.workspace).expanduser().resolve()
    try:
        for line in deploy(workspace):
            print(line, flush=True)
    except DeployError as e:
        print(f"lmpipe: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - one line, not a traceback, for API/HTTP failures
        print(f"lmpipe: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
