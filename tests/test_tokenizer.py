"""Tokenizer training and packing, on four sentences."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from lmpipe.tokenizer import encode_stream, pack_blocks, train_tokenizer

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
