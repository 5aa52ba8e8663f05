"""Fine-tune a sequence classifier on the labelled task (SST-2 by default).

    python -m stages.finetune         # the DVC stage `finetune` (stages/finetune.py) runs this recipe

finetune.init: `pretrained` (the pretrain stage's model), `scratch` (same architecture, random
init) or a local Hugging Face model dir. With finetune.scratch_baseline, a random-init twin is
trained with the same budget so evaluate can measure what pretraining bought; with
finetune.original_baseline (continued pretraining), the original checkpoint too, so evaluate can measure
what continuing its pretraining bought.

Regularisation (lmpipe/regularization.py): label smoothing, dropout override, early stopping (patience),
adversarial training on the embeddings (fgm | pgd) and text augmentation of the training split.

finetune.strategy (lmpipe/strategies.py) decides what trains: `full`, `freeze`, `llrd`, `lora`, `prefix`,
`prompt` or `distill`; the scratch twin uses the same strategy from a random init. Adapter strategies log
the adapter to MLflow; LoRA is merged into a plain model, prefix/prompt keep the adapter beside the base
model (lmpipe.modeling.load_finetuned applies it). metrics: per variant the best validation figures plus
trainable_params, total_params, trainable_percent and steps_per_s.

finetune.head: lm (`finetune_generator` below) fine-tunes the causal LM itself on clean.sft's conversations
instead (generative / instruction fine-tuning, lmpipe/sft.py): the loss on the assistant tokens only, the best
checkpoint by validation response loss, strategies full, freeze, llrd and lora, and the scratch twin.

Resume covers the whole stage (lmpipe/checkpoints.py): both variants' checkpoints and each finished
variant live in finetune.checkpoint_dir/<fingerprint>/, so a re-run after a crash during the scratch twin
reuses the finished classifier and continues the twin from its newest checkpoint, in the same MLflow run.
The classifier is saved with the length it was trained at (every prediction path truncates there); the
loss/accuracy curves and the training and validation splits are logged to MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pandas as pd
from transformers import AutoConfig, AutoModelForCausalLM

from lmpipe import chat, checkpoints, conversations, metric_log, sft, strategies, tasks
from lmpipe.config import Params
from lmpipe.errors import ConfigError
from lmpipe.evaluation import curve_figure
from lmpipe.generation import is_causal_lm
from lmpipe.io import atomic_dir, write_json
from lmpipe.metric_log import log_metrics_bounded
from lmpipe.modeling import (
    check_vocab,
    device,
    from_pretrained,
    load_classifier,
    load_tokenizer,
    max_positions,
    resolve_init,
    resolve_model_ref,
)
from lmpipe.names import missing
from lmpipe.regularization import MODEL_OPS, augment, dropout_overrides
from lmpipe.stage import seed_everything
from lmpipe.training import encode_labeled
from lmpipe.training import finetune as train_classifier
from lmpipe.training import finetune_lm as train_generator


def _finish(name: str, res, trainable: int, total: int, tokenizer, cfg, ckpt: Path, run):
    """A variant that trained here (classifier or generator): its record logged to MLflow and saved with its
    finished model (checkpoints.save_finished); returns what save_finished returns."""
    training = {"trainable_params": trainable, "total_params": total,
                "trainable_percent": 100.0 * trainable / total, "steps_per_s": res.metrics.pop("steps_per_s"),
                "stopped_early": res.metrics.pop("stopped_early"),
                "stopped_by_time_cap": res.metrics.pop("stopped_by_time_cap")}
    record = {"metrics": res.metrics, "training": training, "curve": res.curve, "optimizer": res.optimizer,
              "mlflow_run_id": run.info.run_id}
    _log_variant(name, record)
    done = checkpoints.save_finished(ckpt, name, lambda out: strategies.save(
        res.model, tokenizer, cfg.max_length, out, cfg.strategy), record)
    _log_adapter(name, done.path)
    print(f"finetune[{name}]: {cfg.strategy}: {trainable:,} of {total:,} parameters trained "
          f"({training['trainable_percent']:.2f}%)")
    return done


def _log_variant(name: str, record: dict) -> None:
    """A finished variant's best metrics, its trainable share, its curve (PNG) and its optimizer's parameter
    groups (learning rate, weight decay, parameter names) in the active MLflow run."""
    log_metrics_bounded({f"{name}.best_{k}": v for k, v in record["metrics"].items()})
    log_metrics_bounded({f"{name}.{k}": v for k, v in record.get("training", {}).items()})
    mlflow.log_figure(curve_figure(record["curve"], f"finetune[{name}]"), f"finetune_{name}_loss.png")
    if record.get("optimizer"):
        mlflow.log_dict(record["optimizer"], f"finetune_{name}_optimizer.json")


def _log_adapter(name: str, model_dir: Path) -> None:
    """Adapter strategies: the peft adapter (with the trained head) as the artifact <variant>_adapter/."""
    for f in strategies.adapter_files(model_dir):
        mlflow.log_artifact(str(f), f"{name}_adapter")


def finetune_seed(params: Params) -> int:
    """finetune.seed, else common.seed (the splits always take common.seed)."""
    return params.finetune.seed if params.finetune.seed is not None else params.common.seed


def finetune(params: Params, root: Path, run) -> None:
    cfg, seed = params.finetune, finetune_seed(params)
    if cfg.head == "lm":
        return finetune_generator(params, root, run)
    clean_dir = root / params.clean.out_dir
    task_names = tasks.selected(cfg, params.clean)
    layout = tasks.Layout.of({t: tasks.label_names(clean_dir, t, params.clean) for t in task_names})
    source = resolve_init(cfg.init, root, params.pretrain.out_dir)
    base = source if source is not None else root / params.pretrain.out_dir  # scratch keeps the architecture
    if not (base / "config.json").is_file():
        raise missing(base, "pretrain", "no pretrained model to take the architecture from")
    tokenizer = load_tokenizer(base if (base / "tokenizer.json").is_file() else root / params.tokenize.tokenizer_dir)

    base_config = AutoConfig.from_pretrained(base)
    check_vocab(base_config, tokenizer, "finetune")
    if cfg.max_length > max_positions(base_config):
        raise ConfigError(f"finetune.max_length: {cfg.max_length} exceeds the model's {max_positions(base_config)} positions")
    strategies.check(cfg, base_config)  # before anything is written
    overrides = dropout_overrides(base_config, cfg.dropout)
    if strategies.pads_left(cfg.strategy, base_config):
        tokenizer.padding_side = "left"
    dev = device(params.common)
    teacher = strategies.load_teacher(cfg, list(layout.labels[0]), root, dev) if cfg.strategy == "distill" else None

    words = cfg.augment.copies and set(cfg.augment.ops) & set(MODEL_OPS)  # contextual / neighbour: their model
    augmenter = resolve_init(cfg.augment.model, root, params.pretrain.out_dir, "finetune.augment.model") if words else None
    data = _task_data(params, clean_dir, task_names, layout, augmenter)
    train_df, val_df = data["train"], data["validation"]
    examples = sum(data["sizes"].values()) if layout.multi else len(train_df)  # multi: train_df is the schedule
    mlflow.log_metrics({"train_examples": examples, "augmented_examples": data["added"]})
    train = encode_labeled(tokenizer, train_df["text"].tolist(), train_df["label"].tolist(), cfg.max_length)
    val = encode_labeled(tokenizer, val_df["text"].tolist(), val_df["label"].tolist(), cfg.max_length)
    if teacher is not None:
        started = time.perf_counter()
        train = strategies.with_teacher_inputs(train, train_df["text"].tolist(), teacher)
        if teacher.variant != "fp32":  # its soft labels, computed here once: part of the training time
            took = time.perf_counter() - started
            mlflow.log_metric("teacher_soft_labels_s", round(took, 1))
            print(f"finetune: the {teacher.variant} teacher's soft labels for {len(train)} texts in {took:.0f} s")

    # one checkpoint folder for the whole stage, keyed by everything that makes it resumable: a retry
    # (Prefect, or a re-run after a crash) resumes it; another configuration's unfinished run is refused
    ckpt = checkpoints.claim("finetune", params, root)
    # (variant, output, weights it starts from, random init, its tasks): the selected model, and the baselines
    # that get the same budget: a random-init twin, the original checkpoint before continued pretraining, and
    # with several tasks one single-task model per task with the steps that task got
    variants = [("classifier", cfg.out_dir, base, source is None, None)]
    if cfg.scratch_baseline:
        variants.append(("scratch", cfg.scratch_dir, base, True, None))
    if cfg.original_baseline:
        variants.append(("original", cfg.original_dir, resolve_model_ref(params.pretrain.init, root, "pretrain.init"),
                         False, None))
    if cfg.single_task_baselines:
        for t in task_names:
            if not data["batches"][t]:
                raise ConfigError(f"finetune.single_task_baselines: task {t} got 0 of the {data['steps']} multi-task "
                                  "batches (no steps to give its baseline); raise finetune.max_steps or change sampling")
            variants.append((f"single_{t}", str(Path(cfg.single_task_dir) / t), base, source is None, t))
    summary: dict = {"init": cfg.init, "strategy": cfg.strategy, "mlflow_run_id": run.info.run_id,
                     "train_examples": examples, "augmented_examples": data["added"]}
    if layout.multi:
        summary["tasks"] = {t: {"batches": data["batches"][t], "share": data["batches"][t] / data["steps"],
                                "expected_share": data["expected"][t], "train_examples": data["sizes"][t]}
                            for t in task_names}
        summary["sampling"] = cfg.sampling
    if teacher is not None:
        summary["teacher"] = teacher.source
        summary["teacher_variant"] = teacher.variant
    for name, out_dir, weights, random_init, single in variants:
        done = checkpoints.load_finished(ckpt, name)
        if done is None:
            seed_everything(seed)  # same init RNG and data order for every variant
            if single is None:
                run_layout, run_cfg, run_train, run_val = layout, cfg, train, val
                if layout.multi:
                    run_cfg = cfg.model_copy(update={"max_steps": data["steps"]})
            else:  # the task's own data and labels, the steps it got in the multi-task run
                run_layout = tasks.Layout.of({single: layout.labels[layout.index(single)]})
                steps = data["batches"][single]
                run_cfg = cfg.model_copy(update={"max_steps": steps, "eval_every": min(cfg.eval_every, steps)})
                own = data["single"][single]
                run_train = encode_labeled(tokenizer, own["train"]["text"].tolist(), own["train"]["label"].tolist(),
                                           cfg.max_length)
                run_val = encode_labeled(tokenizer, own["validation"]["text"].tolist(),
                                         own["validation"]["label"].tolist(), cfg.max_length)
            entries = run_layout.config_entries()
            model = load_classifier(weights, run_layout.total, entries.pop("id2label"), random_init,
                                    tokenizer.pad_token_id, overrides, extra_config=entries)
            plan = strategies.prepare(model, run_cfg, teacher)  # the same strategy for every variant
            trainable, total = strategies.parameter_counts(plan.model)
            res = train_classifier(plan.model, tokenizer, run_train, run_val, run_cfg, dev, seed, ckpt / name,
                                   prefix=f"{name}.", plan=plan, layout=run_layout,
                                   ordered=run_layout.multi)
            done = _finish(name, res, trainable, total, tokenizer, cfg, ckpt, run)
        else:
            print(f"finetune[{name}]: finished by an earlier attempt; reusing {done.path}")
            if done.record["mlflow_run_id"] != run.info.run_id:  # that attempt logged to another run
                _log_variant(name, done.record)
                _log_adapter(name, done.path)
        metric_log.settle(params.common.tracking_grace_s)  # its metrics sent before its output is written
        checkpoints.copy_finished(done, root / out_dir)
        metrics = {**done.record["metrics"], **done.record.get("training", {})}
        summary[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"finetune[{name}]: best val accuracy {metrics['val_accuracy']:.4f} in {metrics['steps']} steps")
    _mark_untrained(params, root)
    write_json(root / cfg.metrics, summary)
    checkpoints.release(ckpt)


def _mark_untrained(params: Params, root: Path) -> None:
    """Keep each declared DVC output of a baseline that is off present, and clearly empty."""
    cfg = params.finetune
    for flag, out_dir in (("scratch_baseline", cfg.scratch_dir), ("original_baseline", cfg.original_dir),
                          ("single_task_baselines", cfg.single_task_dir)):
        if not getattr(cfg, flag):
            with atomic_dir(root / out_dir) as out:
                (out / "NOT_TRAINED").write_text(f"finetune.{flag} is false\n")


def finetune_generator(params: Params, root: Path, run) -> None:
    """finetune.head lm: the causal LM fine-tuned on conversations (the selected tasks' instruction versions and
    clean.sft.sources), and with finetune.scratch_baseline its random-init twin with the same budget."""
    cfg, seed = params.finetune, finetune_seed(params)
    clean_dir = root / params.clean.out_dir
    # 1) the model it starts from and its tokenizer with a chat template, checked before anything is written
    source = resolve_init(cfg.init, root, params.pretrain.out_dir)
    base = source if source is not None else root / params.pretrain.out_dir  # scratch keeps the architecture
    if not (base / "config.json").is_file():
        raise missing(base, "pretrain", "no pretrained model to take the architecture from")
    base_config = AutoConfig.from_pretrained(base)
    if not is_causal_lm(base):
        raise ConfigError(f"finetune.head: lm needs a causal LM; {base} is a {base_config.model_type} encoder "
                          f"({', '.join(base_config.architectures or ['?'])}), which cannot generate")
    tokenizer = load_tokenizer(base if (base / "tokenizer.json").is_file() else root / params.tokenize.tokenizer_dir)
    chat.check_tokenizer(tokenizer, "finetune.head: lm")
    check_vocab(base_config, tokenizer, "finetune")
    if cfg.max_length > max_positions(base_config):
        raise ConfigError(f"finetune.max_length: {cfg.max_length} exceeds the model's {max_positions(base_config)} positions")
    strategies.check(cfg, base_config)
    overrides = dropout_overrides(base_config, cfg.dropout)
    tokenizer.padding_side = "right"  # training batches; generation pads on the left itself
    dev = device(params.common)

    # 2) the conversations, encoded with labels on the assistant tokens only
    sources = conversations.sources_for(cfg, params.clean)
    frames = {split: conversations.load_split(clean_dir, sources, split) for split in ("train", "validation")}
    for split, context in (("train", "training"), ("validation", "validation")):
        mlflow.log_input(mlflow.data.from_pandas(frames[split], source=str(Path(params.clean.out_dir) / "sft"),
                                                 name=f"sft_{split}"), context=context)
    train, train_cut = sft.dataset(tokenizer, frames["train"], cfg.max_length)
    val, val_cut = sft.dataset(tokenizer, frames["validation"], cfg.max_length)
    mlflow.log_metrics({"train_examples": len(train), "truncated_train_examples": train_cut,
                        "truncated_validation_examples": val_cut})

    # 3) the generator and its scratch twin, each resumable (one checkpoint folder for the stage)
    ckpt = checkpoints.claim("finetune", params, root)
    variants = [("generator", cfg.out_dir, source is None)]
    if cfg.scratch_baseline:
        variants.append(("scratch", cfg.scratch_dir, True))
    summary: dict = {"init": cfg.init, "head": "lm", "strategy": cfg.strategy, "sources": sources,
                     "mlflow_run_id": run.info.run_id, "train_examples": len(train),
                     "truncated_train_examples": train_cut}
    for name, out_dir, random_init in variants:
        done = checkpoints.load_finished(ckpt, name)
        if done is None:
            seed_everything(seed)  # same init RNG and data order for both
            if random_init:
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base, **overrides))
            else:
                model = from_pretrained(AutoModelForCausalLM, base, **overrides)
            model.config.pad_token_id = tokenizer.pad_token_id
            plan = strategies.prepare(model, cfg)
            trainable, total = strategies.parameter_counts(plan.model)
            res = train_generator(plan.model, tokenizer, train, val, cfg, dev, seed, ckpt / name, prefix=f"{name}.",
                                  collator=sft.collator(tokenizer), plan=plan)
            done = _finish(name, res, trainable, total, tokenizer, cfg, ckpt, run)
        else:
            print(f"finetune[{name}]: finished by an earlier attempt; reusing {done.path}")
            if done.record["mlflow_run_id"] != run.info.run_id:
                _log_variant(name, done.record)
                _log_adapter(name, done.path)
        metric_log.settle(params.common.tracking_grace_s)
        checkpoints.copy_finished(done, root / out_dir)
        metrics = {**done.record["metrics"], **done.record.get("training", {})}
        summary[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        print(f"finetune[{name}]: best val response loss {metrics['val_loss']:.4f} (perplexity "
              f"{metrics['val_response_perplexity']:.2f}) in {metrics['steps']} steps")
    _mark_untrained(params, root)
    write_json(root / cfg.metrics, summary)
    checkpoints.release(ckpt)


AUGMENT_SAMPLES = 50
"""Augmented training examples (with their originals) logged to MLflow as a table."""


def _task_data(params: Params, clean_dir: Path, task_names: list[str], layout, augmenter: Path | None = None) -> dict:
    """The training and validation examples. One task: its splits as they are (augmented). Several: every
    task's validation split with global labels, and the training examples in the order of the multi-task
    batch schedule (lmpipe.tasks.schedule), so Trainer reads them sequentially."""
    cfg, seed = params.finetune, finetune_seed(params)
    own, sizes, added = {}, {}, 0
    for t in task_names:
        train_df = tasks.load_split(clean_dir, t, params.clean, "train")
        val_df = tasks.load_split(clean_dir, t, params.clean, "validation")
        where = tasks.task_dir(Path(params.clean.out_dir), t, params.clean)
        suffix = "" if len(task_names) == 1 else f"_{t}"
        for df, split, context in ((train_df, "train", "training"), (val_df, "validation", "validation")):
            mlflow.log_input(mlflow.data.from_pandas(df, source=str(where / f"labeled_{split}.parquet"),
                                                     name=f"labeled_{split}{suffix}", targets="label"), context=context)
        # text augmentation: the training split only, seeded; validation stays as it is
        n = len(train_df)
        train_df = augment(train_df, cfg.augment, seed, augmenter, params.evaluate.batch_size)
        added += len(train_df) - n
        if len(train_df) > n:  # what augmentation made of the first examples, on the run page
            made = train_df.iloc[n:n + AUGMENT_SAMPLES]
            mlflow.log_table({"original": [train_df["text"].iloc[(k - n) // cfg.augment.copies] for k in made.index],
                              "augmented": made["text"].tolist(), "label": made["label"].tolist()},
                             f"augment_samples{suffix}.json")
        own[t], sizes[t] = {"train": train_df.reset_index(drop=True), "validation": val_df}, len(train_df)
    if not layout.multi:
        t = task_names[0]
        return {"train": own[t]["train"], "validation": own[t]["validation"], "added": added, "single": own}
    steps = tasks.total_steps(cfg, sum(sizes.values()))
    rows, batches = tasks.schedule(sizes, steps, cfg.batch_size, cfg.sampling, cfg.sampling_temperature, seed)
    offsets = {t: layout.offset(t) for t in task_names}
    frames = {t: own[t]["train"] for t in task_names}
    train = pd.DataFrame({"text": [frames[t]["text"].iat[i] for t, i in rows],
                          "label": [int(frames[t]["label"].iat[i]) + offsets[t] for t, i in rows]})
    val = pd.concat([own[t]["validation"].assign(label=own[t]["validation"]["label"] + offsets[t])
                     for t in task_names], ignore_index=True)
    return {"train": train, "validation": val, "added": added, "single": own, "steps": steps, "batches": batches,
            "sizes": sizes, "expected": tasks.shares(sizes, cfg.sampling, cfg.sampling_temperature)}
