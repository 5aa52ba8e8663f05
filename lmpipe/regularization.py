"""Regularisation beyond weight decay for fine-tuning: dropout override, text augmentation, adversarial training.

    python -m stages.finetune --set finetune.adversarial.method=fgm --set finetune.augment.copies=1

Label smoothing and early stopping are Trainer's own (label_smoothing_factor, EarlyStoppingCallback; wired in
lmpipe/training.py). What Trainer lacks lives here:
- `dropout_overrides`: one dropout probability for every dropout setting the model's config has;
- `augment`: seeded random deletion / swap / insertion of in-vocabulary words (Wei & Zou 2019, EDA, without
  its WordNet synonyms, which would need a download), and model-based replacement of words: contextual (a
  masked LM's top predictions in the sentence, Kobayashi 2018) or neighbour (nearest tokens in a model's
  input-embedding space, synonyms from the encoder's own vocabulary); the training split only;
- `EmbeddingAdversary`: FGM (Miyato et al. 2017) and PGD (Madry et al. 2018, on embeddings as in FreeLB)
  perturbations of the word embeddings' output, used by FinetuneTrainer.training_step;
- `rdrop_loss` / `check_rdrop`: R-Drop (Liang et al. 2021), two dropout passes of one batch pulled together by
  a symmetric KL, used by FinetuneTrainer.compute_loss (finetune.rdrop_alpha).
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, PretrainedConfig

from lmpipe.config import Adversarial, Augment
from lmpipe.errors import ConfigError, DataError
from lmpipe.modeling import checkpoint_objective, stored_max_length

DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "summary_last_dropout",
                "hidden_dropout", "dropout", "seq_classif_dropout", "qa_dropout", "classifier_dropout_prob",
                "dropout_rate", "activation_dropout")
"""Config attributes that hold a dropout probability (BERT, Llama, GPT-2, DistilBERT, ALBERT, ELECTRA, T5 and
most other transformers configs)."""


def dropout_overrides(config: PretrainedConfig, p: float | None) -> dict[str, float]:
    """{config key: p} for every dropout setting `config` has; {} when p is None (keep the model's own)."""
    if p is None:
        return {}
    keys = [k for k in DROPOUT_KEYS if k in config.to_dict()]
    if not keys:
        raise ConfigError(f"finetune.dropout: {type(config).__name__} has no dropout setting to override")
    return {k: p for k in keys}


# -- augmentation -------------------------------------------------------------------------------------------

def _augment_one(words: list[str], op: str, p: float, vocabulary: list[str], rng: random.Random) -> list[str]:
    """One operation on one example's words; touches max(1, round(p * len)) words (deletion: each with p)."""
    n = max(1, round(p * len(words)))
    out = list(words)
    if op == "delete":
        kept = [w for w in out if rng.random() >= p]
        if len(kept) == len(out) and len(out) > 1:  # at least one word goes
            kept.pop(rng.randrange(len(kept)))
        return kept if kept else [rng.choice(out)]
    if op == "swap":
        for _ in range(n if len(out) > 1 else 0):
            i, j = rng.sample(range(len(out)), 2)
            out[i], out[j] = out[j], out[i]
        return out
    for _ in range(n):  # insert
        out.insert(rng.randint(0, len(out)), rng.choice(vocabulary))
    return out


MODEL_OPS = ("contextual", "neighbour")


def augment(df: pd.DataFrame, cfg: Augment, seed: int, model_dir: Path | None = None, batch_size: int = 64
            ) -> pd.DataFrame:
    """The training split with cfg.copies augmented copies of each example appended (labels kept), seeded.
    Inserted words come from the split's own vocabulary (whitespace words); contextual and neighbour draw
    replacements from the model in `model_dir` (augment.model resolved), run in batches of `batch_size`.
    copies 0 returns `df` itself."""
    if cfg.copies == 0 or df.empty:
        return df
    rng = random.Random(seed)
    vocabulary = sorted({w for text in df["text"] for w in text.split()})
    rows: list[dict] = []
    pending: dict[str, list[tuple[int, list[str], list[int], random.Random]]] = {op: [] for op in MODEL_OPS}
    for text, label in zip(df["text"], df["label"]):
        words = text.split()
        for _ in range(cfg.copies):
            op = rng.choice(cfg.ops)
            if op in MODEL_OPS and words:  # filled in below, all of an op's copies in batches
                n = max(1, round(cfg.probability * len(words)))
                pending[op].append((len(rows), words, sorted(rng.sample(range(len(words)), n)),
                                    random.Random(rng.getrandbits(64))))
                rows.append({"text": text, "label": label})
            else:
                rows.append({"text": " ".join(_augment_one(words, op, cfg.probability, vocabulary, rng)) if words
                             else text, "label": label})
    if any(pending.values()):
        replacer = WordReplacer(model_dir, contextual=bool(pending["contextual"]), top_k=cfg.top_k)
        for op, items in pending.items():
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                for (row, *_), words in zip(chunk, replacer.replace(op, [c[1:] for c in chunk])):
                    rows[row]["text"] = " ".join(words)
    return pd.concat([df[["text", "label"]], pd.DataFrame(rows)], ignore_index=True)


class WordReplacer:
    """Replacement words from a model: `contextual`, the masked LM's top_k predictions at each chosen word
    masked in its sentence; `neighbour`, the top_k tokens nearest the word by cosine of the input embeddings
    (a word that is not one token of the model's vocabulary stays). Candidates are whole alphabetic words of
    the vocabulary (no subword pieces, no special tokens), never the word itself; each copy draws from them with
    its own seeded generator, and the model runs in eval mode, so the result is reproducible."""

    def __init__(self, model_dir: Path | None, contextual: bool, top_k: int) -> None:
        if model_dir is None:
            raise ConfigError("finetune.augment.model: contextual / neighbour need a model")
        self.top_k = top_k
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if contextual:
            config = AutoConfig.from_pretrained(model_dir)
            if checkpoint_objective(config) != "mlm" or self.tokenizer.mask_token is None:
                raise DataError(f"finetune.augment.model: {model_dir} ({type(config).__name__}) is not a masked LM: "
                                "contextual needs a masked LM (use neighbour, or an encoder after pretrain.objective "
                                "mlm)")
            self.model, info = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
            head = [k for k in info["missing_keys"] if "embeddings" not in k and "encoder" not in k]
            if head:
                raise DataError(f"finetune.augment.model: {model_dir} has no trained masked-LM head (missing "
                                f"{head[0]}, ...): contextual needs one (use neighbour, or pretrained after "
                                "pretrain.objective mlm)")
        else:
            self.model = AutoModel.from_pretrained(model_dir)
        self.model.eval()
        width = self.model.get_input_embeddings().weight.shape[0]  # the model's vocabulary (>= the tokenizer's)
        vocab = self.tokenizer.convert_ids_to_tokens(list(range(min(len(self.tokenizer), width))))
        special = set(self.tokenizer.all_special_ids)
        words = [self.tokenizer.convert_tokens_to_string([t]).strip() for t in vocab]
        alpha = [i for i, w in enumerate(words) if i not in special and w.isalpha()]
        # a candidate is a whole word: written alone in a text, it is this one token (not a word-inner piece)
        alone = {form: self.tokenizer([form + words[i] for i in alpha], add_special_tokens=False)["input_ids"]
                 for form in ("", " ")}
        self.word_of = {i: words[i] for k, i in enumerate(alpha) if [i] in (alone[""][k], alone[" "][k])}
        self.eligible = torch.zeros(width, dtype=torch.bool)
        self.eligible[list(self.word_of)] = True
        self.k = min(top_k + 1, len(self.word_of))  # candidates asked of the model: the word itself may be one
        self.max_length = stored_max_length(self.tokenizer, self.model.config)
        self._neighbours: dict[int, list[int]] = {}

    def replace(self, op: str, items: list[tuple[list[str], list[int], random.Random]]) -> list[list[str]]:
        return self._contextual(items) if op == "contextual" else [self._neighbour(*item) for item in items]

    def _draw(self, candidates: list[int], word: str, rng: random.Random) -> str:
        names = [self.word_of[c] for c in candidates
                 if c in self.word_of and self.word_of[c].lower() != word.lower()][:self.top_k]
        return rng.choice(names) if names else word

    def _token(self, word: str) -> int | None:
        for form in (word, " " + word):  # WordPiece: the word; byte-level BPE: the word after a space
            ids = self.tokenizer(form, add_special_tokens=False)["input_ids"]
            if len(ids) == 1 and ids[0] in self.word_of:
                return ids[0]
        return None

    @torch.inference_mode()
    def _neighbour(self, words: list[str], positions: list[int], rng: random.Random) -> list[str]:
        out = list(words)
        for i in positions:
            token = self._token(words[i])
            if token is None:
                continue
            if token not in self._neighbours:
                emb = self.model.get_input_embeddings().weight
                sims = F.cosine_similarity(emb[token][None, :], emb, dim=-1).masked_fill(~self.eligible, -2.0)
                self._neighbours[token] = sims.topk(self.k).indices.tolist()
            out[i] = self._draw(self._neighbours[token], words[i], rng)
        return out

    @torch.inference_mode()
    def _contextual(self, items: list[tuple[list[str], list[int], random.Random]]) -> list[list[str]]:
        mask = self.tokenizer.mask_token
        texts = [" ".join(mask if i in set(positions) else w for i, w in enumerate(words))
                 for words, positions, _ in items]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        where = enc["input_ids"] == self.tokenizer.mask_token_id
        logits = self.model(**enc).logits[where]  # (masks, V): the masked slots only, in reading order
        ranked = logits.masked_fill_(~self.eligible, float("-inf")).topk(self.k).indices.tolist()
        out, slot = [], 0
        for b, (words, positions, rng) in enumerate(items):
            new = list(words)
            for i in positions[:int(where[b].sum())]:  # a mask cut off by truncation keeps its word
                new[i] = self._draw(ranked[slot], words[i], rng)
                slot += 1
            out.append(new)
        return out


# -- adversarial training -----------------------------------------------------------------------------------

def _per_example_unit(g: torch.Tensor) -> torch.Tensor:
    """g / ||g|| with the L2 norm taken per example over all its tokens' embeddings. g: (B, T, H)."""
    norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """delta scaled back into the L2 ball of radius epsilon, per example."""
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (epsilon / norm).clamp(max=1.0)
    return delta * factor.view(-1, *([1] * (delta.dim() - 1)))


class EmbeddingAdversary:
    """Perturbs the output of the model's input-embedding module (a forward hook), so it works with every
    strategy, frozen embeddings and peft adapters included: the perturbation is on the embedded tokens, not on
    the embedding matrix. `capture()` records d loss / d embeddings of the pass it wraps; `applied(delta)`
    adds delta to the embeddings of the pass it wraps."""

    def __init__(self, model: torch.nn.Module, cfg: Adversarial) -> None:
        self.cfg = cfg
        self._capture = False
        self._delta: torch.Tensor | None = None
        self.embedded: torch.Tensor | None = None
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self._delta is not None:
            output = output + self._delta
        if self._capture:
            if not output.requires_grad:  # frozen embeddings (freeze, peft): make the output a leaf that records
                output = output.detach().requires_grad_()
            else:
                output.retain_grad()
            self.embedded = output
        return output

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        self._capture, self.embedded = True, None
        try:
            yield
        finally:
            self._capture = False

    @contextlib.contextmanager
    def applied(self, delta: torch.Tensor) -> Iterator[None]:
        self._delta = delta
        try:
            yield
        finally:
            self._delta = None

    def first_step(self, grad: torch.Tensor) -> torch.Tensor:
        """The perturbation after the clean pass: FGM epsilon * unit gradient; PGD one step of alpha (projected)."""
        if self.cfg.method == "fgm":
            return self.cfg.epsilon * _per_example_unit(grad)
        return _project(self.cfg.alpha * _per_example_unit(grad), self.cfg.epsilon)

    def ascend(self, delta: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """One more PGD step from delta along grad (d loss / d perturbed embeddings), projected."""
        return _project(delta + self.cfg.alpha * _per_example_unit(grad), self.cfg.epsilon)

    def remove(self) -> None:
        self._handle.remove()


def check_rdrop(model: torch.nn.Module, alpha: float) -> None:
    """R-Drop compares two dropout masks: refuse a model without dropout (both passes would be the same, the KL
    term 0, and the step twice the cost for nothing). Dropout is a Dropout module with p > 0, or a dropout
    setting of the config above 0 (Llama applies its attention dropout as a function, not a module)."""
    config = getattr(model, "config", None)
    configured = any(isinstance(v := getattr(config, k, None), float) and v > 0 for k in DROPOUT_KEYS)
    if alpha > 0 and not configured and not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        raise ConfigError(f"finetune.rdrop_alpha: {alpha} needs dropout in the model, and every dropout of this one is "
                          "0; set finetune.dropout (e.g. 0.1)")


def rdrop_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float, smoothing: float = 0.0) -> torch.Tensor:
    """R-Drop's loss, summed over the examples (the caller divides): `logits` (2B, C) are the batch's two dropout
    passes stacked, `labels` (B,). Per example: mean of the two cross-entropies + alpha x half the symmetric KL
    between the two predicted distributions."""
    first, second = logits.float().chunk(2)  # (B, C) each
    ce = F.cross_entropy(logits.float(), torch.cat([labels, labels]), reduction="sum", label_smoothing=smoothing) / 2
    lp, lq = F.log_softmax(first, -1), F.log_softmax(second, -1)
    kl = (F.kl_div(lp, lq, log_target=True, reduction="sum") + F.kl_div(lq, lp, log_target=True, reduction="sum")) / 2
    return ce + alpha * kl
