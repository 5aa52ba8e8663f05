"""Atomic output writing: temp file/dir next to the target, then rename.

A killed stage never leaves a half-written file where DVC or the next stage would read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lmpipe.errors import DataError, LmpipeError
from lmpipe.names import missing
# Imported inside functions (start-up cost, docs/results.md#start-up): pandas where used: read_parquet is the only
# caller, and the light CLI path imports this module.


def _umask_mode(base: int) -> int:
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        if blocker is not None:  # mkdir says only "File exists" / "Not a directory"
            raise LmpipeError(f"{path}: cannot create output directory ({blocker} is a file)") from None
        raise LmpipeError(f"{path.parent}: cannot create output directory ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise LmpipeError(f"{path.parent}: output directory is not writable")


def write_failure(exc: BaseException, folder: Path) -> str:
    """Why a write failed, in a few words: the errno text of the first OSError in the chain; writers that
    wrap it (pyarrow, torch.save, safetensors) are recognised by a full disk."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, OSError) and e.strerror:
            break
        e = e.__cause__ or e.__context__
    text = e.strerror if e is not None else str(exc)
    code = re.search(r"(?:os error|errno) (\d+)\b", text)  # pyarrow: "Error writing bytes ... [errno 28] ..."
    if code:
        return os.strerror(int(code.group(1)))
    if e is not None:
        return text
    try:
        full = shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        full = False
    if full or "No space left" in text:
        return "No space left on device"
    return text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def _write_error(path: Path, exc: BaseException) -> LmpipeError | None:
    """A write into `path`'s temp copy that failed on the disk (an OSError, or a writer's wrapped full-disk
    error) as one line; None for anything else (a user error the body raised, a bug, Ctrl-C)."""
    if isinstance(exc, LmpipeError) or not isinstance(exc, Exception):
        return None
    why = write_failure(exc, path.parent)
    if not isinstance(exc, OSError) and why != "No space left on device":
        return None
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
    return LmpipeError(f"{path}: cannot write output ({why}); {kept}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in the target's folder; on success rename it over `path`."""
    path = Path(path)
    _ensure_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LmpipeError(f"{path}: cannot create output file ({e.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode(0o666))  # mkstemp makes 0600; outputs are readable like any file
        os.replace(tmp_path, path)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        error = _write_error(path, e)  # a full disk, an I/O error: one line; the target is untouched
        if error is None:
            raise
        raise error from None


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir next to `path`; on success it replaces `path` whole."""
    path = Path(path)
    _ensure_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise LmpipeError(f"{path}: cannot create output directory ({e.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _write_error(path, e)  # a full disk, an I/O error: one line; the target is untouched
        if error is None:
            raise
        raise error from None


def file_md5(path: str | Path) -> str | None:
    """md5 of a file's bytes (what DVC records for a file), None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_parquet(path: str | Path, producer: str):
    """A parquet file a stage wrote, as a DataFrame; missing, or torn (a copy cut short, a foreign file),
    refused in one line naming it and the stage that makes it."""
    import pandas as pd


    path = Path(path)
    if not path.is_file():
        raise missing(path, producer)
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why.split("': ", 1)[-1].split(". ")[0]  # pyarrow repeats the path: "... source '<path>': <why>. ..."
        raise DataError(f"{path}: not a readable parquet file ({why}); re-run the {producer} stage "
                        f"(dvc repro {producer})") from None
