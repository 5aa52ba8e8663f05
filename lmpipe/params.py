"""params.yaml -> Params: load, apply a profile and dotted overrides, validate once; every problem listed at
once, one line each, naming file, section and key (the schema is lmpipe/config.py).

    lmpipe validate params.yaml --profile profiles/smoke.yaml     # the check, from the shell
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmpipe.config import Params
from lmpipe.errors import ConfigError


def _format_errors(err: ValidationError, source: str) -> list[str]:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            msgs = ["unknown key"]
        elif e["type"] == "missing":
            msgs = ["missing key"]
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] != "value_error" and not isinstance(e.get("input"), (dict, list, type(None))):
                msg += f" (got {e['input']!r})"
            msgs = msg.splitlines()
        for msg in msgs:
            # validators name their own field as "field: ..." -> section.field: ...
            m = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg)
            if m and loc:
                lines.append(f"{source}: {loc}.{m.group(1)}: {m.group(2)}")
            elif m or not loc:
                lines.append(f"{source}: {msg}")
            else:
                lines.append(f"{source}: {loc}: {msg}")
    return lines


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set `a.b.c = value` in a nested dict, creating levels as needed."""
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'pretrain.learning_rate=3e-4' -> ('pretrain.learning_rate', 0.0003) (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: value is not valid YAML") from None


def load_raw(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at top level")
    return raw


def validate(raw: dict, source: str = "params.yaml") -> Params:
    """Validate a params tree; raise ConfigError listing every problem, one per line."""
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError("\n".join(_format_errors(err, source))) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None,
                profile: str | Path | None = None) -> Params:
    """Load params.yaml, then a profile (a partial params tree), then dotted overrides; validate once."""
    return validate(merge(load_raw(path), profile, overrides), str(path))


def merge(raw: dict, profile: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict:
    """A params tree with a profile (a partial params tree) and then dotted overrides applied on top."""
    raw = copy.deepcopy(raw)
    if profile:
        for key, value in flatten(load_raw(profile)).items():
            set_dotted(raw, key, copy.deepcopy(value))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, copy.deepcopy(value))
    return raw


def repo_root() -> Path:
    """The project root: LMPIPE_ROOT, else the current directory (DVC runs stages from the repo root)."""
    return Path(os.environ.get("LMPIPE_ROOT") or os.getcwd()).resolve()
