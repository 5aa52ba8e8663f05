"""Text generation with a causal LM: the one home of sampling settings, prompt encoding and `generate` calls.

Pretraining's samples, `lmpipe generate`, generative evaluation and the `/generate` endpoint all call
`generate` / `stream` / `generate_rows` here; transformers' own `generate` does the work (KV cache, top-k/top-p
warpers). `generate_rows` runs many requests as the rows of one call, each streamed on its own (`RowStreamer`).

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
from transformers.generation.streamers import BaseStreamer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmpipe import chat
from lmpipe.errors import ConfigError, DataError
from lmpipe.modeling import (PACKAGE_PREFIX, from_pretrained, load_int8, load_tokenizer, max_positions, resolve_model_ref,
                             variant_of)


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

    def batch_key(self) -> tuple | None:
        """What two requests must share to run as rows of one `generate_rows` call: everything but
        max_new_tokens (each row stops at its own). None: this request runs alone, because seeded sampling draws
        from one generator for the whole batch, so its text would depend on the rows beside it."""
        if self.temperature == 0:
            return ("greedy",)  # the seed draws nothing
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_k or 0, self.top_p)

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
    if variant_of(path) == "int8_dynamic":  # deploy's quantised variant: CPU only
        model = load_int8(AutoModelForCausalLM, path)
    else:
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
    return encode_prompts(tokenizer, [prompt])[0]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """encode_prompt of many texts in one batched tokenizer call (generative fine-tuning encodes every
    conversation and its turns' prefixes this way). A text that already starts with the BOS token (a
    checkpoint's chat template that writes it) gets no second one."""
    bos, bos_text = tokenizer.bos_token_id, tokenizer.bos_token
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
    return [([bos] if bos is not None and not (bos_text and text.startswith(bos_text)) else []) + ids
            for text, ids in zip(prompts, encoded)]


def keep_last(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """`ids` cut to `limit` tokens from the left (the end of a prompt, where the question and the generation
    prompt are, is kept), the leading BOS kept."""
    if len(ids) <= limit:
        return ids
    head = ids[:1] if bos is not None and ids and ids[0] == bos else []
    return head + ids[len(ids) - (limit - len(head)):]


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """A chat ([{role, content}, ...]) as generative fine-tuning laid it out (lmpipe.chat.prompt_text: the
    tokenizer's chat template, the assistant's turn opened), encoded like every prompt (BOS in front unless the
    template writes it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model has no chat template (no chat_template in its tokenizer_config.json): "
                          "send a prompt instead of messages")
    return encode_prompts(tokenizer, [chat.prompt_text(tokenizer, messages)])[0]


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


def left_pad(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, longest prompt). Left padding: every row's last position is its
    prompt's last token, where generation continues."""
    width = max(len(n) for n in ids)
    input_ids = torch.tensor([[pad] * (width - len(n)) + n for n in ids], device=device)
    mask = torch.tensor([[0] * (width - len(n)) + [1] * len(n) for n in ids], device=device)
    return input_ids, mask


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _batch(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling,
           max_prompt_tokens: int | None = None):
    ids = encode_prompts(tokenizer, prompts)
    if max_prompt_tokens is not None:  # a model fine-tuned at a length: its prompts cut the way training cut them
        ids = [keep_last(n, max_prompt_tokens, tokenizer.bos_token_id) for n in ids]
    for n in ids:
        check_length(model, len(n), sampling)
    input_ids, mask = left_pad(ids, _pad_id(tokenizer), model.device)
    return ids, input_ids, mask


def _call_kwargs(tokenizer, sampling: Sampling) -> dict:
    return {**sampling.generate_kwargs(), "pad_token_id": _pad_id(tokenizer), "eos_token_id": tokenizer.eos_token_id}


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], sampling: Sampling,
             cancel: threading.Event | None = None, max_prompt_tokens: int | None = None) -> list[Generated]:
    """One batched `generate` call over `prompts` (left padded); seeded by sampling.seed when given.
    `max_prompt_tokens`: longer prompts keep their last tokens (keep_last) instead of being refused."""
    ids, input_ids, mask = _batch(model, tokenizer, prompts, sampling, max_prompt_tokens)
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


# ----------------------------------------------------------------- many requests as the rows of one generate call


@dataclass
class Row:
    """One request in a `generate_rows` call: its prompt ids, its own token limit, and its cancel flag."""

    ids: list[int]
    max_new_tokens: int
    cancel: threading.Event


@dataclass
class RowStep:
    """What one decoding step brought one row: `text` is the new text since its last step ("" while a character's
    bytes are still incomplete); `finish` is None while it runs, then eos | length | cancelled."""

    row: int
    text: str
    new_tokens: int
    finish: str | None = None


class RowStreamer(BaseStreamer):
    """transformers' streamers take one row; this one takes generate's whole token column each step, (B,),
    splits it into the rows, decodes each incrementally and reports every step's rows to `on_step` at once
    (called on the generating thread). A row ends at its EOS, its own max_new_tokens, or its cancel flag;
    tokens generate still writes for an ended row (padding, or the step before the stop is seen) are dropped."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, rows: list[Row], on_step) -> None:
        self.tokenizer, self.rows, self.on_step = tokenizer, rows, on_step
        n = len(rows)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.sent = [""] * n  # text reported so far
        # incremental decoding (as text-generation-inference does): decode from `prefix`, report what lies past the
        # text of tokens[prefix:read]; a window of a few tokens keeps each step O(1) and byte-level BPE's
        # multi-token characters whole ("\ufffd" at the end = not yet)
        self.prefix, self.read = [0] * n, [0] * n
        self.finish: list[str | None] = [None] * n

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # generate's first put is the prompt, (B, T)
            return
        steps = []
        for i, token in enumerate(value.tolist()):
            if self.finish[i] is not None:
                continue
            if self.rows[i].cancel.is_set():
                steps.append(self._end(i, "cancelled"))
            elif token == self.tokenizer.eos_token_id:
                steps.append(self._end(i, "eos"))
            else:
                self.tokens[i].append(token)
                text = self._decode_new(i)
                if len(self.tokens[i]) >= self.rows[i].max_new_tokens:
                    steps.append(self._end(i, "length", text))
                else:
                    steps.append(RowStep(i, text, len(self.tokens[i])))
        if steps:
            self.on_step(steps)

    def end(self) -> None:
        """generate returned: a row still open was cancelled (or generate's own max_length ended it)."""
        steps = [self._end(i, "cancelled" if self.rows[i].cancel.is_set() else "length")
                 for i in range(len(self.rows)) if self.finish[i] is None]
        if steps:
            self.on_step(steps)

    def _decode_new(self, i: int) -> str:
        toks, start, read = self.tokens[i], self.prefix[i], self.read[i]
        before = self.tokenizer.decode(toks[start:read], skip_special_tokens=True)
        text = self.tokenizer.decode(toks[start:], skip_special_tokens=True)
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self.prefix[i], self.read[i] = read, len(toks)
            self.sent[i] += text[len(before):]
            return text[len(before):]
        return ""

    def _end(self, i: int, finish: str, text: str = "") -> RowStep:
        """The row's last step: whatever incremental decoding still held back, from one full decode."""
        self.finish[i] = finish
        full = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        if full.startswith(self.sent[i]) and len(full) > len(self.sent[i]):
            text += full[len(self.sent[i]):]
            self.sent[i] = full
        return RowStep(i, text, len(self.tokens[i]), finish)


class _RowsDone(StoppingCriteria):
    """Per row: done once cancelled or at its own max_new_tokens (generate's own EOS criterion does the rest)."""

    def __init__(self, rows: list[Row], prompt_width: int) -> None:
        self.rows, self.width = rows, prompt_width
        self.limits = torch.tensor([r.max_new_tokens for r in rows])

    def __call__(self, input_ids, scores, **kw):
        cancelled = torch.tensor([r.cancel.is_set() for r in self.rows])
        return ((input_ids.shape[1] - self.width >= self.limits) | cancelled).to(input_ids.device)


@torch.inference_mode()
def generate_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[Row], sampling: Sampling,
                  on_step) -> None:
    """One batched `generate` (left padded) over `rows`, sharing `sampling` but for max_new_tokens, which each row
    has its own of; every step's new text goes to `on_step(list[RowStep])` (on this thread), each row's last step
    has its finish. The call returns when every row has ended; setting a row's cancel ends that row at the next
    step (the whole call when it is the last row running). Seeded by sampling.seed when given."""
    for r in rows:
        check_length(model, len(r.ids), sampling.model_copy(update={"max_new_tokens": r.max_new_tokens}))
    input_ids, mask = left_pad([r.ids for r in rows], _pad_id(tokenizer), model.device)
    longest = sampling.model_copy(update={"max_new_tokens": max(r.max_new_tokens for r in rows)})
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    model.generate(input_ids=input_ids, attention_mask=mask, streamer=RowStreamer(tokenizer, rows, on_step),
                   stopping_criteria=StoppingCriteriaList([_RowsDone(rows, input_ids.shape[1])]),
                   **_call_kwargs(tokenizer, longest))
