"""Clean the pretraining corpus, the labelled task data and the instruction data (clean.sft).

    python -m stages.clean            # the DVC stage `clean` (stages/clean.py) runs this recipe

Reads `common` + `clean` from params.yaml; writes parquet splits under clean.out_dir and the
rows-in/out-per-rule stats to clean.metrics (a DVC metric, also logged to MLflow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from lmpipe import conversations, data
from lmpipe.config import Params
from lmpipe.datasource import data_dir
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, write_json
from lmpipe.masking import Masker
from lmpipe.tasks import task_dir
from lmpipe.metric_log import log_metrics_bounded


def clean(params: Params, root: Path, run) -> None:
    import mlflow  # here, not at import: a params error is then reported in about a second, not after ~2.5 s

    cfg, seed = params.clean, params.common.seed
    ddir = data_dir(root)
    mask = Masker(cfg.mask)  # personal data -> <kind> placeholders, before anything else sees the text

    # 1) corpus: read every source, mask, normalise/filter/dedup together, split by document
    raw_docs: list[str] = []
    for src in cfg.corpus:
        raw_docs.extend(data.read_texts(src, ddir))
    if mask:
        raw_docs = [mask(d) for d in raw_docs]
    docs, corpus_stats = data.clean_documents(raw_docs, cfg.min_chars, cfg.max_chars, cfg.keep_newlines)
    if len(docs) < (1 if cfg.split == "tail" else 2):  # tail cuts one document in two
        raise DataError(
            f"clean.corpus: {len(docs)} documents left after cleaning ({corpus_stats['rows_in']} in: "
            f"{corpus_stats['dropped_empty']} empty, {corpus_stats['dropped_too_short']} shorter than "
            f"min_chars={cfg.min_chars}, {corpus_stats['dropped_duplicate']} duplicates); need at least "
            f"{1 if cfg.split == 'tail' else 2}")
    if cfg.split == "tail":
        train_docs, val_docs = data.tail_split(docs, cfg.validation_fraction)
    else:
        train_idx, val_idx = data.split_indices(len(docs), cfg.validation_fraction, seed)
        train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    if not train_docs or not val_docs:
        raise DataError(f"clean.corpus: {sum(map(len, docs))} characters give an empty "
                        f"{'train' if not train_docs else 'validation'} split (clean.validation_fraction="
                        f"{cfg.validation_fraction}, split {cfg.split})")
    corpus_stats.update(train=len(train_docs), validation=len(val_docs))

    # 2) labelled tasks: train file -> train/validation (and test without a test file), test file kept whole
    tasks = {cfg.labeled.name: _labeled_task(cfg.labeled, None, ddir, cfg.max_chars, seed, "clean.labeled", mask)}
    for name, task in cfg.tasks.items():
        tasks[name] = _labeled_task(task, task.test_fraction, ddir, cfg.max_chars, seed,
                                     f"clean.tasks.{name}", mask)

    # 3) instruction data: your conversations (cleaned, deduplicated, split seeded) and each templated task's
    #    splits as conversations (the same examples the classifier trains and is tested on)
    sft_splits, sft_stats = {}, {}
    if cfg.sft.sources:
        convs: list = []
        for src in cfg.sft.sources:
            convs.extend(conversations.read_source(src, ddir))
        if mask:
            convs = [[{**turn, "content": mask(turn["content"])} for turn in conv] for conv in convs]
        kept, sft_stats[conversations.SOURCES] = conversations.clean_conversations(convs, cfg.max_chars)
        sft_splits[conversations.SOURCES] = conversations.split_conversations(
            kept, cfg.sft.validation_fraction, cfg.sft.test_fraction, seed)
    for name, template in cfg.sft.templates.items():
        sft_splits[name] = {split: conversations.task_split(df, tasks[name]["names"], template)
                            for split, df in tasks[name]["splits"].items()}
    for name, splits in sft_splits.items():
        sft_stats.setdefault(name, {}).update({split: len(df) for split, df in splits.items()})

    # 4) write everything at once (atomic dir swap)
    with atomic_dir(root / cfg.out_dir) as out:
        pd.DataFrame({"text": train_docs}).to_parquet(out / "corpus_train.parquet", index=False)
        pd.DataFrame({"text": val_docs}).to_parquet(out / "corpus_validation.parquet", index=False)
        for name, t in tasks.items():
            folder = task_dir(out, name, cfg)
            folder.mkdir(parents=True, exist_ok=True)
            for split in ("train", "validation", "test"):
                t["splits"][split].to_parquet(folder / f"labeled_{split}.parquet", index=False)
            (folder / "labels.json").write_text(json.dumps({"raw": t["vocab"], "names": t["names"]}, indent=2) + "\n")
        for name, splits in sft_splits.items():
            for split, df in splits.items():
                path = conversations.split_path(out, name, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                df.to_parquet(path, index=False)
    primary = tasks[cfg.labeled.name]
    train_stats, test_stats, vocab = primary["train_stats"], primary["test_stats"], primary["vocab"]
    tr_idx, va_idx, test_df = primary["splits"]["train"], primary["splits"]["validation"], primary["splits"]["test"]

    stats = {
        "corpus": corpus_stats,
        "labeled": {"train": {**train_stats, "train": len(tr_idx), "validation": len(va_idx)}, "test": test_stats,
                    "num_labels": len(vocab)},
        "tasks": {name: {split: len(df) for split, df in t["splits"].items()} | {"num_labels": len(t["vocab"])}
                  for name, t in tasks.items()},
        "mlflow_run_id": run.info.run_id,
    }
    if sft_stats:
        stats["sft"] = sft_stats
    if mask:
        stats["mask"] = dict(mask.counts)
        log_metrics_bounded({f"mask.{k}": v for k, v in mask.counts.items()})
    write_json(root / cfg.metrics, stats)
    log_metrics_bounded({f"corpus.{k}": v for k, v in corpus_stats.items()})
    log_metrics_bounded({f"labeled.train.{k}": v for k, v in stats["labeled"]["train"].items()})
    log_metrics_bounded({f"labeled.test.{k}": v for k, v in test_stats.items()})
    mlflow.log_artifact(str(root / cfg.metrics))
    for name, t in list(tasks.items())[1:]:
        log_metrics_bounded({f"tasks.{name}.{split}": len(df) for split, df in t["splits"].items()})
    log_metrics_bounded({f"sft.{name}.{k}": v for name, st in sft_stats.items() for k, v in st.items()})
    print(f"clean: corpus {corpus_stats['rows_in']} -> {len(train_docs)} train / {len(val_docs)} validation docs; "
          f"labelled {len(tr_idx)} train / {len(va_idx)} validation / {len(test_df)} test, {len(vocab)} classes")


def _labeled_task(task, test_fraction: float | None, ddir: Path, max_chars: int, seed: int, where: str,
                  mask: Masker) -> dict:
    """One task's splits: labels mapped to 0..K-1 by the train file's vocabulary; the test split is the test
    file, or a seeded test_fraction of the train file held out before the validation split is taken. Texts are
    masked first (`mask`, when it names kinds)."""

    def read(src):
        df = data.read_labeled(src, ddir)
        return df.assign(text=[mask(t) for t in df["text"]]) if mask else df

    train_df, vocab, train_stats = data.clean_labeled(read(task.train), None, 1, max_chars, task.train.path)
    if task.test is not None:
        test_df, _, test_stats = data.clean_labeled(read(task.test), vocab, 1, max_chars, task.test.path)
    else:
        rest, held = data.split_indices(len(train_df), test_fraction, seed)
        test_df, train_df = train_df.iloc[held].reset_index(drop=True), train_df.iloc[rest].reset_index(drop=True)
        test_stats = {"rows_in": len(test_df), "rows_out": len(test_df), "dropped_empty": 0}
    tr_idx, va_idx = data.split_indices(len(train_df), task.validation_fraction, seed)
    names = task.label_names or vocab
    if len(names) != len(vocab):
        raise DataError(f"{where}.label_names: {len(names)} names for {len(vocab)} classes {vocab}")
    splits = {"train": train_df.iloc[tr_idx], "validation": train_df.iloc[va_idx], "test": test_df}
    return {"splits": splits, "vocab": vocab, "names": names, "train_stats": train_stats, "test_stats": test_stats}
