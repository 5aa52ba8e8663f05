"""Generative (instruction) fine-tuning examples: conversations formatted with the tokenizer's chat template
(lmpipe/chat.py), encoded with the loss on the assistant tokens only, padded, and scored.

    python -m stages.finetune --set finetune.head=lm     # with tokenize.chat_tokens: true (profiles/generative.yaml)

Labels are the input ids on the assistant turns (their content and closing EOS) and -100 everywhere else; a
conversation longer than finetune.max_length keeps its last tokens (and its BOS), as generation cuts prompts
(lmpipe.generation.keep_last). The conversations come from the clean stage (lmpipe/conversations.py).
"""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import DataCollatorForSeq2Seq

from lmpipe import chat
from lmpipe.errors import DataError
from lmpipe.generation import encode_prompts, keep_last
from lmpipe.modeling import stored_max_length
# Imported inside functions (start-up cost, docs/results.md#start-up): datasets where used: the prompt templates and
# `lmpipe generate` need none of it.

IGNORE = -100
"""Label of a token the loss skips (PyTorch's cross-entropy ignore_index)."""


# -- training examples --------------------------------------------------------------------------------------------

def encode(tokenizer, conversations: list[chat.Messages], max_length: int) -> tuple[dict[str, list], int]:
    """Conversations -> input_ids and labels (the assistant turns' tokens, -100 elsewhere), each cut to
    max_length from the left (the last turns are kept; generation cuts prompts the same way). Returns the
    columns and how many conversations were cut.

    The assistant tokens of turn i are those between the chat template's rendering of turns < i with the
    generation prompt and its rendering of turns <= i, each of which must encode as a prefix of the whole
    conversation (true of any template that renders turn by turn); every text of the batch is encoded in one
    tokenizer call."""
    # 1) the texts: each conversation, then per assistant turn its prefix before and after that turn
    texts, spans = [], []
    for messages in conversations:
        turns = [i for i, t in enumerate(messages) if t["role"] == "assistant"]
        texts.append(chat.conversation_text(tokenizer, messages))
        for i in turns:
            texts += [chat.prompt_text(tokenizer, messages[:i]), chat.conversation_text(tokenizer, messages[:i + 1])]
        spans.append(len(turns))
    ids = encode_prompts(tokenizer, texts)
    # 2) labels: the tokens each assistant turn adds; the rest -100
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    pos, cut = 0, 0
    for n_turns in spans:
        full = ids[pos]
        labels = [IGNORE] * len(full)
        for k in range(n_turns):
            before, after = ids[pos + 1 + 2 * k], ids[pos + 2 + 2 * k]
            if full[:len(after)] != after or after[:len(before)] != before:
                raise DataError("chat template: a conversation's turns do not encode as prefixes of it, so the "
                                "assistant tokens cannot be told apart; use a template that renders turn by turn")
            labels[len(before):len(after)] = after[len(before):]
        pos += 1 + 2 * n_turns
        if len(full) > max_length:  # the same positions of both: the BOS (when there is one) and the last tokens
            cut += 1
            kept = keep_last(list(range(len(full))), max_length, 0 if full[0] == tokenizer.bos_token_id else None)
            full, labels = [full[i] for i in kept], [labels[i] for i in kept]
        columns["input_ids"].append(full)
        columns["labels"].append(labels)
    return columns, cut


def dataset(tokenizer, frame: pd.DataFrame, max_length: int):
    """A clean split (load_split) as a datasets.Dataset of input_ids / attention_mask / labels, plus the number
    of conversations cut to max_length."""
    import datasets

    columns, cut = encode(tokenizer, [chat.loads(m) for m in frame["messages"]], max_length)
    columns["attention_mask"] = [[1] * len(x) for x in columns["input_ids"]]
    return datasets.Dataset.from_dict(columns), cut


def collator(tokenizer):
    """Right-pads a batch: input_ids with the pad id, labels with -100 (transformers' own collator)."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, padding=True)


def response_loss(model, tokenizer, ds, batch_size: int, device: str) -> dict[str, float]:
    """Mean cross-entropy per assistant token over `ds` (the sum over tokens / their count, not a mean of batch
    means) and its perplexity."""
    pad = collator(tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(ds), batch_size):
            batch = pad([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
            target = batch["labels"][:, 1:]  # token t predicts t + 1
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            total += float(loss)
            count += int((target != IGNORE).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}


def score_responses(model, tokenizer, frame: pd.DataFrame, batch_size: int, device: str) -> dict[str, float]:
    """response_loss over the conversations of `frame`, encoded as training encoded them: cut at the length the
    model was fine-tuned at (evaluate scores the generator this way, deploy its int8 variant)."""
    tokenizer.padding_side = "right"
    ds, _ = dataset(tokenizer, frame, stored_max_length(tokenizer, model.config))
    return response_loss(model, tokenizer, ds, batch_size, device)

