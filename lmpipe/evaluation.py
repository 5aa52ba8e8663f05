"""Evaluation: LM perplexity on held-out blocks, classifier probabilities (the one path evaluate, deploy and
serving share), confusion-matrix and training-curve figures. The metrics of a task: lmpipe.tasks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedModel, PreTrainedTokenizerBase

from lmpipe import names
from lmpipe.io import atomic_path
from lmpipe.modeling import stored_max_length
from lmpipe.tasks import Layout
# Imported inside functions (start-up cost, docs/results.md#start-up): matplotlib where used: only the plots need it.


@torch.inference_mode()
def perplexity(model: PreTrainedModel, blocks: np.ndarray, batch_size: int, device: str, mlm: bool,
               tokenizer: PreTrainedTokenizerBase | None = None, mlm_probability: float = 0.15,
               seed: int = 0) -> dict[str, float]:
    """Token-weighted mean loss over all blocks -> perplexity; `mlm` (the pretraining objective) says whether
    the model predicts masked tokens or the next one. For masked LMs the masking is seeded (a fixed mask per
    run), so the figure is comparable between runs."""
    model.eval().to(device)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=mlm_probability) if mlm else None
    gen = torch.Generator().manual_seed(seed)
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.from_numpy(np.asarray(blocks[start:start + batch_size], dtype=np.int64))  # (B, T)
        if collator is not None:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            batch = collator([{"input_ids": row} for row in ids])
            labels = batch["labels"]
            ids = batch["input_ids"]
            n = int((labels != -100).sum())
        else:
            labels = ids
            n = ids.numel() - ids.shape[0]  # causal LM predicts T-1 tokens per block
        out = model(input_ids=ids.to(device), labels=labels.to(device))
        total_loss += float(out.loss) * n
        total_tokens += n
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": names.perplexity(loss), "tokens": total_tokens}


def length_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int, max_length: int,
                   return_tensors: str = "pt") -> Iterator[tuple[np.ndarray, Any]]:
    """`texts` in batches of similar token length, longest first: (indices into texts, the batch's encoding
    padded to its own longest text). Each batch is encoded exactly as a batch in file order would be (truncated
    at max_length, padding=True), so a text's prediction does not depend on where it lands; callers put the
    results back in file order by the indices. Sorting saves the padding a short text gets in a batch with a
    long one (benchmarks/evaluate_speed.py)."""
    if len(texts) <= batch_size:  # one batch pads to its longest text in any order: no length pass
        if texts:
            yield np.arange(len(texts)), tokenizer(texts, truncation=True, max_length=max_length, padding=True,
                                                   return_tensors=return_tensors)
        return
    # 1) token lengths after truncation: one call, no padding
    lengths = np.fromiter((len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]),
                          dtype=np.int64, count=len(texts))
    # 2) longest first (a device runs out of memory on the first batch, not the last); stable: ties keep file order
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        yield idx, tokenizer([texts[i] for i in idx], truncation=True, max_length=max_length, padding=True,
                             return_tensors=return_tensors)


@torch.inference_mode()
def predict_proba(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int,
                  device: str, max_length: int | None = None) -> np.ndarray:
    """(N, num_labels) class probabilities, rows in the order of `texts`. Inputs are truncated at the length
    stored with the model (lmpipe.modeling.stored_max_length), the one it was fine-tuned at, unless max_length
    is given; they run in length-sorted batches (length_batches)."""
    max_length = max_length or stored_max_length(tokenizer, model.config)
    layout = Layout.from_config(model.config)  # a multi-task model: a softmax within each task's head
    model.eval().to(device)
    out = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    for idx, enc in length_batches(tokenizer, texts, batch_size, max_length):
        logits = model(**enc.to(device)).logits.float()  # (B, num_labels)
        out[idx] = layout.softmax(logits.cpu().numpy()) if layout.multi else torch.softmax(logits, dim=-1).cpu().numpy()
    return out


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> None:
    # here, not at the top: matplotlib costs 0.6-0.7 s (measured on 2 cores after torch) and serving imports this
    # module for predict_proba and never plots
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, int(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def curve_figure(curve: list[dict[str, Any]], title: str):
    """A training curve as a matplotlib Figure (for mlflow.log_figure): loss per split over steps, and
    validation accuracy on a second axis when the rows carry it (history_curve rows)."""
    # no pyplot: no global figure state, no GUI backend; imported here for the 0.6-0.7 s (see plot_confusion)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for split in dict.fromkeys(r["split"] for r in curve):
        rows = [r for r in curve if r["split"] == split]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="." if split != "train" else None,
                label=f"{split} loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    acc = [r for r in curve if "accuracy" in r]
    if acc:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in acc], [r["accuracy"] for r in acc], color="tab:green", marker=".",
                 linestyle="--", label=f"{acc[0]['split']} accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="best")
    fig.tight_layout()
    return fig
