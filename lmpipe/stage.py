"""The shared entry point of every DVC stage: params -> seed -> MLflow run -> body -> outputs.

User errors (LmpipeError) print one line and exit non-zero; nothing is half written because
bodies write through lmpipe.io's atomic helpers.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Callable

from lmpipe.config import Params, load_params, parse_override, repo_root
from lmpipe.errors import LmpipeError


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # CPU runs are bitwise reproducible; on CUDA ask for deterministic kernels where they exist
    torch.use_deterministic_algorithms(True, warn_only=True)


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "filelock", "transformers.modeling_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


Body = Callable[[Params, Path, Any], Any]


def _end_progress_bars() -> None:
    """Close progress bars a failed body left open, so the error line starts a line of its own and is
    the last one printed (an open bar would end mid-line and redraw itself after it at exit)."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # a bar that cannot close must not hide the error itself
            pass


def _resumable_run_id(path: Path | None) -> str | None:
    """The MLflow run a crashed attempt left behind (so a resumed stage continues the same run)."""
    if path is None or not path.is_file():
        return None
    import mlflow

    run_id = path.read_text().strip()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # deleted run, other tracking store: start a fresh run
        return None
    return run_id if run.info.status in ("RUNNING", "FAILED", "KILLED") else None


def run_stage(name: str, body: Body, argv: list[str] | None = None,
              run_id_file: Callable[[Params, Path], Path] | None = None) -> int:
    """Parse `--params/--set`, validate, open the stage's MLflow run, call body(params, root, run).

    run_id_file(params, root), when given, names a file next to the stage's checkpoints: the run id
    is kept there so that a re-run after a crash reattaches to the same MLflow run."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"lmpipe {name} stage")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted params key for this run only")
    args = parser.parse_args(argv)
    _quiet()
    try:
        overrides = dict(parse_override(s) for s in args.set)
        params = load_params(args.params, overrides=overrides)
        root = repo_root()
        seed_everything(params.common.seed)
        if int(os.environ.get("RANK", "0")) != 0:
            # torchrun worker ranks > 0 take part in training only: no MLflow run, no outputs
            body(params, root, None)
            return 0
        from lmpipe.tracking import setup, stage_run

        id_file = run_id_file(params, root) if run_id_file else None
        if id_file is not None:
            setup(root, params.common.experiment)
        with stage_run(name, params, root, run_id=_resumable_run_id(id_file)) as run:
            if id_file is not None:
                from lmpipe.io import atomic_path

                with atomic_path(id_file) as tmp:
                    tmp.write_text(run.info.run_id)
            try:
                body(params, root, run)
            except LmpipeError as e:
                import mlflow

                mlflow.set_tag("lmpipe.error", str(e).splitlines()[0][:500])
                raise
    except LmpipeError as e:
        _end_progress_bars()
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:  # disk full, permissions, ... on a path the user configured
        _end_progress_bars()
        where = e.filename or "output"
        print(f"{name}: error: {where}: {e.strerror or e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return 0
