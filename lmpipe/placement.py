"""Stages on the hardware they need: which pool runs a stage, and how its inputs and outputs travel.

    params.yaml  placement: {pools: {pretrain: gpu, finetune: gpu}}

The pipeline flow (flows/pipeline.py) runs a stage in place when params name no pool for it, or the pool of the
worker that runs the flow (env LMPIPE_POOL, set by each pool's job template). Any other pool gets a run of the
deployment `lmpipe-stage/<pool>` (flows/stage.py), and the flow waits for it. That run's worker:
1) `worktree`: a git worktree of the flow's commit in its own checkout (.lmpipe/placed/<flow run>-<stage>, kept
   when the stage fails or is stopped, so a retry resumes from the stage's checkpoint);
2) `write_inputs`: the flow's params.yaml and dvc.lock, so DVC sees the same pipeline state as the flow's host;
3) `dvc repro --pull --single-item <stage>`: the inputs come from the DVC remote, never from a shared disk;
4) `push`: `dvc push --run-cache <stage>`, so the next host finds the outputs and a re-run anywhere the run cache;
5) reports the stage's dvc.lock entry (a Prefect artifact, `report`/`read_report`), which the flow's host writes
   into its own dvc.lock before `pull`ing the outputs.
While any stage is placed elsewhere, the flow's own stages pull and push the same way. Without a pool named, no
remote is needed and nothing is pulled or pushed: one host, as `make run`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml
from dvc.utils.serialize import loads_yaml, modify_yaml

from lmpipe import experiments
from lmpipe.config import Params
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.names import DVC, PLACED, POOL_ENV, STAGES

CODE_PATHS = ("dvc.yaml", "lmpipe", "stages", "flows", "pyproject.toml")
"""What another host takes from git rather than from the flow: uncommitted edits here would not reach it."""
READY = ".lmpipe-placed-ready"
"""Written last when a placed stage's worktree is made: only such a worktree is reused by a retry."""
REPORT_KEY = "lmpipe-placed-{stage}"
"""The artifact a placed stage's run leaves for the flow (Prefect artifact keys: lowercase, digits, dashes)."""


def here() -> str | None:
    """The pool of the worker running this process, None outside a pool (a shell, `make run`)."""
    return os.environ.get(POOL_ENV) or None


def pool_for(params: Params, stage: str) -> str | None:
    """The pool to hand `stage` to; None = run it here."""
    pool = params.placement.pools.get(stage)
    return pool if pool and pool != here() else None


def placed(params: Params, stages: list[str] | None = None) -> dict[str, str]:
    """stage -> pool for every stage (of `stages`) that runs elsewhere."""
    return {s: p for s in (stages or STAGES) if (p := pool_for(params, s))}


def _dvc(wt: Path, *args: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run([*DVC, *args], cwd=wt, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        line = experiments.error_line(res.stderr + "\n" + res.stdout, str(res.returncode))
        raise LmpipeError(f"dvc {args[0]}: {line}")
    return res.stdout


def check(wt: Path, where: dict[str, str]) -> None:
    """The flow's checkout can hand stages out: a default DVC remote, and no uncommitted code (another host runs
    the commit). ConfigError, one line, before any stage runs."""
    if not where:
        return
    sent = ", ".join(f"{s} -> {p}" for s, p in where.items())
    default = subprocess.run([*DVC, "remote", "default"], cwd=wt, capture_output=True, text=True)
    if default.returncode != 0 or not default.stdout.strip():  # dvc exits 251 with "No default remote set"
        raise ConfigError(f"placement.pools sends {sent}: outputs travel through a DVC remote and {wt} has no "
                          "default one (dvc remote add -d <name> <url>, on every host)")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS], cwd=wt,
                           capture_output=True, text=True).stdout.split("\n")
    dirty = [ln[3:] for ln in dirty if ln.strip()]
    if dirty:
        raise ConfigError(f"placement.pools sends {sent}: another host runs the committed code, and {wt} has "
                          f"uncommitted changes in {', '.join(dirty[:3])}{' ...' if len(dirty) > 3 else ''}: commit first")


def check_store(uri: str | None) -> None:
    """The flow's MLflow store is one this host reaches: a server, or (hosts on one machine) a file store whose
    folder exists here. Else ConfigError, one line, before the stage runs (its run would land in a file nobody
    reads)."""
    if not uri or uri.startswith(("http://", "https://", "databricks")):
        return
    path = Path(uri.split(":///", 1)[1] if ":///" in uri else uri.removeprefix("file:"))
    if not path.parent.is_dir():
        raise ConfigError(f"MLFLOW_TRACKING_URI {uri}: the flow's MLflow store is a file on its host, not here; "
                          "stages on other hosts need a tracking server (lmpipe services up; MLFLOW_TRACKING_URI=http://...)")


def commit(wt: Path) -> str:
    res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=wt, capture_output=True, text=True)
    if res.returncode != 0:
        raise ConfigError(f"placement: {wt} has no commit (another host checks the code out by commit)")
    return res.stdout.strip()


def worktree(root: Path, key: str, rev: str) -> Path:
    """This host's worktree for one placed stage of one flow run: created at `rev`, or the one a stopped try left
    (its checkpoints are how the stage resumes). Shares the checkout's DVC cache, remotes and data link."""
    if not re.fullmatch(r"[\w.-]+", key):
        raise ConfigError(f"placement: worktree key {key!r} is not a plain name")
    if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=root, capture_output=True).returncode:
        raise ConfigError(f"placement: {root} does not have commit {rev[:12]} that the flow runs: git fetch there")
    wt = root / PLACED / key
    if wt.exists():
        if (wt / READY).is_file() and _git(wt, "rev-parse", "--show-toplevel") == str(wt.resolve()) \
                and _git(wt, "rev-parse", "HEAD") == rev:
            return wt  # a stopped try's worktree: its checkpoints are where the stage resumes from
        experiments.remove(root, wt)  # half made or half removed: made again (it holds nothing to resume)
    wt = experiments.create(root, key, rev=rev, folder=PLACED)
    (wt / READY).write_text(rev + "\n")
    return wt


def _git(wt: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=wt, capture_output=True, text=True).stdout.strip()


def write_inputs(wt: Path, params_yaml: str, lock_yaml: str | None) -> None:
    """The flow's pipeline state: its params.yaml and dvc.lock (absent: nothing ran there yet)."""
    (wt / "params.yaml").write_text(params_yaml)
    lock = wt / "dvc.lock"
    if lock_yaml is None:
        lock.unlink(missing_ok=True)
    else:
        lock.write_text(lock_yaml)


def read_lock(wt: Path) -> str | None:
    path = wt / "dvc.lock"
    return path.read_text() if path.is_file() else None


def lock_entry(wt: Path, stage: str) -> dict[str, Any]:
    """`stage`'s entry of wt/dvc.lock, read as DVC reads it (YAML 1.2)."""
    lock = loads_yaml(read_lock(wt) or "{}") or {}
    entry = lock.get("stages", {}).get(stage)
    if entry is None:
        raise LmpipeError(f"placement: {wt}/dvc.lock has no entry for {stage} after it ran")
    return entry


def set_lock_entry(wt: Path, stage: str, entry: dict[str, Any]) -> None:
    """Write another host's dvc.lock entry for `stage` into this checkout's dvc.lock with DVC's own YAML round trip
    (the other entries and their formatting stay as DVC wrote them; a new entry goes in pipeline order)."""
    path = wt / "dvc.lock"
    if not path.is_file():
        path.write_text("schema: '2.0'\nstages: {}\n")
    order = list(yaml.safe_load((wt / "dvc.yaml").read_text())["stages"])
    with modify_yaml(str(path)) as lock:
        stages = lock.setdefault("stages", {})
        stages[stage] = entry
        ranked = sorted(stages, key=lambda s: order.index(s) if s in order else len(order))
        if list(stages) != ranked:
            reordered = {name: stages[name] for name in ranked}
            stages.clear()
            stages.update(reordered)


def up_to_date(wt: Path, stage: str) -> bool:
    """DVC has nothing to do for `stage` here (its dvc.lock entry matches its deps, params and outputs): the flow
    then does not hand it to another pool at all."""
    return json.loads(_dvc(wt, "status", "--json", stage) or "{}") == {}


def pull(wt: Path, stage: str, env: dict[str, str] | None = None) -> None:
    """The outputs dvc.lock names for `stage`, from the remote (or this host's cache) into the checkout."""
    _dvc(wt, "pull", "--force", stage, env=env)


def push(wt: Path, stage: str, env: dict[str, str] | None = None) -> None:
    """`stage`'s outputs and the run cache to the default remote."""
    _dvc(wt, "push", "--run-cache", stage, env=env)


def remove(root: Path, wt: Path) -> None:
    experiments.remove(root, wt)


def report(stage: str, result: dict[str, Any], entry: dict[str, Any], facts: dict[str, str]) -> str:
    """The placed run's report to the flow: a markdown artifact, readable in the Prefect UI, with the dvc.lock
    entry as its JSON block. Returns the markdown."""
    lines = [f"# {stage}: {'ran' if result['ran'] else 'cached'} in {result['seconds']} s", "",
             "| fact | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    payload = {"result": result, "facts": facts, "lock": entry}  # key order kept: it is dvc.lock's
    return "\n".join(lines + ["", "```json", json.dumps(payload), "```", ""])


def read_report(markdown: str) -> dict[str, Any]:
    match = re.search(r"```json\n(.*?)\n```", markdown, re.S)
    if match is None:
        raise LmpipeError("placement: the placed stage's report has no JSON block")
    return json.loads(match.group(1))


def where(facts: dict[str, str]) -> str:
    """One cell of the flow's report: pool, worker, host, device."""
    device = facts.get("host.gpu") or facts.get("host.cpu", "")
    return (f"pool {facts.get('host.pool') or '-'} · worker {facts.get('host.worker') or '-'} · {facts.get('host.name', '?')} "
            f"({facts.get('host.workspace', '')}) · {facts.get('host.device', '?')} {device}").strip()
