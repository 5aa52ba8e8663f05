"""Training on `transformers.Trainer`: pretraining on packed blocks, fine-tuning a classifier.

Trainer owns the loop (AdamW, warmup + cosine, accumulation, clipping, mixed precision,
checkpoints with optimizer/scheduler/RNG state); this module only wires data, params and MLflow.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (DataCollatorForLanguageModeling, DataCollatorWithPadding, PreTrainedModel,
                          PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments)

from lmpipe.config import Finetune, Pretrain
from lmpipe.errors import ConfigError, LmpipeError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (avx512_bf16 or AMX), as oneDNN reports them."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_compile(compiled: bool, device: str) -> None:
    """torch.compile's CPU backend (inductor) builds C++ kernels: refuse early, in one line, without a compiler."""
    if compiled and device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX") or "g++", "c++", "clang++")):
        raise ConfigError("pretrain.compile: torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; "
                          "install one or set pretrain.compile=false")


def precision_flags(precision: str, device: str, compiled: bool = False) -> dict[str, bool]:
    """auto: bf16 on a CUDA device that supports it; on CPU bf16 only for a compiled model on a CPU with
    native bf16 (measured on 2 Zen 4 cores, nanoGPT shape: 28 ms/step vs 38 ms fp32; eager bf16 autocast
    gained nothing because its casts are separate kernels), fp32 elsewhere."""
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            precision = "bf16" if compiled and cpu_has_bf16() else "fp32"
    if precision == "fp16" and device != "cuda":
        raise ConfigError("pretrain.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def fingerprint(*parts: Any) -> str:
    """Short stable hash of everything that makes a checkpoint resumable (config, data, params)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


RESUME_KEY_FILE = "lmpipe_resume_key.json"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    from lmpipe.config import flatten

    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def claim_checkpoint_dir(parent: Path, prefix: str, key: dict[str, Any], where: str) -> Path:
    """The checkpoint folder `parent/<prefix><fingerprint of key>` for this configuration.

    A folder of another configuration (same prefix) that holds a complete checkpoint is an unfinished
    run: it is refused in one line naming what differs, never loaded and never deleted. Folders with no
    complete checkpoint (a run that failed before its first save) hold nothing to resume and are removed."""
    folder = parent / f"{prefix}{fingerprint(key)}"
    others = sorted(p for p in parent.iterdir() if p.is_dir() and p.name.startswith(prefix)) if parent.is_dir() else []
    for other in others:
        if other == folder:
            continue
        if latest_checkpoint(other) is None:
            shutil.rmtree(other, ignore_errors=True)
            continue
        try:
            diffs = _differences(json.loads((other / RESUME_KEY_FILE).read_text()), key)
        except (OSError, ValueError):
            diffs = ["(its configuration was not recorded)"]
        raise ConfigError(
            f"{other}: holds an unfinished {where} run of another configuration (differs in: "
            f"{'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}); re-run with those values to resume it, "
            f"or delete that folder to start this configuration")
    from lmpipe.io import write_json

    write_json(folder / RESUME_KEY_FILE, key)
    return folder


def _failure_reason(exc: BaseException, folder: Path) -> str:
    """The errno text of the first OSError in the chain; writers that wrap it (torch.save, safetensors)
    are recognised by a full disk."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        e = e.__cause__ or e.__context__
    text = str(exc)
    try:
        full = shutil.disk_usage(folder.parent).free < (1 << 20)
    except OSError:
        full = False
    if full or "No space left" in text or "os error 28" in text:
        return "No space left on device"
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


class GuardedTrainer(Trainer):
    """Trainer whose checkpoint write fails as one line and leaves no partial checkpoint behind. The
    previous checkpoint stays: Trainer rotates old checkpoints only after a complete save."""

    def _save_checkpoint(self, model, trial):
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            shutil.rmtree(folder, ignore_errors=True)
            previous = latest_checkpoint(folder.parent)
            kept = f"; {previous.name} is intact and a re-run resumes from it" if previous else ""
            raise LmpipeError(f"{folder}: cannot write checkpoint ({_failure_reason(e, folder)}){kept}") from None


def checkpoint_complete(path: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint is complete when it parses and names its step.
    A checkpoint cut short by a kill (no or truncated state file) is never loaded."""
    m = CKPT_RE.match(path.name)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(m) and state.get("global_step") == int(m.group(1)) and any(path.glob("*.safetensors"))


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest complete Trainer checkpoint in folder; incomplete ones are removed."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        if CKPT_RE.match(p.name) and p.is_dir():
            if checkpoint_complete(p):
                found.append((int(CKPT_RE.match(p.name).group(1)), p))
            else:
                shutil.rmtree(p, ignore_errors=True)
    return max(found)[1] if found else None


@dataclass
class MlflowCallback(TrainerCallback):
    """Logs Trainer's log dicts to the active MLflow run (rate bounded by logging_steps)."""

    prefix: str = ""
    tokens_per_step: int = 0
    _t: float = 0.0
    _step: int = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t, self._step = time.perf_counter(), state.global_step

    def on_log(self, args, state, control, logs=None, **kw):
        import mlflow

        if not state.is_world_process_zero or not logs:
            return
        step = state.global_step
        out: dict[str, float] = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = {"loss": "train_loss", "learning_rate": "lr"}.get(key, key)
            out[self.prefix + name] = float(value)
            if key == "eval_loss":
                out[self.prefix + "eval_perplexity"] = math.exp(min(float(value), 50))
        if "loss" in logs and self.tokens_per_step:
            now = time.perf_counter()
            if step > self._step:
                out[self.prefix + "tokens_per_s"] = (step - self._step) * self.tokens_per_step / (now - self._t)
            self._t, self._step = now, step
        if out:
            mlflow.log_metrics(out, step=step)


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


def write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    from lmpipe.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "split", "loss"])
        w.writeheader()
        w.writerows(curve)


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
             val_blocks: np.ndarray, cfg: Pretrain, device: str, seed: int, ckpt_dir: Path) -> PretrainResult:
    """Train `model` from scratch on packed blocks; resumes from the newest checkpoint in ckpt_dir."""
    # 1) data: clm labels are the inputs (the model shifts them); mlm masks dynamically per batch
    clm = cfg.objective == "clm"
    # compiled: every batch full, so the model never meets a new shape (a partial batch at the epoch end
    # cost a ~40 s recompile). Training leaves out fewer than one global batch of blocks (what drop_last
    # does) and the final evaluation covers the full batches of the validation split.
    per_step = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    train_ds = BlockDataset(train_blocks, with_labels=clm,
                            limit=_full_batches(len(train_blocks), per_step) if cfg.compile else None)
    val_small = BlockDataset(val_blocks, with_labels=clm, limit=cfg.eval_batches * cfg.batch_size)
    val_full = BlockDataset(val_blocks, with_labels=clm,
                            limit=_full_batches(len(val_blocks), cfg.batch_size) if cfg.compile else None)
    collator = None if clm else DataCollatorForLanguageModeling(tokenizer, mlm=True,
                                                                mlm_probability=cfg.mlm_probability)
    block = train_blocks.shape[1]
    # 2) Trainer owns optimizer, schedule, accumulation, clipping, precision, compile and checkpoints
    check_compile(cfg.compile, device)
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        adam_beta1=0.9, adam_beta2=0.95, warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_ratio},
        eval_strategy="steps", eval_steps=cfg.eval_every, save_strategy="steps", save_steps=cfg.checkpoint_every,
        save_total_limit=cfg.keep_last, logging_steps=cfg.log_every, report_to="none", seed=seed, data_seed=seed,
        use_cpu=device == "cpu", dataloader_num_workers=0, dataloader_pin_memory=device == "cuda",
        disable_tqdm=False, fsdp=cfg.fsdp, optim="adamw_torch_fused", torch_compile=cfg.compile,
        **precision_flags(cfg.precision, device, cfg.compile))
    logger = MlflowCallback(tokens_per_step=cfg.batch_size * cfg.gradient_accumulation_steps * block
                            * max(1, args.world_size))
    timer = StepTimer()
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_small,
                             data_collator=collator, callbacks=[logger, timer])
    resume = latest_checkpoint(ckpt_dir)
    # 3) train (resuming restores model, optimizer, scheduler, RNG and data position)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    # 4) final evaluation on the whole validation split
    final = trainer.evaluate(eval_dataset=val_full)
    metrics = {"train_loss": float(out.training_loss), "val_loss": float(final["eval_loss"]),
               "val_perplexity": math.exp(min(float(final["eval_loss"]), 50)), "train_seconds": seconds,
               "steps": int(trainer.state.global_step),
               "tokens_per_s": (trainer.state.global_step - (int(resume.name.split("-")[1]) if resume else 0))
               * logger.tokens_per_step / max(seconds, 1e-9),
               "train_tokens_per_s": timer.tokens_per_s(logger.tokens_per_step),
               "parameters": int(sum(p.numel() for p in model.parameters())),
               "val_blocks": len(val_full)}
    # the curve from Trainer's own history: it survives a resume (restored from the checkpoint)
    curve = [{"step": h["step"], "split": "train", "loss": float(h["loss"])} for h in trainer.state.log_history
             if "loss" in h and "step" in h]
    curve += [{"step": h["step"], "split": "validation", "loss": float(h["eval_loss"])}
              for h in trainer.state.log_history if "eval_loss" in h and "step" in h]
    curve.sort(key=lambda r: (r["step"], r["split"]))
    return PretrainResult(trainer.model, metrics, curve, str(resume) if resume else None, timer)


def _compute_metrics(eval_pred) -> dict[str, float]:
    from lmpipe.evaluation import classification_metrics

    logits, labels = eval_pred
    preds = np.asarray(logits).argmax(-1)
    m = classification_metrics(np.asarray(labels), preds, np.asarray(logits).shape[-1])
    return {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}


def encode_labeled(tokenizer: PreTrainedTokenizerBase, texts: list[str], labels: list[int], max_length: int):
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"], desc="tokenize")


def finetune(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train, validation, cfg: Finetune,
             device: str, seed: int, ckpt_dir: Path, prefix: str) -> tuple[PreTrainedModel, dict[str, float]]:
    """Fine-tune a sequence classifier; evaluate every eval_every steps and keep the best by accuracy."""
    args = TrainingArguments(
        output_dir=str(ckpt_dir), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=max(cfg.batch_size, 64),
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type="linear", eval_strategy="steps", eval_steps=cfg.eval_every, save_strategy="steps",
        save_steps=cfg.eval_every, save_total_limit=2, load_best_model_at_end=True,
        metric_for_best_model="accuracy", greater_is_better=True, logging_steps=max(1, cfg.eval_every // 5),
        report_to="none", seed=seed, data_seed=seed, use_cpu=device == "cpu", dataloader_num_workers=0,
        dataloader_pin_memory=device == "cuda", disable_tqdm=False)
    logger = MlflowCallback(prefix=prefix)
    trainer = GuardedTrainer(model=model, args=args, train_dataset=train, eval_dataset=validation,
                             data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=_compute_metrics,
                             callbacks=[logger])
    t0 = time.perf_counter()
    resume = latest_checkpoint(ckpt_dir)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    best = trainer.evaluate()
    metrics = {"val_accuracy": best["eval_accuracy"], "val_f1_macro": best["eval_f1_macro"],
               "val_loss": best["eval_loss"], "train_seconds": time.perf_counter() - t0,
               "steps": int(trainer.state.global_step)}
    return trainer.model, metrics
