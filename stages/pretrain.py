"""Pretrain the language model (from scratch, or continue a checkpoint's pretraining).

    python -m stages.pretrain    # what `dvc repro pretrain` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `pretrain`; writes pretrain.out_dir (model + tokenizer), pretrain.plot, pretrain.metrics,
pretrain.samples (clm: the final model's text for pretrain.sample_prompts).
pretrain.nproc_per_node > 1 runs the recipe under torchrun (DDP).
What it does, step by step: lmpipe/recipes/pretrain.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.pretrain import pretrain, processes
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("pretrain", pretrain, argv, resumable=True, processes=processes)


if __name__ == "__main__":
    sys.exit(main())
