"""The sweep-trial protocol between lmpipe/sweep.py (which runs a trial as a DVC experiment) and the finetune
stage inside it: $LMPIPE_TRIAL names the Optuna trial, the stage reports the objective at each evaluation and
stops (TrialPruned, exit 3) when the pruner says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import TrainerCallback

from lmpipe.errors import LmpipeError
# Imported inside functions (start-up cost, docs/results.md#start-up): optuna where used: every finetune imports this
# module, and only a sweep trial needs optuna.

TRIAL_ENV = "LMPIPE_TRIAL"
"""Set by lmpipe/sweep.py for a trial's stages: JSON {storage, study, trial_id, objective, pruner}."""
OBJECTIVE_KEYS = {"val_accuracy": "eval_accuracy", "val_f1_macro": "eval_f1_macro", "val_loss": "eval_loss"}
"""A sweep objective (metrics/finetune.json) -> the name Trainer gives it at each evaluation."""


def sweep_pruner(kind: str):
    """The Optuna pruner a sweep file names (none | median | hyperband); pruners live in no storage, so the
    sweep and the stage that reports build the same one."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


class TrialPruned(LmpipeError):
    """The sweep's pruner stopped this trial (lmpipe/sweep.py marks it pruned and saves no experiment)."""

    exit_code = 3


@dataclass
class TrialReporter(TrainerCallback):
    """A sweep trial: report the objective at every evaluation to the trial in the Optuna storage, and stop
    (TrialPruned) when the pruner says so."""

    spec: dict[str, Any]

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=self.spec["study"], storage=self.spec["storage"],
                                  pruner=sweep_pruner(self.spec["pruner"]))
        trial = optuna.trial.Trial(study, self.spec["trial_id"])
        value = float(metrics[OBJECTIVE_KEYS[self.spec["objective"]]])
        trial.report(value, state.global_step)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_step", state.global_step)
            raise TrialPruned(f"sweep trial pruned by the {self.spec['pruner']} pruner at step {state.global_step} "
                              f"({self.spec['objective']} {value:.4f})")
