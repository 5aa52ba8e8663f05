"""Model construction on `transformers` configs: no architecture code lives here.

`build_lm_config` maps the pretrain params section to a Llama, GPT-2 or BERT config; the
classifier helpers load a pretrained LM (or its random-init twin) with a classification head.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification, AutoTokenizer, BertConfig, GPT2Config,
                          LlamaConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from lmpipe.config import Pretrain
from lmpipe.errors import ConfigError, DataError


def build_lm_config(cfg: Pretrain, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """A from-scratch config sized by params; vocabulary and special ids from the tokenizer."""
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    vocab = len(tokenizer)
    if cfg.arch == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                           num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                           num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
                           attention_dropout=cfg.dropout, tie_word_embeddings=True, **ids)
    if cfg.arch == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=cfg.hidden_size, n_inner=cfg.intermediate_size,
                          n_layer=cfg.num_layers, n_head=cfg.num_heads, n_positions=cfg.max_position_embeddings,
                          resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, **ids)
    if cfg.arch == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                          num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                          max_position_embeddings=cfg.max_position_embeddings, hidden_dropout_prob=cfg.dropout,
                          attention_probs_dropout_prob=cfg.dropout, type_vocab_size=1, **ids)
    raise ConfigError(f"pretrain.arch: unknown architecture {cfg.arch!r}")


def attention_implementation(cfg: Pretrain) -> str:
    """auto -> eager under torch.compile (inductor fuses mask + softmax into its own kernels, which measured
    faster on CPU than SDPA's flash kernel at short contexts, in bf16 especially; README, Pretraining),
    sdpa otherwise."""
    if cfg.attention != "auto":
        return cfg.attention
    return "eager" if cfg.compile else "sdpa"


def build_lm(config: PretrainedConfig, objective: str, attention: str = "sdpa") -> PreTrainedModel:
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    return auto.from_config(config, attn_implementation=attention)


def max_positions(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def check_vocab(model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range: refuse early."""
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size} (tokenizer and model do not belong together)")


def resolve_init(init: str, root: Path, pretrained_dir: str) -> Path | None:
    """pretrained -> the pretrain stage's output; scratch -> None; anything else is a local HF dir."""
    if init == "scratch":
        return None
    path = root / pretrained_dir if init == "pretrained" else Path(init).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(f"finetune.init: {path} is not a Hugging Face model directory (no config.json)")
    return path


def load_classifier(source: Path, num_labels: int, id2label: dict[int, str], random_init: bool,
                    pad_token_id: int | None) -> PreTrainedModel:
    """Sequence classifier on the model in `source`; random_init keeps only its config (the scratch twin)."""
    kwargs = dict(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    if random_init:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        return AutoModelForSequenceClassification.from_config(config)
    model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def save_classifier(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int, out: Path) -> None:
    """Model (safetensors) + tokenizer, with the tokenizer's model_max_length set to the length the model
    was fine-tuned at: every prediction path reads it back (stored_max_length), so none truncates differently."""
    tokenizer.model_max_length = max_length
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def stored_max_length(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig) -> int:
    """The truncation length saved with a classifier (its tokenizer's model_max_length), capped by the
    model's positions; a tokenizer that recorded none (transformers' huge sentinel) gets the positions."""
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    stored = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    known = [int(v) for v in (stored, positions) if v]
    return min(known) if known else 512  # neither recorded: BERT's context, the common default


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not path.is_dir():
        raise DataError(f"{path}: tokenizer directory missing; run the tokenize stage first")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # GPT-style tokenizers ship without one; classification batches need it
        tok.pad_token = tok.eos_token
    return tok
