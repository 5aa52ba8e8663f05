"""Evaluate: LM perplexity, classifier vs from-scratch baseline on the held-out test split.

    python -m stages.evaluate         # what `dvc repro evaluate` runs

Writes evaluate.metrics (lm.*, classifier.*, scratch_baseline.*, benefit.*), the confusion matrix
as a DVC plot (CSV of actual/predicted) and a PNG, and logs one `pipeline` summary run to MLflow
carrying every param and the final metrics, so pipeline executions compare side by side.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

from lmpipe.config import Params, device, flatten
from lmpipe.errors import DataError
from lmpipe.evaluation import classification_metrics, perplexity, plot_confusion, predict_proba
from lmpipe.io import atomic_path, read_json, write_json
from lmpipe.modeling import load_tokenizer
from lmpipe.stage import run_stage
from lmpipe.tokenizer import load_blocks
from lmpipe.tracking import git_info, log_metrics_bounded, run_params


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: missing; run the {stage} stage first (dvc repro {stage})")
    return path


def evaluate(params: Params, root: Path, run) -> None:
    cfg, dev = params.evaluate, device(params.common)
    clean_dir = root / params.clean.out_dir
    test = pd.read_parquet(_need(clean_dir / "labeled_test.parquet", "clean"))
    names = json.loads((clean_dir / "labels.json").read_text())["names"]
    labels = test["label"].to_numpy()

    # 1) language model perplexity on the held-out validation blocks
    lm_dir = _need(root / params.pretrain.out_dir, "pretrain")
    auto = AutoModelForMaskedLM if params.pretrain.objective == "mlm" else AutoModelForCausalLM
    lm = auto.from_pretrained(lm_dir)
    lm_tok = load_tokenizer(lm_dir)
    val_blocks = load_blocks(_need(root / params.tokenize.out_dir / "validation.npy", "tokenize"))
    lm_metrics = perplexity(lm, val_blocks, cfg.batch_size, dev, lm_tok, params.pretrain.mlm_probability,
                            params.common.seed)
    del lm

    # 2) classifiers on the test split: the selected model and the from-scratch baseline
    results = {}
    preds_main = None
    for key, folder in (("classifier", params.finetune.out_dir), ("scratch_baseline", params.finetune.scratch_dir)):
        path = _need(root / folder, "finetune")
        if not (path / "config.json").is_file():
            continue  # finetune.scratch_baseline: false
        model = AutoModelForSequenceClassification.from_pretrained(path)
        probs = predict_proba(model, load_tokenizer(path), test["text"].tolist(), cfg.batch_size,
                              params.finetune.max_length, dev)
        preds = probs.argmax(-1)
        results[key] = classification_metrics(labels, preds, len(names))
        if key == "classifier":
            preds_main = preds

    metrics = {"lm": {"perplexity": lm_metrics["perplexity"], "loss": lm_metrics["loss"],
                      "tokens": lm_metrics["tokens"]},
               "test_examples": int(len(test))}
    for key, m in results.items():
        metrics[key] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
    if "scratch_baseline" in results:
        metrics["benefit"] = {k: results["classifier"][k] - results["scratch_baseline"][k]
                              for k in ("accuracy", "f1_macro")}
    metrics["classifier"]["confusion_matrix"] = results["classifier"]["confusion_matrix"]

    # 3) outputs: confusion rows for the DVC plot, PNG, metrics json (with this run's id)
    with atomic_path(root / cfg.confusion) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((names[a], names[p]) for a, p in zip(labels, preds_main))
    plot_confusion(results["classifier"]["confusion_matrix"], names, root / cfg.confusion_png,
                   f"classifier on test (accuracy {results['classifier']['accuracy']:.3f})")
    metrics["mlflow_run_id"] = run.info.run_id
    write_json(root / cfg.metrics, metrics)

    flat = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float))}
    log_metrics_bounded(flat)
    mlflow.log_artifact(str(root / cfg.confusion_png))
    mlflow.log_artifact(str(root / cfg.confusion))
    mlflow.log_dict({"confusion_matrix": results["classifier"]["confusion_matrix"], "labels": names},
                    "confusion_matrix.json")
    _log_summary(params, root, flat, run.info.run_id)
    line = f"evaluate: lm perplexity {lm_metrics['perplexity']:.1f}; classifier accuracy {metrics['classifier']['accuracy']:.4f}"
    if "scratch_baseline" in metrics:
        line += f" vs scratch {metrics['scratch_baseline']['accuracy']:.4f}"
    print(line)


def _log_summary(params: Params, root: Path, eval_flat: dict, eval_run_id: str) -> None:
    """One run per pipeline execution: every param + upstream and final metrics, for side-by-side comparison."""
    upstream = {}
    for stage in ("clean", "tokenize", "pretrain", "finetune"):
        path = root / getattr(params, stage).metrics
        if path.is_file():
            upstream.update({f"{stage}.{k}": v for k, v in flatten(read_json(path)).items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
    all_params = {}
    for stage in ("clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy"):
        all_params.update(run_params(stage, params))
    tags = {"lmpipe.kind": "summary", "lmpipe.eval_run_id": eval_run_id, **git_info(root)}
    parent = mlflow.active_run().data.tags.get("mlflow.parentRunId")
    if parent:
        tags["mlflow.parentRunId"] = parent
    for key in ("prefect.flow_run_id", "prefect.flow_run_name", "prefect.deployment", "dvc.exp_name"):
        value = mlflow.active_run().data.tags.get(key)
        if value:
            tags[key] = value
    client = mlflow.MlflowClient()
    summary = client.create_run(mlflow.active_run().info.experiment_id, run_name="pipeline", tags=tags)
    rid = summary.info.run_id
    from mlflow.entities import Metric, Param

    items = list(all_params.items())
    for i in range(0, len(items), 100):
        client.log_batch(rid, params=[Param(k, str(v)[:6000]) for k, v in items[i:i + 100]])
    merged = {**{f"upstream.{k}": v for k, v in upstream.items()}, **eval_flat}
    metric_objs = [Metric(k, float(v), 0, 0) for k, v in merged.items()]
    for i in range(0, len(metric_objs), 500):
        client.log_batch(rid, metrics=metric_objs[i:i + 500])
    client.set_terminated(rid)


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
