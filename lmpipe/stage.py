"""The shared entry point of every DVC stage: params -> seed -> MLflow run -> body -> outputs.

User errors (LmpipeError) print one line and exit non-zero; nothing is half written because
bodies write through lmpipe.io's atomic helpers.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from lmpipe.checkpoints import remember_run_id, resumable_run_id, run_id_file
from lmpipe.config import Params
from lmpipe.errors import LmpipeError
from lmpipe.metric_log import PENDING_FILE, metric_log
from lmpipe.params import load_params, parse_override, repo_root
from lmpipe.tracking import check_reachable, setup, stage_run, tracking_uri
# Imported inside functions (start-up cost, docs/results.md#start-up): numpy, torch and mlflow where used: the clean
# and tokenize stages start without torch.


def seed_everything(seed: int, with_torch: bool = True) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    if not with_torch:
        return
    import torch

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


def _stop(signum, frame) -> None:
    # SIGTERM (the flow stopping it, a worker, `timeout`): unwind like Ctrl-C, so the MLflow run is marked
    # KILLED; a checkpoint being written is incomplete and ignored, the previous one stays (lmpipe.checkpoints)
    raise KeyboardInterrupt("SIGTERM")


def run_stage(name: str, body: Body, argv: list[str] | None = None, resumable: bool = False,
              uses_torch: bool = True, processes: Callable[[Params], int] | None = None) -> int:
    """Parse `--params/--set`, validate, open the stage's MLflow run, call body(params, root, run).

    resumable: the stage checkpoints (lmpipe.checkpoints); its run id is kept next to the checkpoints
    so that a re-run after a crash reattaches to the same MLflow run. uses_torch: False for a stage that
    never touches torch (clean), which then neither imports nor seeds it (with its deterministic mode that
    costs ~3.5 s a run, measured). processes: how many training processes the params ask for; above one the
    stage is started again under torchrun (DDP, no home-made process management; Trainer picks gloo on CPU,
    nccl on GPU), each process with this argv, and this one waits for them."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"lmpipe {name} stage")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted params key for this run only")
    args = parser.parse_args(argv)
    _quiet()
    signal.signal(signal.SIGTERM, _stop)
    try:
        overrides = dict(parse_override(s) for s in args.set)
        params = load_params(args.params, overrides=overrides)
        root = repo_root()
        nproc = processes(params) if processes is not None and "LOCAL_RANK" not in os.environ else 1
        if nproc > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", f"stages.{name}", *(sys.argv[1:] if argv is None else argv)]
            print("+", " ".join(cmd), flush=True)
            launcher = subprocess.Popen(cmd)
            try:
                return launcher.wait()
            except KeyboardInterrupt:  # SIGTERM/Ctrl-C: torchrun passes SIGTERM on to every rank
                launcher.terminate()
                launcher.wait()
                raise
        if int(os.environ.get("RANK", "0")) != 0:
            # torchrun worker ranks > 0 take part in training only: no MLflow run, no outputs
            seed_everything(params.common.seed, uses_torch)
            body(params, root, None)
            return 0

        check_reachable(tracking_uri(root))  # a tracking server that is down: refused before any compute
        seed_everything(params.common.seed, uses_torch)

        id_file = run_id_file(name, params, root) if resumable else None
        if id_file is not None:
            setup(root, params.common.experiment)
        with stage_run(name, params, root, run_id=resumable_run_id(id_file)) as run:
            if id_file is not None:
                remember_run_id(id_file, run.info.run_id)
            pending = id_file.parent / PENDING_FILE if id_file is not None else None
            try:
                with metric_log(run.info.run_id, pending, params.common.tracking_grace_s):
                    body(params, root, run)
            except LmpipeError as e:
                import mlflow

                try:
                    mlflow.set_tag("lmpipe.error", str(e).splitlines()[0][:500])
                except Exception:  # the tracking server is what failed: the error line below says so
                    pass
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
    except KeyboardInterrupt as e:
        _end_progress_bars()
        how = " by SIGTERM" if str(e) == "SIGTERM" else ""
        print(f"{name}: interrupted{how}; its last complete checkpoint (if any) is kept and a re-run resumes from it",
              file=sys.stderr, flush=True)
        return 143 if how else 130
    return 0
