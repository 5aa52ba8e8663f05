"""The `lmpipe` command.

    lmpipe serve [--host 127.0.0.1] [--port 8000] [--model-uri models:/lmpipe-sst2@champion] [--token-file F]
    lmpipe monitor --url http://127.0.0.1:8000 [--token T]              # live drift (PSI per feature) of a server
    lmpipe alerts [--check]                                             # Prometheus rules from params (ops/prometheus)
    lmpipe smoke [--profile profiles/smoke.yaml] [--set KEY=VALUE ...]   # whole pipeline as a DVC experiment
    lmpipe rollback [--model NAME] [--to VERSION] [--reason TEXT]       # champion back to the previous holder
    lmpipe lineage models:/lmpipe-sst2@champion                         # commit, data hash, stage runs
    lmpipe compare [EXP ...] [--json]                                   # experiments: differing params, headline metrics
    lmpipe data link [PATH]                                             # where this checkout's input data is
    lmpipe exp-run profiles/minilm-sst2.yaml [--queue] [-S KEY=VALUE]  # dvc exp run with a profile's keys
    lmpipe sweep sweeps/finetune-lr-strategy.yaml [--apply-best]        # Optuna study, trials = DVC experiments
    lmpipe validate [params.yaml] [--profile P]                         # check params, list every problem
    lmpipe generate [MODEL] --prompt TEXT [--stream] [--seed N]          # continue a prompt with a causal LM
    lmpipe services up|down|status [--state-dir D] [--set services.K=V] # shared PostgreSQL, MLflow, Prefect
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from lmpipe.errors import LmpipeError
from lmpipe.params import load_params, parse_override, repo_root
# Imported inside functions (start-up cost, docs/results.md#start-up): each subcommand imports its module where it
# runs: `lmpipe validate` or a usage error answers without torch, mlflow or prefect.


def _tracking(root: Path):
    import mlflow

    from lmpipe.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri(root))
    return mlflow.MlflowClient()


def _serve_flags(cfg, flags: dict):
    """params.yaml's serve section with the flags given on top, validated like the file."""
    from pydantic import ValidationError

    from lmpipe.errors import ConfigError

    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return cfg.model_validate({**cfg.model_dump(), **given})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


def _newest_causal_lm(params, root: Path) -> str:
    """The default MODEL of `lmpipe generate`: the generative fine-tune (finetune.head lm) when it has been
    trained, else the pretrained causal LM."""
    if params.finetune.head == "lm" and (root / params.finetune.out_dir / "config.json").is_file():
        return params.finetune.out_dir
    return params.pretrain.out_dir


def _generate(args, root: Path) -> int:
    """`lmpipe generate`: every bad argument (settings, MODEL, a prompt the model cannot take) is a ConfigError
    before anything is generated."""

    # the terminal shows the text, or one error line: no loading or download progress bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from transformers.utils import logging as hf_logging

    from lmpipe import chat, generation
    from lmpipe.errors import ConfigError, DataError

    hf_logging.disable_progress_bar()
    sampling = generation.Sampling.parse(flags=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    ref = args.model or _newest_causal_lm(load_params(args.params), root)
    if generation.is_mlflow_ref(ref):  # only these read the tracking store (a folder never opens it)
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its database set-up lines
        _tracking(root)
    with tempfile.TemporaryDirectory(prefix="lmpipe-generate-") as tmp:
        try:
            path = generation.resolve_model(ref, root, Path(tmp))
        except ConfigError as e:
            hint = "" if args.model else "; run the pretrain stage first (dvc repro pretrain) or name a MODEL"
            raise ConfigError(f"{e}{hint}") from None
        model, tokenizer = generation.load_generator(path)  # in memory: the download can go
    prompt = args.prompt
    if getattr(tokenizer, "chat_template", None) and not args.raw:  # a generative fine-tune: the prompt is a user turn
        prompt = chat.prompt_text(tokenizer, [{"role": "user", "content": args.prompt}])
    n = len(generation.encode_prompt(tokenizer, prompt))
    if n == 0:
        raise ConfigError("--prompt: empty, and the tokenizer has no BOS token to start from")
    try:
        generation.check_length(model, n, sampling)
    except DataError as e:
        raise ConfigError(f"--prompt: {e}") from None
    print(args.prompt, end="" if prompt is args.prompt else "\n", flush=True)  # a chat answer on its own line
    if args.stream:
        try:
            for chunk in generation.stream(model, tokenizer, prompt, sampling):
                print(chunk, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C: the stream stops generating at the next token
            print(flush=True)
            return 130
        print()
    else:
        [out] = generation.generate(model, tokenizer, [prompt], sampling)
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser(
        "serve", help="serve the classifier or a generator over HTTP (batched, metrics, auth, drift, hot reload)",
        description="Serve a classifier (POST /predict) or a causal LM (POST /generate): GET /health, /metrics, "
                    "/drift, POST /admin/reload. "
                    "Defaults come from params.yaml's serve section; flags override. With a token "
                    "(--token-file, else $LMPIPE_API_TOKEN) every route but /health needs "
                    "'Authorization: Bearer <token>'; without one only a loopback host is allowed. "
                    "On models:/NAME@alias the server follows the alias (serve.reload_interval_s).")
    p_serve.add_argument("--model-uri", default=None,
                         help="MLflow model URI or local HF dir, e.g. models/pretrain for a generator "
                              "(default models:/<deploy.model_name>@<deploy.alias>)")
    p_serve.add_argument("--host", default=None, help="interface to bind (serve.host)")
    p_serve.add_argument("--port", type=int, default=None, help="TCP port (serve.port)")
    p_serve.add_argument("--token-file", default=None, metavar="PATH",
                         help="file holding the bearer token (default: $LMPIPE_API_TOKEN; none = no auth)")
    p_serve.add_argument("--allow-unauthenticated", action="store_true",
                         help="allow a non-loopback --host without a token")
    p_serve.add_argument("--max-batch-size", type=int, default=None, help="texts per forward pass (serve.max_batch_size)")
    p_serve.add_argument("--max-wait-ms", type=float, default=None,
                         help="how long a batch waits for more requests (serve.max_wait_ms)")
    p_serve.add_argument("--reload-interval", type=float, default=None, metavar="SECONDS",
                         help="alias poll interval (serve.reload_interval_s)")
    p_serve.add_argument("--params", default="params.yaml")
    p_serve.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="params override, e.g. --set serve.request_timeout_s=2")
    p_mon = sub.add_parser("monitor", help="a running server's drift report (GET /drift) as a table")
    p_mon.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p_mon.add_argument("--token", default=None, help="bearer token (default: $LMPIPE_API_TOKEN)")
    p_mon.add_argument("--json", action="store_true", help="print the report as JSON")
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
    p_rb = sub.add_parser("rollback", help="move the champion alias back to the previous holder (or --to VERSION)")
    p_rb.add_argument("--to", default=None, metavar="VERSION", help="this registered version instead of the previous one")
    p_rb.add_argument("--reason", default=None, help="why (recorded with who and when)")
    p_rb.add_argument("--model", default=None, metavar="NAME",
                      help="the registered model (default deploy.model_name; e.g. the generator's)")
    p_rb.add_argument("--params", default="params.yaml", help="reads deploy.model_name and deploy.alias")
    p_lin = sub.add_parser("lineage", help="what produced a model version or MLflow run")
    p_lin.add_argument("ref", help="models:/NAME@ALIAS, models:/NAME/VERSION or an MLflow run id")
    p_lin.add_argument("--json", action="store_true", help="print the record as JSON")
    p_cmp = sub.add_parser("compare", help="experiments side by side: the params that differ, the headline metrics",
                           description="One row per DVC experiment (the workspace, HEAD and HEAD's experiments, or "
                                       "the ones named), the params.yaml keys whose values differ between the rows "
                                       "and the headline metrics (accuracy, f1_macro, perplexity, benefit_accuracy, ...).")
    p_cmp.add_argument("experiments", nargs="*", metavar="EXP", help="experiment names or revs (default: all)")
    p_cmp.add_argument("--json", action="store_true", help="print the table as JSON")
    p_data = sub.add_parser("data", help="the input data folder of this checkout")
    data_sub = p_data.add_subparsers(dest="data_cmd", required=True)
    p_link = data_sub.add_parser("link", help="point the lmpipe-data DVC remote at PATH (.dvc/config.local)")
    p_link.add_argument("path", nargs="?", default=None,
                        help="data folder (default: $LMPIPE_DATA_DIR, else the current link, else ../shared/data)")
    data_sub.add_parser("show", help="print the data folder stages read")
    p_gen = sub.add_parser(
        "generate", help="continue a prompt with a causal LM (printed once, or streamed with --stream)",
        description="Prints the prompt and the model's continuation (transformers' generate with a KV cache; "
                    "docs/generation.md). Temperature 0 is greedy decoding; --seed makes sampling repeatable.")
    p_gen.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH, an MLflow run id (its "
                            "`model` artifact) or a model folder (default: the pipeline's newest causal LM: finetune.out_dir "
                            "after a generative fine-tune (finetune.head lm), else pretrain.out_dir)")
    p_gen.add_argument("--prompt", required=True, help="the text to continue")
    # the numbers arrive as text and are validated by lmpipe.generation.Sampling (one line per bad value)
    p_gen.add_argument("--max-new-tokens", default=None, metavar="N", help="tokens to generate (default 64)")
    p_gen.add_argument("--temperature", default=None, metavar="T", help="0 = greedy (default 1.0)")
    p_gen.add_argument("--top-k", default=None, metavar="K", help="sample from the K most likely tokens only")
    p_gen.add_argument("--top-p", default=None, metavar="P", help="nucleus sampling: the smallest set with mass P")
    p_gen.add_argument("--seed", default=None, metavar="N", help="seed the sampling: same seed, same text")
    p_gen.add_argument("--stream", action="store_true", help="print the text as it is produced")
    p_gen.add_argument("--raw", action="store_true",
                       help="continue the text as given, even when the model has a chat template (a generative "
                            "fine-tune answers the prompt as a user turn otherwise)")
    p_gen.add_argument("--params", default="params.yaml", help="reads pretrain.out_dir for the default MODEL")
    p_val = sub.add_parser("validate", help="validate params.yaml (and a profile)")
    p_val.add_argument("params", nargs="?", default="params.yaml")
    p_val.add_argument("--profile", default=None)
    p_svc = sub.add_parser("services", help="shared PostgreSQL + MLflow server + Prefect server (make services)",
                           description="up: start what is not running and print the export lines; down: stop what "
                                       "up started (pid files); status: each service's state, pid and URL. Ports and "
                                       "host: params.yaml's services section (--set overrides).")
    p_svc.add_argument("action", choices=["up", "down", "status"])
    p_svc.add_argument("--state-dir", default=None,
                       help="state folder (default: $LMPIPE_SERVICES_DIR, else services.state_dir)")
    p_svc.add_argument("--params", default="params.yaml")
    p_svc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="params override, e.g. --set services.mlflow_port=5001")
    p_alerts = sub.add_parser("alerts", help="write ops/prometheus/alerts.yml from params.yaml's serve section")
    p_alerts.add_argument("--params", default="params.yaml")
    p_alerts.add_argument("--check", action="store_true", help="exit 1 when the file differs from what params give")
    args = parser.parse_args(argv)
    root = repo_root()
    # each command imports what it runs, in its branch: `lmpipe validate` answers in about a second, while the
    # serving, registry and sweep modules bring torch, transformers, mlflow or optuna (seconds of imports)
    try:
        if args.cmd == "serve":
            params = load_params(args.params, dict(parse_override(s) for s in args.set))
            uri = args.model_uri or f"models:/{params.deploy.model_name}@{params.deploy.alias}"
            flags = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                     "reload_interval_s": args.reload_interval}
            cfg = _serve_flags(params.serve, flags)
            _tracking(root)
            from lmpipe.serving.app import serve

            serve(uri, args.host, args.port, cfg, token_file=args.token_file,
                  allow_unauthenticated=args.allow_unauthenticated)
            return 0
        if args.cmd == "rollback":
            from lmpipe.registry import rollback

            params = load_params(args.params)
            name, alias = args.model or params.deploy.model_name, params.deploy.alias
            res = rollback(_tracking(root), name, alias, args.to, args.reason)
            print(f"{name}@{alias}: v{res['from']} -> v{res['to']} ({res['entry']['why']}; by {res['entry']['by']} "
                  f"at {res['entry']['at']})")
            return 0
        if args.cmd == "alerts":
            from lmpipe.serving.alerts import write

            path, same = write(load_params(args.params).serve, root, check=args.check)
            if args.check and not same:
                print(f"lmpipe: error: {path} differs from what {args.params} gives: run `lmpipe alerts`",
                      file=sys.stderr)
                return 1
            print(f"{path}: {'up to date' if same else 'written'}")
            return 0
        if args.cmd == "monitor":
            from lmpipe.monitoring import fetch_report, format_report

            report = fetch_report(args.url, args.token)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
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
        if args.cmd == "compare":
            from lmpipe.compare import collect, format_table

            tab = collect(root, args.experiments or None)
            print(json.dumps(tab, indent=2, default=str) if args.json else format_table(tab))
            return 0
        if args.cmd == "data":
            from lmpipe import datasource

            if args.data_cmd == "link":
                path = datasource.link(root, args.path) if args.path else datasource.link_default(root)
                print(f"{datasource.DEP} -> {path}")
            else:
                print(datasource.data_dir(root))
            return 0
        if args.cmd == "services":
            from lmpipe.team import services

            cfg = load_params(args.params, dict(parse_override(s) for s in args.set)).services
            lay = services.layout(root, cfg, args.state_dir)
            action = {"up": lambda: services.up(lay, cfg), "down": lambda: services.down(lay),
                      "status": lambda: services.status(lay)}[args.action]
            for line in action():
                print(line, flush=True)
            return 0
        if args.cmd == "generate":
            return _generate(args, root)
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
