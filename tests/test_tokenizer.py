"""Tokenizer training and packing, on four sentences."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmpipe.tokenizer import encode_stream, pack_blocks, tokenizers_parallelism, train_tokenizer

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat and the log"]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
def test_train_save_reload_roundtrip(kind, tmp_path):
    tok = train_tokenizer(TEXTS, kind, vocab_size=300 if kind == "bpe" else 60, min_frequency=1, model_max_length=64)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    ids = again("the cat")["input_ids"]
    assert ids[0] == again.bos_token_id and ids[-1] == again.eos_token_id
    assert again.decode(ids, skip_special_tokens=True).replace(" ", "") == "thecat"
    assert again.pad_token == "<pad>" and again.mask_token == "<mask>"


def test_char_vocab_is_the_alphabet():
    tok = train_tokenizer(TEXTS, "char", vocab_size=10, min_frequency=1, model_max_length=64)
    assert len(tok) == 5 + len(set("".join(TEXTS)))


def test_pack_drops_tail_and_picks_dtype():
    tok = train_tokenizer(TEXTS, "bpe", vocab_size=300, min_frequency=1, model_max_length=64)
    ids = encode_stream(tok, TEXTS, total=len(TEXTS))
    blocks = pack_blocks(ids, 4, len(tok))
    assert blocks.shape == (len(ids) // 4, 4) and blocks.dtype == np.uint16
    assert np.array_equal(blocks.reshape(-1), ids[: blocks.size])
    assert pack_blocks(np.arange(10), 4, 70_000).dtype == np.uint32


def test_torn_blocks_file_is_one_line_naming_it(tmp_path):
    from lmpipe.errors import DataError
    from lmpipe.tokenizer import load_blocks

    path = tmp_path / "train.npy"
    np.save(path, pack_blocks(np.arange(400), 16, 300))
    assert load_blocks(path).shape == (25, 16)
    for size in (100, 500):  # the header cut short; the data cut short
        with open(path, "r+b") as f:
            f.truncate(size)
        with pytest.raises(DataError, match=r"train\.npy: not a readable \.npy file \(.+\); re-run the tokenize stage"):
            load_blocks(path)


# odd inputs for the fast path: the template's own special token inside a text, non-ASCII, newlines, one
# character, and a text longer than the checkpoint-style truncation set below
ODD = [*TEXTS, "a <s> inside and </s> too", "café naïve — 東京\nsecond line", "x", " ".join(TEXTS * 5)]


def _old_path(tok, texts, separator=None):
    """What encode_stream did before its fast path: transformers' own call, one np.asarray per document."""
    tail = [] if separator is None else [separator]
    return np.concatenate([np.asarray(ids + tail, dtype=np.int64) for ids in tok(texts)["input_ids"]])


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "char"])
@pytest.mark.parametrize("separator", [None, 3])
def test_fast_path_ids_equal_transformers_call(kind, separator):
    tok = train_tokenizer(TEXTS, kind, vocab_size=300 if kind == "bpe" else 60, min_frequency=1, model_max_length=64)
    tok.model_max_length = int(1e12)  # as the stage sets it
    expected = _old_path(tok, ODD, separator)
    for batch in (1, 3, 1000):  # batch boundaries change nothing
        ids = encode_stream(tok, ODD, total=len(ODD), batch=batch, separator=separator)
        assert ids.dtype == np.int64 and np.array_equal(ids, expected)


def test_fast_path_ignores_backend_truncation_and_padding():
    """A checkpoint's tokenizer.json may set truncation and padding on the backend; packing uses neither
    (transformers' own call switches them off for an untruncated, unpadded batch)."""
    tok = train_tokenizer(TEXTS, "bpe", vocab_size=300, min_frequency=1, model_max_length=64)
    tok.model_max_length = int(1e12)
    expected = _old_path(tok, ODD)
    tok.backend_tokenizer.enable_truncation(4)
    tok.backend_tokenizer.enable_padding(length=50, pad_id=tok.pad_token_id)
    assert np.array_equal(encode_stream(tok, ODD, total=len(ODD)), expected)


def test_fast_path_is_deterministic_under_parallelism(monkeypatch, tmp_path):
    """The same BPE tokenizer and the same blocks, byte for byte (np.save), with the backend's threads on or off
    (tokenize.parallel)."""
    texts = ODD * 50
    saved, trained = [], []
    for parallel in ("false", "true"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
        tok = train_tokenizer(texts, "bpe", vocab_size=300, min_frequency=1, model_max_length=64)
        tok.model_max_length = int(1e12)
        trained.append(tok.backend_tokenizer.to_str())
        path = tmp_path / f"{parallel}.npy"
        np.save(path, pack_blocks(encode_stream(tok, texts, total=len(texts), batch=64), 8, len(tok)))
        saved.append(path.read_bytes())
    np.save(tmp_path / "old.npy", pack_blocks(_old_path(tok, texts), 8, len(tok)))
    assert trained[0] == trained[1]
    assert saved[0] == saved[1] == (tmp_path / "old.npy").read_bytes()


def test_a_set_tokenizers_parallelism_wins_over_tokenize_parallel():
    assert tokenizers_parallelism(None, True) == "true" and tokenizers_parallelism(None, False) == "false"
    assert tokenizers_parallelism("0", True) == "0" and tokenizers_parallelism("true", False) == "true"
    assert tokenizers_parallelism("", True) == ""  # set but empty: tokenizers reads it as off


def test_slow_tokenizer_falls_back_to_its_own_call():
    class Slow:  # no backend_tokenizer: a pure-Python tokenizer
        def __call__(self, texts):
            return {"input_ids": [[1, *map(ord, t), 2] for t in texts]}

    ids = encode_stream(Slow(), ["ab", "c"], total=2, separator=0)
    assert ids.tolist() == [1, 97, 98, 2, 0, 1, 99, 2, 0]
