"""Fine-tune the classifier (and its baselines) on the labelled task(s).

    python -m stages.finetune    # what `dvc repro finetune` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `finetune`; writes finetune.out_dir and the baselines' folders, finetune.metrics.
What it does, step by step: lmpipe/recipes/finetune.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.finetune import finetune
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("finetune", finetune, argv, resumable=True)


if __name__ == "__main__":
    sys.exit(main())
