"""Classification tasks: where each task's splits live, their metrics, and multi-task models (one encoder, a head
per task).

    finetune.tasks: [sst2, ag_news, trec]     # params.yaml; clean.labeled is one task, clean.tasks the others

A multi-task model is an ordinary transformers sequence classifier whose output layer holds every task's
head as a disjoint block of rows: for SST-2 (2 classes), AG News (4) and TREC (6) it has 12 outputs, SST-2's
head the first 2 rows, AG News' the next 4, TREC's the last 6. Its config.json records that layout
(`lmpipe_tasks`). Each task's loss and softmax see only its own block, so a task's examples train the shared
encoder and their own head and no other head. Because the saved model stays an ordinary classifier, every
strategy (LoRA keeps the whole output layer in modules_to_save, so every head trains), every deploy variant
(int8, ONNX, pruning) and every loader work on it unchanged. Labels inside a multi-task model are global:
task t's class c is output offset(t) + c.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmpipe.config import Clean, Finetune
from lmpipe.io import read_parquet
from lmpipe.names import need
# Imported inside functions (start-up cost, docs/results.md#start-up): scikit-learn and torch where used: the tokenize
# stage imports this module for the task data.

CONFIG_KEY = "lmpipe_tasks"
"""config.json key of a multi-task model: [{"name": ..., "labels": [...]}, ...] in output order."""


# -- the clean stage's layout -------------------------------------------------------------------------------

def task_dir(clean_dir: Path, name: str, cfg: Clean) -> Path:
    """clean.labeled's splits stay where a single-task pipeline always had them (clean.out_dir); every other
    task has a folder of its own under clean.out_dir/tasks/."""
    return clean_dir if name == cfg.labeled.name else clean_dir / "tasks" / name


def load_split(clean_dir: Path, name: str, cfg: Clean, split: str) -> pd.DataFrame:
    return read_parquet(task_dir(clean_dir, name, cfg) / f"labeled_{split}.parquet", "clean")


def label_names(clean_dir: Path, name: str, cfg: Clean) -> list[str]:
    path = need(task_dir(clean_dir, name, cfg) / "labels.json", "clean")
    return json.loads(path.read_text())["names"]


def selected(cfg: Finetune, clean: Clean) -> list[str]:
    """finetune.tasks, or clean.labeled alone."""
    return list(cfg.tasks or [clean.labeled.name])


# -- metrics ------------------------------------------------------------------------------------------------

def classification_metrics(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> dict[str, Any]:
    """Accuracy, macro-F1 (a class never seen counts 0) and the confusion matrix (rows: actual) of one task."""
    # here, not at the top: scikit-learn costs 1.3-1.4 s (measured on 2 cores) and the clean stage imports this
    # module for task_dir only
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {"accuracy": float(accuracy_score(labels, preds)),
            "f1_macro": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)),
                                       zero_division=0)),
            "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(num_labels))).tolist()}


# -- the model's heads ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Tasks in output order, each with its label names."""

    names: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, tasks: dict[str, list[str]]) -> "Layout":
        return cls(tuple(tasks), tuple(tuple(str(x) for x in v) for v in tasks.values()))

    @classmethod
    def from_config(cls, config) -> "Layout":
        """A model's layout: its lmpipe_tasks, or one task with the model's own labels (a single-task model)."""
        spec = getattr(config, CONFIG_KEY, None)
        if spec:
            return cls(tuple(t["name"] for t in spec), tuple(tuple(t["labels"]) for t in spec))
        id2label = {int(k): str(v) for k, v in config.id2label.items()}
        return cls(("default",), (tuple(id2label[i] for i in sorted(id2label)),))

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.labels)

    def offset(self, task: str) -> int:
        i = self.index(task)
        return sum(len(v) for v in self.labels[:i])

    def span(self, task: str) -> slice:
        start = self.offset(task)
        return slice(start, start + len(self.labels[self.index(task)]))

    def index(self, task: str) -> int:
        if task not in self.names:
            raise KeyError(f"unknown task {task!r}; the model's tasks are {', '.join(self.names)}")
        return self.names.index(task)

    def resolve(self, task: str | None) -> str:
        """None -> the default (first) task."""
        return self.names[0] if task is None else self.names[self.index(task)]

    def config_entries(self) -> dict[str, Any]:
        """What load_classifier puts into the model's config: the global id2label and, with several tasks,
        the layout. A single-task model's config stays exactly what it always was."""
        if not self.multi:
            return {"id2label": dict(enumerate(self.labels[0]))}
        names = [f"{t}:{label}" for t, labels in zip(self.names, self.labels) for label in labels]
        return {"id2label": dict(enumerate(names)),
                CONFIG_KEY: [{"name": t, "labels": list(labels)} for t, labels in zip(self.names, self.labels)]}

    def task_of_label(self) -> np.ndarray:
        """Global label -> task index, (total,)."""
        return np.repeat(np.arange(len(self.names)), [len(v) for v in self.labels])

    def softmax(self, logits: np.ndarray) -> np.ndarray:
        """(N, total) logits -> probabilities normalised within each task's block."""
        out = np.empty_like(logits, dtype=np.float32)
        for t in self.names:
            s = self.span(t)
            block = logits[:, s] - logits[:, s].max(-1, keepdims=True)
            e = np.exp(block)
            out[:, s] = e / e.sum(-1, keepdims=True)
        return out

    def predict(self, probs: np.ndarray, task: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, total) probabilities -> (the task's class index, its probability) per row."""
        block = probs[:, self.span(self.resolve(task))]
        idx = block.argmax(-1)
        return idx, block[np.arange(len(block)), idx]

    def loss(self, logits, labels, weights: dict[str, float] | None = None, smoothing: float = 0.0):
        """Mean over the batch of each example's cross-entropy within its own task's block (labels are global),
        times the task's weight."""
        # here, not at the top: torch costs 1.8-1.9 s (measured on 2 cores) and the clean stage imports this module
        import torch
        import torch.nn.functional as F

        task_of = torch.as_tensor(self.task_of_label(), device=labels.device)[labels]
        total = logits.new_zeros(())
        for i, t in enumerate(self.names):
            rows = task_of == i
            if not bool(rows.any()):
                continue
            s = self.span(t)
            ce = F.cross_entropy(logits[rows, s].float(), labels[rows] - s.start, reduction="sum",
                                 label_smoothing=smoothing)
            total = total + (weights or {}).get(t, 1.0) * ce
        return total / labels.shape[0]

    def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Per-task accuracy and macro-F1 (argmax within the example's task) and their means (accuracy, f1_macro)."""
        task_of = self.task_of_label()[labels]
        out: dict[str, float] = {}
        for i, t in enumerate(self.names):
            rows = task_of == i
            if not rows.any():
                continue
            s = self.span(t)
            m = classification_metrics(labels[rows] - s.start, logits[rows, s].argmax(-1), s.stop - s.start)
            out[f"{t}_accuracy"], out[f"{t}_f1_macro"] = m["accuracy"], m["f1_macro"]
        present = [t for t in self.names if f"{t}_accuracy" in out]
        out["accuracy"] = float(np.mean([out[f"{t}_accuracy"] for t in present]))
        out["f1_macro"] = float(np.mean([out[f"{t}_f1_macro"] for t in present]))
        return out


def score(probs_by_task: dict[str, np.ndarray], labels_by_task: dict[str, np.ndarray], layout: Layout) -> dict[str, Any]:
    """Test-split figures of a model: per task accuracy, macro-F1, confusion matrix; accuracy and f1_macro are
    the means over tasks (one task: its own figures, as a single-task pipeline always reported them)."""
    tasks = {}
    for task, probs in probs_by_task.items():
        preds, _ = layout.predict(probs, task if layout.multi else None)
        n = len(layout.labels[layout.index(task)]) if layout.multi else len(layout.labels[0])
        tasks[task] = classification_metrics(labels_by_task[task], preds, n)
    out: dict[str, Any] = {"accuracy": float(np.mean([m["accuracy"] for m in tasks.values()])),
                           "f1_macro": float(np.mean([m["f1_macro"] for m in tasks.values()]))}
    return {**out, "tasks": tasks}


# -- multi-task batches -------------------------------------------------------------------------------------

def shares(sizes: dict[str, int], sampling: str, temperature: float) -> dict[str, float]:
    """Each task's expected share of the batches."""
    names = list(sizes)
    if sampling == "round_robin":
        return {t: 1.0 / len(names) for t in names}
    power = 1.0 if sampling == "proportional" else 1.0 / temperature
    w = np.array([sizes[t] for t in names], dtype=float) ** power
    return dict(zip(names, (w / w.sum()).tolist()))


def schedule(sizes: dict[str, int], steps: int, batch_size: int, sampling: str, temperature: float,
             seed: int) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The whole run's training examples in batch order: each batch holds `batch_size` examples of one task,
    the task drawn by `sampling` (seeded); within a task, examples come in a seeded random order, reshuffled
    when the task runs out. Returns [(task, row index)] of length steps * batch_size and batches per task."""
    rng = np.random.default_rng(seed)
    names = list(sizes)
    if sampling == "round_robin":
        order = [i % len(names) for i in range(steps)]
    else:
        p = shares(sizes, sampling, temperature)
        order = rng.choice(len(names), size=steps, p=[p[t] for t in names]).tolist()
    perms = {t: rng.permutation(sizes[t]) for t in names}
    pos = dict.fromkeys(names, 0)
    rows: list[tuple[str, int]] = []
    counts = dict.fromkeys(names, 0)
    for i in order:
        t = names[i]
        counts[t] += 1
        for _ in range(batch_size):
            if pos[t] == sizes[t]:
                perms[t], pos[t] = rng.permutation(sizes[t]), 0
            rows.append((t, int(perms[t][pos[t]])))
            pos[t] += 1
    return rows, counts


def total_steps(cfg: Finetune, examples: int) -> int:
    """finetune.max_steps, or the steps epochs over `examples` take."""
    return cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * examples / cfg.batch_size))
