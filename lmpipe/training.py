"""Training on `transformers.Trainer`: pretraining on packed blocks, fine-tuning a classifier.

Trainer owns the loop (AdamW, warmup + cosine, accumulation, clipping, mixed precision,
checkpoints with optimizer/scheduler/RNG state); this module only wires data, params and MLflow.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lmpipe.callbacks import MlflowCallback, OptimizerRecord, StepTimer, TimeCap
from lmpipe.checkpoints import checkpoint_write_error, resume_point
from lmpipe.compile_cache import check_compile, compile_cache, compile_cache_counts
from lmpipe.config import Finetune, Pretrain
from lmpipe.errors import ConfigError
from lmpipe.io import atomic_path
from lmpipe.metric_log import flush_metrics
from lmpipe.names import checkpoint_step, perplexity
from lmpipe.regularization import EmbeddingAdversary, check_rdrop, rdrop_loss
from lmpipe.tasks import classification_metrics
from lmpipe.trial import TRIAL_ENV, TrialReporter


class BlockDataset(torch.utils.data.Dataset):
    """Rows of a memory-mapped (n_blocks, block_size) token array; labels = inputs for causal LM."""

    def __init__(self, blocks: np.ndarray, with_labels: bool, limit: int | None = None) -> None:
        self.blocks = blocks if limit is None else blocks[:limit]
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64))  # (T,)
        return {"input_ids": ids, "labels": ids} if self.with_labels else {"input_ids": ids}


class WindowDataset(torch.utils.data.Dataset):
    """Windows of `block` tokens starting every `stride` tokens of the train blocks read as one stream (the
    blocks are consecutive slices of the packed corpus); stride < block overlaps them. The index is the start
    position, so the sampler's shuffle, its seed and a resume's data position work as for the blocks."""

    def __init__(self, blocks: np.ndarray, stride: int, with_labels: bool) -> None:
        self.stream, self.block, self.stride = blocks.reshape(-1), blocks.shape[1], stride
        self.n = (len(self.stream) - self.block) // stride + 1
        self.with_labels = with_labels

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.stride
        ids = torch.from_numpy(np.asarray(self.stream[start:start + self.block], dtype=np.int64))
        return {"input_ids": ids, "labels": ids} if self.with_labels else {"input_ids": ids}


def train_windows(blocks: np.ndarray, stride: int | str, with_labels: bool, per_step: int, full_batches: bool):
    """The training set `pretrain.window_stride` names; compiled runs keep whole global batches only."""
    ds = BlockDataset(blocks, with_labels) if stride == "block" else WindowDataset(blocks, int(stride), with_labels)
    return torch.utils.data.Subset(ds, range(_full_batches(len(ds), per_step))) if full_batches else ds


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (avx512_bf16 or AMX), as oneDNN reports them."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def precision_flags(precision: str, device: str, compiled: bool = False,
                    field: str = "pretrain.precision") -> dict[str, bool]:
    """auto: bf16 on a CUDA device that supports it; on CPU bf16 only for a compiled model on a CPU with
    native bf16, where it measured faster (docs/results.md); eager bf16 autocast gained nothing because its
    casts are separate kernels. fp32 elsewhere."""
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if compiled and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError(f"{field}: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def _scheduler_kwargs(scheduler: str, min_lr_ratio: float = 0.0) -> dict[str, Any]:
    """What Trainer's cosine_with_min_lr needs beyond warmup and steps: its floor (0 = decay to 0)."""
    return {"min_lr_rate": min_lr_ratio} if scheduler == "cosine_with_min_lr" else {}


CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""torch's non-reentrant activation checkpointing: works when the inputs need no gradient (a frozen embedding
under LoRA or head-only training) and restores dropout's RNG, so a step computes what it would without it."""


def check_gradient_checkpointing(model: PreTrainedModel, enabled: bool, field: str) -> None:
    """ConfigError, one line, when `field` asks for gradient checkpointing of a model that has none."""
    if enabled and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{field}: {type(model).__name__} does not support gradient checkpointing (set it false)")


def checkpointing_used(trainer: Trainer) -> float:
    """1.0 when the trained model recomputed its activations (what Trainer set up, read from the model)."""
    return float(bool(getattr(trainer.model, "is_gradient_checkpointing", False)))


def pretrain_arguments(cfg: Pretrain, ckpt_dir: Path, device: str, seed: int,
                       **extra: Any) -> tuple[TrainingArguments, Path | None]:
    """The one place the `pretrain` section becomes Trainer's arguments (every pretraining objective): steps,
    batch, AdamW, warmup + cosine to min_lr_ratio, clipping, eval/checkpoint/log cadence, seeds, precision,
    torch.compile (refused without a C++ compiler; its on-disk cache set up). `extra`: the objective's own
    (fsdp, optim, remove_unused_columns). Returns (arguments, the compile cache folder or None)."""
    check_compile(cfg.compile, device)
    cache = compile_cache() if cfg.compile else None
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, warmup_steps=cfg.warmup_steps, optim=cfg.optimizer,
        lr_scheduler_type=cfg.lr_scheduler, lr_scheduler_kwargs=_scheduler_kwargs(cfg.lr_scheduler, cfg.min_lr_ratio),
        eval_strategy="steps", eval_steps=cfg.eval_every, save_strategy="steps", save_steps=cfg.checkpoint_every,
        save_total_limit=cfg.keep_last, logging_steps=cfg.log_every, report_to="none", seed=seed, data_seed=seed,
        use_cpu=device == "cpu", dataloader_num_workers=0, dataloader_pin_memory=device == "cuda",
        disable_tqdm=False, torch_compile=cfg.compile, **precision_flags(cfg.precision, device, cfg.compile),
        **extra)
    return args, cache


class GuardedTrainer(Trainer):
    """Trainer whose checkpoint write fails as one line and leaves no partial checkpoint behind. The
    previous checkpoint stays: Trainer rotates old checkpoints only after a complete save. It also keeps
    the wall seconds its evaluations and checkpoint saves took (`phase_seconds`), so a stage can report
    what share of its loop they cost."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase_seconds = {"evaluate": 0.0, "checkpoint": 0.0}

    def evaluate(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.phase_seconds["evaluate"] += time.perf_counter() - t

    def _save_checkpoint(self, model, trial):
        # a checkpoint is where a killed run resumes: the metric points logged up to it are sent before it is
        # written (one attempt; while the server is down they stay buffered), so a resume leaves no gap
        flush_metrics()
        t = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            raise checkpoint_write_error(folder, e) from None
        finally:
            self.phase_seconds["checkpoint"] += time.perf_counter() - t

    def _issue_warnings_after_load(self, load_result):
        # a tied weight (lm_head.weight = the input embedding) is saved once, so a checkpoint of a tied model
        # "misses" it: re-tie and keep the warning for keys that are really missing
        every = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        tied = every - {n for n, _ in self.model.named_parameters()}
        missing = [k for k in load_result.missing_keys if k not in tied]
        if len(missing) < len(load_result.missing_keys):
            self.model.tie_weights()
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def write_curve(path: Path, curve: list[dict[str, Any]]) -> None:

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "split", "loss"])
        w.writeheader()
        w.writerows(curve)


def history_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (step, split, loss) from Trainer's own log history, which survives a resume (restored from
    the checkpoint): train loss per logging step, validation loss per evaluation, plus the validation
    accuracy when the model is a classifier."""
    curve = [{"step": h["step"], "split": "train", "loss": float(h["loss"])} for h in log_history
             if "loss" in h and "step" in h]
    for h in log_history:
        if "eval_loss" in h and "step" in h:
            row = {"step": h["step"], "split": "validation", "loss": float(h["eval_loss"])}
            if "eval_accuracy" in h:
                row["accuracy"] = float(h["eval_accuracy"])
            curve.append(row)
    curve.sort(key=lambda r: (r["step"], r["split"]))
    return curve


def _full_batches(n: int, batch: int) -> int:
    """n rounded down to whole batches (n itself when that is less than one batch)."""
    return n - n % batch if n >= batch else n


@dataclass
class PretrainResult:
    model: PreTrainedModel
    metrics: dict[str, float]
    curve: list[dict[str, Any]]
    resumed_from: str | None
    timer: StepTimer


def pretrain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_blocks: np.ndarray,
             val_blocks: np.ndarray, cfg: Pretrain, device: str, seed: int, ckpt_dir: Path,
             callbacks: list[TrainerCallback] = ()) -> PretrainResult:
    """Train `model` from scratch on packed blocks; resumes from the newest checkpoint in ckpt_dir. `callbacks`:
    the recipe's own on top of the logging ones (the clm samples, lmpipe/samples.py); their on_evaluate also
    runs at the final evaluation."""
    # 1) data: clm labels are the inputs (the model shifts them); mlm masks dynamically per batch
    clm = cfg.objective == "clm"
    # compiled: every batch full, so the model never meets a new shape (a partial batch at the epoch end
    # cost a recompile). Training leaves out fewer than one global batch of blocks (what drop_last
    # does) and the final evaluation covers the full batches of the validation split.
    per_step = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    train_ds = train_windows(train_blocks, cfg.window_stride, clm, per_step, full_batches=cfg.compile)
    val_small = BlockDataset(val_blocks, with_labels=clm, limit=cfg.eval_batches * cfg.batch_size)
    val_full = BlockDataset(val_blocks, with_labels=clm,
                            limit=_full_batches(len(val_blocks), cfg.batch_size) if cfg.compile else None)
    collator = None if clm else DataCollatorForLanguageModeling(tokenizer, mlm=True,
                                                                mlm_probability=cfg.mlm_probability)
    block = train_blocks.shape[1]
    # 2) Trainer owns optimizer, schedule, accumulation, clipping, precision, compile and checkpoints
    check_gradient_checkpointing(model, cfg.gradient_checkpointing, "pretrain.gradient_checkpointing")
    args, cache = pretrain_arguments(cfg, ckpt_dir, device, seed, fsdp=cfg.fsdp)
    logger = MlflowCallback(tokens_per_step=cfg.batch_size * cfg.gradient_accumulation_steps * block
                            * max(1, args.world_size))
    timer = StepTimer()
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_small,
                             data_collator=collator, callbacks=[logger, timer, *callbacks])
    resume = resume_point(ckpt_dir, "pretrain", cfg.max_steps)
    # 3) train (resuming restores model, optimizer, scheduler, RNG and data position)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    loop = {**trainer.phase_seconds, "logging": logger.seconds}
    # 4) final evaluation on the whole validation split
    t1 = time.perf_counter()
    final = trainer.evaluate(eval_dataset=val_full)
    final_eval_seconds = time.perf_counter() - t1
    metrics = {"train_loss": float(out.training_loss), "val_loss": float(final["eval_loss"]),
               "val_perplexity": perplexity(final["eval_loss"]), "train_seconds": seconds,
               "steps": int(trainer.state.global_step),
               "tokens_per_s": (trainer.state.global_step - (checkpoint_step(resume) if resume else 0))
               * logger.tokens_per_step / max(seconds, 1e-9),
               "train_tokens_per_s": timer.tokens_per_s(logger.tokens_per_step),
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "gradient_checkpointing": checkpointing_used(trainer),
               "fsdp": float(bool(getattr(trainer, "is_fsdp_enabled", False))),  # Accelerate sharded the model
               "train_examples": len(train_ds), "val_blocks": len(val_full), "final_eval_seconds": final_eval_seconds,
               # the training loop's wall time spent in periodic evaluation, checkpoint saves, MLflow logging
               **{f"loop_share_{k}": v / max(seconds, 1e-9) for k, v in loop.items()}}
    print("pretrain: loop " + ", ".join(f"{k} {v:.1f} s ({v / max(seconds, 1e-9):.1%})" for k, v in loop.items())
          + f" of {seconds:.1f} s; final evaluation {final_eval_seconds:.1f} s", flush=True)
    if cache is not None:
        metrics.update(compile_cache_counts())
        print(f"pretrain: torch.compile cache {cache}: {metrics['compile_graphs_cached']} graphs loaded, "
              f"{metrics['compile_graphs_compiled']} compiled; autograd graphs {metrics['compile_autograd_cached']} "
              f"loaded, {metrics['compile_autograd_bypassed']} not cacheable", flush=True)
    curve = history_curve(trainer.state.log_history)
    return PretrainResult(trainer.model, metrics, curve, str(resume) if resume else None, timer)


def _compute_metrics(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    m = classification_metrics(np.asarray(labels), preds, np.asarray(logits).shape[-1])
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}


def _task_metrics(layout):
    def compute(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        return layout.metrics(np.asarray(logits), np.asarray(labels))

    return compute


def encode_labeled(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int):
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"], desc="tokenize")


class FinetuneTrainer(GuardedTrainer):
    """GuardedTrainer plus the hooks fine-tuning needs, all Trainer's own extension points: `create_optimizer`
    with a learning-rate multiplier per parameter (llrd), `compute_loss` against a teacher's soft labels
    (distill), and `training_step` adding an adversarial pass on perturbed embeddings (finetune.adversarial,
    lmpipe/regularization.py)."""

    def __init__(self, *args, lr_scale: dict[str, float] | None = None, teacher=None, adversarial=None,
                 layout=None, loss_weights: dict[str, float] | None = None, ordered: bool = False,
                 rdrop_alpha: float = 0.0, classifier: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lr_scale, self.teacher, self.rdrop_alpha, self.classifier = lr_scale, teacher, rdrop_alpha, classifier
        if rdrop_alpha > 0:
            check_rdrop(self.model, rdrop_alpha)
        # multi-task (lmpipe/tasks.py): each example's loss within its task's head; batches in schedule order
        self.layout = layout if layout is not None and layout.multi else None
        self.loss_weights, self.ordered = loss_weights, ordered
        self.adversary = None
        self._adversarial_losses: list[float] = []
        if adversarial is not None and adversarial.method != "none":
            if self.args.n_gpu > 1:  # DataParallel replicas would share one embedding hook
                raise ConfigError(f"finetune.adversarial.method: {adversarial.method} needs one device per process; "
                                  f"{self.args.n_gpu} GPUs are visible (set CUDA_VISIBLE_DEVICES or use torchrun)")

            self.adversary = EmbeddingAdversary(self.model, adversarial)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.adversary is None:
            return super().training_step(model, inputs, num_items_in_batch)
        adv = self.adversary
        # 1) the clean pass (forward + backward), recording d loss / d embeddings
        with adv.capture():
            loss = super().training_step(model, dict(inputs), num_items_in_batch)
        if adv.embedded is None or adv.embedded.grad is None:
            return loss  # the loss does not reach the embeddings (nothing to perturb along)
        delta = adv.first_step(adv.embedded.grad.detach())
        # 2) pgd: more ascent steps, each a forward + backward to the perturbation only (parameters untouched)
        for _ in range(adv.cfg.steps - 1 if adv.cfg.method == "pgd" else 0):
            leaf = delta.clone().requires_grad_()
            with adv.applied(leaf), self.compute_loss_context_manager():
                step_loss = self.compute_loss(model, self._prepare_inputs(dict(inputs)))
            (grad,) = torch.autograd.grad(step_loss, leaf)
            delta = adv.ascend(delta, grad.detach())
        # 3) the adversarial pass: its gradients add to the clean ones before the optimizer step
        with adv.applied(delta.detach()):
            adversarial_loss = super().training_step(model, dict(inputs), num_items_in_batch)
        self._adversarial_losses.append(float(adversarial_loss))
        return loss  # the logged train loss stays the clean one, comparable across settings

    def log(self, logs, *args, **kwargs):
        # the adversarial loss beside the clean train loss, averaged over the same steps
        if self._adversarial_losses and "loss" in logs:
            logs["adversarial_loss"] = sum(self._adversarial_losses) / len(self._adversarial_losses)
            self._adversarial_losses.clear()
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.lr_scale is None or self.optimizer is not None:
            return super().create_optimizer(model)
        # Trainer's optimizer class and settings and its weight-decay split, one group per (multiplier, decay)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups.setdefault((self.lr_scale[name], name in decay), []).append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(
            [{"params": params, "lr": self.args.learning_rate * scale,
              "weight_decay": self.args.weight_decay if decayed else 0.0}
             for (scale, decayed), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))],
            **optimizer_kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.ordered:  # the multi-task schedule already fixed the (seeded) order of the batches
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
        return super()._get_train_sampler(train_dataset)

    def _per_item(self, loss: torch.Tensor, examples: int, num_items_in_batch) -> torch.Tensor:
        """A loss computed here (a mean over this micro-batch's `examples`) in the unit Trainer expects. With
        gradient accumulation, Trainer divides by the accumulation steps only when the model's forward takes no
        **kwargs; otherwise it hands the model num_items_in_batch and expects the sum over the whole accumulated
        batch / its size back, so a mean here must be rescaled to that."""
        if not self.model_accepts_loss_kwargs or num_items_in_batch is None or int(num_items_in_batch) == examples:
            return loss  # Trainer divides by the accumulation steps itself, or there is nothing to rescale
        return loss * examples / num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.rdrop_alpha > 0 and model.training:
            # R-Drop: the batch twice in one forward (two dropout masks), (2B, C) logits
            labels = inputs.pop("labels")
            outputs = model(**{k: torch.cat([v, v]) for k, v in inputs.items()})
            summed = rdrop_loss(outputs.logits, labels, self.rdrop_alpha, self.args.label_smoothing_factor)
            loss = self._per_item(summed / len(labels), len(labels), num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        if self.layout is not None:
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # label smoothing is a training loss: evaluation keeps the plain cross-entropy
            smoothing = self.args.label_smoothing_factor if model.training else 0.0
            loss = self.layout.loss(outputs.logits, labels, self.loss_weights, smoothing)
            if model.training:
                loss = self._per_item(loss, len(labels), num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        teacher_inputs = {k[len("teacher_"):]: inputs.pop(k) for k in [k for k in inputs if k.startswith("teacher_")]}
        if not model.training and self.label_smoother is not None:
            # evaluation keeps the plain cross-entropy (label smoothing is a training loss), so val_loss
            # compares across settings
            smoother, self.label_smoother = self.label_smoother, None
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.label_smoother = smoother
        if self.classifier and model.training and self.args.gradient_accumulation_steps > 1 and self.teacher is None:
            # accumulated: the cross-entropy computed here, whatever the model does with num_items_in_batch
            # (Llama's classifier divides by it, BERT's ignores it: its gradients came out k times too large)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = F.cross_entropy(outputs.logits.float(), labels, label_smoothing=self.args.label_smoothing_factor)
            loss = self._per_item(loss, len(labels), num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        if self.teacher is None or not model.training or not teacher_inputs:
            # evaluation keeps the plain cross-entropy, so val_loss compares across strategies
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if "log_probs" in teacher_inputs:  # a variant teacher's soft labels, computed before training
            teacher_logits = teacher_inputs["log_probs"]
        else:
            with torch.no_grad():  # the teacher is fixed: eval mode (set at load), no graph
                teacher_logits = self.teacher.model(**teacher_inputs).logits  # (B, num_labels)
        loss = self._per_item(self.teacher.loss(outputs.logits, teacher_logits, labels), len(labels), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


@dataclass
class FinetuneResult:
    model: PreTrainedModel
    """The best checkpoint's model (by validation accuracy)."""
    metrics: dict[str, float]
    curve: list[dict[str, Any]]
    """history_curve of the training (the final evaluation of the best model left out)."""
    log_history: list[dict[str, Any]]
    """Trainer's log history up to the end of training."""
    best_checkpoint: str | None
    """The checkpoint the returned model was loaded from."""
    optimizer: dict[str, Any] = field(default_factory=dict)
    """OptimizerRecord of this process's training: {"groups": [...], "frozen": [...]}."""


def _early_stopped_at(checkpoint: Path | None, patience: int | None) -> int | None:
    """The checkpoint's step when early stopping had ended training there (its patience counter, saved in
    trainer_state.json, reached `patience`); None otherwise."""
    if checkpoint is None or patience is None:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("stateful_callbacks", {}).get("EarlyStoppingCallback") or {}
    saved = saved[0] if isinstance(saved, list) and saved else saved
    counter = (saved.get("attributes") or {}).get("early_stopping_patience_counter", 0) if isinstance(saved, dict) else 0
    return int(state["global_step"]) if counter >= patience else None


def _time_cap(cfg: Finetune) -> TimeCap | None:
    return TimeCap(cfg.max_minutes) if cfg.max_minutes is not None else None


def finetune_arguments(cfg: Finetune, ckpt_dir: Path, device: str, seed: int, stopped_at: int | None, best: str,
                       **extra: Any) -> TrainingArguments:
    """The one place the `finetune` section becomes Trainer's arguments (both heads): steps, batch and
    accumulation, the optimizer and its schedule after warmup, clipping, precision, the batch sampler, an
    evaluation and a checkpoint every eval_every steps, the best checkpoint by `best` (accuracy, higher is
    better; loss, lower is better) loaded at the end. `extra`: the head's own."""
    return TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=stopped_at or cfg.max_steps, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=max(cfg.batch_size, 64),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS,
        optim=cfg.optimizer, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        # Trainer reads a float < 1 as a share of the steps, an int as steps
        warmup_steps=cfg.warmup_ratio if cfg.warmup_steps is None else cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler, lr_scheduler_kwargs=_scheduler_kwargs(cfg.lr_scheduler),
        train_sampling_strategy=cfg.sampler, **precision_flags(cfg.precision, device, field="finetune.precision"),
        label_smoothing_factor=cfg.label_smoothing, eval_strategy="steps", eval_steps=cfg.eval_every, save_strategy="steps",
        save_steps=cfg.eval_every, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model=best, greater_is_better=best != "loss", logging_steps=max(1, cfg.eval_every // 5),
        report_to="none", seed=seed, data_seed=seed, use_cpu=device == "cpu", dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda", disable_tqdm=False,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience counter survives a resume
        **extra)


def finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train, validation, cfg: Finetune,
             device: str, seed: int, ckpt_dir: Path, prefix: str, plan=None, layout=None,
             ordered: bool = False) -> FinetuneResult:
    """Fine-tune a sequence classifier; evaluate every eval_every steps and keep the best by accuracy.
    Resumes from the newest complete checkpoint in ckpt_dir. `plan` (a lmpipe.strategies.Plan for `model`)
    adds per-parameter learning rates (llrd) or a teacher (distill). A multi-task `layout` (lmpipe/tasks.py)
    scores each task's validation examples with its own head, and the best checkpoint is the one with the
    best mean of the per-task accuracies; `ordered` trains on `train` in its own order (the task schedule)."""
    multi = layout is not None and layout.multi
    teacher = getattr(plan, "teacher", None)
    resume = resume_point(ckpt_dir, f"finetune[{prefix.rstrip('.')}]" if prefix else "finetune", cfg.max_steps)
    # an interrupted run that early stopping had already ended at its newest checkpoint: resume to that step
    # (no more training), so a crash after training changes neither the steps nor the best model
    stopped_at = _early_stopped_at(resume, cfg.patience)
    check_gradient_checkpointing(model, cfg.gradient_checkpointing, "finetune.gradient_checkpointing")
    args = finetune_arguments(cfg, ckpt_dir, device, seed, stopped_at, best="accuracy",
                              remove_unused_columns=teacher is None)  # distill: keep the teacher_* columns
    logger, timer, record, cap = MlflowCallback(prefix=prefix), StepTimer(skip=1), OptimizerRecord(), _time_cap(cfg)
    callbacks: list[TrainerCallback] = [logger, timer, record] + ([cap] if cap else [])
    if cfg.patience is not None:  # stops after `patience` evaluations without a better val accuracy
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    reporter = None
    if os.environ.get(TRIAL_ENV) and prefix == "classifier.":  # a sweep trial: the selected model reports
        reporter = TrialReporter(json.loads(os.environ[TRIAL_ENV]))
        callbacks.append(reporter)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                              data_collator=teacher.collator(collator) if teacher else collator,
                              compute_metrics=_task_metrics(layout) if multi else _compute_metrics,
                              callbacks=callbacks, lr_scale=getattr(plan, "lr_scale", None), teacher=teacher,
                              adversarial=cfg.adversarial, layout=layout, loss_weights=cfg.loss_weights,
                              ordered=ordered, rdrop_alpha=cfg.rdrop_alpha, classifier=True)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    if reporter is not None:
        trainer.remove_callback(reporter)  # the best model's evaluation below is no new report
    if trainer.adversary is not None:
        trainer.adversary.remove()
    history = list(trainer.state.log_history)  # before the best model's own evaluation below
    best = trainer.evaluate()
    steps = int(trainer.state.global_step)
    trained = steps - (checkpoint_step(resume) if resume else 0)
    metrics = {"val_accuracy": best["eval_accuracy"], "val_f1_macro": best["eval_f1_macro"],
               "val_loss": best["eval_loss"], "train_seconds": seconds, "steps": steps,
               # early stopping ended it before its budget
               "stopped_early": float(stopped_at is not None or steps < trainer.state.max_steps),
               "stopped_by_time_cap": float(cap is not None and cap.hit), "gradient_checkpointing": checkpointing_used(trainer),
               # steady state (evaluations and checkpoint saves left out); the whole run's rate without them
               "steps_per_s": (len(timer.durations) / sum(timer.durations)) if timer.durations
               else trained / max(seconds, 1e-9)}
    if multi:  # each task's validation figures of the selected checkpoint
        for t in layout.names:
            metrics[f"val_{t}_accuracy"], metrics[f"val_{t}_f1_macro"] = best[f"eval_{t}_accuracy"], best[f"eval_{t}_f1_macro"]
    return FinetuneResult(trainer.model, metrics, history_curve(history), history, trainer.state.best_model_checkpoint,
                          {"optimizer": record.kind, "groups": record.groups, "frozen": record.frozen})


def finetune_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train, validation, cfg: Finetune,
                device: str, seed: int, ckpt_dir: Path, prefix: str, collator, plan=None) -> FinetuneResult:
    """Generative fine-tuning (finetune.head lm) of a causal LM on encoded conversations (lmpipe/sft.py: labels
    -100 outside the assistant turns, so the causal-LM loss is the assistant tokens' only); evaluate every
    eval_every steps and keep the checkpoint with the lowest validation loss (the response loss). Resume,
    early stopping (patience evaluations without a lower loss), llrd's learning rates and the MLflow curves as
    for the classifier. `collator`: lmpipe.sft.collator's padding."""
    resume = resume_point(ckpt_dir, f"finetune[{prefix.rstrip('.')}]", cfg.max_steps)
    stopped_at = _early_stopped_at(resume, cfg.patience)
    # prediction_loss_only: evaluation keeps no (B, T, vocab) logits, only the loss
    check_gradient_checkpointing(model, cfg.gradient_checkpointing, "finetune.gradient_checkpointing")
    args = finetune_arguments(cfg, ckpt_dir, device, seed, stopped_at, best="loss", prediction_loss_only=True)
    logger, timer, record, cap = MlflowCallback(prefix=prefix), StepTimer(skip=1), OptimizerRecord(), _time_cap(cfg)
    callbacks: list[TrainerCallback] = [logger, timer, record] + ([cap] if cap else [])
    if cfg.patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    trainer = FinetuneTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                              data_collator=collator, callbacks=callbacks,
                              lr_scale=getattr(plan, "lr_scale", None))
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    history = list(trainer.state.log_history)
    best = trainer.evaluate()
    steps = int(trainer.state.global_step)
    trained = steps - (checkpoint_step(resume) if resume else 0)
    metrics = {"val_loss": best["eval_loss"], "val_response_perplexity": perplexity(best["eval_loss"]),
               "gradient_checkpointing": checkpointing_used(trainer),
               "train_seconds": seconds, "steps": steps,
               "stopped_early": float(stopped_at is not None or steps < trainer.state.max_steps),
               "stopped_by_time_cap": float(cap is not None and cap.hit),
               "steps_per_s": (len(timer.durations) / sum(timer.durations)) if timer.durations
               else trained / max(seconds, 1e-9)}
    return FinetuneResult(trainer.model, metrics, history_curve(history), history, trainer.state.best_model_checkpoint,
                          {"optimizer": record.kind, "groups": record.groups, "frozen": record.frozen})
