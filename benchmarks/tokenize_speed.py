"""Tokenize throughput: the tokenize stage's encoding + packing path against raw `tokenizers` encode_batch on the
same corpus and tokenizer, in one run.

    .venv/bin/python benchmarks/tokenize_speed.py [--rounds 7] [--kinds bpe,char] [--corpus wikitext|pipeline]

The corpus is the clean stage's train split, made by `python -m stages.clean` in a scratch folder: WikiText-2 raw
valid + test (the train file is not in ../shared/data, PROVENANCE.md), or with --corpus pipeline the corpus
params.yaml lists (WikiText-2 + the SST-2 train sentences). For each tokenizer kind the stage trains
(`lmpipe.tokenizer.train_tokenizer`, the stage's settings), rows:
  (a) raw encode_batch: a plain `tokenizers.Tokenizer` (the trained one's JSON) encoding the whole split in
      one call, ids left in the Encoding objects -- the reference;
  (a') raw encode_batch_fast: the same without character offsets;
  (b) lmpipe: `encode_stream` + `pack_blocks`, the stage's path, ids out into a (n_blocks, block_size) array;
  (c) before: what encode_stream did until now (transformers' own call, one np.asarray per document), packed.
Each with the backend's threads on and off (TOKENIZERS_PARALLELISM, which `tokenizers` reads at every call).
Rounds alternate the rows so a slow spell of a shared host hits all of them alike; each figure is the best
round (as timeit does); with threads off the ratio is also given by CPU time, which a busy host disturbs less.
Then the whole `python -m stages.tokenize` per kind as a process, with tokenize.parallel true and false: wall
from start to outputs written (and the stage's imports alone), and the train split's tokens/s the stage
records. Last line: one JSON object.
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
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe.datasource import data_dir  # noqa: E402
from lmpipe.experiments import prepare  # noqa: E402

WIKITEXT = [{"path": "pretrain/wikitext-2-raw/wiki.valid.raw"}, {"path": "pretrain/wikitext-2-raw/wiki.test.raw"}]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"tokenize_speed: {' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return seconds


def old_path(tok, texts: list[str], block_size: int) -> np.ndarray:
    """encode_stream + pack_blocks as they were before the fast path (1000 documents per call)."""
    from lmpipe.tokenizer import pack_blocks

    chunks = []
    for start in range(0, len(texts), 1000):
        chunks.extend(np.asarray(ids, dtype=np.int64) for ids in tok(texts[start:start + 1000])["input_ids"])
    return pack_blocks(np.concatenate(chunks), block_size, len(tok))


ROWS = {"a": "(a)  raw encode_batch", "a_fast": "(a') raw encode_batch_fast",
        "b": "(b)  lmpipe encode_stream + pack_blocks", "c": "(c)  before: transformers call + pack"}
THREADS = {"on": "true", "off": "false"}  # TOKENIZERS_PARALLELISM


def measure(kind: str, texts: list[str], params, rounds: int) -> dict:
    """Best-of-rounds wall and CPU seconds of every row, threads on and off, for one tokenizer kind; and whether
    (b) and (c) make the same blocks."""
    from tokenizers import Tokenizer

    from lmpipe.tokenizer import encode_stream, pack_blocks, train_tokenizer

    cfg = params.tokenize
    tok = train_tokenizer(texts, kind, cfg.vocab_size, cfg.min_frequency, params.pretrain.max_position_embeddings)
    tok.model_max_length = int(1e12)  # as the stage sets it: documents are packed, not truncated
    raw = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    tokens = len(encode_stream(tok, texts, total=len(texts), desc=f"{kind} (count)"))
    rows = {"a": lambda: raw.encode_batch(texts),
            "a_fast": lambda: raw.encode_batch_fast(texts),
            "b": lambda: pack_blocks(encode_stream(tok, texts, total=len(texts), desc=kind), cfg.block_size, len(tok)),
            "c": lambda: old_path(tok, texts, cfg.block_size)}
    wall: dict[tuple[str, str], float] = {}
    cpu: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for threads, env_value in THREADS.items():
            os.environ["TOKENIZERS_PARALLELISM"] = env_value
            for row, fn in rows.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[row, threads] = min(wall.get((row, threads), float("inf")), time.perf_counter() - t0)
                cpu[row, threads] = min(cpu.get((row, threads), float("inf")), time.process_time() - c0)
    same = bool(np.array_equal(rows["b"](), rows["c"]()))
    return {"kind": kind, "vocab": len(tok), "tokens": tokens, "wall": wall, "cpu": cpu, "identical_to_before": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--kinds", default="bpe,char")
    ap.add_argument("--corpus", choices=("wikitext", "pipeline"), default="wikitext")
    ap.add_argument("--skip-stage", action="store_true", help="no whole-stage runs")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmpipe-tokenize-speed-"))
    # 1) the clean stage's train split in a scratch folder (not timed)
    raw, params = prepare(ROOT, {"clean.corpus": WIKITEXT} if args.corpus == "wikitext" else None, None)
    (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "LMPIPE_DATA_DIR": str(data_dir(ROOT)),
           "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    timed([sys.executable, "-m", "stages.clean"], tmp, env)
    import pandas as pd

    texts = pd.read_parquet(tmp / params.clean.out_dir / "corpus_train.parquet")["text"].tolist()
    chars = sum(map(len, texts))
    print(f"corpus ({args.corpus}): clean train split, {len(texts)} documents, {chars / 1e6:.2f} M characters; "
          f"{os.cpu_count()} cores", flush=True)

    # 2) in-process rows, per kind
    results = [measure(kind, texts, params, args.rounds) for kind in args.kinds.split(",")]

    # 3) the whole stage as a process, per kind, tokenize.parallel on and off (TOKENIZERS_PARALLELISM unset: the
    # knob decides)
    stage_env = {k: v for k, v in env.items() if k != "TOKENIZERS_PARALLELISM"}
    imports = None if args.skip_stage else timed(
        [sys.executable, "-c", "import stages.tokenize, lmpipe.tracking, mlflow"], tmp, stage_env)  # the import floor
    for res in results:
        res["stage"] = {}
        for threads in ([] if args.skip_stage else THREADS):
            wall = timed([sys.executable, "-m", "stages.tokenize", "--set", f"tokenize.kind={res['kind']}", "--set",
                          f"tokenize.parallel={THREADS[threads]}"], tmp, stage_env)
            m = json.loads((tmp / params.tokenize.metrics).read_text())
            assert m["tokenizers_parallelism"] == THREADS[threads], m
            res["stage"][threads] = {"wall_s": round(wall, 2), "train_tokens_per_s": m["train"]["tokens_per_s"],
                                     "tokenizer_train_s": m["tokenizer_train_seconds"]}

    # 4) the table: tokens/s at the best wall time; with threads off the work is one thread, so the ratio of CPU
    # times is the same comparison with the other sessions' load on the host mostly taken out
    print(f"\n{'':44}{'threads on':>20}{'threads off':>32}")
    print(f"{'':44}{'tokens/s':>10}{'vs (a)':>10}{'tokens/s':>10}{'vs (a)':>10}{'by CPU s':>12}")
    summary: dict = {"corpus": args.corpus, "documents": len(texts), "characters": chars, "rounds": args.rounds,
                     "cores": os.cpu_count(), "kinds": {}}
    for res in results:
        wall, cpu, n = res["wall"], res["cpu"], res["tokens"]
        print(f"{res['kind']} (vocab {res['vocab']}, {n} tokens, block {params.tokenize.block_size}; "
              f"output identical to before: {res['identical_to_before']}; threads on: (a) ran on "
              f"{cpu['a', 'on'] / wall['a', 'on']:.2f} cores)")
        out = {"tokens": n, "identical_to_before": res["identical_to_before"]}
        for row, label in ROWS.items():
            print(f"  {label:42}{n / wall[row, 'on']:10.0f}{wall['a', 'on'] / wall[row, 'on']:10.2f}"
                  f"{n / wall[row, 'off']:10.0f}{wall['a', 'off'] / wall[row, 'off']:10.2f}"
                  f"{cpu['a', 'off'] / cpu[row, 'off']:12.2f}")
            for threads in THREADS:
                out[f"{row}_tokens_per_s_{threads}"] = round(n / wall[row, threads])
                out[f"{row}_vs_a_{threads}"] = round(wall["a", threads] / wall[row, threads], 3)
            out[f"{row}_vs_a_off_cpu"] = round(cpu["a", "off"] / cpu[row, "off"], 3)
        for threads, st in res["stage"].items():
            print(f"  python -m stages.tokenize, tokenize.parallel={THREADS[threads]}: {st['wall_s']:.1f} s wall "
                  f"(process start to outputs written; tokenizer training {st['tokenizer_train_s']:.1f} s); "
                  f"its train split at {st['train_tokens_per_s']} tokens/s")
        out["stage"] = res["stage"]
        summary["kinds"][res["kind"]] = out
    if imports is not None:
        summary["stage_import_s"] = round(imports, 2)
        print(f"the stage's imports alone (python -c 'import stages.tokenize, mlflow'): {imports:.1f} s")
    print(f"best of {args.rounds} rounds")
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
