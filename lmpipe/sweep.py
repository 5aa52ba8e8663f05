"""Hyperparameter sweeps: an Optuna study in which every trial is a DVC experiment.

    lmpipe sweep sweeps/finetune-lr-strategy.yaml            # run the study, or resume it after a crash
    lmpipe sweep sweeps/finetune-lr-strategy.yaml --apply-best   # then `dvc exp apply` the best trial

1) the sweep file (`SweepFile`) is validated against params.yaml + its profile: unknown keys, keys that are
   not params, empty ranges, a grid over floats -> one line each, nothing run;
2) the study lives in a persistent Optuna storage: .lmpipe/sweeps/<name>.db (SQLite), or $LMPIPE_SWEEP_STORAGE
   (e.g. the team's PostgreSQL). Its name carries the sweep file's hash, so an edited file is a new study;
3) each trial: Optuna suggests values, lmpipe.experiments.run runs the pipeline as the DVC experiment
   `<sweep>-t<NNN>` (stages upstream of the varied keys come from DVC's run cache), and the objective is read
   from the trial's metrics/finetune.json: a validation figure of the selected classifier, never the test split;
4) pruning: the finetune stage reports its validation metric at every evaluation to the trial
   (lmpipe/trial.py, via $LMPIPE_TRIAL) and stops when the pruner says so; the trial is marked pruned in Optuna
   and MLflow and no DVC experiment is saved for it;
5) crash-safe: a trial left RUNNING by a killed sweep is marked failed and its values are queued again, so
   the same command completes the study with `n_trials` finished (complete or pruned) trials.

MLflow: one `sweep` run (tags sweep.name, sweep.sampler, optuna.study, git commit, Prefect flow run) with
each trial's pipeline run (named after its experiment) nested under it (metric `objective`, tag `optuna.state`); the best trial's
params and objective on the sweep run, and Optuna's plots as artifacts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from filelock import FileLock, Timeout
from pydantic import Field, ValidationError, model_validator

from lmpipe import experiments
from lmpipe.config import Section
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.experiments import resolve_profile, resolve_yaml
from lmpipe.names import DVC
from lmpipe.params import flatten, load_raw, merge, validate
from lmpipe.params_file import update_params_file
from lmpipe.tracking import TAGS_ENV, git_info, setup
# Imported inside functions (start-up cost, docs/results.md#start-up): optuna, mlflow and matplotlib where used: a bad
# sweep file is reported before they load.

STORAGE_ENV = "LMPIPE_SWEEP_STORAGE"
"""An Optuna storage URL for every sweep (default: a SQLite file per sweep under .lmpipe/sweeps/)."""


class FloatParam(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    """Sample on a log scale (low must be > 0)."""


class IntParam(Section):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False


class CategoricalParam(Section):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class SweepFile(Section):
    profile: str | None = None
    """A profile (profiles/<name>.yaml) under every trial; the space's values go on top."""
    fixed: dict[str, Any] = Field(default_factory=dict)
    """params.yaml key -> value for every trial (e.g. a longer finetune.max_steps than the profile's)."""
    space: dict[str, Param] = Field(min_length=1)
    """params.yaml key -> its range."""
    sampler: Literal["grid", "random", "tpe"]
    n_trials: int | None = Field(default=None, ge=1)
    """Finished (complete or pruned) trials to reach; a grid's size when left out (grid only)."""
    objective: Literal["val_accuracy", "val_f1_macro", "val_loss"]
    """The selected classifier's figure on the validation split (metrics/finetune.json); the test split is
    never an objective."""
    direction: Literal["maximize", "minimize"]
    pruner: Literal["none", "median", "hyperband"] = "none"
    seed: int = 0
    parallel: int = Field(default=1, ge=1)
    """Trials at a time (the Prefect sweep flow's concurrency; the CLI runs one at a time)."""

    @model_validator(mode="after")
    def _ranges(self) -> "SweepFile":
        issues = []
        for key, p in self.space.items():
            if isinstance(p, (FloatParam, IntParam)):
                if p.low >= p.high:
                    issues.append(f"space.{key}: empty range (low {p.low} >= high {p.high})")
                if p.log and p.low <= 0:
                    issues.append(f"space.{key}: log scale needs low > 0 (got {p.low})")
            if self.sampler == "grid" and isinstance(p, FloatParam):
                issues.append(f"space.{key}: the grid sampler needs listed values: use type categorical with choices")
        if self.sampler != "grid" and self.n_trials is None:
            issues.append(f"n_trials: required with sampler {self.sampler}")
        if self.sampler == "grid" and self.n_trials is not None and self.n_trials > self.grid_size():
            issues.append(f"n_trials: {self.n_trials} exceeds the grid's {self.grid_size()} points")
        if issues:
            raise ValueError("\n".join(issues))
        return self

    def grid(self) -> dict[str, list[Any]]:
        return {k: (p.choices if isinstance(p, CategoricalParam) else list(range(p.low, p.high + 1, p.step)))
                for k, p in self.space.items()}

    def grid_size(self) -> int:
        n = 1
        for values in self.grid().values():
            n *= len(values)
        return n

    def trials(self) -> int:
        return self.n_trials or self.grid_size()


def resolve_sweep(root: Path, ref: str) -> Path:
    """A sweep name (sweeps/<name>.yaml) or a YAML path."""

    return resolve_yaml(root, ref, "sweeps", "sweep")


def load_sweep(path: Path, root: Path) -> SweepFile:
    """The sweep file, validated, and checked against params.yaml + its profile; ConfigError lists every problem."""
    if not path.is_file():
        raise ConfigError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("float", "int", "categorical")))
            msg = {"extra_forbidden": "unknown key", "missing": "missing key"}.get(err["type"], err["msg"])
            for part in msg.removeprefix("Value error, ").splitlines():
                lines.append(f"{path.name}: {part}" if err["type"] == "value_error" else f"{path.name}: {loc}: {part}")
        raise ConfigError("\n".join(lines)) from None
    profile = resolve_profile(root, sweep.profile)
    base = merge(load_raw(root / "params.yaml"), profile)
    known = flatten(base)
    issues = [f"{path.name}: {part}.{key}: not a params.yaml key" for part in ("fixed", "space")
              for key in getattr(sweep, part) if key not in known]
    if issues:
        raise ConfigError("\n".join(issues))
    base = merge(base, None, sweep.fixed)
    # every bound / choice must be a valid value of its key (one trial with each, validated like params.yaml)
    for key, p in sweep.space.items():
        for value in (p.choices if isinstance(p, CategoricalParam) else [p.low, p.high]):
            try:
                validate(merge(base, None, {key: value}), f"{path.name}: space.{key}={value!r}")
            except ConfigError as e:
                issues.extend(str(e).splitlines())
    if issues:
        raise ConfigError("\n".join(dict.fromkeys(issues)))
    return sweep


# -- the study -----------------------------------------------------------------------------------------------

def study_name(name: str, path: Path) -> str:
    return f"{name}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"


def storage_url(root: Path, name: str) -> str:
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    folder = root / ".lmpipe" / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / name}.db"


def _sampler(sweep: SweepFile):
    """Random or TPE; the grid is walked by `_next_grid_point` (each point enqueued as a fixed trial), because
    Optuna's GridSampler counts a failed (killed) trial's point as visited and cannot re-run it."""
    import optuna

    if sweep.sampler in ("grid", "random"):
        return optuna.samplers.RandomSampler(seed=sweep.seed)
    return optuna.samplers.TPESampler(seed=sweep.seed)


def _suggest(trial, sweep: SweepFile) -> dict[str, Any]:
    values = {}
    for key, p in sweep.space.items():
        if isinstance(p, FloatParam):
            values[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
        elif isinstance(p, IntParam):
            values[key] = trial.suggest_int(key, p.low, p.high, step=p.step, log=p.log)
        else:
            values[key] = trial.suggest_categorical(key, p.choices)
    return values


def _next_grid_point(study, sweep: SweepFile) -> dict[str, Any] | None:
    """The first point of the seeded grid order that no trial has finished or is running (failed ones count
    as not done, so a killed trial's point runs again)."""
    import optuna

    keys = list(sweep.space)
    points = list(itertools.product(*(sweep.grid()[k] for k in keys)))
    random.Random(sweep.seed).shuffle(points)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)
    done = {tuple(t.params.get(k) for k in keys) for t in study.get_trials(deepcopy=False, states=states)}
    return next((dict(zip(keys, p)) for p in points if p not in done), None)


def _recover(study, sweep: SweepFile) -> None:
    """Trials a killed sweep left RUNNING: failed, and their values run again (a grid point comes round again by
    itself; a sampled configuration is queued)."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if sweep.sampler != "grid":
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        print(f"sweep: trial {t.number} was interrupted; queued again", flush=True)


def _finished(study) -> list:
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))


@dataclass
class Study:
    """An open sweep: the validated file, its Optuna study and its MLflow sweep run. `run_trial` may be called
    from several threads at once (the Prefect flow's `parallel`): asking for a trial is serialised."""

    root: Path
    name: str
    sweep: SweepFile
    params: Any
    profile: Path | None
    study: Any
    study_name: str
    storage: str
    parent: str
    client: Any
    run_tags: dict[str, str] = field(default_factory=dict)
    """Tags for every trial's pipeline and stage runs (the Prefect flow run, when there is one)."""
    file_lock: Any = None
    """Held while the study is open: a second sweep of the same study in this checkout is refused (it would
    take the first one's running trials for interrupted ones)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        if self.file_lock is not None:
            self.file_lock.release()

    def finished(self) -> int:
        return len(_finished(self.study))

    def remaining(self) -> int:
        """Trials still to run for the study to reach n_trials finished ones (none running counted)."""
        return max(0, self.sweep.trials() - self.finished())

    def run_trial(self) -> dict[str, Any] | None:
        """Ask for one trial, run it as a DVC experiment, tell Optuna and MLflow; None when the study is full.
        A failed trial raises LmpipeError (the study stays resumable)."""
        import optuna

        from lmpipe.trial import TRIAL_ENV

        sweep, name, client = self.sweep, self.name, self.client
        with self.lock:  # ask: the grid's next point and Optuna's RUNNING trial are created together
            running = len(self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
            if self.finished() + running >= sweep.trials():
                return None
            if sweep.sampler == "grid":
                point = _next_grid_point(self.study, sweep)
                if point is None:
                    return None
                self.study.enqueue_trial(point)
            trial = self.study.ask()
            values = _suggest(trial, sweep)
        exp_name = f"{name}-t{trial.number:03d}"
        trial.set_user_attr("dvc_exp", exp_name)
        print(f"sweep {name}: trial {trial.number} {values}", flush=True)
        found: dict[str, Any] = {}
        trial_env = {TRIAL_ENV: json.dumps({"storage": self.storage, "study": self.study_name,
                                            "trial_id": trial._trial_id, "objective": sweep.objective,
                                            "pruner": sweep.pruner})}
        if self.run_tags:
            trial_env[TAGS_ENV] = json.dumps(self.run_tags)
        t0 = time.perf_counter()
        # a trial is selection on the validation split: its deploy stage registers nothing and moves no alias
        # (the test split must not pick the champion; parallel trials would race on it)
        overrides = {**sweep.fixed, **values, "deploy.publish": False}
        try:
            code, run_id = experiments.run_trial(self.root, exp_name, overrides, self.profile, trial_env,
                                                 {"mlflow.parentRunId": self.parent, "sweep.trial": str(trial.number),
                                                  **self.run_tags},
                                                 lambda wt: found.update(_objective(wt, self.params, sweep.objective)))
        except Exception:  # the trial could not run or be saved: failed in Optuna, not left RUNNING
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        seconds = time.perf_counter() - t0
        state = optuna.trial.TrialState.COMPLETE
        attrs = next(t.user_attrs for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if code != 0 and "pruned_at_step" in attrs:  # the finetune stage stopped it (lmpipe.trial.TrialReporter)
            state = optuna.trial.TrialState.PRUNED
            self.study.tell(trial, state=state)
        elif code != 0 or "value" not in found:
            state = optuna.trial.TrialState.FAIL
            self.study.tell(trial, state=state)
        else:
            self.study.tell(trial, found["value"])
            client.log_metric(run_id, "objective", found["value"])
            client.log_metric(self.parent, "trial_objective", found["value"], step=trial.number)
        client.log_metric(run_id, "trial_seconds", round(seconds, 3))  # repro_seconds + the sweep's own work
        client.set_tag(run_id, "optuna.state", state.name)
        client.set_tag(run_id, "optuna.trial", str(trial.number))
        print(f"sweep {name}: trial {trial.number} {state.name}"
              + (f" {sweep.objective}={found['value']:.4f}" if state.name == "COMPLETE" else "")
              + f" ({seconds:.1f} s)", flush=True)
        if state == optuna.trial.TrialState.FAIL:
            raise LmpipeError(f"sweep {name}: trial {trial.number} failed (exit {code}); fix it and run the same "
                              "command again to resume the study")
        return {"number": trial.number, "state": state.name, "value": found.get("value"), "params": values,
                "dvc_exp": exp_name if state.name == "COMPLETE" else None, "mlflow_run_id": run_id,
                "seconds": round(seconds, 2)}

    def fail(self) -> None:
        self.client.set_terminated(self.parent, "FAILED")

    def finish(self, apply_best: bool = False) -> dict[str, Any]:
        """The best trial on the sweep run, Optuna's plots; {study, storage, mlflow_run_id, best, trials}."""
        import optuna

        sweep, name, client, parent = self.sweep, self.name, self.client, self.parent
        complete = [t for t in _finished(self.study) if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            self.fail()
            raise LmpipeError(f"sweep {name}: every trial was pruned; nothing to select")
        best = self.study.best_trial
        for key, value in best.params.items():
            client.log_param(parent, f"best.{key}", value)
        client.log_metric(parent, f"best_{sweep.objective}", best.value)
        client.set_tag(parent, "sweep.best_trial", str(best.number))
        client.set_tag(parent, "sweep.best_exp", best.user_attrs.get("dvc_exp", ""))
        _log_plots(client, parent, self.study)
        client.set_terminated(parent, "FINISHED")
        summary = {"study": self.study_name, "storage": self.storage, "mlflow_run_id": parent, "best": {
            "trial": best.number, "params": best.params, "value": best.value, "dvc_exp": best.user_attrs.get("dvc_exp")},
            "trials": [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
                        "dvc_exp": t.user_attrs.get("dvc_exp")} for t in self.study.get_trials(deepcopy=False)]}
        print(f"sweep {name}: best trial {best.number} {sweep.objective}={best.value:.4f} {best.params} "
              f"(dvc exp {summary['best']['dvc_exp']})", flush=True)
        if apply_best:
            apply(self.root, summary["best"]["dvc_exp"])
        return summary


def open_study(root: Path, path: Path, tags: dict[str, str] | None = None) -> Study:
    """Validate the sweep file, create or load its Optuna study (recovering trials a killed sweep left
    running) and its MLflow sweep run (one per study, found again on resume; `tags` added, e.g. the Prefect
    flow run)."""
    sweep = load_sweep(path, root)  # every problem in one go, before the heavy imports below

    name = path.stem
    profile = experiments.resolve_profile(root, sweep.profile)
    params = validate(merge(load_raw(root / "params.yaml"), profile, sweep.fixed))
    (root / ".lmpipe" / "sweeps").mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(str(root / ".lmpipe" / "sweeps" / f"{name}.lock"))
    try:
        file_lock.acquire(timeout=0)
    except Timeout:
        raise LmpipeError(f"sweep {name} is already running in this checkout; wait for it (or stop it), then run "
                          "the same command to resume") from None
    try:
        return _open(root, path, sweep, name, profile, params, tags, file_lock)
    except BaseException:
        file_lock.release()
        raise


def _open(root: Path, path: Path, sweep: SweepFile, name: str, profile: Path | None, params, tags, file_lock) -> Study:
    import mlflow
    import optuna

    from lmpipe.trial import sweep_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sname, storage = study_name(name, path), storage_url(root, name)
    study = optuna.create_study(storage=storage, study_name=sname, direction=sweep.direction,
                                sampler=_sampler(sweep), pruner=sweep_pruner(sweep.pruner), load_if_exists=True)
    _recover(study, sweep)

    exp_id = setup(root, params.common.experiment)
    client = mlflow.MlflowClient()
    tags = dict(tags or {})
    if os.environ.get("PREFECT__FLOW_RUN_ID") and "prefect.flow_run_id" not in tags:
        tags["prefect.flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    run_tags = dict(tags)
    parent = study.user_attrs.get("mlflow_run_id")
    if parent is None:
        tags = {"lmpipe.kind": "sweep", "sweep.name": name, "sweep.sampler": sweep.sampler, "sweep.pruner": sweep.pruner,
                "optuna.study": sname, "optuna.storage": storage, "sweep.objective": sweep.objective,
                "sweep.direction": sweep.direction, **git_info(root), **tags}
        parent = client.create_run(exp_id, run_name=f"sweep {name}", tags=tags).info.run_id
        study.set_user_attr("mlflow_run_id", parent)
        for key, p in sweep.space.items():
            client.log_param(parent, f"space.{key}", json.dumps(p.model_dump(exclude={"type"})))
    else:
        client.update_run(parent, "RUNNING")
        for key, value in tags.items():  # a resumed study: the newest executor's tags
            client.set_tag(parent, key, value)
    return Study(root, name, sweep, params, profile, study, sname, storage, parent, client, run_tags, file_lock)


def run_sweep(root: Path, path: Path, apply_best: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep in `path`, one trial at a time; returns {study, best, trials}."""
    study = open_study(root, path)
    try:
        while study.run_trial() is not None:
            pass
        return study.finish(apply_best)
    except LmpipeError:
        study.fail()
        raise
    finally:
        study.close()


def _objective(wt: Path, params, objective: str) -> dict[str, Any]:
    metrics = json.loads((wt / params.finetune.metrics).read_text())
    return {"value": float(metrics["classifier"][objective])}


def _log_plots(client, run_id: str, study) -> None:
    """Optimisation history, parameter importances, parallel coordinates: HTML (plotly) and PNG (matplotlib)."""
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl

    plots = {"history": (vis.plot_optimization_history, vis_mpl.plot_optimization_history),
             "importances": (vis.plot_param_importances, vis_mpl.plot_param_importances),
             "parallel_coordinate": (vis.plot_parallel_coordinate, vis_mpl.plot_parallel_coordinate)}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
        for name, (html, png) in plots.items():
            try:
                html(study).write_html(f"{tmp}/{name}.html")
                ax = png(study)
                fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
                fig.savefig(f"{tmp}/{name}.png", dpi=100, bbox_inches="tight")
                import matplotlib.pyplot as plt

                plt.close(fig)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of one completed trial
                print(f"sweep: plot {name} skipped ({str(e).splitlines()[0][:120]})", flush=True)
                continue
        client.log_artifacts(run_id, tmp, "optuna")


def apply(root: Path, exp_name: str) -> None:
    """`dvc exp apply` the experiment into the workspace and print the params diff against HEAD."""
    res = subprocess.run([*DVC, "exp", "apply", exp_name], cwd=root, capture_output=True, text=True)
    if res.returncode != 0:
        raise LmpipeError(f"dvc exp apply {exp_name}: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    # trials ran with deploy.publish false (selection only); the applied workspace deploys as HEAD does
    head = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True).stdout
    raw = yaml.safe_load((root / "params.yaml").read_text())
    publish = (yaml.safe_load(head) or {}).get("deploy", {}).get("publish", True)
    if raw.get("deploy", {}).get("publish") != publish:
        raw["deploy"]["publish"] = publish
        update_params_file(root / "params.yaml", raw)  # that one value; the file's comments stay
    diff = subprocess.run(["git", "diff", "--", "params.yaml"], cwd=root, capture_output=True, text=True).stdout
    print(f"applied {exp_name}; params.yaml now differs from HEAD by:\n{diff or '(nothing)'}", flush=True)
