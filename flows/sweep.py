"""The Prefect sweep flow: an lmpipe sweep (lmpipe/sweep.py) whose trials are Prefect tasks.

    python -m flows.sweep finetune-lr-strategy                 # sweeps/<name>.yaml, `parallel` from the file
    python -m flows.sweep sweeps/minilm-lora.yaml --parallel 2
    prefect deployment run 'lmpipe-sweep/on-demand' -p sweep=finetune-lr-strategy   (prefect.yaml)

Same study, same DVC experiments, same MLflow sweep run as `lmpipe sweep`: the flow only schedules the
trials. At most `parallel` trials run at a time (default: the sweep file's `parallel`, 1 on 2 cores). The
first trial of a new study runs alone, so the stages upstream of the varied keys are in DVC's run cache
before trials run side by side (otherwise each would run pretrain). A killed flow resumes like the CLI:
run it again and the study completes with `n_trials` finished trials.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as flows/pipeline.py

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.runtime import deployment, flow_run

from lmpipe.errors import LmpipeError
from lmpipe.sweep import load_sweep, open_study, resolve_sweep

ROOT = Path(__file__).resolve().parents[1]


@task(name="sweep-trial", task_run_name="trial-{slot}", cache_policy=NO_CACHE, retries=0)
def sweep_trial(study: Any, slot: int) -> dict[str, Any] | None:
    """Run the study's next trial as a DVC experiment; None when the study needs no more trials."""
    result = study.run_trial()
    if result is not None:
        get_run_logger().info(f"trial {result['number']} {result['state']} value={result['value']} "
                              f"params={result['params']} ({result['seconds']} s)")
    return result


@flow(name="lmpipe-sweep", log_prints=True)
def sweep(sweep: str, workspace: str | None = None, parallel: int | None = None,
          apply_best: bool = False) -> dict[str, Any]:
    """An Optuna sweep (sweeps/<sweep>.yaml or a path), every trial a DVC experiment run as a task."""
    root = Path(workspace or os.environ.get("LMPIPE_WORKSPACE") or ROOT).resolve()
    tags = {"prefect.flow_run_id": str(flow_run.get_id() or ""), "prefect.flow_run_name": flow_run.get_name() or ""}
    if deployment.get_name():
        tags["prefect.deployment"] = deployment.get_name()
    study = open_study(root, resolve_sweep(root, sweep), tags)
    try:
        width = parallel or study.sweep.parallel
        if width < 1:
            raise ValueError(f"parallel: must be >= 1 (got {width})")
        todo = study.remaining()
        results = []
        # 1) a new study's first trial alone: it fills DVC's run cache with the upstream stages
        if todo and study.finished() == 0 and width > 1:
            results.append(sweep_trial(study, 0))
            todo -= 1
        # 2) the rest, at most `width` at a time (a trial slot that finds the study full returns None)
        slots = iter(range(len(results), len(results) + todo))
        pending = {sweep_trial.submit(study, s) for s in [next(slots) for _ in range(min(width, todo))]}
        failure: BaseException | None = None
        while pending:
            done = next(as_completed(pending))
            pending.remove(done)
            try:
                results.append(done.result())
            except Exception as e:  # noqa: BLE001 - a failed trial: let the running ones finish, then fail
                failure = failure or e
            if failure is None and (slot := next(slots, None)) is not None:
                pending.add(sweep_trial.submit(study, slot))
        if failure is not None:
            raise failure
        summary = study.finish(apply_best)
        summary["ran"] = [r for r in results if r is not None]
        return summary
    except BaseException:
        study.fail()
        raise
    finally:
        study.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweeps/<name>.yaml or a sweep name")
    parser.add_argument("--parallel", type=int, default=None, help="trials at a time (default: the file's parallel)")
    parser.add_argument("--apply-best", action="store_true", help="dvc exp apply the best trial when done")
    args = parser.parse_args(argv)
    try:
        if args.parallel is not None and args.parallel < 1:
            raise LmpipeError(f"--parallel: must be >= 1 (got {args.parallel})")
        load_sweep(resolve_sweep(ROOT, args.sweep), ROOT)  # one line per problem, exit 2, before Prefect starts
    except LmpipeError as e:
        print(f"lmpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    state = sweep(sweep=args.sweep, parallel=args.parallel, apply_best=args.apply_best, return_state=True)
    if state.is_failed():
        print(f"lmpipe: sweep flow failed: {state.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
