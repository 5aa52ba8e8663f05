"""The `lmpipe` command.

    lmpipe serve [--host 127.0.0.1] [--port 8000] [--model-uri models:/lmpipe-sst2@champion]
    lmpipe smoke [--profile profiles/smoke.yaml]     # whole pipeline as a DVC experiment
    lmpipe validate [params.yaml] [--profile P]      # check params, list every problem
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from lmpipe.config import flatten, load_params, load_raw, repo_root
from lmpipe.errors import LmpipeError


def hydra_value(value) -> str:
    """A value in Hydra's override grammar (what `dvc exp run -S` parses): strings quoted."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def profile_overrides(profile: str | Path) -> list[str]:
    """A profile (partial params tree) as `dvc exp run -S key=value` arguments."""
    return [f"{key}={hydra_value(value)}" for key, value in flatten(load_raw(profile)).items()]


def smoke(profile: str, extra: list[str]) -> int:
    """Run the whole pipeline with a profile as a DVC experiment: params.yaml stays untouched.

    `--temp` runs it in a temporary copy of the repo; data and MLflow paths are made absolute
    so stage runs land in this repo's tracking store wherever DVC executes them."""
    root = repo_root()
    params = load_params(root / "params.yaml", profile=profile)  # validate before DVC starts anything
    from lmpipe.config import data_dir

    ddir = data_dir(params.common, root)
    from lmpipe.tracking import setup

    setup(root, params.common.experiment)  # experiment + artifact location in this repo, not DVC's temp dir
    env = dict(os.environ, MLFLOW_TRACKING_URI=os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}")
    env.setdefault("HF_HUB_OFFLINE", "1")
    sets = [*profile_overrides(profile), f"common.data_dir={hydra_value(str(ddir))}", *extra]
    cmd = ["dvc", "exp", "run", "--temp"]
    for s in sets:
        cmd += ["-S", s]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root, env=env)


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
    p_val = sub.add_parser("validate", help="validate params.yaml (and a profile)")
    p_val.add_argument("params", nargs="?", default="params.yaml")
    p_val.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "serve":
            params = load_params(args.params)
            uri = args.model_uri or f"models:/{params.deploy.model_name}@{params.deploy.alias}"
            import mlflow

            from lmpipe.tracking import tracking_uri

            mlflow.set_tracking_uri(tracking_uri(repo_root()))
            from lmpipe.serving import serve

            serve(uri, args.host, args.port)
            return 0
        if args.cmd == "smoke":
            return smoke(args.profile, args.set)
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
