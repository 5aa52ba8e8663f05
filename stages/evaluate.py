"""Evaluate: LM perplexity, the classifier against its baselines on the test split, the drift reference.

    python -m stages.evaluate    # what `dvc repro evaluate` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `evaluate`; writes evaluate.metrics, the confusion plot, evaluate.reference_profile.
What it does, step by step: lmpipe/recipes/evaluate.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.evaluate import evaluate
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
