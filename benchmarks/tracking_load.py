"""Load test: N parallel stage-like writers logging training metrics to the SQLite default vs the PostgreSQL-backed
MLflow server of `lmpipe services`.

    .venv/bin/python benchmarks/tracking_load.py [--writers 1 2 4 8] [--steps 100] [--server-uri http://...]

Each writer is its own process, like a DVC stage: it opens an MLflow run and logs `--steps` training steps of
`--metrics` metrics each (one log_batch per step, as a training loop logs loss, learning rate, grad norm every
log_every steps), then ends the run. All writers of a round start together (a barrier after their imports).
Side (i) is lmpipe's default store, `sqlite:///<tmp>/mlflow.db` opened by every writer directly; side (ii) is
an MLflow server on PostgreSQL, started by lmpipe.team.services in a temporary state dir (stopped at the end) unless
--server-uri names a running one. A failed call (e.g. `database is locked`) is counted and the writer goes on.
Prints, per number of writers, metric points/s (all writers together, wall clock of the round) and failures
for each side, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPERIMENT = "tracking-load"


def writer(uri: str, exp_id: str, steps: int, n_metrics: int, barrier, out) -> None:
    """One stage-like process: a run, `steps` log_batch calls of `n_metrics` points, end the run."""
    os.environ["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    sys.stdout = open(os.devnull, "w")  # MLflow 3 prints a "View run" link per run against a server
    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient(uri)
    failures, errors, ok = 0, [], 0
    barrier.wait()
    t0 = time.perf_counter()
    try:
        run_id = client.create_run(exp_id, run_name="writer").info.run_id
    except Exception as e:  # noqa: BLE001 - counted, reported
        out.put({"ok": 0, "failures": steps + 2, "errors": [str(e).splitlines()[0][:120]], "seconds": 0.0})
        return
    for step in range(steps):
        now = int(time.time() * 1000)
        batch = [Metric(f"m{i}", 1.0 / (step + 1) + i, now, step) for i in range(n_metrics)]
        try:
            client.log_batch(run_id, metrics=batch)
            ok += n_metrics
        except Exception as e:  # noqa: BLE001
            failures += 1
            if len(errors) < 3:
                errors.append(str(e).splitlines()[0][:120])
    try:
        client.set_terminated(run_id)
    except Exception as e:  # noqa: BLE001
        failures += 1
        errors.append(str(e).splitlines()[0][:120])
    out.put({"ok": ok, "failures": failures, "errors": errors, "seconds": time.perf_counter() - t0})


def round_(uri: str, n: int, steps: int, n_metrics: int) -> dict:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)  # the schema exists before the writers
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(n + 1), ctx.Queue()
    procs = [ctx.Process(target=writer, args=(uri, exp_id, steps, n_metrics, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.perf_counter()
    results = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    ok = sum(r["ok"] for r in results)
    return {"writers": n, "points": ok, "seconds": round(wall, 2), "points_per_s": round(ok / wall, 1),
            "failures": sum(r["failures"] for r in results),
            "errors": sorted({e for r in results for e in r["errors"]})[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=100, help="log_batch calls per writer")
    parser.add_argument("--metrics", type=int, default=3, help="metric points per step")
    parser.add_argument("--server-uri", default=None, help="a running MLflow server (default: start lmpipe services)")
    args = parser.parse_args(argv)

    from lmpipe.team import services
    from lmpipe.params import load_params

    tmp = Path(tempfile.mkdtemp(prefix="tracking-load-"))
    tmp.chmod(0o755)  # the postgres user enters the state dir
    lay = None
    server = args.server_uri
    if server is None:
        cfg = load_params(ROOT / "params.yaml").services.model_copy(
            update={"postgres_port": 0, "mlflow_port": 0, "prefect_port": 0})
        lay = services.layout(ROOT, cfg, str(tmp / "services"))
        for line in services.up(lay, cfg):
            print(line, file=sys.stderr, flush=True)
            if line.startswith("export MLFLOW_TRACKING_URI="):
                server = line.split("=", 1)[1]
    sides = {"sqlite": f"sqlite:///{tmp / 'mlflow.db'}", "postgres server": server}
    rows: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for n in args.writers:
            for name, uri in sides.items():
                res = round_(uri, n, args.steps, args.metrics)
                rows[name].append(res)
                print(f"measured: {name}, {n} writers: {res}", file=sys.stderr, flush=True)
    finally:
        if lay is not None:
            for line in services.down(lay):
                print(line, file=sys.stderr, flush=True)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{args.steps} steps x {args.metrics} metrics per writer (one log_batch per step):")
    print(f"{'writers':<9}" + "".join(f"{name + ' pts/s':>24}{'failures':>10}" for name in sides))
    for i, n in enumerate(args.writers):
        print(f"{n:<9}" + "".join(f"{rows[name][i]['points_per_s']:>24}{rows[name][i]['failures']:>10}"
                                  for name in sides))
    for name in sides:
        errs = sorted({e for r in rows[name] for e in r["errors"]})
        if errs:
            print(f"{name} errors: {'; '.join(errs[:3])}")
    print(json.dumps({"steps": args.steps, "metrics": args.metrics, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
