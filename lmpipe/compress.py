"""Compressed variants of the fine-tuned classifier, built, loaded and measured in one place.

    python -m stages.deploy      # builds deploy.variants, scores each on the test split, gates, registers

Variants (`deploy.variants`):
- `fp32`          the fine-tuned directory as it is;
- `int8_dynamic`  PyTorch dynamic quantisation of every nn.Linear (int8 weights, activations quantised per
                  batch at run time); stored as the quantised state dict (`model_int8.pt`) + config;
- `onnx`          ONNX export (torch.onnx, opset 17, dynamic batch and sequence axes) run by ONNX Runtime;
- `onnx_int8`     that graph through ONNX Runtime's dynamic quantiser (int8 weights);
- `pruned`        L1 magnitude pruning (torch.nn.utils.prune) of `deploy.sparsity` of every encoder Linear's
                  weights, made permanent (prune.remove) before saving: a plain transformers directory;
- `ensemble`      the fine-tuned model and the classifiers of `deploy.ensemble` (any variant each, the same tasks
                  and labels), copied whole under `members/<i>/`; it predicts the mean of their probabilities
                  (each member reads the text with its own tokenizer and length).

Every variant directory holds the tokenizer, config.json and `lmpipe_variant.json`; `load(dir)` returns a
classifier with `predict_proba(texts, batch_size)` for any of them, which evaluate's scoring, the deploy
gate, the MLflow pyfunc and `lmpipe serve` all call: inputs are truncated at the length stored with the
model, as in `lmpipe.evaluation.predict_proba`.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.utils.prune as prune
from onnxruntime.quantization import QuantType, quantize_dynamic
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from lmpipe.embeddings import encode
from lmpipe.errors import DataError
from lmpipe.evaluation import length_batches, predict_proba
from lmpipe.modeling import (
    ADAPTER_CONFIG,
    INT8_WEIGHTS,
    VARIANT_FILE,
    load_finetuned,
    load_int8,
    load_tokenizer,
    quantize_int8,
    stored_max_length,
    variant_of,
)
from lmpipe.names import VARIANTS
from lmpipe.tasks import Layout

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", INT8_WEIGHTS, "model.onnx", "model.int8.onnx")
MEMBERS = "members"
"""An ensemble's member directories: members/0 (the fine-tuned model), members/1, ..."""
GENERATOR_VARIANTS = ("fp32", "int8_dynamic")
"""The variants a generator (finetune.head lm) gets; the others export or prune a classifier's logits."""


def _copy_without_weights(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in WEIGHT_FILES and not f.name.startswith("training_args"):
            shutil.copy2(f, dest / f.name)


def supports(src: Path, variant: str) -> str | None:
    """Why `variant` cannot be built from the fine-tuned directory `src`, or None."""
    if variant not in ("fp32", "ensemble") and (src / ADAPTER_CONFIG).is_file():
        return "prefix/prompt adapters (virtual tokens) are not exported; only fp32 is served for them"
    return None


def build(variant: str, src: Path, dest: Path, sparsity: float, members: dict[str, Path] | None = None) -> None:
    """Write the variant of the fine-tuned classifier in `src` to `dest` (a new directory). `members` (ensemble):
    what deploy.ensemble named -> its local model directory."""
    if variant == "ensemble":
        check_members(src, members or {})
        _copy_without_weights(src, dest)
        for i, path in enumerate([src, *members.values()]):
            shutil.copytree(path, dest / MEMBERS / str(i))
    elif variant == "fp32":
        shutil.copytree(src, dest)
    elif variant == "pruned":
        model = load_finetuned(src).eval()
        head = _head_names(model)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name not in head:  # the head stays dense
                prune.l1_unstructured(module, "weight", amount=sparsity)
                prune.remove(module, "weight")  # permanent: the zeros are the weights
        _copy_without_weights(src, dest)
        model.save_pretrained(dest)
    elif variant == "int8_dynamic":
        model = quantize_int8(load_finetuned(src).eval())
        _copy_without_weights(src, dest)
        torch.save(model.state_dict(), dest / INT8_WEIGHTS)
    elif variant in ("onnx", "onnx_int8"):
        _copy_without_weights(src, dest)
        _export_onnx(load_finetuned(src).eval(), dest / "model.onnx")
        if variant == "onnx_int8":
            # here, not at the top: the quantiser (it imports onnx) costs 1.0-1.2 s (measured on 2 cores after
            # torch), and only this one variant's build needs it, never a load
            quantize_dynamic(str(dest / "model.onnx"), str(dest / "model.int8.onnx"), weight_type=QuantType.QInt8)
            (dest / "model.onnx").unlink()
    else:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    meta = {"variant": variant, **({"sparsity": sparsity} if variant == "pruned" else {}),
            **({"members": ["finetune.out_dir", *members]} if variant == "ensemble" else {})}
    (dest / VARIANT_FILE).write_text(json.dumps(meta) + "\n")


def check_members(src: Path, members: dict[str, Path]) -> None:
    """An ensemble's other members (what deploy.ensemble named -> its directory) against the fine-tuned model in
    `src`: at least one, none itself an ensemble, each with the same tasks and labels; else one line naming it."""
    if not members:
        raise DataError("deploy.ensemble: the ensemble variant needs at least one other model")
    own = Layout.from_config(AutoConfig.from_pretrained(src))
    for source, path in members.items():
        if variant_of(path) == "ensemble":
            raise DataError(f"deploy.ensemble: {source} is itself an ensemble; name its members instead")
        theirs = Layout.from_config(AutoConfig.from_pretrained(path))
        if (theirs.names, theirs.labels) != (own.names, own.labels):
            raise DataError(f"deploy.ensemble: {source} predicts {_described(theirs)}, the fine-tuned model "
                            f"{_described(own)}")


def _described(layout: Layout) -> str:
    return "; ".join(f"{name}: {list(labels)}" for name, labels in zip(layout.names, layout.labels))


def _head_names(model) -> set[str]:
    """The classification head's Linear modules (`score` for Llama/GPT-2, `classifier` for BERT)."""
    return {n for n, _ in model.named_modules() if n.split(".")[0] in ("score", "classifier")}


def build_generator(variant: str, src: Path, dest: Path) -> None:
    """Write the variant (GENERATOR_VARIANTS) of the causal LM in `src` to `dest`; lmpipe.generation.load_generator
    reads either."""
    if variant == "fp32":
        shutil.copytree(src, dest)
    elif variant == "int8_dynamic":
        model = quantize_int8(AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval())
        _copy_without_weights(src, dest)
        torch.save(model.state_dict(), dest / INT8_WEIGHTS)
    else:
        raise ValueError(f"variant {variant!r} is not built for a generator; one of {', '.join(GENERATOR_VARIANTS)}")
    (dest / VARIANT_FILE).write_text(json.dumps({"variant": variant}) + "\n")


def _export_onnx(model, path: Path) -> None:
    model.config.use_cache = False  # a KV cache object is no ONNX input/output
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings on transformers' masks
        torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes=axes, opset_version=17, dynamo=False)


class Classifier:
    """Any variant directory: texts -> (N, num_labels) probabilities; `.id2label`, `.variant`."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.dir = Path(model_dir)
        self.variant = variant_of(self.dir)
        self.config = AutoConfig.from_pretrained(self.dir)
        self.id2label = {int(k): v for k, v in self.config.id2label.items()}
        self.layout = Layout.from_config(self.config)  # a multi-task model: one head (label block) per task
        self.tokenizer = load_tokenizer(self.dir)
        self.max_length = stored_max_length(self.tokenizer, self.config)
        self.device = device if self.variant in ("fp32", "pruned", "ensemble") else "cpu"  # int8, ONNX Runtime: CPU
        self.model = self.session = None
        self.members: list[Classifier] = []
        if self.variant == "ensemble":
            self.members = [Classifier(d, device) for d in sorted((self.dir / MEMBERS).iterdir(),
                                                                   key=lambda d: int(d.name))]
        elif self.variant in ("onnx", "onnx_int8"):
            onnx = self.dir / ("model.int8.onnx" if self.variant == "onnx_int8" else "model.onnx")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()  # the same threads as the torch variants
            self.session = ort.InferenceSession(str(onnx), opts, providers=["CPUExecutionProvider"])
        elif self.variant == "int8_dynamic":
            self.model = load_int8(AutoModelForSequenceClassification, self.dir)
        else:
            self.model = load_finetuned(self.dir).eval().to(self.device)

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        if self.members:  # within each task's head the members' probabilities, averaged
            return np.mean([m.predict_proba(texts, batch_size) for m in self.members], axis=0, dtype=np.float64
                           ).astype(np.float32)
        if self.model is not None:
            return predict_proba(self.model, self.tokenizer, texts, batch_size, self.device, self.max_length)
        out = np.zeros((len(texts), len(self.id2label)), dtype=np.float32)
        for idx, enc in length_batches(self.tokenizer, texts, batch_size, self.max_length, return_tensors="np"):
            logits = self.session.run(["logits"], {"input_ids": enc["input_ids"].astype(np.int64),
                                                   "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
            out[idx] = self.layout.softmax(logits)  # within each task's head, (B, num_labels)
        return out

    def embed_unsupported(self) -> str | None:
        if self.members:
            return "the ensemble variant averages its members' probabilities and has no one encoder; serve fp32 for /embed"
        if self.model is None:
            return (f"the {self.variant} variant exports logits only; serve an fp32, int8_dynamic or pruned variant "
                    "for /embed")
        return None

    def embed(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        """L2-normalised mean-pooled embeddings of the classifier's encoder (lmpipe/embeddings.py)."""
        return encode(self.model, self.tokenizer, texts, batch_size, self.device, "mean", self.max_length).tolist()

    def tasks(self) -> dict[str, list[str]]:
        """Task name -> its label names (a single-task model: one task, named "default")."""
        return {t: list(labels) for t, labels in zip(self.layout.names, self.layout.labels)}

    def predict(self, texts: list[str], batch_size: int = 64, tasks: list[str | None] | None = None
                ) -> list[dict[str, Any]]:
        """[{label, score}] per text; `tasks` names each text's task (None: the default, first task). One forward
        pass serves every task: the encoder is shared, each text reads its own task's head."""
        probs = self.predict_proba(texts, batch_size)
        out = []
        for row, task in zip(probs, tasks or [None] * len(texts)):
            name = self.layout.resolve(task)
            block = row[self.layout.span(name)]
            i = int(block.argmax())
            out.append({"label": self.layout.labels[self.layout.index(name)][i], "score": float(block[i])})
        return out


def load(model_dir: str | Path, device: str = "cpu") -> Classifier:
    return Classifier(model_dir, device)


def size_mb(model_dir: Path) -> float:
    """The variant directory on disk (weights, config, tokenizer), MiB."""
    return sum(f.stat().st_size for f in Path(model_dir).rglob("*") if f.is_file()) / 2**20


def latency_ms(clf: Classifier, texts: list[str], batch: int, repeats: int) -> float:
    """Median wall time of one forward pass over `batch` texts (after one warm-up), ms."""
    chunk = (texts * (batch // max(len(texts), 1) + 1))[:batch]
    clf.predict_proba(chunk, batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.predict_proba(chunk, batch)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
