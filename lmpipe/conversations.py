"""Conversations on disk: reading and cleaning your chat data (clean.sft.sources), the tasks' instruction
versions (clean.sft.templates), and where the clean stage keeps them.

    python -m stages.clean            # writes them; finetune.head: lm trains on them (lmpipe/sft.py)

The clean stage writes, under clean.out_dir/sft/:
  sources/{train,validation,test}.parquet        your conversations (clean.sft.sources), cleaned and split
  tasks/<task>/{train,validation,test}.parquet   each templated task's splits (the classifier's own splits)
one row per conversation: `messages` (JSON list of {role, content}) and `label` (the gold label word of a task
example, "" for your own). The finetune and evaluate stages read them back with `load_split`, format them with
the tokenizer's chat template (lmpipe/chat.py) and encode them (lmpipe/sft.py). pandas only, no torch: the
clean stage imports this.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lmpipe import chat, data
from lmpipe.config import Clean, Finetune, SftSource, TaskTemplate
from lmpipe.errors import DataError
from lmpipe.io import read_parquet

SPLITS = ("train", "validation", "test")
SOURCES = "sources"
"""The `source` name of your own conversations (task examples carry their task's name)."""


# -- where the clean stage puts them ---------------------------------------------------------------------------

def split_path(clean_dir: Path, source: str, split: str) -> Path:
    sub = Path("sft") / SOURCES if source == SOURCES else Path("sft") / "tasks" / source
    return clean_dir / sub / f"{split}.parquet"


def sources_for(cfg: Finetune, clean: Clean) -> list[str]:
    """What finetune.head lm trains on: the selected tasks (finetune.tasks, else clean.labeled) that have a
    template, then your own conversations when clean.sft has sources."""
    tasks = [t for t in (cfg.tasks or [clean.labeled.name]) if t in clean.sft.templates]
    return tasks + ([SOURCES] if clean.sft.sources else [])


def load_split(clean_dir: Path, sources: list[str], split: str) -> pd.DataFrame:
    """Columns source, messages (JSON), label; the sources in order."""
    frames = [read_parquet(split_path(clean_dir, s, split), "clean").assign(source=s) for s in sources]
    return pd.concat(frames, ignore_index=True)[["source", "messages", "label"]]


# -- reading and cleaning your conversations (clean stage) -------------------------------------------------------

def _plain(value: Any) -> Any:
    """A parquet cell as plain Python: pyarrow's list<struct> arrives as numpy arrays of dicts."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def read_source(src: SftSource, data_dir: Path) -> list[chat.Messages]:
    """Every conversation of one clean.sft source (jsonl: one JSON object a line; parquet: one a row), validated;
    a malformed record is one DataError line naming the file and line (row)."""
    path = data._resolve(src, data_dir)
    suffix = path.suffix.lower()
    out = []
    if suffix == ".jsonl":
        try:
            lines = path.read_bytes().decode(src.encoding).splitlines()
        except UnicodeDecodeError as e:
            raise data._decode_error(path, src.encoding, e) from None
        except LookupError:
            raise DataError(f"{path}: unknown encoding {src.encoding!r}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
            out.append(chat.record_messages(record, f"{path}:{number}"))
    elif suffix == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow's errors: not a parquet file, torn
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]})") from None
        for number, record in enumerate(df.to_dict("records"), 1):
            record = {k: _plain(v) for k, v in record.items() if not (k == "system" and v is None)}
            out.append(chat.record_messages(record, f"{path}: row {number}"))
    else:
        raise DataError(f"{path}: unsupported conversation format {suffix!r} (jsonl or parquet)")
    return out


def clean_conversations(conversations: list[chat.Messages], max_chars: int) -> tuple[list[chat.Messages], dict]:
    """1) normalise every turn (NFKC, control characters dropped, line breaks kept) 2) drop a conversation with
    an empty turn 3) or longer than max_chars in all 4) exact dedup (first occurrence wins)."""
    stats = Counter(rows_in=len(conversations))
    seen: set[str] = set()
    kept = []
    for messages in conversations:
        turns = [{"role": t["role"], "content": data.normalize(t["content"], keep_newlines=True)} for t in messages]
        key = chat.dumps(turns)
        if any(not t["content"] for t in turns):
            stats["dropped_empty"] += 1
        elif sum(len(t["content"]) for t in turns) > max_chars:
            stats["dropped_too_long"] += 1
        elif key in seen:
            stats["dropped_duplicate"] += 1
        else:
            seen.add(key)
            kept.append(turns)
    stats["rows_out"] = len(kept)
    for k in ("dropped_empty", "dropped_too_long", "dropped_duplicate"):
        stats.setdefault(k, 0)
    return kept, dict(stats)


def split_conversations(conversations: list[chat.Messages], validation_fraction: float, test_fraction: float,
                        seed: int) -> dict[str, pd.DataFrame]:
    """Seeded test share first, then the validation share of the rest (as a task without a test file)."""
    if len(conversations) < 3:
        raise DataError(f"clean.sft.sources: {len(conversations)} conversations left after cleaning; need at least 3 "
                        "(train, validation and test)")
    rest, test = data.split_indices(len(conversations), test_fraction, seed)
    tr, va = data.split_indices(len(rest), validation_fraction, seed)
    frame = lambda idx: pd.DataFrame({"messages": [chat.dumps(conversations[i]) for i in idx], "label": ""})
    return {"train": frame([rest[i] for i in tr]), "validation": frame([rest[i] for i in va]), "test": frame(test)}


def task_split(df: pd.DataFrame, names: list[str], template: TaskTemplate) -> pd.DataFrame:
    """A labelled split (text, label index) as conversations through the task's template; label = the word."""
    words = [names[int(i)] for i in df["label"]]
    return pd.DataFrame({
        "messages": [chat.dumps(chat.task_messages(template.prompt, template.response, template.system, text, word))
                     for text, word in zip(df["text"], words)],
        "label": words})


