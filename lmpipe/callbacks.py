"""Trainer callbacks every training recipe shares: metrics to MLflow, steady-state step timing, the optimizer's
parameter groups as training starts, a wall-clock cap on training."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import TrainerCallback

from lmpipe.names import perplexity
from lmpipe.metric_log import log_metrics_bounded


@dataclass
class MlflowCallback(TrainerCallback):
    """Logs Trainer's log dicts to the active MLflow run (rate bounded by logging_steps)."""

    prefix: str = ""
    tokens_per_step: int = 0
    seconds: float = 0.0
    """Wall seconds spent in on_log (building the points and handing them to MLflow)."""
    _t: float = 0.0
    _step: int = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t, self._step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        t = time.perf_counter()
        try:
            self._log(state.global_step, logs)
        finally:
            self.seconds += time.perf_counter() - t

    def _log(self, step: int, logs: dict) -> None:
        out: dict[str, float] = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = {"loss": "train_loss", "learning_rate": "lr"}.get(key, key)
            out[self.prefix + name] = float(value)
            if key == "eval_loss":
                out[self.prefix + "eval_perplexity"] = perplexity(value)
        if "loss" in logs and self.tokens_per_step:
            now = time.perf_counter()
            if step > self._step:
                out[self.prefix + "tokens_per_s"] = (step - self._step) * self.tokens_per_step / (now - self._t)
            self._t, self._step = now, step
        if out:
            log_metrics_bounded(out, step=step)  # buffered while the tracking server is unreachable


@dataclass
class StepTimer(TrainerCallback):
    """Steady-state training throughput: the time between consecutive optimizer steps, leaving out the
    first `skip` steps of this process (torch.compile warm-up) and every interval that held an evaluation
    or a checkpoint save. MLflow logging stays in: it is part of what the stage does per step."""

    skip: int = 3
    durations: list[float] = field(default_factory=list)
    """Seconds per counted optimizer step."""
    _last: float | None = None
    _seen: int = 0
    _interrupted: bool = False

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self._seen += 1
        if self._last is not None and self._seen > self.skip and not self._interrupted:
            self.durations.append(now - self._last)
        self._last, self._interrupted = now, False

    def tokens_per_s(self, tokens_per_step: int, median: bool = False) -> float:
        """Mean rate over the counted steps, or the rate at the median step time (robust to a noisy host)."""
        if not self.durations:
            return 0.0
        per_step = float(np.median(self.durations)) if median else sum(self.durations) / len(self.durations)
        return tokens_per_step / per_step

    def on_evaluate(self, args, state, control, **kw):
        self._interrupted = True

    def on_save(self, args, state, control, **kw):
        self._interrupted = True


@dataclass
class OptimizerRecord(TrainerCallback):
    """What the optimizer really holds at the start of training: each parameter group's learning rate,
    weight decay and parameter names, and the parameters that train nowhere (frozen)."""

    groups: list[dict[str, Any]] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    kind: str = ""
    """The optimizer's class (torch's or transformers'), e.g. AdamW, SGD, Adafactor."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.kind = type(getattr(optimizer, "optimizer", optimizer)).__name__  # inside accelerate's wrapper
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [{"lr": float(g.get("initial_lr", g["lr"])), "weight_decay": float(g["weight_decay"]),
                        "numel": int(sum(p.numel() for p in g["params"])),
                        "params": [names.get(id(p), "?") for p in g["params"]]} for g in optimizer.param_groups]
        self.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]


@dataclass
class TimeCap(TrainerCallback):
    """Ends training once `minutes` of wall clock have passed since this process started training: the step
    that crosses the cap is evaluated and saved like an evaluation step, so the best checkpoint is chosen among
    everything that trained. `hit` says whether it ended training."""

    minutes: float
    hit: bool = False
    _start: float = 0.0

    def on_train_begin(self, args, state, control, **kw):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if not self.hit and time.perf_counter() - self._start >= self.minutes * 60:
            self.hit = True
            control.should_training_stop = control.should_evaluate = control.should_save = True
