"""Train the tokenizer on the clean training split and pack the LM splits into blocks.

    python -m stages.tokenize         # the DVC stage `tokenize` (stages/tokenize.py) runs this recipe

Writes a transformers fast-tokenizer directory (tokenize.tokenizer_dir) and
{train,validation}.npy blocks of shape (n_blocks, block_size) under tokenize.out_dir.
With tokenize.chat_tokens the chat role markers are appended as special tokens after the trained vocabulary
and the chat template is saved with the tokenizer (lmpipe/chat.py), for generative fine-tuning.
With tokenize.kind: pretrained nothing is trained: the pretrain.init checkpoint's own tokenizer packs the
splits (continued pretraining), and block_size must fit the checkpoint's positions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmpipe.chat import add_chat_format
from lmpipe.config import Params
from lmpipe.errors import DataError
from lmpipe.io import atomic_dir, read_parquet, write_json
from lmpipe.metric_log import log_metrics_bounded
# Imported inside functions (start-up cost, docs/results.md#start-up): transformers and modeling where used: the
# tokenize stage with its own BPE tokenizer never loads transformers' model classes.

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers (and torch under it) are imported in the functions, not here: a params error is then reported
# in about a second instead of after ~6 s of imports

# TOKENIZERS_PARALLELISM as the user set it, read before run_stage defaults it to false (for the stages that fork
# DataLoader workers); unset, tokenize.parallel decides (this stage forks nothing while it tokenizes)
USER_PARALLELISM = os.environ.get("TOKENIZERS_PARALLELISM")


def checkpoint_tokenizer(params: Params, root: Path) -> tuple[PreTrainedTokenizerBase, int | None]:
    """The pretrain.init checkpoint's tokenizer and the id that separates documents (tokenize.kind:
    pretrained); the checkpoint is checked first, so a bad one is refused before anything is read or written."""
    from transformers import AutoConfig

    from lmpipe.modeling import check_checkpoint, resolve_model_ref
    from lmpipe.tokenizer import document_separator, load_pretrained_tokenizer

    ref = params.pretrain.init
    path = resolve_model_ref(ref, root, "pretrain.init")
    check_checkpoint(AutoConfig.from_pretrained(path), ref, params.pretrain.objective, params.tokenize.block_size)
    tok = load_pretrained_tokenizer(path, ref)
    return tok, document_separator(tok)


def tokenize(params: Params, root: Path, run) -> None:
    from lmpipe.tokenizer import Throughput, encode_stream, pack_blocks, tokenizers_parallelism, train_tokenizer

    cfg = params.tokenize
    os.environ["TOKENIZERS_PARALLELISM"] = threads = tokenizers_parallelism(USER_PARALLELISM, cfg.parallel)
    pretrained = checkpoint_tokenizer(params, root) if cfg.kind == "pretrained" else None
    clean_dir = root / params.clean.out_dir
    splits = {}
    for split in ("train", "validation"):
        splits[split] = read_parquet(clean_dir / f"corpus_{split}.parquet", "clean")["text"].tolist()

    # 1) train on the training split only (validation stays unseen), or take the checkpoint's tokenizer
    timer = Throughput()
    if pretrained is not None:
        tok, separator = pretrained
    else:
        tok = train_tokenizer(splits["train"], cfg.kind, cfg.vocab_size, cfg.min_frequency,
                              params.pretrain.max_position_embeddings)
        separator = None  # its template adds <s> ... </s>
        if cfg.chat_tokens:  # role markers after the trained vocabulary (no id changes) + the chat template
            add_chat_format(tok)
    train_seconds = timer.rate(1) ** -1
    vocab = len(tok)
    max_len, tok.model_max_length = tok.model_max_length, int(1e12)  # documents are packed, not truncated

    # 2) encode + pack each split
    stats: dict = {"vocab_size": vocab, "kind": cfg.kind, "block_size": cfg.block_size,
                   "tokenizer_train_seconds": round(train_seconds, 2), "tokenizers_parallelism": threads}
    if pretrained is not None:
        stats["tokenizer_from"] = params.pretrain.init
    blocks = {}
    for split, texts in splits.items():
        timer = Throughput()
        ids = encode_stream(tok, texts, total=len(texts), desc=f"tokenize {split}", separator=separator)
        blocks[split] = pack_blocks(ids, cfg.block_size, vocab)
        if len(blocks[split]) == 0:
            raise DataError(f"tokenize.block_size: {cfg.block_size} is longer than the whole {split} split "
                            f"({len(ids)} tokens); lower it or add data")
        stats[split] = {"documents": len(texts), "tokens": int(len(ids)), "blocks": int(len(blocks[split])),
                        "tokens_per_s": round(timer.rate(len(ids)))}

    # 3) write atomically, both or neither: a blocks dir that cannot be written leaves the old tokenizer too
    tok.model_max_length = max_len
    with atomic_dir(root / cfg.tokenizer_dir) as tok_out, atomic_dir(root / cfg.out_dir) as out:
        tok.save_pretrained(str(tok_out))
        for split, arr in blocks.items():
            np.save(out / f"{split}.npy", arr)

    stats["mlflow_run_id"] = run.info.run_id
    write_json(root / cfg.metrics, stats)
    log_metrics_bounded({"vocab_size": vocab, **{f"{s}.{k}": v for s in blocks for k, v in stats[s].items()}})
    print(f"tokenize: vocab {vocab}; train {stats['train']['tokens']} tokens -> {stats['train']['blocks']} blocks "
          f"({stats['train']['tokens_per_s']} tok/s); validation {stats['validation']['tokens']} tokens")
