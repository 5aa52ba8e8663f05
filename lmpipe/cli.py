"""The `lmpipe` command.

    lmpipe serve [--host 127.0.0.1] [--port 8000] [--model-uri models:/lmpipe-sst2@champion]
    lmpipe smoke [--profile profiles/smoke.yaml] [--set KEY=VALUE ...]   # whole pipeline as a DVC experiment
    lmpipe lineage models:/lmpipe-sst2@champion                         # commit, data hash, stage runs
    lmpipe data link [PATH]                                             # where this checkout's input data is
    lmpipe exp-run profiles/minilm-sst2.yaml [--queue] [-S KEY=VALUE]  # dvc exp run with a profile's keys
    lmpipe sweep sweeps/finetune-lr-strategy.yaml [--apply-best]        # Optuna study, trials = DVC experiments
    lmpipe validate [params.yaml] [--profile P]                         # check params, list every problem
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmpipe.config import load_params, parse_override, repo_root
from lmpipe.errors import LmpipeError


def _tracking(root: Path):
    import mlflow

    from lmpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.MlflowClient()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="serve the classifier over HTTP")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--model-uri", default=None,
                         help="MLflow model URI or local HF dir (default models:/<deploy.model_name>@<deploy.alias>)")
    p_serve.add_argument("--params", default="params.yaml")
    p_smoke = sub.add_parser("smoke", help="whole pipeline with a profile, as a DVC experiment")
    p_smoke.add_argument("--profile", default="profiles/smoke.yaml")
    p_smoke.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p_smoke.add_argument("--name", default=None, help="experiment name (default smoke-<timestamp>)")
    p_exp = sub.add_parser("exp-run", help="dvc exp run with a profile's keys as -S overrides",
                           description="dvc exp run -S <each key of PROFILE> [DVC_ARGS]: a native DVC experiment "
                                       "(--queue, --temp, -n NAME and more -S work as in dvc exp run)")
    p_exp.add_argument("profile", help="profiles/<name>.yaml or a profile name")
    p_exp.add_argument("dvc_args", nargs=argparse.REMAINDER, help="passed to dvc exp run")
    p_sweep = sub.add_parser("sweep", help="Optuna sweep whose trials are DVC experiments (sweeps/<name>.yaml)")
    p_sweep.add_argument("file", help="sweeps/<name>.yaml or a sweep name")
    p_sweep.add_argument("--apply-best", action="store_true", help="dvc exp apply the best trial when done")
    p_lin = sub.add_parser("lineage", help="what produced a model version or MLflow run")
    p_lin.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id")
    p_lin.add_argument("--json", action="store_true", help="print the record as JSON")
    p_data = sub.add_parser("data", help="the input data folder of this checkout")
    data_sub = p_data.add_subparsers(dest="data_cmd", required=True)
    p_link = data_sub.add_parser("link", help="point the lmpipe-data DVC remote at PATH (.dvc/config.local)")
    p_link.add_argument("path", nargs="?", default=None,
                        help="data folder (default: $LMPIPE_DATA_DIR, else the current link, else ../shared/data)")
    data_sub.add_parser("show", help="print the data folder stages read")
    p_val = sub.add_parser("validate", help="validate params.yaml (and a profile)")
    p_val.add_argument("params", nargs="?", default="params.yaml")
    p_val.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    root = repo_root()
    try:
        if args.cmd == "serve":
            params = load_params(args.params)
            uri = args.model_uri or f"models:/{params.deploy.model_name}@{params.deploy.alias}"
            _tracking(root)
            from lmpipe.serving import serve

            serve(uri, args.host, args.port)
            return 0
        if args.cmd == "smoke":
            from lmpipe import experiments

            overrides = dict(parse_override(s) for s in args.set)
            return experiments.run(root, args.name or experiments.default_name("smoke"), overrides,
                                   experiments.resolve_profile(root, args.profile))
        if args.cmd == "exp-run":
            from lmpipe import experiments

            return experiments.dvc_exp_run(root, experiments.resolve_profile(root, args.profile), args.dvc_args)
        if args.cmd == "sweep":
            from lmpipe.sweep import resolve_sweep, run_sweep

            run_sweep(root, resolve_sweep(root, args.file), apply_best=args.apply_best)
            return 0
        if args.cmd == "lineage":
            from lmpipe.lineage import format_lineage, lineage

            info = lineage(_tracking(root), args.ref)
            print(json.dumps(info, indent=2) if args.json else format_lineage(info))
            return 0
        if args.cmd == "data":
            from lmpipe import datasource

            if args.data_cmd == "link":
                path = datasource.link(root, args.path) if args.path else datasource.link_default(root)
                print(f"{datasource.DEP} -> {path}")
            else:
                print(datasource.data_dir(root))
            return 0
        if args.cmd == "validate":
            load_params(args.params, profile=args.profile)
            print(f"{args.params}: ok")
            return 0
    except LmpipeError as e:
        print(f"lmpipe: error: {e}", file=sys.stderr)
        return e.exit_code
    return 1


if __name__ == "__main__":
    sys.exit(main())
