"""Pretrain a small language model from scratch on the packed token blocks, or continue a checkpoint's.

    python -m stages.pretrain         # the DVC stage `pretrain` (stages/pretrain.py) runs this recipe

Builds a transformers config (Llama by default, GPT-2 or BERT selectable) from `pretrain`, or, with
pretrain.init: <checkpoint> (`package:<name>` or a local HF dir), loads that checkpoint with its MLM or CLM
head (continued, domain-adaptive pretraining on the blocks its own tokenizer packed), trains with Trainer,
checkpoints into pretrain.checkpoint_dir/<fingerprint>/ (lmpipe/checkpoints.py: a re-run after a crash
resumes there and reattaches to the same MLflow run; a different configuration is
refused while that unfinished run's checkpoint is there), saves the final model (safetensors) + tokenizer
to pretrain.out_dir and logs the loss curve (pretrain.plot, and as a PNG) to MLflow. A causal LM (clm) also
continues pretrain.sample_prompts at every evaluation and at the end (lmpipe/samples.py): an MLflow table, and
the final samples in pretrain.samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import torch
from transformers import AutoConfig

from lmpipe import checkpoints, metric_log, objectives, samples
from lmpipe.config import Params
from lmpipe.errors import ConfigError
from lmpipe.evaluation import curve_figure
from lmpipe.io import atomic_dir, read_parquet, write_json
from lmpipe.metric_log import log_metrics_bounded
from lmpipe.modeling import (
    attention_implementation,
    build_lm,
    build_lm_config,
    check_checkpoint,
    check_vocab,
    device,
    load_continued_lm,
    load_tokenizer,
    max_positions,
    resolve_model_ref,
    save_lm,
)
from lmpipe.names import SENTENCE_OBJECTIVES, need
from lmpipe.tokenizer import load_blocks
from lmpipe.training import pretrain as train_lm
from lmpipe.training import write_curve


def pretrain(params: Params, root: Path, run) -> None:
    cfg = params.pretrain
    tok_dir, blocks_dir = root / params.tokenize.tokenizer_dir, root / params.tokenize.out_dir
    tokenizer = load_tokenizer(tok_dir)
    blocks = {}
    for split in ("train", "validation"):
        path = blocks_dir / f"{split}.npy"
        blocks[split] = load_blocks(need(path, "tokenize"))

    # 1) model from a transformers config, or the init checkpoint; refuse shapes the model cannot take
    block = blocks["train"].shape[1]
    sentence_level = cfg.objective in SENTENCE_OBJECTIVES  # simcse, mlm_nsp: sentences, not packed blocks
    continued = None
    if sentence_level:
        init_dir = None if cfg.init == "scratch" else resolve_model_ref(cfg.init, root, "pretrain.init")
        if init_dir is not None:
            check_checkpoint(AutoConfig.from_pretrained(init_dir), cfg.init, cfg.objective, block)
        model, config = objectives.build_model(cfg, tokenizer, init_dir, attention_implementation(cfg))
        if block > max_positions(config):
            raise ConfigError(f"tokenize.block_size: {block} exceeds the model's {max_positions(config)} positions")
        check_vocab(config, tokenizer, "pretrain")
        docs = {split: _corpus(root / params.clean.out_dir, split) for split in ("train", "validation")}
    elif cfg.init == "scratch":
        config = build_lm_config(cfg, tokenizer)
        if block > max_positions(config):
            raise ConfigError(f"tokenize.block_size: {block} exceeds pretrain.max_position_embeddings ({max_positions(config)})")
        check_vocab(config, tokenizer, "pretrain")
        model, init_dir, continued = build_lm(config, cfg.objective, attention_implementation(cfg)), None, None
    else:
        init_dir = resolve_model_ref(cfg.init, root, "pretrain.init")
        config = AutoConfig.from_pretrained(init_dir)
        check_checkpoint(config, cfg.init, cfg.objective, block)
        check_vocab(config, tokenizer, "pretrain")
        continued = load_continued_lm(init_dir, cfg.objective, attention_implementation(cfg))
        model = continued.model
        if continued.new_weights:
            print(f"pretrain: {cfg.init} has no weights for {', '.join(continued.new_weights)}; "
                  f"transformers initialised them (the {cfg.objective} head is trained from here)")

    # samples (clm): every prompt must fit the model's positions, refused now rather than at the first evaluation
    sampler = None
    if cfg.objective == "clm" and cfg.sample_prompts:
        samples.check_prompts(config, tokenizer, cfg)
        sampler = samples.SampleWriter(tokenizer, cfg.sample_prompts, samples.sampling(cfg, params.common.seed))

    # 2) checkpoints live under a fingerprint of everything that makes them resumable; an unfinished
    #    run of another configuration is refused, never loaded or deleted
    is_main = run is not None  # torchrun ranks > 0 get no run and write nothing
    if is_main:
        ckpt_dir = checkpoints.claim("pretrain", params, root)
    else:
        ckpt_dir = checkpoints.checkpoint_dir("pretrain", params, root)
    fp = ckpt_dir.name
    if is_main:
        mlflow.set_tags({"pretrain.fingerprint": fp, "pretrain.parameters": sum(p.numel() for p in model.parameters()),
                         "pretrain.world_size": os.environ.get("WORLD_SIZE", "1")})
        if continued is not None:
            mlflow.set_tags({"pretrain.init": cfg.init, "pretrain.init_model_type": config.model_type,
                             "pretrain.init_new_weights": ",".join(continued.new_weights)[:5000] or "none",
                             "pretrain.init_carried_weights": ",".join(continued.unused_weights)[:5000] or "none"})

    # 3) train
    dev = device(params.common)
    if sentence_level:
        result = objectives.train(model, tokenizer, docs["train"], docs["validation"], cfg, block, dev,
                                  params.common.seed, ckpt_dir)
    else:
        result = train_lm(model, tokenizer, blocks["train"], blocks["validation"], cfg, dev, params.common.seed, ckpt_dir,
                          callbacks=[sampler] if sampler is not None else [])
    if not is_main:
        return
    metric_log.settle(params.common.tracking_grace_s)  # every training metric sent before any output is written
    if result.resumed_from:
        mlflow.set_tag("pretrain.resumed_from", result.resumed_from)
    if sampler is not None:
        sampler.send()  # the samples table complete (the final model's rows included) before any output

    # 4) outputs: model + tokenizer (self-contained HF dir), curve, metrics, the final samples
    with atomic_dir(root / cfg.out_dir) as out:
        save_lm(result.model, out, init_dir, continued.unused_weights if continued else ())
        tokenizer.save_pretrained(str(out))
    write_curve(root / cfg.plot, result.curve)
    samples.write(root / cfg.samples, sampler.last() if sampler else [], sampler.settings if sampler else None)
    metrics = {**{k: round(v, 6) if isinstance(v, float) else v for k, v in result.metrics.items()},
               "device": dev, "mlflow_run_id": run.info.run_id}
    write_json(root / cfg.metrics, metrics)
    log_metrics_bounded({f"final.{k}": v for k, v in result.metrics.items()})
    mlflow.log_artifact(str(root / cfg.plot))
    mlflow.log_figure(curve_figure(result.curve, "pretrain"), "pretrain_loss.png")
    checkpoints.release(ckpt_dir)
    m = result.metrics
    line = f"pretrain: {cfg.objective}: {m['steps']} steps, val loss {m['val_loss']:.4f}"
    if "val_perplexity" in m:
        line += f" (ppl {m['val_perplexity']:.1f})"
    if "val_nsp_accuracy" in m:
        line += f", NSP accuracy {m['val_nsp_accuracy']:.4f}"
    rate = f"{m['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in m else f"{m['examples_per_s']:.1f} examples/s"
    print(f"{line}, {rate} on {dev}")


def _corpus(clean_dir: Path, split: str) -> list[str]:
    """The clean corpus documents of one split (the sentence-level objectives split them into sentences)."""
    return read_parquet(clean_dir / f"corpus_{split}.parquet", "clean")["text"].tolist()


def processes(params: Params) -> int:
    """How many training processes pretrain.nproc_per_node asks for; more than one runs DDP under torchrun.
    pretrain.fsdp on a CPU is refused here, before any process starts: Trainer/Accelerate shard only on CUDA
    devices, and on a CPU the processes would run plain DDP instead of what was asked."""
    if params.pretrain.fsdp and device(params.common) != "cuda":
        raise ConfigError(f"pretrain.fsdp: {params.pretrain.fsdp!r} needs CUDA devices (Trainer/Accelerate shard on GPUs "
                          "only); on a CPU set pretrain.fsdp='' (nproc_per_node > 1 runs DDP)")
    n = params.pretrain.nproc_per_node
    if n == "auto":
        n = torch.cuda.device_count() or os.cpu_count() or 1
    return int(n)
