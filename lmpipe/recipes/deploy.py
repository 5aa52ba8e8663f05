"""Deploy: quality gate, compressed variants measured and gated, MLflow model registry, champion alias.

    python -m stages.deploy           # the DVC stage `deploy` (stages/deploy.py) runs this recipe

1) gate: classifier.accuracy in evaluate.metrics must reach deploy.min_accuracy, else nothing is registered;
2) variants (deploy.variants, lmpipe/compress.py): each is built from the fine-tuned model, scored on the
   same test split as evaluate (accuracy, macro-F1) and timed on the same inputs (batch 1 and 32), its size
   measured; a variant that loses more than deploy.max_accuracy_drop against fp32 is refused (recorded in
   metrics/deploy.json and on the MLflow run, not an error);
3) every variant that passed is registered under deploy.model_name with its figures as version tags, and
   the fine-tuned model's validation accuracy (`val_accuracy`, the figure fine-tuning selected its checkpoint
   on); the alias (champion) moves to the deploy.serve_variant version (fp32 when that variant was refused)
   when its val_accuracy beats the holder's: choosing among experiments is selection, so it uses validation
   data, and the test split stays a report; the served variant is exported to deploy.out_dir/model.

finetune.head lm (`_gate_generator`): the generator is gated on deploy.min_exact_match and deploy.max_perplexity
(evaluate's generator.exact_match and response_perplexity); when it passes, its variants (fp32, int8_dynamic:
gated on deploy.max_perplexity_increase) are registered as the generator pyfunc (lmpipe/package.py) under
deploy.model_name and the alias moves to deploy.serve_variant's version as for a classifier, by exact match.
`lmpipe serve` on it answers POST /generate.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd

from lmpipe import compress, conversations, registry, sft, tasks
from lmpipe.config import Params
from lmpipe.errors import DataError
from lmpipe.generation import load_generator
from lmpipe.io import atomic_dir, read_json, write_json
from lmpipe.lineage import PARENT_TAG, PipelineRun
from lmpipe.monitoring import REFERENCE_FILE
from lmpipe.registry import log_generator, log_variant, promote
from lmpipe.names import model_uri, need


def measure_variants(params: Params, src: Path, work: Path, tests: dict[str, pd.DataFrame],
                     reference: Path | None = None, members: dict[str, Path] | None = None,
                     validation: dict[str, pd.DataFrame] | None = None) -> list[dict]:
    """Build, score, time and gate every variant of deploy.variants; rows in that order, fp32 first. `tests`:
    the test split of each task of the model (a multi-task model's accuracy is the mean over its tasks, each
    task's own in the row's `tasks`). Each variant directory gets evaluate's drift reference (`reference`) as
    drift_reference.json. The ensemble (`members`: deploy.ensemble resolved) is other models than the one
    fine-tuning selected, so it is also scored on `validation`, the figure its promotion compares."""
    cfg = params.deploy
    timing = next(iter(tests.values()))["text"].tolist()[:32]
    rows: list[dict] = []
    fp32_acc = None
    for variant in ["fp32", *[v for v in cfg.variants if v != "fp32"]]:
        row: dict = {"variant": variant}
        why = compress.supports(src, variant)
        if why:
            rows.append({**row, "status": "unsupported", "reason": why})
            print(f"deploy: variant {variant}: not built ({why})")
            continue
        dest = work / variant
        compress.build(variant, src, dest, cfg.sparsity, members if variant == "ensemble" else None)
        clf = compress.load(dest)
        m = _score(clf, tests, params.evaluate.batch_size)
        if variant == "ensemble":
            row["val_accuracy"] = _score(clf, validation, params.evaluate.batch_size)["accuracy"]
        if len(tests) > 1:
            row["tasks"] = {t: round(tm["accuracy"], 6) for t, tm in m["tasks"].items()}
        row.update(accuracy=m["accuracy"], f1_macro=m["f1_macro"], dir=str(dest),
                   latency_b1_ms=round(compress.latency_ms(clf, timing, 1, cfg.latency_repeats), 3),
                   latency_b32_ms=round(compress.latency_ms(clf, timing, 32, cfg.latency_repeats), 3),
                   size_mb=round(compress.size_mb(dest), 3))
        del clf
        if reference is not None:  # the server's drift monitor reads it from the model directory (not in size_mb)
            shutil.copy2(reference, dest / REFERENCE_FILE)
        if variant == "fp32":
            fp32_acc = m["accuracy"]
        row["accuracy_drop"] = round(fp32_acc - m["accuracy"], 6)
        if variant != "fp32" and row["accuracy_drop"] > cfg.max_accuracy_drop:
            row.update(status="refused", reason=f"accuracy drop {row['accuracy_drop']:.4f} > deploy.max_accuracy_drop "
                                                  f"{cfg.max_accuracy_drop}")
        else:
            row["status"] = "passed"
        rows.append(row)
        print(f"deploy: variant {variant}: accuracy {m['accuracy']:.4f} (drop {row['accuracy_drop']:+.4f}), "
              f"{row['latency_b1_ms']:.1f} ms @1, {row['latency_b32_ms']:.1f} ms @32, {row['size_mb']:.1f} MiB: "
              f"{row['status']}" + (f" ({row['reason']})" if row["status"] != "passed" else ""))
    fp32 = rows[0]
    for row in rows[1:]:
        if row.get("latency_b1_ms"):
            row["speedup_b1"] = round(fp32["latency_b1_ms"] / row["latency_b1_ms"], 3)
            row["speedup_b32"] = round(fp32["latency_b32_ms"] / row["latency_b32_ms"], 3)
            row["size_ratio"] = round(row["size_mb"] / fp32["size_mb"], 3)
    if "fp32" not in cfg.variants:
        rows[0].update(status="reference", reason="not in deploy.variants: measured as the reference, not registered")
    return rows


def _score(clf, splits: dict[str, pd.DataFrame], batch_size: int) -> dict:
    return tasks.score({t: clf.predict_proba(df["text"].tolist(), batch_size) for t, df in splits.items()},
                       {t: df["label"].to_numpy() for t, df in splits.items()}, clf.layout)


def ensemble_members(refs: list[str], root: Path, work: Path, own: Path) -> dict[str, Path]:
    """deploy.ensemble -> {what it named: the model directory}: a directory (relative to `root`) as it is, a
    registered version downloaded under `work`. Each must be a model directory other than `own` (the fine-tuned
    model, a member already); else one line naming it."""
    out = {}
    for i, ref in enumerate(refs):
        if ref.startswith("models:/"):
            out[ref] = registry.model_dir(ref, work / str(i), "deploy.ensemble")
        else:
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else root / path
            if not (path / "config.json").is_file():
                raise DataError(f"deploy.ensemble: {ref} is not a fine-tuned model dir (no {path / 'config.json'})")
            if path.resolve() == own.resolve():
                raise DataError(f"deploy.ensemble: {ref} is the fine-tuned model itself, which is always the first "
                                "member")
            out[ref] = path
    return out


def deploy(params: Params, root: Path, run) -> None:
    cfg = params.deploy
    ev = read_json(need(root / params.evaluate.metrics, "evaluate"))
    if params.finetune.head == "lm":
        return _gate_generator(params, root, run, ev)
    acc, f1 = float(ev["classifier"]["accuracy"]), float(ev["classifier"]["f1_macro"])
    model_dir = root / params.finetune.out_dir
    result = {"accuracy": acc, "min_accuracy": cfg.min_accuracy, "gate_passed": acc >= cfg.min_accuracy,
              "mlflow_run_id": run.info.run_id}
    mlflow.log_metrics({"accuracy": acc, "f1_macro": f1})
    # the execution's pipeline run: the flow's / experiment's (this run's parent), or the one evaluate opened
    parent = run.data.tags.get(PARENT_TAG) or ev.get("pipeline_run_id")
    pipeline = PipelineRun(mlflow.MlflowClient(), parent) if parent else None
    if pipeline is not None:
        pipeline.join("deploy", run, root)

    with atomic_dir(root / cfg.out_dir) as out, tempfile.TemporaryDirectory(prefix="lmpipe-variants-") as work:
        if not result["gate_passed"]:
            (out / "GATE_FAILED").write_text(f"accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}\n")
            mlflow.set_tag("deploy.gate", "failed")
            print(f"deploy: gate failed: accuracy {acc:.4f} < deploy.min_accuracy {cfg.min_accuracy}; not registered")
        elif not cfg.publish:
            result["registered"] = False
            (out / "NOT_REGISTERED").write_text("deploy.publish is false (e.g. a sweep trial)\n")
            mlflow.set_tags({"deploy.gate": "passed", "deploy.registered": "false"})
            print(f"deploy: gate passed (accuracy {acc:.4f}); deploy.publish is false: nothing registered")
        else:
            clean_dir = root / params.clean.out_dir
            selected = tasks.selected(params.finetune, params.clean)
            tests = {t: tasks.load_split(clean_dir, t, params.clean, "test") for t in selected}
            members = validation = None
            if "ensemble" in cfg.variants:
                members = ensemble_members(cfg.ensemble, root, Path(work) / "ensemble-sources", model_dir)
                compress.check_members(model_dir, members)  # before anything is built
                validation = {t: tasks.load_split(clean_dir, t, params.clean, "validation") for t in selected}
            reference = need(root / params.evaluate.reference_profile, "evaluate")
            rows = measure_variants(params, model_dir, Path(work), tests, reference, members, validation)
            served = _served(cfg, rows)
            shutil.copytree(next(r for r in rows if r["variant"] == served)["dir"], out / "model")  # export first
            # the selected checkpoint's validation accuracy, shared by every variant built from it
            val_acc = float(read_json(need(root / params.finetune.metrics, "finetune"))["classifier"]["val_accuracy"])
            result.update(_register(params, rows, served, run, val_acc))
            result["variants"] = {r.pop("variant"): {k: v for k, v in r.items() if k != "dir"} for r in rows}
            (out / "deploy.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_json(root / cfg.metrics, result)


def _served(cfg, rows: list[dict]) -> str:
    """deploy.serve_variant when it passed the gate, else fp32, else the first variant that passed."""
    passed = [r["variant"] for r in rows if r["status"] == "passed"]
    if not passed:
        raise DataError("deploy: no variant of deploy.variants passed the gate (" + "; ".join(
            f"{r['variant']}: {r['status']}" + (f" ({r['reason']})" if "reason" in r else "") for r in rows) + ")")
    return next(v for v in (cfg.serve_variant, "fp32", *passed) if v in passed)


def _register(params: Params, rows: list[dict], served: str, run, val_acc: float) -> dict:
    """Register the variants that passed, log their figures, move the alias to the served one when its
    validation accuracy `val_acc` (the fine-tuned model's) wins."""
    cfg = params.deploy
    client = mlflow.MlflowClient()
    mlflow.log_metric("val_accuracy", val_acc)
    versions = {}
    for r in rows:
        figures = {k: r[k] for k in ("accuracy", "f1_macro", "accuracy_drop", "latency_b1_ms", "latency_b32_ms",
                                     "size_mb") if k in r} | {"val_accuracy": r.get("val_accuracy", val_acc)}
        mlflow.log_metrics({f"variant.{r['variant']}.{k}": v for k, v in figures.items()})
        mlflow.set_tag(f"deploy.variant.{r['variant']}", r["status"] + (f": {r['reason']}" if "reason" in r else ""))
        if r["status"] == "passed":
            versions[r["variant"]] = log_variant(Path(r["dir"]), cfg.model_name, r["variant"], figures, run)
            r["version"] = versions[r["variant"]]
    result = {"registered_model": cfg.model_name, "served_variant": served, "version": versions[served],
              "versions": versions, "model_uri": model_uri(cfg.model_name, version=versions[served])}
    if served != cfg.serve_variant:
        result["serve_variant_refused"] = cfg.serve_variant
        print(f"deploy: deploy.serve_variant {cfg.serve_variant} was not registered (see its row); serving {served}")
    served_row = next(r for r in rows if r["variant"] == served)
    val_acc = served_row.get("val_accuracy", val_acc)  # the ensemble's own; every other variant's is the model's
    result.update(promote(client, cfg.model_name, cfg.alias, versions[served], val_acc, key="val_accuracy"))
    mlflow.set_tags({"deploy.gate": "passed", "deploy.version": versions[served], "deploy.served_variant": served,
                     "deploy.promoted": str(result["promoted"])})
    old_version, old_score = result["previous_champion"], result["previous_champion_score"]
    verdict = (f"{cfg.alias} -> v{versions[served]}" if result["promoted"]
               else f"{cfg.alias} stays v{old_version} (val accuracy {old_score:.4f})")
    print(f"deploy: registered {cfg.model_name} " + ", ".join(f"{v} v{n}" for v, n in versions.items())
          + f"; serving {served} (val accuracy {val_acc:.4f}, test accuracy {served_row['accuracy']:.4f}); {verdict}")
    return result


def _gate_generator(params: Params, root: Path, run, ev: dict) -> None:
    """finetune.head lm: exact match (when there are task-derived prompts) and response perplexity against the
    gates; a generator that passes is exported to deploy.out_dir/model and registered (deploy.publish)."""
    cfg, g = params.deploy, ev["generator"]
    em, ppl = g.get("exact_match"), float(g["response_perplexity"])
    failed = ([f"exact match {em:.4f} < deploy.min_exact_match {cfg.min_exact_match}"]
              if em is not None and em < cfg.min_exact_match else []) + \
        ([f"response perplexity {ppl:.2f} > deploy.max_perplexity {cfg.max_perplexity}"] if ppl > cfg.max_perplexity else [])
    result = {"head": "lm", "exact_match": em, "min_exact_match": cfg.min_exact_match, "response_perplexity": ppl,
              "max_perplexity": cfg.max_perplexity, "gate_passed": not failed, "registered": False,
              "mlflow_run_id": run.info.run_id}
    mlflow.log_metrics({k: v for k, v in (("exact_match", em), ("response_perplexity", ppl)) if v is not None})
    parent = run.data.tags.get(PARENT_TAG) or ev.get("pipeline_run_id")
    if parent:
        PipelineRun(mlflow.MlflowClient(), parent).join("deploy", run, root)
    with atomic_dir(root / cfg.out_dir) as out:
        if failed:
            (out / "GATE_FAILED").write_text("; ".join(failed) + "\n")
        elif not cfg.publish:
            (out / "NOT_REGISTERED").write_text("deploy.publish is false (e.g. a sweep trial)\n")
        else:
            result.update(_register_generator(params, root, out, em, ppl, run))
    mlflow.set_tags({"deploy.gate": "failed" if failed else "passed",
                     "deploy.registered": str(bool(result.get("version"))).lower()})
    write_json(root / cfg.metrics, result)
    if failed:
        print(f"deploy: generator gate failed: {'; '.join(failed)}; not registered")
    elif not result.get("version"):
        print("deploy: generator gate passed; deploy.publish is false: nothing registered")


def _register_generator(params: Params, root: Path, out: Path, em: float | None, ppl: float, run) -> dict:
    """Build the generator's variants (deploy.variants that apply to a causal LM: fp32, int8_dynamic), refuse an
    int8 variant whose response perplexity on the held-out conversations rises more than
    deploy.max_perplexity_increase over fp32's (both measured here, alike), register the rest under
    deploy.model_name, export the served one to `out`/model and move the alias to it when its exact match beats
    the holder's (a generator without task-derived prompts has none: it takes the alias when it passes)."""
    cfg = params.deploy
    wanted = [v for v in ("fp32", *cfg.variants) if v in compress.GENERATOR_VARIANTS]
    test = conversations.load_split(root / params.clean.out_dir,
                                    conversations.sources_for(params.finetune, params.clean), "test")
    rows: dict[str, dict] = {v: {"status": "unsupported", "reason": "a generator's variants are "
                                 + ", ".join(compress.GENERATOR_VARIANTS)}
                             for v in cfg.variants if v not in compress.GENERATOR_VARIANTS}
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lmpipe-variants-") as work:
        for variant in dict.fromkeys(wanted):
            dest = Path(work) / variant
            compress.build_generator(variant, root / params.finetune.out_dir, dest)
            model, tokenizer = load_generator(dest)
            row = {"response_perplexity": sft.score_responses(model, tokenizer, test, params.evaluate.batch_size,
                                                              "cpu")["perplexity"], "size_mb": compress.size_mb(dest)}
            del model
            base = rows.get("fp32", row)["response_perplexity"]
            row["perplexity_increase"] = row["response_perplexity"] / base - 1
            passed = variant == "fp32" or row["perplexity_increase"] <= cfg.max_perplexity_increase
            row["status"] = "passed" if passed else "refused"
            if not passed:
                row["reason"] = (f"response perplexity +{row['perplexity_increase']:.2%} > "
                                 f"deploy.max_perplexity_increase {cfg.max_perplexity_increase:.2%}")
            rows[variant] = row
            mlflow.log_metrics({f"variant.{variant}.{k}": v for k, v in row.items() if isinstance(v, float)})
            mlflow.set_tag(f"deploy.variant.{variant}", row["status"] + (f": {row['reason']}" if not passed else ""))
            if passed and variant in cfg.variants:
                figures = {"response_perplexity": row["response_perplexity"], "size_mb": row["size_mb"],
                           **({"exact_match": em, "accuracy": em} if em is not None else {})}
                versions[variant] = row["version"] = log_generator(dest, cfg.model_name, figures, run, variant)
            print(f"deploy: generator variant {variant}: response perplexity {row['response_perplexity']:.3f} "
                  f"({row['perplexity_increase']:+.2%}), {row['size_mb']:.1f} MiB: {row['status']}"
                  + (f" ({row['reason']})" if not passed else ""))
        served = cfg.serve_variant if cfg.serve_variant in versions else next(iter(versions), None)
        if served is None:
            raise DataError("deploy: no generator variant of deploy.variants passed (" + "; ".join(
                f"{v}: {r['status']}" for v, r in rows.items()) + ")")
        if served != cfg.serve_variant:
            print(f"deploy: deploy.serve_variant {cfg.serve_variant} was not registered (see its row); serving {served}")
        shutil.copytree(Path(work) / served, out / "model")
    result = {"registered": True, "registered_model": cfg.model_name, "served_variant": served,
              "version": versions[served], "versions": versions, "variants": rows,
              "model_uri": model_uri(cfg.model_name, version=versions[served])}
    result.update(promote(mlflow.MlflowClient(), cfg.model_name, cfg.alias, versions[served],
                          em if em is not None else 1.0))
    mlflow.set_tags({"deploy.version": versions[served], "deploy.served_variant": served,
                     "deploy.promoted": str(result["promoted"])})
    verdict = (f"{cfg.alias} -> v{versions[served]}" if result["promoted"]
               else f"{cfg.alias} stays v{result['previous_champion']}")
    print(f"deploy: registered generator {cfg.model_name} " + ", ".join(f"{v} v{n}" for v, n in versions.items())
          + f"; serving {served} (exact match {'n/a' if em is None else f'{em:.4f}'}, response perplexity "
          f"{ppl:.2f}); {verdict}")
    return result
