"""Change params.yaml the way its user would: a comment-preserving round trip, never a re-dump.

    update_params_file(wt / "params.yaml", merge(load_raw(root / "params.yaml"), profile, overrides))

ruamel.yaml's round-trip mode (what DVC's `dvc exp run -S` edits params.yaml with) keeps every comment, the
key order, quoting and flow lists ([a, b]) of the file; only the values that differ from the desired tree are
touched: changed leaves in place (their end-of-line comment stays), new keys appended to their section, lists
replaced whole (item by item when the length is unchanged, so their items' comments stay), removed keys
dropped with their end-of-line comment. Comment lines that follow a replaced or moved value stay where they
were: before the next key. Values are written so that lmpipe's reader (PyYAML, YAML 1.1) and DVC's (ruamel,
YAML 1.2) read the same thing: floats always with a dot (1.0e-05, as PyYAML writes them), strings that either
would read as something else quoted ('yes', '1e5', '12:30'), None as null. The written text is read back and
compared with the desired tree before it replaces the file (lmpipe.io.atomic_path).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import CommentMark, YAMLError as RuamelYAMLError
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken

from lmpipe.params import load_raw
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.io import atomic_path

_STR = "tag:yaml.org,2002:str"
_PYYAML = yaml.resolver.Resolver()  # PyYAML's implicit types: what lmpipe.config.load_raw makes of a plain scalar


def update_params_file(path: str | Path, raw: dict) -> None:
    """Rewrite the params file at `path` so that it reads (yaml.safe_load) as `raw`, keeping its comments,
    key order and formatting; atomic. A params file that is not a mapping, or a value that would not read
    back as given, raises and leaves the file as it was."""
    path = Path(path)
    current = load_raw(path)  # as lmpipe reads it; not YAML, or not a mapping: ConfigError naming the line
    text = path.read_text(encoding="utf-8")
    rt = _round_trip_yaml()
    try:
        doc = rt.load(text)
    except RuamelYAMLError as e:  # what PyYAML lets pass and ruamel does not (a duplicate key)
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if doc is None:  # an empty file
        doc = CommentedMap()
    indents = {"mapping": 2, "sequence": 4, "offset": 2, **_indents(doc)}
    if indents["sequence"] < indents["offset"] + 2:  # ruamel needs room for "- "; a file's odd list keeps it
        indents["sequence"] = indents["offset"] + 2
    rt.indent(**indents)
    _sync_map(doc, current, raw)
    out = io.StringIO()
    rt.dump(doc, out)
    back, want = _flat(yaml.safe_load(out.getvalue())), _flat(raw)
    wrong = sorted(k for k in back.keys() | want.keys()
                   if k not in back or k not in want or not _same(back[k], want[k]))
    if wrong:  # a value the representers below do not cover: never write a file that reads differently
        raise LmpipeError(f"{path}: {', '.join(wrong)} would not read back as given; {path.name} is unchanged")
    with atomic_path(path) as tmp:
        tmp.write_text(out.getvalue(), encoding="utf-8")


# -- values: what both YAML readers read back as the same ------------------------------------------------------

def _represent_float(rep: RoundTripRepresenter, data: float) -> Any:
    """PyYAML's float text: repr with a dot before any exponent (PyYAML reads 1e-05 as a string)."""
    if math.isnan(data):
        text = ".nan"
    elif math.isinf(data):
        text = ".inf" if data > 0 else "-.inf"
    else:
        text = repr(data).lower()
        if "e" in text and "." not in text:
            text = text.replace("e", ".0e")
    return rep.represent_scalar("tag:yaml.org,2002:float", text)


class _Str(str):
    """A string written here, not read from the file (whose plain `on` PyYAML reads as True: kept as written)."""


def _represent_str(rep: RoundTripRepresenter, data: _Str) -> Any:
    """Quoted when PyYAML would read it plain as another type (yes, on, 12:30, 1_000); ruamel's emitter already
    quotes what YAML 1.2 would read as another type."""
    if _PYYAML.resolve(yaml.ScalarNode, data, (True, False)) != _STR:
        return rep.represent_scalar(_STR, data, style="'")
    return RoundTripRepresenter.represent_str(rep, data)


def _represent_none(rep: RoundTripRepresenter, data: None) -> Any:
    return rep.represent_scalar("tag:yaml.org,2002:null", "null")  # as params.yaml writes it, not an empty value


class _Representer(RoundTripRepresenter):
    """ruamel's round-trip representer with the three above; its own class, since add_representer changes the
    class it is called on (RoundTripRepresenter's would change DVC's `-S` writes in this process too)."""


_Representer.add_representer(float, _represent_float)
_Representer.add_representer(_Str, _represent_str)
_Representer.add_representer(type(None), _represent_none)


def _round_trip_yaml() -> YAML:
    rt = YAML()  # round-trip mode
    rt.Representer = _Representer
    rt.preserve_quotes = True
    rt.width = 4096  # long values stay on their line
    return rt


def _indents(node: Any, found: dict[str, int] | None = None) -> dict[str, int]:
    """The file's own indentation, from where ruamel found its first nested block map and block list:
    {mapping, sequence (key to item text), offset (key to dash)}; 2, 4, 2 (params.yaml's) when it has none."""
    found = {} if found is None else found
    if isinstance(node, CommentedMap):
        for key, value in node.items():
            col = node.lc.key(key)[1]
            block = isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style()
            if block and isinstance(value, CommentedMap) and "mapping" not in found:
                found["mapping"] = value.lc.col - col
            if block and isinstance(value, CommentedSeq) and "sequence" not in found:
                found["sequence"], found["offset"] = value.lc.item(0)[1] - col, value.lc.col - col
            _indents(value, found)
    elif isinstance(node, CommentedSeq):
        for value in node:
            _indents(value, found)
    return found


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same types all the way down (True is not 1, 1 is not 1.0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key, lists whole (names what differs in an error)."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _new(value: Any, like: Any = None) -> Any:
    """A fresh node for `value`; a list keeps the style of the list it replaces (flow [a, b] or block), else
    lists of scalars are flow, as params.yaml writes them."""
    if isinstance(value, dict):
        node = CommentedMap()
        for k, v in value.items():
            node[_new(k)] = _new(v)
        return node
    if isinstance(value, list):
        node = CommentedSeq(_new(v) for v in value)
        flow = like.fa.flow_style() if isinstance(like, CommentedSeq) else None
        if flow if flow is not None else not any(isinstance(v, (dict, list)) for v in value):
            node.fa.set_flow_style()
        return node
    return _Str(value) if type(value) is str else value


# -- structure: changes in place, comments kept ----------------------------------------------------------------
# ruamel keeps a comment with what precedes it: the comment lines before a key belong to the end of the value
# before it (the token `# end-of-line comment\n\n  # lines of the next key\n`). Whatever replaces, adds or removes
# a value moves that tail (all but the end-of-line comment) to the value that now comes last.

def _slot(container: CommentedMap | CommentedSeq) -> int:
    return 2 if isinstance(container, CommentedMap) else 0  # the comment after a map value / a list item


def _tail_position(container: CommentedMap | CommentedSeq, key: Any) -> tuple[Any, Any]:
    """Where the comment after container[key] is kept: with its last item, for a block map or list."""
    value = container[key]
    if isinstance(value, (CommentedMap, CommentedSeq)) and len(value) and not value.fa.flow_style():
        return _tail_position(value, list(value)[-1] if isinstance(value, CommentedMap) else len(value) - 1)
    return container, key


def _take_tail(container: CommentedMap | CommentedSeq, key: Any) -> str:
    """Remove and return the comment lines after container[key] (its end-of-line comment stays)."""
    holder, key = _tail_position(container, key)
    entry = holder.ca.items.get(key)
    token = entry[_slot(holder)] if entry else None
    if token is None or "\n" not in token.value:
        return ""
    eol, rest = token.value.split("\n", 1)
    token.value = eol + "\n"  # mutated, not dropped: a flow list shares the token with its key
    return rest


def _put_tail(container: CommentedMap | CommentedSeq, key: Any, rest: str) -> None:
    """Add comment lines after container[key] (after its own)."""
    if not rest:
        return
    holder, key = _tail_position(container, key)
    entry = holder.ca.items.setdefault(key, [None] * (4 if isinstance(holder, CommentedMap) else 2))
    token = entry[_slot(holder)]
    if token is None:
        entry[_slot(holder)] = CommentToken("\n" + rest, CommentMark(0), None)
    else:
        token.value = token.value + ("" if token.value.endswith("\n") else "\n") + rest


def _replace(container: CommentedMap | CommentedSeq, key: Any, value: Any) -> None:
    rest = _take_tail(container, key)
    container[key] = value
    _put_tail(container, key, rest)


def _sync(node: Any, current: Any, want: Any) -> Any:
    """`node` (a ruamel value that PyYAML reads as `current`) made to read as `want`: changed in place when it
    is a map that stays non-empty, or a list of the same length; else a new node."""
    if _same(current, want):
        return node  # untouched: its text (1e-3, 'quoted', ...) stays as the user wrote it
    if isinstance(node, CommentedMap) and isinstance(current, dict) and isinstance(want, dict) and want:
        _sync_map(node, current, want)  # (emptied, it would stay a block map, which YAML cannot write empty)
        return node
    if (isinstance(node, CommentedSeq) and isinstance(current, list) and isinstance(want, list)
            and len(current) == len(want) == len(node)):
        for i, (cur, value) in enumerate(zip(current, want)):
            new = _sync(node[i], cur, value)
            if new is not node[i]:
                _replace(node, i, new)
        return node
    return _new(want, like=node)


def _sync_map(node: CommentedMap, current: dict, want: dict) -> None:
    # PyYAML's key for each of ruamel's (the same keys in the same order; `on:` is True to PyYAML)
    keys = dict(zip(current, node)) if len(current) == len(node) else {k: k for k in node}
    for key in [k for k in current if k not in want and k in keys]:
        _remove(node, keys[key])
    for key, value in want.items():
        if key in keys and keys[key] in node:
            new = _sync(node[keys[key]], current[key], value)
            if new is not node[keys[key]]:
                _replace(node, keys[key], new)
        elif len(node):  # a new key: last in its section, before the comment lines that lead to the next one
            rest = _take_tail(node, list(node)[-1])
            node[_new(key)] = _new(value)
            _put_tail(node, key, rest)
        else:
            node[_new(key)] = _new(value)


def _remove(node: CommentedMap, key: Any) -> None:
    """Drop `key` and its end-of-line comment; the comment lines after it go to the key before it (a section's
    first key has none: they go with it)."""
    rest = _take_tail(node, key)
    names = list(node.keys())
    before = names[names.index(key) - 1] if names.index(key) > 0 else None
    del node[key]
    node.ca.items.pop(key, None)
    if before is not None:
        _put_tail(node, before, rest)
