"""Clean the pretraining corpus and the labelled task data.

    python -m stages.clean    # what `dvc repro clean` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `clean`; writes the parquet splits under clean.out_dir and the rows-in/out-per-rule
stats to clean.metrics.
What it does, step by step: lmpipe/recipes/clean.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.clean import clean
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("clean", clean, argv, uses_torch=False)


if __name__ == "__main__":
    sys.exit(main())
