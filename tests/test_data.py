"""Cleaning: pure functions and the clean stage's outputs (its bad inputs: tests/test_bad_inputs.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from helpers import run_module
from lmpipe import data


def test_normalize_nfkc_controls_whitespace():
    assert data.normalize("ﬁne\u00a0 film\x07\t\n ok\u200b ") == "fine film ok"


def _normalize_per_char(text: str, keep_newlines: bool) -> str:
    """normalize's definition written out one character at a time (what it was before the regex)."""
    import unicodedata

    text = unicodedata.normalize("NFKC", text)
    text = "".join(" " if ch in "\t\r\v\f" or (ch == "\n" and not keep_newlines) else ch for ch in text
                   if ch in "\t\n\r\v\f" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"))
    if keep_newlines:
        return "\n".join(" ".join(line.split()) for line in text.split("\n")).strip("\n")
    return " ".join(text.split())


def test_normalize_matches_its_definition_on_every_code_point(monkeypatch):
    """Every Unicode code point, in runs of 256 between words, both modes: the regex path drops exactly the
    characters of categories Cc/Cf/Cs/Co (tabs and newlines aside) that unicodedata names."""
    import sys

    for start in range(0, sys.maxunicode + 1, 256):
        text = "a \n" + "".join(chr(c) for c in range(start, min(start + 256, sys.maxunicode + 1))) + "\tb \n\n c"
        for keep in (False, True):
            assert data.normalize(text, keep) == _normalize_per_char(text, keep), (hex(start), keep)
    # the ranges are Unicode 14.0's; another unicodedata version computes its own, equal here
    monkeypatch.setattr(data.unicodedata, "unidata_version", "other")
    assert data.dropped_ranges() == data._DROPPED_14


def test_clean_documents_counts_every_rule():
    docs = ["", "   ", "short", "a long enough document", "a  long enough document", "x" * 50]
    kept, stats = data.clean_documents(docs, min_chars=10, max_chars=40)
    assert kept == ["a long enough document"]
    assert stats == {"rows_in": 6, "dropped_empty": 2, "dropped_too_short": 1, "dropped_too_long": 1,
                     "dropped_duplicate": 1, "rows_out": 1}


def test_split_is_seeded_and_disjoint():
    a = data.split_indices(100, 0.1, seed=1)
    assert a == data.split_indices(100, 0.1, seed=1)
    assert a != data.split_indices(100, 0.1, seed=2)
    train, val = a
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 100


def test_labels_map_to_ints_in_numeric_order():
    df = pd.DataFrame({"text": ["a", "b", "", "c"], "label": ["10", "9", "9", "10"]})
    out, vocab, stats = data.clean_labeled(df, None, 1, 100, "t.tsv")
    assert vocab == ["9", "10"] and out["label"].tolist() == [1, 0, 1]
    assert stats["dropped_empty"] == 1


def test_clean_stage_writes_splits_and_stats(workdir: Path):
    res = run_module("stages.clean", workdir)
    assert res.returncode == 0, res.stderr
    out = workdir / "data" / "clean"
    for name in ("corpus_train", "corpus_validation", "labeled_train", "labeled_validation", "labeled_test"):
        assert len(pd.read_parquet(out / f"{name}.parquet")) > 0
    stats = yaml.safe_load((workdir / "metrics" / "clean.json").read_text())
    assert stats["corpus"]["dropped_duplicate"] > 0  # the tiny corpus repeats lines
    assert stats["mlflow_run_id"]


def _edit_params(workdir: Path, fn) -> None:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    fn(raw)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))


def test_tail_split_holds_out_the_last_characters_in_order_like_nanogpt(workdir: Path, tiny_data: Path):
    # the whole file as one document, the last 10% of its characters as validation: nanoGPT's prepare.py split
    text = "\n".join(f"line {i}: " + " ".join(["to be or not to be"] * (i % 5 + 1)) for i in range(300))
    (tiny_data / "corpus" / "text.txt").write_text(text, encoding="utf-8")
    _edit_params(workdir, lambda r: r["clean"].update(corpus=[{"path": "corpus/text.txt", "unit": "file"}],
                                                      split="tail", validation_fraction=0.1, keep_newlines=True,
                                                      max_chars=1_000_000))
    res = run_module("stages.clean", workdir)
    assert res.returncode == 0, res.stderr
    train = pd.read_parquet(workdir / "data" / "clean" / "corpus_train.parquet")["text"].tolist()
    val = pd.read_parquet(workdir / "data" / "clean" / "corpus_validation.parquet")["text"].tolist()
    n = len(text)
    assert train == [text[: int(n * 0.9)]] and val == [text[int(n * 0.9):]]


def test_tail_split_cuts_across_documents_in_order():
    from lmpipe.data import tail_split

    docs = ["aaaa", "bbbb", "cc"]  # 10 characters: the last 30% is "bcc"
    assert tail_split(docs, 0.3) == (["aaaa", "bbb"], ["b", "cc"])
    assert tail_split(docs, 0.2) == (["aaaa", "bbbb"], ["cc"])


def test_clean_mask_replaces_personal_data_everywhere_and_counts_each_kind(workdir: Path, tiny_data: Path):
    pii = ("mail jane.doe@example.org or see https://example.com/x?id=7 from 10.0.0.12 , card 4111 1111 1111 1111 , "
           "call +44 20 7946 0958 .")
    with open(tiny_data / "corpus" / "text.txt", "a", encoding="utf-8") as f:
        f.write(f"an excellent film , {pii}\n")
    with open(tiny_data / "task" / "train.tsv", "a", encoding="utf-8") as f:
        f.write(f"a wonderful film , {pii}\t1\n")
    _edit_params(workdir, lambda r: r["clean"].update(mask=["email", "url", "ip", "card", "phone"]))
    res = run_module("stages.clean", workdir)
    assert res.returncode == 0, res.stderr
    out = workdir / "data" / "clean"
    texts = [t for name in ("corpus_train", "corpus_validation", "labeled_train", "labeled_validation", "labeled_test")
             for t in pd.read_parquet(out / f"{name}.parquet")["text"]]
    joined = "\n".join(texts)
    for secret in ("jane.doe", "example.com", "10.0.0.12", "4111", "7946"):
        assert secret not in joined, secret
    masked = "mail <email> or see <url> from <ip> , card <card> , call <phone> ."
    assert sum(masked in t for t in texts) == 2  # the corpus line and the labelled row
    stats = yaml.safe_load((workdir / "metrics" / "clean.json").read_text())
    assert stats["mask"] == {"email": 2, "url": 2, "ip": 2, "card": 2, "phone": 2}
    # off by default: the same data unmasked, and no mask section
    _edit_params(workdir, lambda r: r["clean"].update(mask=[]))
    assert run_module("stages.clean", workdir).returncode == 0
    assert "mask" not in yaml.safe_load((workdir / "metrics" / "clean.json").read_text())
    assert "jane.doe@example.org" in "\n".join(pd.read_parquet(out / "labeled_train.parquet")["text"].tolist() +
                                              pd.read_parquet(out / "labeled_validation.parquet")["text"].tolist())
