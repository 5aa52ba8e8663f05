"""Pretraining objectives beyond next-token and masked-token prediction, on an encoder (BERT, MiniLM, ...).

    python -m stages.pretrain --set pretrain.objective=simcse     # or mlm_nsp

simcse (Gao et al. 2021, unsupervised): each sentence of the clean corpus is encoded twice with dropout on;
the two embeddings are the positive pair and the batch's other sentences the negatives: cross-entropy over
cosine similarities / temperature. The encoder is saved bare (AutoModel) with its pooling in config.json;
fine-tuning starts from it like from any other pretrained model, and the server answers /embed with it.

mlm_nsp (Devlin et al. 2019): BertForPreTraining's two heads on sentence pairs drawn from consecutive
sentences of one document (the pair's label 0), or, half the time, a first sentence with a random sentence of
another document (label 1); tokens masked as for mlm. Validation reports NSP accuracy beside MLM perplexity.
RoBERTa (Liu et al. 2019) found NSP unhelpful for downstream tasks; the option is here so that can be measured.

Both train on Trainer (the same optimizer, schedule, precision, checkpoints and resume as clm/mlm); only the
data and the loss differ.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertForPreTraining, DataCollatorForLanguageModeling, DataCollatorWithPadding

from lmpipe.checkpoints import resume_point
from lmpipe.config import Pretrain
from lmpipe.embeddings import POOLING_KEY, pool
from lmpipe.errors import DataError
from lmpipe.modeling import build_lm_config
from lmpipe.names import checkpoint_step, perplexity
# Imported inside functions (start-up cost, docs/results.md#start-up): training (datasets) and callbacks where used:
# the evaluate stage imports this module for perplexity and never trains.

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
MIN_WORDS = 3


def sentences(document: str) -> list[str]:
    """A document split after ., ! or ? before a capital or a digit; fragments under MIN_WORDS words dropped."""
    return [s.strip() for s in _SENTENCE_END.split(document) if len(s.split()) >= MIN_WORDS]


def corpus_sentences(documents: list[str], limit: int | None = None) -> list[str]:
    """Distinct sentences of the corpus, in corpus order."""
    seen: dict[str, None] = {}
    for doc in documents:
        for s in sentences(doc):
            seen.setdefault(s, None)
            if limit is not None and len(seen) >= limit:
                return list(seen)
    return list(seen)


def nsp_pairs(documents: list[str], seed: int) -> list[tuple[str, str, int]]:
    """(first, second, label): label 0 when `second` follows `first` in its document, 1 when it is a random
    sentence of another document; about half each, seeded."""
    docs = [s for s in (sentences(d) for d in documents) if s]
    rng = random.Random(seed)
    pairs = []
    for i, doc in enumerate(docs):
        for j in range(len(doc) - 1):
            if rng.random() < 0.5 or len(docs) < 2:
                pairs.append((doc[j], doc[j + 1], 0))
            else:
                k = rng.randrange(len(docs) - 1)
                other = docs[k + (k >= i)]
                pairs.append((doc[j], other[rng.randrange(len(other))], 1))
    return pairs


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def encode_sentences(tokenizer, texts: list[str], max_length: int) -> _Rows:
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return _Rows([{"input_ids": ids, "attention_mask": m} for ids, m in zip(enc["input_ids"], enc["attention_mask"])])


def encode_pairs(tokenizer, pairs: list[tuple[str, str, int]], max_length: int) -> _Rows:
    """[CLS] A [SEP] B [SEP] with token types 0/1, built from the tokenizer's own special tokens (a tokenizer
    trained here has no pair template), the longer side truncated first."""
    cls = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    first = tokenizer([a for a, _, _ in pairs], add_special_tokens=False)["input_ids"]
    second = tokenizer([b for _, b, _ in pairs], add_special_tokens=False)["input_ids"]
    rows = []
    for a, b, (_, _, label) in zip(first, second, pairs):
        a, b = list(a), list(b)
        while len(a) + len(b) > max_length - 3:
            (a if len(a) >= len(b) else b).pop()
        ids = [cls, *a, sep, *b, sep]
        rows.append({"input_ids": ids, "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1),
                     "attention_mask": [1] * len(ids), "next_sentence_label": label})
    return _Rows(rows)


def simcse_loss(model, batch: dict[str, torch.Tensor], temperature: float, pooling: str) -> torch.Tensor:
    """The batch encoded twice in one forward pass (two dropout masks), InfoNCE over the B x B cosine
    similarities with the diagonal as the positives."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = model(input_ids=torch.cat([ids, ids]), attention_mask=torch.cat([mask, mask])).last_hidden_state
    z = F.normalize(pool(hidden.float(), torch.cat([mask, mask]), pooling), dim=-1)
    z1, z2 = z[: len(ids)], z[len(ids):]
    logits = z1 @ z2.T / temperature  # (B, B)
    return F.cross_entropy(logits, torch.arange(len(ids), device=logits.device))


def _trainer_class():
    from lmpipe.training import GuardedTrainer

    class ObjectiveTrainer(GuardedTrainer):
        """simcse: the contrastive loss; mlm_nsp: BertForPreTraining's summed loss, and an evaluation that reports
        MLM loss/perplexity and NSP accuracy separately."""

        def __init__(self, *args, objective: str, temperature: float, pooling: str, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.objective, self.temperature, self.pooling = objective, temperature, pooling

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.objective == "simcse":
                loss = simcse_loss(model, inputs, self.temperature, self.pooling)
                return (loss, None) if return_outputs else loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        @torch.no_grad()
        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            # simcse keeps dropout on: without it both views are identical and the loss says nothing
            model = self.model.train() if self.objective == "simcse" else self.model.eval()
            loader = self.get_eval_dataloader(eval_dataset)
            total, batches, mlm_sum, mlm_tokens, nsp_right, nsp_n = 0.0, 0, 0.0, 0, 0, 0
            gen = torch.random.fork_rng()  # the MLM masking of evaluation leaves the training RNG untouched
            with gen:
                torch.manual_seed(0)
                for batch in loader:
                    batch = self._prepare_inputs(batch)
                    if self.objective == "simcse":
                        total += float(simcse_loss(model, batch, self.temperature, self.pooling))
                    else:
                        out = model(**batch)
                        total += float(out.loss)
                        labels = batch["labels"]
                        n = int((labels != -100).sum())
                        mlm_sum += float(F.cross_entropy(out.prediction_logits.flatten(0, 1).float(), labels.flatten(),
                                                         ignore_index=-100, reduction="sum"))
                        mlm_tokens += n
                        nsp_right += int((out.seq_relationship_logits.argmax(-1) == batch["next_sentence_label"]).sum())
                        nsp_n += len(labels)
                    batches += 1
            metrics = {f"{metric_key_prefix}_loss": total / max(batches, 1)}
            if self.objective == "mlm_nsp":
                mlm = mlm_sum / max(mlm_tokens, 1)
                metrics.update({f"{metric_key_prefix}_mlm_loss": mlm,
                                f"{metric_key_prefix}_mlm_perplexity": perplexity(mlm),
                                f"{metric_key_prefix}_nsp_accuracy": nsp_right / max(nsp_n, 1)})
            model.train()
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            return metrics

    return ObjectiveTrainer


def build_model(cfg: Pretrain, tokenizer, init_dir: Path | None, attention: str):
    """The encoder (simcse: AutoModel) or BertForPreTraining (mlm_nsp), from params or the init checkpoint."""
    if init_dir is None:
        config = build_lm_config(cfg, tokenizer)
        if cfg.objective == "mlm_nsp":
            config.type_vocab_size = 2  # sentence A / B
            return BertForPreTraining(config), config
        return AutoModel.from_config(config, attn_implementation=attention), config
    if cfg.objective == "mlm_nsp":
        model = BertForPreTraining.from_pretrained(init_dir, attn_implementation=attention, dtype=torch.float32)
    else:
        model = AutoModel.from_pretrained(init_dir, attn_implementation=attention, dtype=torch.float32)
    return model, model.config


def train(model, tokenizer, train_docs: list[str], val_docs: list[str], cfg: Pretrain, block_size: int,
          device: str, seed: int, ckpt_dir: Path):
    """Train `model` with cfg.objective (simcse | mlm_nsp) on the corpus documents; resumes from ckpt_dir."""
    from lmpipe.callbacks import MlflowCallback, StepTimer
    from lmpipe.training import PretrainResult, history_curve, pretrain_arguments

    if cfg.objective == "simcse":
        raw = {"training": corpus_sentences(train_docs), "validation": corpus_sentences(val_docs)}
    else:
        raw = {"training": nsp_pairs(train_docs, seed), "validation": nsp_pairs(val_docs, seed + 1)}
    for name, rows in raw.items():
        if len(rows) < 2:
            what = "sentences" if cfg.objective == "simcse" else "sentence pairs (documents of 2+ sentences)"
            raise DataError(f"pretrain.objective: {cfg.objective}: the {name} corpus has {len(rows)} {what}; need 2 or more")
    if cfg.objective == "simcse":
        train_ds, val_ds = (encode_sentences(tokenizer, raw[k], block_size) for k in ("training", "validation"))
        collator = DataCollatorWithPadding(tokenizer)
    else:
        train_ds, val_ds = (encode_pairs(tokenizer, raw[k], block_size) for k in ("training", "validation"))
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=cfg.mlm_probability)
    args, _ = pretrain_arguments(cfg, ckpt_dir, device, seed, remove_unused_columns=False)
    logger, timer = MlflowCallback(), StepTimer()
    trainer = _trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                               data_collator=collator, callbacks=[logger, timer], objective=cfg.objective,
                               temperature=cfg.simcse_temperature, pooling=cfg.pooling)
    resume = resume_point(ckpt_dir, "pretrain", cfg.max_steps)
    t0 = time.perf_counter()
    out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    final = trainer.evaluate()
    steps = int(trainer.state.global_step)
    trained = steps - (checkpoint_step(resume) if resume else 0)
    metrics = {"train_loss": float(out.training_loss), "val_loss": float(final["eval_loss"]),
               "train_seconds": seconds, "steps": steps, "parameters": int(sum(p.numel() for p in model.parameters())),
               "examples_per_s": trained * cfg.batch_size * cfg.gradient_accumulation_steps / max(seconds, 1e-9),
               "train_examples": len(train_ds), "val_examples": len(val_ds)}
    if cfg.objective == "mlm_nsp":
        metrics.update(val_mlm_loss=final["eval_mlm_loss"], val_perplexity=final["eval_mlm_perplexity"],
                       val_nsp_accuracy=final["eval_nsp_accuracy"])
    if cfg.objective == "simcse":
        setattr(trainer.model.config, POOLING_KEY, cfg.pooling)
    return PretrainResult(trainer.model, metrics, history_curve(trainer.state.log_history),
                          str(resume) if resume else None, timer)


def sentence_sample(documents: list[str], n: int, seed: int) -> list[str]:
    """Up to n distinct sentences of `documents`, a seeded sample."""
    pool_ = corpus_sentences(documents)
    rng = np.random.default_rng(seed)
    return [pool_[i] for i in sorted(rng.permutation(len(pool_))[:n])]
