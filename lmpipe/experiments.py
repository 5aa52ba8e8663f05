"""The one way lmpipe runs params overrides as a DVC experiment: `make smoke`, the flow's experiments
(and sweep trials) all go through here.

    lmpipe smoke --profile profiles/smoke.yaml --set finetune.max_steps=20

1) `create`: a git worktree of the committed HEAD under .lmpipe/worktrees/<name>, sharing this checkout's
   DVC cache (so DVC's run cache serves every stage whose inputs did not change) and its data link;
2) `write_params`: params.yaml there = params.yaml + profile + overrides, validated first (every problem
   one line, nothing run); values are written as YAML, so no override needs shell or Hydra quoting;
3) the stages run there (`dvc repro`, or stage by stage by the Prefect flow);
4) `save`: `dvc exp save -n <name>`, so `dvc exp show` lists it with its params and metrics; then `remove`.
`workspace()` is that sequence as one context (with the execution's pipeline run and the stages'
environment): `lmpipe smoke`, sweep trials (`run_trial`) and the Prefect flow each open one.

The user's params.yaml and outputs are never touched. Uncommitted code is not part of an experiment
(commit first). Native DVC experiments (`dvc exp run -S`, `--queue`) work beside these: both read the
data through the checkout's `lmpipe-data` link and share one run cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from filelock import FileLock

from lmpipe import datasource
from lmpipe.config import Params
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.lineage import PipelineRun
from lmpipe.names import DVC, WORKTREES
from lmpipe.params import flatten, load_raw, merge, validate
from lmpipe.params_file import update_params_file
from lmpipe.tracking import PARENT_ENV, git_info, setup, tracking_uri
# Imported inside functions (start-up cost, docs/results.md#start-up): mlflow and dvc's internals where used: sweep
# imports this module, and a bad profile or sweep file is reported before they load.


def error_line(text: str, fallback: str) -> str:
    """DVC's own error line (the last `ERROR:` line; DVC ends with a support footer), else the last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or [fallback])[-1]


def resolve_yaml(root: Path, ref: str, folder: str, kind: str) -> Path:
    """A name (<folder>/<name>.yaml) or a YAML path, relative to root; missing -> ConfigError naming `kind`."""
    path = Path(ref) if ref.endswith((".yaml", ".yml")) else Path(folder) / f"{ref}.yaml"
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ConfigError(f"{kind} {ref!r}: {path} not found")
    return path


def resolve_profile(root: Path, profile: str | None) -> Path | None:
    """A profile name (profiles/<name>.yaml) or a YAML path; missing -> ConfigError."""
    return resolve_yaml(root, profile, "profiles", "profile") if profile else None


def prepare(root: Path, overrides: dict[str, Any] | None, profile: Path | None) -> tuple[dict, Params]:
    """The experiment's params tree, validated (raises ConfigError listing every problem)."""
    raw = merge(load_raw(root / "params.yaml"), profile, overrides)
    return raw, validate(raw, "params.yaml" + (f" + {profile.name}" if profile else "") + (" + overrides" if overrides else ""))


def create(root: Path, name: str, rev: str = "HEAD", folder: str = WORKTREES) -> Path:
    """A detached worktree of `rev` under `folder` that shares the checkout's DVC cache, remotes and data link."""
    wt = root / folder / name
    wt.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["git", "worktree", "add", "--detach", "--force", str(wt), rev], cwd=root,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise LmpipeError(f"git worktree add {wt}: {error_line(res.stderr, str(res.returncode))} (is HEAD committed?)")
    local = root / ".dvc" / "config.local"  # this checkout's remotes (placement pushes to the default one)
    if local.is_file():
        shutil.copy2(local, wt / ".dvc" / "config.local")
    subprocess.run([*DVC, "config", "--local", "cache.dir", str(root / ".dvc" / "cache")], cwd=wt, check=True,
                   capture_output=True)
    datasource.link(wt, datasource.data_dir(root))
    return wt


def write_params(wt: Path, raw: dict) -> None:
    """The worktree's params.yaml changed to read as `raw`, its comments and key order kept (never re-dumped:
    `dvc exp apply` of the experiment brings this file into the user's checkout)."""
    update_params_file(wt / "params.yaml", raw)


def env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for stages run in a worktree: MLflow runs land in the checkout's store."""

    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def save(wt: Path, name: str, run_env: dict[str, str]) -> None:
    """Record the worktree's state as the DVC experiment `name` (metrics and plots are git-tracked files).
    Saves of parallel experiments (the sweep flow's `parallel`) take turns: they write the shared git
    repository's experiment refs, which two `dvc exp save` at once corrupt for one of them."""
    root = wt.parents[2]  # <root>/.lmpipe/worktrees/<name>
    with FileLock(str(root / ".lmpipe" / "exp-save.lock")):
        res = subprocess.run([*DVC, "exp", "save", "-n", name, "--force"], cwd=wt, capture_output=True, text=True,
                             env=run_env)
    if res.returncode != 0:
        raise LmpipeError(f"dvc exp save: {error_line(res.stderr or res.stdout, str(res.returncode))}")


def remove(root: Path, wt: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=root, capture_output=True)
    shutil.rmtree(wt, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)


def default_name(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


class Workspace:
    """One execution of the pipeline: where its stages run (an experiment's worktree, or the checkout itself
    when `name` is None), the pipeline run it records into, and the environment its stages get. Made by
    `workspace()`; `lmpipe smoke`, sweep trials and the Prefect flow all run through it."""

    def __init__(self, root: Path, name: str | None, run: PipelineRun, path: Path, env: dict[str, str]):
        self.root, self.name, self.run, self.path, self.env = root, name, run, path, env
        self.status = "FAILED"
        """How the pipeline run ends when the block exits without an exception: set "FINISHED" on success."""
        self.kept: str | None = None

    def save(self) -> None:
        """Record the worktree as the DVC experiment `name` (`dvc exp show` lists it)."""
        save(self.path, self.name, {**os.environ, **self.env})
        print(f"experiment {self.name} saved: dvc exp show", flush=True)

    def keep(self, why: str) -> None:
        """Leave the worktree in place after the block (its outputs are the only copy), saying why."""
        self.kept = why
        self.run.tag("lmpipe.worktree", str(self.path))


@contextmanager
def workspace(root: Path, name: str | None, raw: dict, params: Params, tags: dict[str, str],
              **env_extra: str) -> Iterator[Workspace]:
    """Open an execution: the worktree of HEAD with `raw` as its params.yaml (none for `name` None), its
    pipeline run (tagged `tags`, named after the experiment) and the stages' environment. On exit the run
    ends (FINISHED when the block set it, KILLED on Ctrl-C, else FAILED) and the worktree goes, unless the
    block kept it or a signal stopped the execution (a stage's checkpoints stay with it)."""
    import mlflow

    wt = create(root, name) if name is not None else None
    ws = None
    try:
        if wt is not None:
            write_params(wt, raw)
        experiment_id = setup(root, params.common.experiment)  # the store first: a client reads it when made
        run = PipelineRun.open(mlflow.MlflowClient(), experiment_id,
                               {**({"dvc.exp_name": name} if name else {}), **tags})
        ws = Workspace(root, name, run, wt or root, env(root, **{PARENT_ENV: run.run_id}, **env_extra))
        try:
            yield ws
        except Exception:
            ws.status = "FAILED"
            raise
        except BaseException as e:  # Ctrl-C or a signal: the stage's checkpoints stay with the worktree
            ws.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            ws.kept = ws.kept or f"stopped by {type(e).__name__}"
            raise
        finally:
            run.end(ws.status)
    finally:
        if wt is not None:
            if ws is not None and ws.kept:
                print(f"lmpipe: experiment worktree kept ({ws.kept}): {wt}", file=sys.stderr, flush=True)
            else:
                remove(root, wt)


def run(root: Path, name: str, overrides: dict[str, Any] | None = None, profile: Path | None = None) -> int:
    """The whole pipeline as the experiment `name` (`dvc repro` in its worktree), under one pipeline run."""
    return run_trial(root, name, overrides, profile)[0]


def run_trial(root: Path, name: str, overrides: dict[str, Any] | None, profile: Path | None,
              extra_env: dict[str, str] | None = None, tags: dict[str, str] | None = None,
              on_success: Callable[[Path], None] | None = None) -> tuple[int, str]:
    """`run` with what a sweep trial adds: environment for the stages, tags on the pipeline run (e.g. its
    parent), and `on_success(worktree)` before the worktree goes. Returns (dvc repro's exit code, pipeline
    run id); a failed or pruned run saves no experiment."""
    raw, params = prepare(root, overrides, profile)  # validate before anything runs
    with workspace(root, name, raw, params, {**git_info(root), **(tags or {})}, **(extra_env or {})) as ws:
        print(f"+ dvc repro  (experiment {name} in {ws.path})", flush=True)
        t0 = time.perf_counter()
        code = subprocess.call([*DVC, "repro"], cwd=ws.path, env=ws.env)
        ws.run.client.log_metric(ws.run.run_id, "repro_seconds", round(time.perf_counter() - t0, 3))
        if code == 0:
            ws.save()
            if on_success is not None:
                on_success(ws.path)
            ws.status = "FINISHED"
        return code, ws.run.run_id


# -- a profile as native `dvc exp run -S` overrides ----------------------------------------------------------

def _hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar, which `dvc exp run -S` parses: strings quoted, lists and
    dicts as [..] and {k:v}."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)  # Hydra reads 5e-05 as a string: its floats need a dot (5.0e-05)
        return text.replace("e", ".0e") if "e" in text and "." not in text else text
    if isinstance(value, int):
        return repr(value)
    text = str(value)
    if "\\" in text or "${" in text:  # Hydra's escaping rules and DVC's interpolation would change them
        raise ConfigError(f"profile value {text!r}: backslashes and ${{ cannot pass through dvc exp run -S; "
                          "use lmpipe smoke --profile, which writes params.yaml directly")
    return "'" + text.replace("'", "\\'") + "'"


def dvc_set_params(root: Path, profile: Path) -> list[str]:
    """`-S key=value` arguments for `dvc exp run` that apply `profile` to root's params.yaml (every leaf key;
    lists whole; `++key` adds an optional key params.yaml leaves out)."""

    present = flatten(load_raw(root / "params.yaml"))
    return [a for key, value in flatten(load_raw(profile)).items()
            for a in ("-S", f"{'' if key in present else '++'}{key}={_hydra_value(value)}")]


def _user_set_params(dvc_args: list[str]) -> list[str]:
    """The -S / --set-param values among dvc exp run arguments."""
    out, it = [], iter(dvc_args)
    for arg in it:
        if arg in ("-S", "--set-param"):
            out.append(next(it, ""))
        elif arg.startswith("--set-param="):
            out.append(arg.split("=", 1)[1])
    return out


def dvc_exp_run(root: Path, profile: Path, dvc_args: list[str]) -> int:
    """`dvc exp run` with the profile's keys as -S overrides, plus dvc_args (--queue, --temp, -n NAME, more -S
    ...). The params DVC will write (profile and your -S applied by DVC's own parser) are validated first:
    every problem one line, nothing runs. The experiment is DVC's own (without --temp/--queue DVC runs it in
    the workspace, which then holds its params and results, as `dvc exp run` always does)."""
    from dvc.exceptions import DvcException
    from dvc.utils.hydra import apply_overrides

    sets = dvc_set_params(root, profile)
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "params.yaml"
        shutil.copy(root / "params.yaml", trial)
        try:
            apply_overrides(trial, sets[1::2] + _user_set_params(dvc_args))
        except DvcException as e:
            cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
            raise ConfigError(f"dvc exp run -S: {e}{cause}") from None
        validate(yaml.safe_load(trial.read_text()), f"params.yaml + {profile.name} + -S")
    cmd = [*DVC, "exp", "run", *sets, *dvc_args]
    return subprocess.run(cmd, cwd=root, env=env(root)).returncode
