"""Clean the pretraining corpus and the labelled task data.

    python -m stages.clean            # what `dvc repro clean` runs

Reads `common` + `clean` from params.yaml; writes parquet splits under clean.out_dir and the
rows-in/out-per-rule stats to clean.metrics (a DVC metric, also logged to MLflow).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pandas as pd

from lmpipe import data
from lmpipe.config import Params
from lmpipe.datasource import data_dir
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, write_json
from lmpipe.stage import run_stage
from lmpipe.tracking import log_metrics_bounded


def clean(params: Params, root: Path, run) -> None:
    cfg, seed = params.clean, params.common.seed
    ddir = data_dir(root)

    # 1) corpus: read every source, normalise/filter/dedup together, split by document
    raw_docs: list[str] = []
    for src in cfg.corpus:
        raw_docs.extend(data.read_texts(src, ddir))
    docs, corpus_stats = data.clean_documents(raw_docs, cfg.min_chars, cfg.max_chars, cfg.keep_newlines)
    if len(docs) < 2:
        raise DataError(
            f"clean.corpus: {len(docs)} documents left after cleaning ({corpus_stats['rows_in']} in: "
            f"{corpus_stats['dropped_empty']} empty, {corpus_stats['dropped_too_short']} shorter than "
            f"min_chars={cfg.min_chars}, {corpus_stats['dropped_duplicate']} duplicates); need at least 2")
    train_idx, val_idx = data.split_indices(len(docs), cfg.validation_fraction, seed)
    corpus_stats.update(train=len(train_idx), validation=len(val_idx))

    # 2) labelled task: train file -> train/validation, test file kept whole for evaluate
    lab = cfg.labeled
    train_df, vocab, train_stats = data.clean_labeled(
        data.read_labeled(lab.train, ddir), None, 1, cfg.max_chars, lab.train.path)
    test_df, _, test_stats = data.clean_labeled(
        data.read_labeled(lab.test, ddir), vocab, 1, cfg.max_chars, lab.test.path)
    tr_idx, va_idx = data.split_indices(len(train_df), lab.validation_fraction, seed)
    names = lab.label_names or vocab
    if len(names) != len(vocab):
        raise DataError(f"clean.labeled.label_names: {len(names)} names for {len(vocab)} classes {vocab}")

    # 3) write everything at once (atomic dir swap)
    with atomic_dir(root / cfg.out_dir) as out:
        pd.DataFrame({"text": [docs[i] for i in train_idx]}).to_parquet(out / "corpus_train.parquet", index=False)
        pd.DataFrame({"text": [docs[i] for i in val_idx]}).to_parquet(out / "corpus_validation.parquet", index=False)
        train_df.iloc[tr_idx].to_parquet(out / "labeled_train.parquet", index=False)
        train_df.iloc[va_idx].to_parquet(out / "labeled_validation.parquet", index=False)
        test_df.to_parquet(out / "labeled_test.parquet", index=False)
        (out / "labels.json").write_text(json.dumps({"raw": vocab, "names": names}, indent=2) + "\n")

    stats = {
        "corpus": corpus_stats,
        "labeled": {"train": {**train_stats, "train": len(tr_idx), "validation": len(va_idx)}, "test": test_stats,
                    "num_labels": len(vocab)},
        "mlflow_run_id": run.info.run_id,
    }
    write_json(root / cfg.metrics, stats)
    log_metrics_bounded({f"corpus.{k}": v for k, v in corpus_stats.items()})
    log_metrics_bounded({f"labeled.train.{k}": v for k, v in stats["labeled"]["train"].items()})
    log_metrics_bounded({f"labeled.test.{k}": v for k, v in test_stats.items()})
    mlflow.log_artifact(str(root / cfg.metrics))
    print(f"clean: corpus {corpus_stats['rows_in']} -> {len(train_idx)} train / {len(val_idx)} validation docs; "
          f"labelled {len(tr_idx)} train / {len(va_idx)} validation / {len(test_df)} test, {len(vocab)} classes")


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", clean, argv)


if __name__ == "__main__":
    sys.exit(main())
