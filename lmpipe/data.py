"""Data cleaning: read sources, normalise, filter, deduplicate, split.

Pure functions over plain values; stages/clean.py does the I/O around them.
"""

from __future__ import annotations

import csv
import functools
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pandas as pd

from lmpipe.config import LabeledSource, TextSource
from lmpipe.errors import DataError
# Imported inside functions (start-up cost, docs/results.md#start-up): datasets where used: the clean stage reads CSV
# and text without it.

_WS = re.compile(r"\s+")


_HWS = re.compile(r"[^\S\n]+")

# Code points of the categories Cc, Cf, Cs and Co other than \t\n\r\v\f, as ranges: what normalize drops.
# These are Unicode 14.0's (Python 3.11's unicodedata); tests/test_data.py checks them against unicodedata.
_DROPPED_14 = ((0x0, 0x8), (0xE, 0x1F), (0x7F, 0x9F), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C), (0x6DD, 0x6DD),
               (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E),
               (0x2060, 0x2064), (0x2066, 0x206F), (0xD800, 0xF8FF), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB),
               (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x13438), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
               (0xE0001, 0xE0001), (0xE0020, 0xE007F), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD))
_SPACES = str.maketrans("\t\r\v\f", "    ")


def dropped_ranges() -> tuple[tuple[int, int], ...]:
    """The code point ranges normalize drops, from this Python's unicodedata (0.7 s: only when its Unicode
    version is not the one _DROPPED_14 was taken from)."""
    if unicodedata.unidata_version == "14.0.0":
        return _DROPPED_14
    ranges, start = [], None
    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        drop = ch not in "\t\n\r\v\f" and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co")
        if drop and start is None:
            start = cp
        elif not drop and start is not None:
            ranges.append((start, cp - 1))
            start = None
    if start is not None:
        ranges.append((start, sys.maxunicode))
    return tuple(ranges)


@functools.cache
def _dropped() -> re.Pattern:
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in dropped_ranges()) + "]")


def normalize(text: str, keep_newlines: bool = False) -> str:
    """NFKC, control characters dropped (tabs/newlines become spaces), whitespace collapsed.
    keep_newlines keeps line breaks (verse, code) and collapses the rest of the whitespace per line."""
    text = _dropped().sub("", unicodedata.normalize("NFKC", text)).translate(_SPACES)
    if keep_newlines:
        return "\n".join(_HWS.sub(" ", line).strip() for line in text.split("\n")).strip("\n")
    return _WS.sub(" ", text).strip()


def _resolve(src: TextSource, data_dir: Path) -> Path:
    path = Path(src.path)
    if not path.is_absolute():
        path = data_dir / path
    if not path.is_file():
        raise DataError(f"{path}: data file not found (source {src.path!r}, data dir {data_dir})")
    if path.stat().st_size == 0:  # a download or copy that never happened
        raise DataError(f"{path}: empty file (source {src.path!r})")
    return path


def _decode_error(path: Path, encoding: str, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not valid {encoding} (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                     f"set the source's encoding")


def _read_hf(src: TextSource) -> pd.DataFrame:
    """`hf:<dataset id>[#<config>][@<split>]` through `datasets` (needs network or a local HF cache)."""
    import datasets

    spec = src.path[3:]
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition("#")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # offline, unknown id, ...: one line, not a traceback
        raise DataError(f"{src.path}: cannot load Hugging Face dataset ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return ds.to_pandas()


def read_table(src: TextSource, data_dir: Path) -> pd.DataFrame:
    """Read a tabular source (csv, tsv, jsonl, parquet, hf:) into a DataFrame of strings."""
    if src.path.startswith("hf:"):
        return _read_hf(src)
    path = _resolve(src, data_dir)
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".csv"):
            sep = "\t" if suffix == ".tsv" else ","
            df = pd.read_csv(path, sep=sep, encoding=src.encoding, dtype=str, keep_default_na=False,
                             header=0 if src.header else None, names=src.columns,
                             # GLUE-style TSVs carry bare quotes inside sentences: no quoting there
                             quoting=csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL)
        elif suffix in (".jsonl", ".json"):
            df = pd.read_json(path, lines=suffix == ".jsonl", encoding=src.encoding, dtype=False)
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            raise DataError(f"{path}: unsupported tabular format {suffix!r} (csv, tsv, jsonl, json, parquet)")
    except UnicodeDecodeError as e:
        raise _decode_error(path, src.encoding, e) from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {src.encoding!r}") from None
    except (pd.errors.ParserError, ValueError) as e:
        raise DataError(f"{path}: malformed {suffix[1:]} ({str(e).splitlines()[0]})") from None
    df.columns = [str(c) for c in df.columns]
    return df


def _column(df: pd.DataFrame, column: str | None, src: TextSource, role: str) -> pd.Series:
    if column is None:
        raise DataError(f"{src.path}: tabular source needs {role} (set it in params.yaml)")
    if column not in df.columns:
        raise DataError(f"{src.path}: no column {column!r} ({role}); columns are {', '.join(map(repr, df.columns))}")
    return df[column]


def read_texts(src: TextSource, data_dir: Path) -> list[str]:
    """Raw documents of one unlabelled source (before normalisation)."""
    is_txt = not src.path.startswith("hf:") and Path(src.path).suffix.lower() in (".txt", ".raw", "")
    if not is_txt:
        df = read_table(src, data_dir)
        return ["" if v is None or (isinstance(v, float) and v != v) else str(v)
                for v in _column(df, src.text_column, src, "text_column")]
    path = _resolve(src, data_dir)
    try:
        text = path.read_bytes().decode(src.encoding)
    except UnicodeDecodeError as e:
        raise _decode_error(path, src.encoding, e) from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {src.encoding!r}") from None
    if src.unit == "paragraph":
        return re.split(r"\n\s*\n", text)
    if src.unit == "file":
        return [text]
    return text.splitlines()


def clean_documents(docs: list[str], min_chars: int, max_chars: int,
                    keep_newlines: bool = False) -> tuple[list[str], dict[str, int]]:
    """1) normalise 2) drop empty 3) length filters 4) exact dedup (first occurrence wins)."""
    stats = Counter(rows_in=len(docs))
    seen: set[str] = set()
    kept = []
    for raw in docs:
        text = normalize(raw, keep_newlines)
        if not text:
            stats["dropped_empty"] += 1
        elif len(text) < min_chars:
            stats["dropped_too_short"] += 1
        elif len(text) > max_chars:
            stats["dropped_too_long"] += 1
        elif text in seen:
            stats["dropped_duplicate"] += 1
        else:
            seen.add(text)
            kept.append(text)
    stats["rows_out"] = len(kept)
    for key in ("dropped_empty", "dropped_too_short", "dropped_too_long", "dropped_duplicate"):
        stats.setdefault(key, 0)
    return kept, dict(stats)


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded shuffle, then the first ceil-ish share is validation; both sides non-empty when n >= 2."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    n_val = min(max(1, round(n * fraction)), n - 1) if n >= 2 else 0
    return sorted(idx[n_val:]), sorted(idx[:n_val])


def tail_split(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """The last `fraction` of the characters (documents in order) as validation, the rest as train; the
    document at the cut is cut there (nanoGPT: train = text[:int(n * 0.9)], val = text[int(n * 0.9):])."""
    cut = int(sum(len(d) for d in docs) * (1 - fraction))
    train: list[str] = []
    for i, doc in enumerate(docs):
        if cut <= len(doc):
            head, tail = doc[:cut], doc[cut:]
            return train + ([head] if head else []), ([tail] if tail else []) + docs[i + 1:]
        train.append(doc)
        cut -= len(doc)
    return train, []


_TREC_LINE = re.compile(r"^([A-Z]+):(\S+) (.*\S.*)$")


def read_trec(src: LabeledSource, data_dir: Path) -> pd.DataFrame:
    """TREC question files: `COARSE:fine question ...` per line -> text, label (the coarse class). A line
    that is not in that format is refused naming the file and line."""
    path = _resolve(src, data_dir)
    try:
        lines = path.read_bytes().decode(src.encoding).splitlines()
    except UnicodeDecodeError as e:
        raise _decode_error(path, src.encoding, e) from None
    except LookupError:
        raise DataError(f"{path}: unknown encoding {src.encoding!r}") from None
    texts, labels = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        m = _TREC_LINE.match(line.strip())
        if m is None:
            raise DataError(f"{path}:{number}: not a TREC line (expected `COARSE:fine question`): {line[:60]!r}")
        labels.append(m.group(1))
        texts.append(m.group(3))
    return pd.DataFrame({"text": texts, "label": labels})


def read_labeled(src: LabeledSource, data_dir: Path) -> pd.DataFrame:
    """Columns text, label (raw strings), empty rows dropped later."""
    if src.format == "trec":
        return read_trec(src, data_dir)
    df = read_table(src, data_dir)
    if src.text_columns:
        parts = [_column(df, c, src, "text_columns").astype(str) for c in src.text_columns]
        text = parts[0].str.cat(parts[1:], sep=" ") if len(parts) > 1 else parts[0]
    else:
        text = _column(df, src.text_column, src, "text_column")
    label = _column(df, src.label_column, src, "label_column")
    def as_str(col: pd.Series) -> list[str]:
        # nulls become "" (dropped as empty rows); 1.0-style floats from a nullable int column become "1"
        return ["" if v is None or (isinstance(v, float) and v != v) else
                str(int(v)) if isinstance(v, float) and v.is_integer() else str(v).strip() for v in col]

    return pd.DataFrame({"text": as_str(text), "label": as_str(label)})


def label_vocabulary(raw_labels: list[str]) -> list[str]:
    """Sorted unique raw labels; numerically when they are all integers (so '10' sorts after '9')."""
    values = sorted(set(raw_labels))
    if all(re.fullmatch(r"-?\d+", v) for v in values):
        values = sorted(values, key=int)
    return values


def clean_labeled(df: pd.DataFrame, vocab: list[str] | None, min_chars: int, max_chars: int,
                  source: str) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """Normalise text, drop empty rows, map labels to ints 0..K-1. Duplicates are kept (they are labels)."""
    stats = Counter(rows_in=len(df))
    texts = [normalize(t) for t in df["text"]]
    labels = list(df["label"])
    keep = [i for i, (t, lab) in enumerate(zip(texts, labels)) if t and lab]
    stats["dropped_empty"] = len(df) - len(keep)
    texts = [texts[i][:max_chars] for i in keep]
    labels = [labels[i] for i in keep]
    if vocab is None:
        vocab = label_vocabulary(labels)
    index = {v: i for i, v in enumerate(vocab)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise DataError(f"{source}: labels {unknown[:5]} do not occur in the training file")
    out = pd.DataFrame({"text": texts, "label": [index[lab] for lab in labels]})
    stats["rows_out"] = len(out)
    if len(out) == 0:
        raise DataError(f"{source}: no labelled rows left after cleaning ({stats['rows_in']} in)")
    return out, vocab, dict(stats)
