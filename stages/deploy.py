"""Deploy: quality gate, compressed variants measured and gated, model registry, champion alias.

    python -m stages.deploy    # what `dvc repro deploy` runs; --params FILE, --set KEY=VALUE for a run by hand

Reads `common` + `deploy`; writes deploy.out_dir (the served model) and deploy.metrics (per-variant table).
What it does, step by step: lmpipe/recipes/deploy.py.
"""

from __future__ import annotations

import sys

from lmpipe.recipes.deploy import deploy
from lmpipe.stage import run_stage


def main(argv: list[str] | None = None) -> int:
    return run_stage("deploy", deploy, argv)


if __name__ == "__main__":
    sys.exit(main())
