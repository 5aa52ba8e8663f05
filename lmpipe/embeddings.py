"""Sentence embeddings: pooling an encoder's hidden states, their quality (alignment, uniformity, a frozen probe),
and the encoder-only model the server answers /embed with.

    pretrain.objective: simcse      # lmpipe/contrastive.py trains the encoder; evaluate measures it here

Embeddings are pooled over the real tokens (mean) or taken at the first token (cls), then L2-normalised:
cosine similarity is their dot product, as in SimCSE and sentence-transformers. A SimCSE encoder records its
pooling in its config.json (`lmpipe_pooling`), so every path pools it the way it was trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel

from lmpipe.evaluation import length_batches
from lmpipe.modeling import load_tokenizer, stored_max_length
# Imported inside functions (start-up cost, docs/results.md#start-up): scikit-learn where used: only the linear probe
# needs it.

POOLING_KEY = "lmpipe_pooling"


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) attention mask -> (B, H): the mean over real tokens, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The bare encoder of a classifier (bert, model, transformer: transformers' base_model), or the model itself."""
    if hasattr(model, "get_base_model"):  # a peft model (prefix/prompt classifiers)
        model = model.get_base_model()
    return getattr(model, "base_model", model)


@torch.inference_mode()
def encode(model: torch.nn.Module, tokenizer, texts: list[str], batch_size: int, device: str,
           pooling: str = "mean", max_length: int = 128) -> np.ndarray:
    """(N, H) L2-normalised embeddings of `texts`, rows in their order (eval mode: no dropout; length-sorted
    batches, lmpipe.evaluation.length_batches)."""
    encoder = encoder_of(model).eval().to(device)
    out = np.zeros((len(texts), int(encoder.config.hidden_size)), dtype=np.float32)
    for idx, enc in length_batches(tokenizer, texts, batch_size, max_length):
        enc = enc.to(device)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        out[idx] = torch.nn.functional.normalize(pool(hidden.float(), enc["attention_mask"], pooling), dim=-1).cpu().numpy()
    return out


def alignment(x: np.ndarray, y: np.ndarray) -> float:
    """Wang & Isola (2020): E ||f(x) - f(y)||^2 over positive pairs (normalised embeddings); lower is better."""
    return float(((x - y) ** 2).sum(-1).mean())


def uniformity(x: np.ndarray, t: float = 2.0) -> float:
    """Wang & Isola (2020): log E exp(-t ||f(x) - f(y)||^2) over all pairs of distinct examples; lower is better."""
    sq = np.clip(2.0 - 2.0 * (x @ x.T), 0.0, None)  # squared distances of unit vectors
    iu = np.triu_indices(len(x), k=1)
    d = -t * sq[iu]
    m = d.max()
    return float(m + np.log(np.exp(d - m).mean()))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int,
          k: int = 10) -> dict[str, float]:
    """Frozen-encoder accuracy on a labelled task: a logistic-regression probe and cosine k-NN (k neighbours)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    linear = float((clf.predict(test_x) == test_y).mean())
    sims = test_x @ train_x.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    votes = train_y[top]
    knn = np.array([np.bincount(v, minlength=int(train_y.max()) + 1).argmax() for v in votes])
    return {"linear_probe_accuracy": linear, "knn_accuracy": float((knn == test_y).mean())}


def report(before, after, tokenizer, held_out: list[str], positives: list[str], probe_train: tuple[list[str], np.ndarray],
           probe_test: tuple[list[str], np.ndarray], pooling: str, batch_size: int, device: str, seed: int,
           max_length: int) -> dict[str, Any]:
    """Alignment (held-out sentence vs its perturbed copy), uniformity (held-out sentences) and the frozen probes
    (SST-2) of the encoder before and after contrastive training, and after minus before."""
    out: dict[str, Any] = {}
    for name, model in (("before", before), ("after", after)):
        enc = lambda texts: encode(model, tokenizer, texts, batch_size, device, pooling, max_length)  # noqa: E731
        x, y = enc(held_out), enc(positives)
        out[name] = {"alignment": alignment(x, y), "uniformity": uniformity(x),
                     **probe(enc(probe_train[0]), probe_train[1], enc(probe_test[0]), probe_test[1], seed)}
    out["difference"] = {k: out["after"][k] - out["before"][k] for k in out["after"]}
    out["held_out_sentences"], out["probe_train_examples"] = len(held_out), len(probe_train[0])
    return out


class Encoder:
    """An encoder-only model directory (a SimCSE pretrain output): texts -> embeddings; no classifier head."""

    variant = "fp32"

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir)
        self.model = AutoModel.from_pretrained(self.model_dir).eval().to(device)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.max_length = stored_max_length(self.tokenizer, self.config)
        self.pooling = getattr(self.config, POOLING_KEY, "mean")
        self.device = device

    def tasks(self) -> dict[str, list[str]]:
        return {}

    def predict(self, texts, batch_size=64, tasks=None) -> list[dict[str, Any]]:
        raise TypeError("an encoder without a classifier head has no predictions")

    def embed_unsupported(self) -> str | None:
        return None

    def embed(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        return encode(self.model, self.tokenizer, texts, batch_size, self.device, self.pooling, self.max_length).tolist()


def is_encoder_only(model_dir: Path) -> bool:
    """A model directory whose architecture has no head (BertModel, ...): served for /embed only."""
    cfg = Path(model_dir) / "config.json"
    archs = json.loads(cfg.read_text()).get("architectures") or [] if cfg.is_file() else []
    return bool(archs) and all(a.endswith("Model") and not a.endswith("LMHeadModel") for a in archs)
