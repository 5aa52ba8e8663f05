"""Tokenizer training (Hugging Face `tokenizers`), or a checkpoint's own tokenizer, and packing into
fixed-size blocks.

Blocks are stored as one .npy per split, shape (n_blocks, block_size), uint16 when the vocabulary
fits (else uint32), so training memory-maps them (`np.load(path, mmap_mode="r")`) without copies.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lmpipe.config import SPECIAL_TOKENS
from lmpipe.errors import DataError
# Imported inside functions (start-up cost, docs/results.md#start-up): AutoTokenizer (transformers' auto classes)
# where used: only a pretrained tokenizer needs it.

PAD, BOS, EOS, UNK, MASK = SPECIAL_TOKENS


def train_tokenizer(texts: list[str], kind: str, vocab_size: int, min_frequency: int,
                    model_max_length: int) -> PreTrainedTokenizerFast:
    """Train on `texts` and wrap as a transformers fast tokenizer: `<s> text </s>` per sequence."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    elif kind == "char":
        # one token per character of the training text (nanoGPT shakespeare_char style)
        alphabet = sorted(set("".join(texts)))
        vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *alphabet])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
        tok.decoder = decoders.Fuse()
        trainer = None
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    if trainer is not None:
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD, mask_token=MASK,
        cls_token=BOS, sep_token=EOS, model_max_length=model_max_length, padding_side="right")


def encode_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], total: int,
                  batch: int = 10_000, desc: str = "encode", separator: int | None = None) -> np.ndarray:
    """All documents encoded (each `<s> ... </s>`, or whatever the tokenizer's own template adds, e.g.
    `[CLS] ... [SEP]`; `separator` is appended to each when the template adds nothing) and concatenated
    into one 1-D int64 array.

    A fast tokenizer is run through its `tokenizers` backend directly (encode_batch_fast: no offsets), and
    the ids of a batch go into numpy in one np.fromiter: the same ids transformers' own call gives, without
    its per-document dicts and lists (benchmarks/tokenize_speed.py). The backend threads as
    TOKENIZERS_PARALLELISM says; the order of the ids never depends on it. Batches are large because each
    call ends on its slowest thread (a long document), once per call; `batch` documents bound the memory."""
    encode = _backend_encoder(tokenizer)
    chunks: list[np.ndarray] = []
    buf: list[str] = []
    tail = () if separator is None else (separator,)

    def flush() -> None:
        docs = encode(buf)  # one list of ids per document
        ids = itertools.chain.from_iterable(itertools.chain(d, tail) for d in docs) if tail else \
            itertools.chain.from_iterable(docs)
        chunks.append(np.fromiter(ids, dtype=np.int64))
        bar.update(len(buf))

    with tqdm(total=total, desc=desc, unit="doc", mininterval=2) as bar:
        for text in texts:
            buf.append(text)
            if len(buf) == batch:
                flush()
                buf = []
        if buf:
            flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


def _backend_encoder(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], Iterable[list[int]]]:
    """texts -> each one's ids with the special tokens of the tokenizer's template, untruncated and unpadded."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer: its own call
        return lambda texts: tokenizer(texts)["input_ids"]
    # 1) the backend set up as transformers' own call sets it for an unpadded, untruncated batch (a checkpoint's
    #    tokenizer.json may carry a truncation length or padding; its split_special_tokens decides whether
    #    "<s>" in a text is the special token)
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    # 2) encode_batch_fast (recent tokenizers releases) skips the character offsets, which packing never reads
    batch_encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: (e.ids for e in batch_encode(texts, add_special_tokens=True))


def tokenizers_parallelism(user: str | None, parallel: bool) -> str:
    """The TOKENIZERS_PARALLELISM the tokenize stage runs with: the user's own value when one is set (with
    `tokenizers`' meaning: "", off, false, f, no, n, 0 are off), else tokenize.parallel's."""
    if user is not None:
        return user
    return "true" if parallel else "false"


def pack_blocks(ids: np.ndarray, block_size: int, vocab_size: int) -> np.ndarray:
    """(n_tokens,) -> (n_blocks, block_size); the tail shorter than one block is dropped."""
    n = len(ids) // block_size
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    return ids[: n * block_size].reshape(n, block_size).astype(dtype)


# the files a transformers tokenizer can be loaded from (fast tokenizer.json, or a slow one's vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


def load_pretrained_tokenizer(path: Path, ref: str, field: str = "pretrain.init") -> PreTrainedTokenizerBase:
    """A checkpoint's own tokenizer, as it is (continued pretraining needs the ids its embeddings were
    trained on); a checkpoint without one is refused in one line."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{field}: {ref} has no tokenizer in {path} (none of {', '.join(TOKENIZER_FILES)}); "
                        "tokenize.kind: pretrained packs with the checkpoint's own tokenizer: save it there "
                        "(tokenizer.save_pretrained)")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)  # as modeling.load_tokenizer
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{field}: {ref}: cannot load the tokenizer in {path} ({first[:200]})") from None


def document_separator(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The id to put between packed documents when the tokenizer's template marks no boundary itself
    (GPT-2 style: no BOS/EOS added): its EOS; None when the template already adds them (BERT: [CLS] [SEP])."""
    if len(tokenizer("a")["input_ids"]) > len(tokenizer("a", add_special_tokens=False)["input_ids"]):
        return None
    return tokenizer.eos_token_id


def load_blocks(path: str | Path) -> np.ndarray:
    """Memory-mapped (n_blocks, block_size) array; a torn file (a copy cut short) refused in one line."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:  # a header or data shorter than it declares
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: not a readable .npy file ({why[:200]}); re-run the tokenize stage "
                        "(dvc repro tokenize)") from None


class Throughput:
    """Tokens/s over a wall-clock window."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def rate(self, tokens: int) -> float:
        return tokens / max(time.perf_counter() - self.start, 1e-9)
