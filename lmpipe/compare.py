"""Experiments side by side: one row each, only the params that differ between them and the headline metrics.

    lmpipe compare                      # the workspace, HEAD and every experiment of HEAD
    lmpipe compare ft-200 smoke-1       # just these (names or revs as `dvc exp show` lists them)

`dvc exp show` lists every param and metric of every stage (upstream clean/tokenize figures first); this reads
the same records (DVC's own `dvc.api.exp_show`) and keeps what tells the rows apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dvc.api

from lmpipe.errors import LmpipeError
from lmpipe.names import HEADLINE
from lmpipe.params import flatten, load_raw

HEADLINE_COLUMNS = {name: f"{section}.{key}" for name, (section, key) in HEADLINE.items()}


MISSING = "!"
"""What exp_show reports for a value whose file the revision does not have (e.g. HEAD before its first run)."""


def _column(row: dict[str, Any], key: str) -> Any:
    """A row's value under `key`, also when DVC prefixed the column with its file (`metrics/eval.json:key`);
    None when the row has none."""
    value = row[key] if key in row else next((v for k, v in row.items() if k.endswith(f":{key}")), None)
    return None if value == MISSING else value


def _label(row: dict[str, Any]) -> str:
    name = row.get("Experiment")
    if row.get("typ") == "workspace" or row.get("rev") == "workspace":
        return "workspace"
    return name or str(row.get("rev", ""))[:7]


def table(rows: list[dict[str, Any]], param_keys: list[str], wanted: list[str] | None = None) -> dict[str, Any]:
    """{"columns": [...], "rows": [[label, ...], ...]} from `dvc.api.exp_show` records: the rows named in `wanted`
    (all when None; an unknown name is an error), the params of `param_keys` whose values differ between them, and
    the headline metrics any of them has."""
    if wanted:
        by_name = {}
        for r in rows:
            for key in (_label(r), r.get("Experiment"), r.get("rev")):
                if key:
                    by_name.setdefault(str(key), r)
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            raise LmpipeError(f"compare: no experiment named {', '.join(unknown)} (see `dvc exp show`)")
        rows = [by_name[w] for w in wanted]
    differing = [k for k in param_keys if len({repr(_column(r, k)) for r in rows}) > 1]
    metrics = [name for name, key in HEADLINE_COLUMNS.items() if any(_column(r, key) is not None for r in rows)]
    out = [[_label(r), *[_column(r, k) for k in differing], *[_column(r, HEADLINE_COLUMNS[m]) for m in metrics]]
           for r in rows]
    return {"columns": ["experiment", *differing, *metrics], "rows": out}


def collect(root: Path, wanted: list[str] | None = None) -> dict[str, Any]:
    """The comparison table of root's experiments (DVC's exp show records, params.yaml's keys)."""
    records = dvc.api.exp_show(repo=str(root))
    return table(records, list(flatten(load_raw(root / "params.yaml"))), wanted)


def format_table(tab: dict[str, Any]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    grid = [tab["columns"], *[[cell(v) for v in r] for r in tab["rows"]]]
    widths = [max(len(r[i]) for r in grid) for i in range(len(grid[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in grid)
