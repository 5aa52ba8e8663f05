"""Evaluate: LM perplexity, classifier vs from-scratch baseline on the held-out test split.

    python -m stages.evaluate         # what `dvc repro evaluate` runs

Writes evaluate.metrics (lm.*, classifier.*, scratch_baseline.*, benefit.*, and with continued pretraining
original_baseline.* and benefit_continued.*), the confusion matrix
as a DVC plot (CSV of actual/predicted) and a PNG, the drift reference of the classifier's test predictions
(evaluate.reference_profile, lmpipe/monitoring.py), and logs one `pipeline` summary run to MLflow
carrying every param and the final metrics, so pipeline executions compare side by side.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from lmpipe.config import Params, device, flatten
from lmpipe.errors import DataError
from lmpipe.evaluation import classification_metrics, perplexity, plot_confusion, predict_proba
from lmpipe.io import atomic_path, read_json, write_json
from lmpipe.modeling import load_finetuned, load_tokenizer
from lmpipe.monitoring import length_counter, reference_profile, vocabulary
from lmpipe.stage import run_stage
from lmpipe.tokenizer import load_blocks
from lmpipe.lineage import INHERITED_TAGS, log_summary, start_pipeline_run
from lmpipe.tracking import PARENT_ENV, log_metrics_bounded


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
    lm_metrics = perplexity(lm, val_blocks, cfg.batch_size, dev, params.pretrain.objective == "mlm", lm_tok,
                            params.pretrain.mlm_probability, params.common.seed)
    del lm

    # 2) classifiers on the test split: the selected model and the from-scratch baseline
    results = {}
    preds_main = probs_main = None
    for key, folder in (("classifier", params.finetune.out_dir), ("scratch_baseline", params.finetune.scratch_dir),
                        ("original_baseline", params.finetune.original_dir)):
        path = _need(root / folder, "finetune")
        if not (path / "config.json").is_file():
            continue  # that baseline is off (finetune.scratch_baseline / original_baseline: false)
        model = load_finetuned(path)  # a plain classifier, or base + prefix/prompt adapter
        tokenizer = load_tokenizer(path)
        probs = predict_proba(model, tokenizer, test["text"].tolist(), cfg.batch_size,
                              dev)  # truncates at the length stored with the model
        preds = probs.argmax(-1)
        results[key] = classification_metrics(labels, preds, len(names))
        if key == "classifier":
            preds_main, probs_main, tok_main, id2label = preds, probs, tokenizer, model.config.id2label

    metrics = {"lm": {"perplexity": lm_metrics["perplexity"], "loss": lm_metrics["loss"],
                      "tokens": lm_metrics["tokens"]},
               "test_examples": int(len(test))}
    for key, m in results.items():
        metrics[key] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
    # what pretraining bought (vs random init) and what continuing a checkpoint's pretraining bought (vs the
    # original checkpoint), each fine-tuned with the same budget
    for baseline, benefit in (("scratch_baseline", "benefit"), ("original_baseline", "benefit_continued")):
        if baseline in results:
            metrics[benefit] = {k: results["classifier"][k] - results[baseline][k] for k in ("accuracy", "f1_macro")}
    metrics["classifier"]["confusion_matrix"] = results["classifier"]["confusion_matrix"]

    # 3) outputs: confusion rows for the DVC plot, PNG, metrics json (with this run's id)
    with atomic_path(root / cfg.confusion) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((names[a], names[p]) for a, p in zip(labels, preds_main))
    plot_confusion(results["classifier"]["confusion_matrix"], names, root / cfg.confusion_png,
                   f"classifier on test (accuracy {results['classifier']['accuracy']:.3f})")
    # 4) the drift reference the server compares live traffic with: the classifier's test predictions, the
    # training split's words (what deploy ships in the model directory as drift_reference.json)
    train_texts = pd.read_parquet(_need(clean_dir / "labeled_train.parquet", "clean"))["text"]
    texts = test["text"].tolist()
    profile = reference_profile(texts, [id2label[int(p)] for p in preds_main], probs_main.max(-1).tolist(),
                                length_counter(tok_main)(texts), vocabulary(train_texts),
                                label_names=[id2label[i] for i in sorted(id2label)])
    write_json(root / cfg.reference_profile, profile)
    # 5) the pipeline run this execution's stage runs nest under: the flow's / experiment's, or a new one
    client = mlflow.MlflowClient()
    summary_id = os.environ.get(PARENT_ENV) or start_pipeline_run(
        client, run.info.experiment_id, {k: v for k, v in run.data.tags.items() if k in INHERITED_TAGS})
    metrics["mlflow_run_id"] = run.info.run_id
    metrics["pipeline_run_id"] = summary_id
    write_json(root / cfg.metrics, metrics)

    flat = {k: v for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log_metrics_bounded(flat)
    mlflow.log_artifact(str(root / cfg.confusion_png))
    mlflow.log_artifact(str(root / cfg.confusion))
    mlflow.log_artifact(str(root / cfg.reference_profile))
    mlflow.log_dict({"confusion_matrix": results["classifier"]["confusion_matrix"], "labels": names},
                    "confusion_matrix.json")
    mlflow.log_input(mlflow.data.from_pandas(test, source=str((clean_dir / "labeled_test.parquet").relative_to(root)),
                                             name="labeled_test", targets="label"), context="test")
    log_summary(client, summary_id, params, root, metrics)
    if not os.environ.get(PARENT_ENV):
        client.set_terminated(summary_id)  # deploy reopens nothing: it only adds tags
    line = f"evaluate: lm perplexity {lm_metrics['perplexity']:.1f}; classifier accuracy {metrics['classifier']['accuracy']:.4f}"
    if "scratch_baseline" in metrics:
        line += f" vs scratch {metrics['scratch_baseline']['accuracy']:.4f}"
    if "original_baseline" in metrics:
        line += f" vs original checkpoint {metrics['original_baseline']['accuracy']:.4f}"
    print(line)


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
