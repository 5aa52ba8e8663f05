"""Text generation with a causal LM: the one home of sampling settings, prompt encoding and `generate` calls.

Pretraining's samples, `lmpipe generate`, generative evaluation and the `/generate` endpoint all call
`generate` / `stream` here; transformers' own `generate` does the work (KV cache, top-k/top-p warpers).

    from lmpipe.generation import Sampling, load_generator, generate
    model, tokenizer = load_generator(Path("models/pretrain"))
    [out] = generate(model, tokenizer, ["The film"], Sampling(max_new_tokens=40, seed=0))
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from transformers import (AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase,
                          StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmpipe.errors import ConfigError, DataError
from lmpipe.modeling import PACKAGE_PREFIX, from_pretrained, load_tokenizer, max_positions, resolve_model_ref


class Sampling(BaseModel):
    """How to pick each next token. temperature 0 is greedy decoding (top_k / top_p are then unused)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None

    @classmethod
    def parse(cls, where: str = "", flags: bool = False, **values) -> "Sampling":
        """Validated settings, or one ConfigError line naming the first bad field (`where` prefixes it; flags:
        spelled as the command-line flag, `--max-new-tokens`). None values take the default."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"])
            field = "--" + field.replace("_", "-") if flags else field
            raise ConfigError(f"{where}{field}: {err['msg']} (got {err.get('input')!r})") from None

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {"do_sample": True, "temperature": self.temperature, "max_new_tokens": self.max_new_tokens,
                "top_k": self.top_k or 0, "top_p": self.top_p}


@dataclass
class Generated:
    prompt: str
    text: str
    """The new text only (the prompt is not repeated)."""
    prompt_tokens: int
    new_tokens: int


def is_causal_lm(path: Path) -> bool:
    """Whether the HF model dir at `path` holds a decoder that can generate (not an encoder such as MiniLM)."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())  # LlamaForCausalLM, GPT2LMHeadModel, ...
    return bool(getattr(config, "is_decoder", False)) or any(a in heads or a.endswith("ForCausalLM")
                                                             for a in config.architectures or ())


def load_generator(path: Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and tokenizer saved in `path` (pretrain.out_dir, or a generative fine-tune), in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise DataError(f"{path}: not a model directory (no config.json)")
    if not is_causal_lm(path):
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        raise ConfigError(f"{path}: a {config.model_type} model without a causal LM head "
                          f"({', '.join(config.architectures or ['?'])}) cannot generate text; give a causal LM "
                          "(pretrain.objective: clm)")
    model = from_pretrained(AutoModelForCausalLM, path).to(device).eval()
    tokenizer = load_tokenizer(path)
    return model, tokenizer


def resolve_model(ref: str, root: Path, dst: Path | None = None) -> Path:
    """A model reference as the local folder load_generator reads: a directory (relative to `root` or absolute),
    package:NAME (an installed model package, lmpipe.modeling.resolve_model_ref), models:/NAME@ALIAS or models:/NAME/VERSION, runs:/RUN_ID/PATH, or a bare MLflow run id (its `model`
    artifact). An MLflow pyfunc model (what the registry holds) is downloaded and its `model_dir` artifact, the
    HF folder it wraps, returned (downloaded into `dst`, else a temporary folder MLflow makes). A reference that
    names nothing is a ConfigError (one line)."""
    if is_mlflow_ref(ref):
        uri = ref if ":/" in ref else f"runs:/{ref}/model"
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))
        except Exception as e:  # noqa: BLE001 - MLflow raises several types for "no such model/run/artifact"
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{ref}: no such model in the tracking store {mlflow.get_tracking_uri()} ({why})") from None
        return _hf_dir(local, ref)
    if ref.startswith(PACKAGE_PREFIX):
        try:
            return resolve_model_ref(ref, root, "MODEL")
        except DataError as e:
            raise ConfigError(str(e)) from None
    path = Path(ref).expanduser()
    path = path if path.is_absolute() else root / path
    if not (path / "config.json").is_file():
        raise ConfigError(f"{ref}: {path} is not a model directory (no config.json)")
    return path


def is_mlflow_ref(ref: str) -> bool:
    """models:/..., runs:/... or a bare MLflow run id (32 hex digits): resolved through the tracking store."""
    return ref.startswith(("models:/", "runs:/")) or re.fullmatch(r"[0-9a-f]{32}", ref) is not None


def _hf_dir(local: Path, ref: str) -> Path:
    """The HF model folder in a downloaded MLflow artifact: itself, or the pyfunc's `model_dir` artifact."""
    if (local / "config.json").is_file():
        return local
    mlmodel = local / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()).get("flavors") or {}).get("python_function") or {}
        entry = (flavor.get("artifacts") or {}).get("model_dir") or {}
        if entry.get("path") and (local / entry["path"] / "config.json").is_file():
            return local / entry["path"]
    raise ConfigError(f"{ref}: the MLflow artifact holds no Hugging Face model folder (no config.json, no pyfunc "
                      "model_dir artifact)")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Prompt ids as pretraining saw a document start: BOS + the text, never the closing EOS that the
    pipeline tokenizer's post-processor appends (the model would read the prompt as finished)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + ids


def check_length(model: PreTrainedModel, n_prompt: int, sampling: Sampling) -> None:
    limit = max_positions(model.config)
    if n_prompt + sampling.max_new_tokens > limit:
        raise DataError(f"prompt of {n_prompt} tokens + max_new_tokens {sampling.max_new_tokens} exceeds the "
                        f"model's {limit} positions")


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kw):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling):
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    for n in ids:
        check_length(model, len(n), sampling)
    width = max(len(n) for n in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # left padding: every row's last position is its prompt's last token, where generation continues
    input_ids = torch.tensor([[pad] * (width - len(n)) + n for n in ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(n)) + [1] * len(n) for n in ids], device=model.device)
    return ids, input_ids, mask


def _call_kwargs(tokenizer, sampling: Sampling) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {**sampling.generate_kwargs(), "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling,
             cancel: threading.Event | None = None) -> list[Generated]:
    """One batched `generate` call over `prompts` (left padded); seeded by sampling.seed when given."""
    ids, input_ids, mask = _batch(model, tokenizer, prompts, sampling)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    stop = StoppingCriteriaList([_Cancel(cancel)]) if cancel is not None else None
    out = model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=stop,
                         **_call_kwargs(tokenizer, sampling))
    new = out[:, input_ids.shape[1]:]
    results = []
    for prompt, n, row in zip(prompts, ids, new.tolist()):
        if tokenizer.eos_token_id in row:  # the sequence ended; the rest is padding
            row = row[:row.index(tokenizer.eos_token_id)]
        results.append(Generated(prompt, tokenizer.decode(row, skip_special_tokens=True), len(n), len(row)))
    return results


def stream(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, sampling: Sampling,
           cancel: threading.Event | None = None) -> Iterator[str]:
    """The new text of one prompt in chunks as it is produced (TextIteratorStreamer; generate runs in a
    thread). Setting `cancel` (or closing the iterator) stops the generation at the next token."""
    ids, input_ids, mask = _batch(model, tokenizer, [prompt], sampling)
    cancel = cancel or threading.Event()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    failure: list[BaseException] = []

    def work():
        try:
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer,
                               stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]),
                               **_call_kwargs(tokenizer, sampling))
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=work, name="lmpipe-generate", daemon=True)
    thread.start()
    try:
        for chunk in streamer:
            if chunk:
                yield chunk
    finally:
        cancel.set()
        thread.join()
    if failure:
        raise failure[0]
