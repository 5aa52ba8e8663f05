"""Evaluate: LM perplexity, classifier vs from-scratch baseline on the held-out test split.

    python -m stages.evaluate         # the DVC stage `evaluate` (stages/evaluate.py) runs this recipe

Writes evaluate.metrics (lm.*, classifier.*, scratch_baseline.*, benefit.*, and with continued pretraining
original_baseline.* and benefit_continued.*), the confusion matrix
as a DVC plot (CSV of actual/predicted) and a PNG, the drift reference of the classifier's test predictions
(evaluate.reference_profile, lmpipe/monitoring.py), and logs one `pipeline` summary run to MLflow
carrying every param and the final metrics, so pipeline executions compare side by side.

finetune.head lm (`_generators` below): the generator and its scratch twin instead of the classifiers:
response perplexity on the held-out conversations, exact match of the greedy answer to the gold label word
on the task-derived test prompts and the share of answers that are no label at all, per task and their mean
(generator.*, scratch_baseline.*, benefit.*); a table of sampled answers to the first test prompts
(mlflow.log_table); the confusion plot of the default task with a column for answers that are no label.
"""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from lmpipe import chat, conversations, embeddings, objectives, sft, tasks
from lmpipe.config import Augment, Params
from lmpipe.evaluation import perplexity, plot_confusion, predict_proba
from lmpipe.generation import Sampling, generate, load_generator
from lmpipe.io import atomic_path, read_parquet, write_json
from lmpipe.lineage import PipelineRun
from lmpipe.metric_log import log_metrics_bounded
from lmpipe.modeling import (
    device,
    from_pretrained,
    load_finetuned,
    load_tokenizer,
    resolve_model_ref,
    stored_max_length,
)
from lmpipe.monitoring import length_counter, reference_profile, vocabulary
from lmpipe.names import MASKED_OBJECTIVES, need
from lmpipe.params import flatten
from lmpipe.regularization import augment
from lmpipe.tokenizer import load_blocks


def evaluate(params: Params, root: Path, run) -> None:
    cfg, dev = params.evaluate, device(params.common)
    clean_dir = root / params.clean.out_dir
    task_names = tasks.selected(params.finetune, params.clean)
    tests = {t: tasks.load_split(clean_dir, t, params.clean, "test") for t in task_names}
    default = task_names[0]  # the confusion plot, the drift reference, /predict without a task
    test, names = tests[default], tasks.label_names(clean_dir, default, params.clean)
    labels = test["label"].to_numpy()

    # 1) language model perplexity on the held-out validation blocks; a contrastive encoder has no LM head:
    #    its embeddings are measured instead, before and after the objective
    lm_dir = need(root / params.pretrain.out_dir, "pretrain")
    objective = params.pretrain.objective
    lm_metrics, embedding_metrics = None, None
    if objective == "simcse":
        embedding_metrics = _embedding_report(params, root, lm_dir, dev)
    else:
        auto = AutoModelForMaskedLM if objective in MASKED_OBJECTIVES else AutoModelForCausalLM
        lm = from_pretrained(auto, lm_dir)
        lm_tok = load_tokenizer(lm_dir)
        val_blocks = load_blocks(need(root / params.tokenize.out_dir / "validation.npy", "tokenize"))
        lm_metrics = perplexity(lm, val_blocks, cfg.batch_size, dev, objective in MASKED_OBJECTIVES, lm_tok,
                                params.pretrain.mlm_probability, params.common.seed)
        del lm

    if params.finetune.head == "lm":
        return _generators(params, root, run, lm_metrics, dev)

    # 2) classifiers on the test split of every task they have: the selected model and the baselines
    def score(path: Path, which: list[str]) -> tuple[dict, dict]:
        model = load_finetuned(path)  # a plain classifier, or base + prefix/prompt adapter
        tokenizer = load_tokenizer(path)
        probs = {t: predict_proba(model, tokenizer, tests[t]["text"].tolist(), cfg.batch_size, dev)
                 for t in which}  # truncates at the length stored with the model
        layout = tasks.Layout.from_config(model.config)
        return tasks.score(probs, {t: tests[t]["label"].to_numpy() for t in which}, layout), \
            {"probs": probs[which[0]], "tokenizer": tokenizer, "layout": layout}

    results = {}
    for key, folder in (("classifier", params.finetune.out_dir), ("scratch_baseline", params.finetune.scratch_dir),
                        ("original_baseline", params.finetune.original_dir)):
        path = need(root / folder, "finetune")
        if not (path / "config.json").is_file():
            continue  # that baseline is off (finetune.scratch_baseline / original_baseline: false)
        results[key], seen = score(path, task_names)
        if key == "classifier":
            main = seen
    singles = {}
    if params.finetune.single_task_baselines:
        for t in task_names:
            singles[t] = score(need(root / params.finetune.single_task_dir / t, "finetune"), [t])[0]
    probs_main, tok_main, layout = main["probs"], main["tokenizer"], main["layout"]
    preds_main, _ = layout.predict(probs_main, default if layout.multi else None)
    default_names = list(layout.labels[layout.index(default)]) if layout.multi else list(layout.labels[0])

    metrics: dict = {"test_examples": int(len(test))}
    if lm_metrics is not None:
        metrics["lm"] = {"perplexity": lm_metrics["perplexity"], "loss": lm_metrics["loss"], "tokens": lm_metrics["tokens"]}
    if embedding_metrics is not None:
        metrics["embeddings"] = embedding_metrics
    for key, m in results.items():
        metrics[key] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
        if len(task_names) > 1:
            metrics[key]["tasks"] = m["tasks"]
    if len(task_names) > 1:
        metrics["test_examples_by_task"] = {t: int(len(df)) for t, df in tests.items()}
    # what pretraining bought (vs random init) and what continuing a checkpoint's pretraining bought (vs the
    # original checkpoint), each fine-tuned with the same budget
    for baseline, benefit in (("scratch_baseline", "benefit"), ("original_baseline", "benefit_continued")):
        if baseline in results:
            metrics[benefit] = {k: results["classifier"][k] - results[baseline][k] for k in ("accuracy", "f1_macro")}
    # measured transfer: each task's multi-task score against its single-task model with the same steps
    if singles:
        metrics["single_task_baseline"] = {t: {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"]}
                                           for t, m in singles.items()}
        metrics["transfer"] = {t: {"multi": results["classifier"]["tasks"][t]["accuracy"],
                                   "single": singles[t]["accuracy"],
                                   "difference": results["classifier"]["tasks"][t]["accuracy"] - singles[t]["accuracy"]}
                               for t in task_names}
    confusion = results["classifier"]["tasks"][default]["confusion_matrix"]
    metrics["classifier"]["confusion_matrix"] = confusion
    id2label = dict(enumerate(default_names))

    # 3) outputs: confusion rows for the DVC plot, PNG, metrics json (with this run's id)
    with atomic_path(root / cfg.confusion) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        w.writerows((names[a], names[p]) for a, p in zip(labels, preds_main))
    default_acc = results["classifier"]["tasks"][default]["accuracy"]
    plot_confusion(confusion, names, root / cfg.confusion_png,
                   f"classifier on test (accuracy {default_acc:.3f})" if len(task_names) == 1 else
                   f"classifier on {default} test (accuracy {default_acc:.3f})")
    # 4) the drift reference the server compares live traffic with: the classifier's test predictions, the
    # training split's words (what deploy ships in the model directory as drift_reference.json)
    train_texts = tasks.load_split(clean_dir, default, params.clean, "train")["text"]
    texts = test["text"].tolist()
    confidence = layout.predict(probs_main, default if layout.multi else None)[1]
    profile = reference_profile(texts, [id2label[int(p)] for p in preds_main], confidence.tolist(),
                                length_counter(tok_main)(texts), vocabulary(train_texts),
                                label_names=default_names)
    write_json(root / cfg.reference_profile, profile)
    # 5) the pipeline run this execution's stage runs nest under: the flow's / experiment's, or a new one
    pipeline, opened = _record(params, root, run, metrics)
    mlflow.log_artifact(str(root / cfg.reference_profile))
    mlflow.log_dict({"confusion_matrix": confusion, "labels": names}, "confusion_matrix.json")
    for t in task_names[1:]:  # the other tasks' confusion matrices, as artifacts
        tm = results["classifier"]["tasks"][t]
        mlflow.log_dict({"confusion_matrix": tm["confusion_matrix"], "labels": list(layout.labels[layout.index(t)])},
                        f"confusion_matrix_{t}.json")
    for t, df in tests.items():
        where = tasks.task_dir(Path(params.clean.out_dir), t, params.clean) / "labeled_test.parquet"
        mlflow.log_input(mlflow.data.from_pandas(df, source=str(where), targets="label",
                                                 name="labeled_test" if len(tests) == 1 else f"labeled_test_{t}"),
                         context="test")
    pipeline.summarize(params, root, metrics)
    if opened:
        pipeline.end()  # deploy, after it, joins and ends it again
    if lm_metrics is not None:
        line = f"evaluate: lm perplexity {lm_metrics['perplexity']:.1f}; "
    else:
        e = embedding_metrics
        line = (f"evaluate: simcse embeddings: SST-2 linear probe {e['before']['linear_probe_accuracy']:.4f} -> "
                f"{e['after']['linear_probe_accuracy']:.4f}, k-NN {e['before']['knn_accuracy']:.4f} -> "
                f"{e['after']['knn_accuracy']:.4f}, uniformity {e['before']['uniformity']:.3f} -> "
                f"{e['after']['uniformity']:.3f}, alignment {e['before']['alignment']:.3f} -> {e['after']['alignment']:.3f}; ")
    line += f"classifier accuracy {metrics['classifier']['accuracy']:.4f}"
    if len(task_names) > 1:
        line += " (mean of " + ", ".join(f"{t} {m['accuracy']:.4f}" for t, m in results["classifier"]["tasks"].items()) + ")"
    for t, tr in metrics.get("transfer", {}).items():
        line += f"; transfer {t} {tr['difference']:+.4f}"
    if "scratch_baseline" in metrics:
        line += f" vs scratch {metrics['scratch_baseline']['accuracy']:.4f}"
    if "original_baseline" in metrics:
        line += f" vs original checkpoint {metrics['original_baseline']['accuracy']:.4f}"
    print(line)


def _record(params: Params, root: Path, run, metrics: dict):
    """Join (or open) the execution's pipeline run, write evaluate.metrics with both run ids, log every number and
    the confusion plot and table; returns (pipeline run, whether this stage opened it)."""
    cfg = params.evaluate
    pipeline, opened = PipelineRun.for_stage(mlflow.MlflowClient(), run, params, root)
    metrics["mlflow_run_id"] = run.info.run_id
    metrics["pipeline_run_id"] = pipeline.run_id
    write_json(root / cfg.metrics, metrics)
    log_metrics_bounded({k: v for k, v in flatten(metrics).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    mlflow.log_artifact(str(root / cfg.confusion_png))
    mlflow.log_artifact(str(root / cfg.confusion))
    return pipeline, opened


PROBE_TRAIN = 2000
"""Training examples of the frozen-encoder probes (a seeded sample of clean.labeled's train split)."""
HELD_OUT = 500
"""Held-out corpus sentences for alignment and uniformity."""


def _embedding_report(params: Params, root: Path, encoder_dir: Path, dev: str) -> dict:
    """A contrastive (simcse) encoder against the encoder it started from (the pretrain.init checkpoint, or the
    same architecture's seeded random init): alignment and uniformity on held-out corpus sentences (the positive
    pair of a sentence: itself with a tenth of its words deleted), and frozen linear-probe / k-NN accuracy on
    clean.labeled (SST-2 by default; its test split)."""
    seed, clean_dir = params.common.seed, root / params.clean.out_dir
    after = AutoModel.from_pretrained(encoder_dir)
    tokenizer = load_tokenizer(encoder_dir)
    if params.pretrain.init == "scratch":
        torch.manual_seed(seed)
        before = AutoModel.from_config(after.config)
    else:
        before = AutoModel.from_pretrained(resolve_model_ref(params.pretrain.init, root, "pretrain.init"))
    docs = read_parquet(clean_dir / "corpus_validation.parquet", "clean")["text"].tolist()
    held = objectives.sentence_sample(docs, HELD_OUT, seed)
    deletion = Augment(copies=1, probability=0.1, ops=["delete"], model=None, top_k=1)
    perturbed = augment(pd.DataFrame({"text": held, "label": 0}), deletion, seed)["text"].tolist()[len(held):]
    train = read_parquet(clean_dir / "labeled_train.parquet", "clean")
    train = train.sample(n=min(PROBE_TRAIN, len(train)), random_state=seed)
    test = read_parquet(clean_dir / "labeled_test.parquet", "clean")
    pooling = getattr(after.config, embeddings.POOLING_KEY, params.pretrain.pooling)
    return embeddings.report(before, after, tokenizer, held, perturbed,
                             (train["text"].tolist(), train["label"].to_numpy()),
                             (test["text"].tolist(), test["label"].to_numpy()), pooling, params.evaluate.batch_size,
                             dev, seed, stored_max_length(tokenizer, after.config))


NO_LABEL = "(no label)"
"""The confusion plot's column for a generator's answers that are none of the label words."""


def answer_scores(answers: list[str], gold: list[str], label_words: list[str]) -> dict:
    """Exact match of each answer (stripped, case-folded) to its gold label word, and the share of answers that
    are none of the label words."""
    words = {w.strip().casefold() for w in label_words}
    norm = [a.strip().casefold() for a in answers]
    n = max(len(norm), 1)
    return {"exact_match": sum(a == g.strip().casefold() for a, g in zip(norm, gold)) / n,
            "not_a_label": sum(a not in words for a in norm) / n, "examples": len(norm)}


def _generators(params: Params, root: Path, run, lm_metrics: dict | None, dev: str) -> None:
    """finetune.head lm: score the generator and its scratch twin on the held-out conversations."""
    cfg, clean_dir = params.evaluate, root / params.clean.out_dir
    sources = conversations.sources_for(params.finetune, params.clean)
    test = conversations.load_split(clean_dir, sources, "test")
    task_names = [s for s in sources if s != conversations.SOURCES]
    label_words = {t: tasks.label_names(clean_dir, t, params.clean) for t in task_names}
    asked = [chat.prompt_and_answer(chat.loads(m)) for m in test["messages"]]

    def score(path: Path, table: bool) -> tuple[dict, dict]:
        model, tokenizer = load_generator(path, dev)
        limit = stored_max_length(tokenizer, model.config)  # the length it was fine-tuned at
        # 1) response perplexity: the assistant tokens of every held-out conversation, as training encodes them
        out = {f"response_{k}": v for k, v in sft.score_responses(model, tokenizer, test, cfg.batch_size, dev).items()}
        # 2) greedy answers to the task prompts: exact match to the gold label word
        answers: dict[str, list[str]] = {}
        for t in task_names:
            rows = [i for i, s in enumerate(test["source"]) if s == t]
            longest = max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in label_words[t])
            greedy = Sampling(max_new_tokens=longest + 2, temperature=0)
            prompts = [chat.prompt_text(tokenizer, asked[i][0]) for i in rows]
            answers[t] = [g.text for start in range(0, len(prompts), cfg.batch_size) for g in generate(
                model, tokenizer, prompts[start:start + cfg.batch_size], greedy,
                max_prompt_tokens=limit - greedy.max_new_tokens)]
        if task_names:
            per_task = {t: answer_scores(answers[t], [asked[i][1] for i, s in enumerate(test["source"]) if s == t],
                                         label_words[t]) for t in task_names}
            out["exact_match"] = float(np.mean([m["exact_match"] for m in per_task.values()]))
            out["not_a_label"] = float(np.mean([m["not_a_label"] for m in per_task.values()]))
            if len(task_names) > 1:
                out["tasks"] = per_task
        # 3) sampled answers to the first prompts of each source, beside the greedy ones (the selected model only)
        rows = []
        if table and cfg.samples.prompts:
            sampling = Sampling(max_new_tokens=cfg.samples.max_new_tokens, temperature=cfg.samples.temperature,
                                top_p=cfg.samples.top_p, seed=params.common.seed)
            for s in sources:
                idx = [i for i, src in enumerate(test["source"]) if src == s][:cfg.samples.prompts]
                prompts = [chat.prompt_text(tokenizer, asked[i][0]) for i in idx]
                kept = limit - sampling.max_new_tokens
                sampled = generate(model, tokenizer, prompts, sampling, max_prompt_tokens=kept) if prompts else []
                greedy_all = generate(model, tokenizer, prompts, Sampling(max_new_tokens=sampling.max_new_tokens,
                                                                          temperature=0), max_prompt_tokens=kept) \
                    if prompts else []
                rows += [{"source": s, "prompt": asked[i][0][-1]["content"], "expected": asked[i][1],
                          "greedy": g.text, "sampled": x.text} for i, g, x in zip(idx, greedy_all, sampled)]
        del model
        return out, {"answers": answers, "rows": rows}

    results, seen = {}, {}
    for key, folder, table in (("generator", params.finetune.out_dir, True),
                               ("scratch_baseline", params.finetune.scratch_dir, False)):
        path = need(root / folder, "finetune")
        if not (path / "config.json").is_file():
            continue  # finetune.scratch_baseline: false
        results[key], seen[key] = score(path, table)

    metrics: dict = {"test_examples": int(len(test)), "head": "lm"}
    if lm_metrics is not None:
        metrics["lm"] = {"perplexity": lm_metrics["perplexity"], "loss": lm_metrics["loss"], "tokens": lm_metrics["tokens"]}
    metrics.update(results)
    if "scratch_baseline" in results:  # what pretraining bought the generator
        metrics["benefit"] = {k: results["generator"][k] - results["scratch_baseline"][k]
                              for k in ("exact_match", "response_perplexity") if k in results["generator"]}

    # outputs: the confusion plot of the default task (gold label word vs answer; NO_LABEL for anything else);
    # a generator has no classifier drift reference (its predictions are free text): the file says so
    default = task_names[0] if task_names else None
    with atomic_path(root / cfg.confusion) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        if default is not None:
            words = label_words[default]
            gold = [asked[i][1] for i, s in enumerate(test["source"]) if s == default]
            picked = [next((x for x in words if x.casefold() == a.strip().casefold()), NO_LABEL)
                      for a in seen["generator"]["answers"][default]]
            w.writerows(zip(gold, picked))
            names = [*words, NO_LABEL]
            confusion = [[sum(1 for g, p in zip(gold, picked) if g == a and p == b) for b in names] for a in names]
            plot_confusion(confusion, names, root / cfg.confusion_png,
                           f"generator on {default} test (exact match "
                           f"{results['generator'].get('tasks', {}).get(default, results['generator'])['exact_match']:.3f})")
            metrics["generator"]["confusion_matrix"] = confusion
    if default is None:
        plot_confusion([[0]], [NO_LABEL], root / cfg.confusion_png, "generator: no task-derived test prompts")
    write_json(root / cfg.reference_profile, {"head": "lm", "drift_reference": None,
                                              "reason": "a generator's answers are free text, not classes"})
    pipeline, opened = _record(params, root, run, metrics)
    if seen["generator"]["rows"]:
        mlflow.log_table(pd.DataFrame(seen["generator"]["rows"]), artifact_file="sampled_answers.json")
    mlflow.log_input(mlflow.data.from_pandas(test, source=str(Path(params.clean.out_dir) / "sft"), name="sft_test"),
                     context="test")
    pipeline.summarize(params, root, metrics)
    if opened:
        pipeline.end()
    g = results["generator"]
    line = f"evaluate: lm perplexity {lm_metrics['perplexity']:.1f}; " if lm_metrics is not None else "evaluate: "
    line += f"generator response perplexity {g['response_perplexity']:.2f}"
    if "exact_match" in g:
        line += f", exact match {g['exact_match']:.4f} ({g['not_a_label']:.1%} no label)"
    if "scratch_baseline" in results and "exact_match" in results["scratch_baseline"]:
        line += f" vs scratch {results['scratch_baseline']['exact_match']:.4f}"
    print(line)
