"""Fine-tune a sequence classifier on the labelled task (SST-2 by default).

    python -m stages.finetune         # what `dvc repro finetune` runs

finetune.init: `pretrained` (the pretrain stage's model), `scratch` (same architecture, random
init) or a local Hugging Face model dir. With finetune.scratch_baseline, a random-init twin is
trained with the same budget so evaluate can measure what pretraining bought.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd

from lmpipe.config import Params, device
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, file_md5, write_json
from lmpipe.modeling import check_vocab, load_classifier, load_tokenizer, max_positions, resolve_init
from lmpipe.stage import run_stage, seed_everything
from lmpipe.tracking import log_metrics_bounded
from lmpipe.training import claim_checkpoint_dir, encode_labeled, fingerprint, finetune as train_classifier
from lmpipe.errors import ConfigError


def _load_split(clean_dir: Path, split: str) -> pd.DataFrame:
    path = clean_dir / f"labeled_{split}.parquet"
    if not path.is_file():
        raise DataError(f"{path}: missing; run the clean stage first (dvc repro clean)")
    return pd.read_parquet(path)


def _resume_key(params: Params, root: Path, name: str) -> dict:
    """Everything that makes a fine-tuning checkpoint resumable: params, seed, base model, data."""
    cfg = params.finetune
    source = resolve_init(cfg.init, root, params.pretrain.out_dir) if cfg.init != "scratch" else None
    base = source if source is not None else root / params.pretrain.out_dir
    return {"finetune": cfg.model_dump(exclude={"out_dir", "scratch_dir", "metrics"}), "variant": name,
            "common.seed": params.common.seed, "base config.json md5": file_md5(base / "config.json"),
            "base model.safetensors md5": file_md5(base / "model.safetensors"),
            "labeled_train.parquet md5": file_md5(root / params.clean.out_dir / "labeled_train.parquet")}


def _run_id_file(params: Params, root: Path) -> Path:
    return root / "checkpoints" / "finetune" / f"mlflow_run_id-{fingerprint(_resume_key(params, root, 'run'))}"


def finetune(params: Params, root: Path, run) -> None:
    cfg, seed = params.finetune, params.common.seed
    clean_dir = root / params.clean.out_dir
    labels = json.loads((clean_dir / "labels.json").read_text())["names"]
    id2label = dict(enumerate(labels))
    source = resolve_init(cfg.init, root, params.pretrain.out_dir)
    base = source if source is not None else root / params.pretrain.out_dir  # scratch keeps the architecture
    if not (base / "config.json").is_file():
        raise DataError(f"{base}: no pretrained model to take the architecture from; run the pretrain stage first")
    tokenizer = load_tokenizer(base if (base / "tokenizer.json").is_file() else root / params.tokenize.tokenizer_dir)

    from transformers import AutoConfig

    base_config = AutoConfig.from_pretrained(base)
    check_vocab(base_config, tokenizer, "finetune")
    if cfg.max_length > max_positions(base_config):
        raise ConfigError(f"finetune.max_length: {cfg.max_length} exceeds the model's {max_positions(base_config)} positions")

    train_df, val_df = _load_split(clean_dir, "train"), _load_split(clean_dir, "validation")
    train = encode_labeled(tokenizer, train_df["text"].tolist(), train_df["label"].tolist(), cfg.max_length)
    val = encode_labeled(tokenizer, val_df["text"].tolist(), val_df["label"].tolist(), cfg.max_length)
    dev = device(params.common)

    variants = [("classifier", cfg.out_dir, source is None)]
    if cfg.scratch_baseline:
        variants.append(("scratch", cfg.scratch_dir, True))
    summary: dict = {"init": cfg.init, "mlflow_run_id": run.info.run_id}
    for name, out_dir, random_init in variants:
        seed_everything(seed)  # same init RNG and data order for both variants
        model = load_classifier(base, len(labels), id2label, random_init, tokenizer.pad_token_id)
        # checkpoints keyed by everything that makes them resumable: a retry (Prefect, or a re-run after
        # a crash) resumes the same training; another configuration's unfinished run is refused
        ckpt_root = root / "checkpoints" / "finetune"
        ckpt = claim_checkpoint_dir(ckpt_root, f"{name}-", _resume_key(params, root, name), f"finetune[{name}]")
        for other in ckpt_root.glob("mlflow_run_id-*"):
            if other != _run_id_file(params, root):
                other.unlink(missing_ok=True)
        model, metrics = train_classifier(model, tokenizer, train, val, cfg, dev, seed, ckpt, prefix=f"{name}.")
        with atomic_dir(root / out_dir) as out:
            model.save_pretrained(str(out), safe_serialization=True)
            tokenizer.save_pretrained(str(out))
        shutil.rmtree(ckpt, ignore_errors=True)  # crash-resume only; see stages/pretrain.py
        summary[name] = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
        log_metrics_bounded({f"{name}.best_{k}": v for k, v in metrics.items()})
        print(f"finetune[{name}]: best val accuracy {metrics['val_accuracy']:.4f} in {metrics['steps']} steps")
    if not cfg.scratch_baseline:
        # keep the declared DVC output present (and clearly empty) when no baseline is trained
        with atomic_dir(root / cfg.scratch_dir) as out:
            (out / "NOT_TRAINED").write_text("finetune.scratch_baseline is false\n")
    write_json(root / cfg.metrics, summary)
    _run_id_file(params, root).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    return run_stage("finetune", finetune, argv, run_id_file=_run_id_file)


if __name__ == "__main__":
    sys.exit(main())
