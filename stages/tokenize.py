"""Train the tokenizer on the clean training split and pack the LM splits into blocks.

    python -m stages.tokenize    # what `dvc repro tokenize` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `tokenize`; writes tokenize.tokenizer_dir and the {train,validation}.npy blocks under
tokenize.out_dir.
What it does, step by step: lmpipe/recipes/tokenize.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.tokenize import tokenize
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("tokenize", tokenize, argv)


if __name__ == "__main__":
    sys.exit(main())
