"""Pretraining throughput on nanoGPT's shakespeare_char CPU shape, project path vs a plain loop.

    .venv/bin/python benchmarks/pretrain_throughput.py [--steps 200] [--arch llama|gpt2]

Shape of the reference (nanoGPT `train_shakespeare_char.py --device=cpu --compile=False`): 4 layers,
4 heads, hidden 128, context 64, batch 12, character vocabulary, tiny-shakespeare. nanoGPT measured
about 23,000 tokens/s on 2 cores. Prints tokens/s, model FLOPs per token, MFU against a matmul peak
measured in the same run, for (a) lmpipe's pretrain code path (transformers Trainer) and (b) a minimal
plain-PyTorch loop over the same transformers model. Last line: one JSON object.
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

from lmpipe.config import Common, Pretrain, data_dir  # noqa: E402
from lmpipe.modeling import build_lm, build_lm_config  # noqa: E402
from lmpipe.tokenizer import encode_stream, pack_blocks, train_tokenizer  # noqa: E402


def matmul_peak_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_token(model: torch.nn.Module, cfg: Pretrain, block: int) -> float:
    """6N (forward + backward over the parameters) + 12·L·d·T (attention scores), PaLM appendix B."""
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * cfg.num_layers * cfg.hidden_size * block


def plain_loop(model, blocks: np.ndarray, batch: int, steps: int, lr: float) -> float:
    """The no-framework reference: sample, forward, backward, clip, AdamW step. Returns tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    data = torch.from_numpy(np.asarray(blocks, dtype=np.int64))
    model.train()

    def step() -> None:
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[idx]  # (B, T)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch * data.shape[1] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    torch.manual_seed(0)
    text = (data_dir(Common(), ROOT) / "pretrain" / "tinyshakespeare" / "input.txt").read_text()
    tok = train_tokenizer([text], "char", 0, 1, 64)
    ids = encode_stream(tok, [text], total=1)
    split = int(len(ids) * 0.9)
    train, val = pack_blocks(ids[:split], 64, len(tok)), pack_blocks(ids[split:], 64, len(tok))
    cfg = Pretrain(arch=args.arch, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512,
                   max_position_embeddings=64, batch_size=12, max_steps=args.steps, warmup_steps=10,
                   learning_rate=1e-3, eval_every=10**6, eval_batches=1, checkpoint_every=10**6, log_every=10**6)
    peak = matmul_peak_gflops()

    import mlflow

    from lmpipe.training import pretrain

    model = build_lm(build_lm_config(cfg, tok), "clm")
    fpt = flops_per_token(model, cfg, 64)
    with tempfile.TemporaryDirectory() as ckpt, mlflow.start_run():
        res = pretrain(model, tok, train, val[:24], cfg, "cpu", 0, Path(ckpt))
    project = res.metrics["tokens_per_s"]
    torch.manual_seed(0)
    reference = plain_loop(build_lm(build_lm_config(cfg, tok), "clm"), train, 12, args.steps, 1e-3)
    out = {"arch": args.arch, "parameters": int(sum(p.numel() for p in model.parameters())),
           "steps": args.steps, "threads": torch.get_num_threads(), "peak_gflops": round(peak, 1),
           "flops_per_token": int(fpt), "tokens_per_s": round(project), "reference_tokens_per_s": round(reference),
           "ratio": round(project / reference, 3), "mfu": round(project * fpt / (peak * 1e9), 4),
           "reference_mfu": round(reference * fpt / (peak * 1e9), 4), "nanogpt_tokens_per_s": 23000}
    print(f"{'':24}{'tokens/s':>10}{'ms/step':>10}{'MFU':>8}")
    for name, tps in (("lmpipe (Trainer)", project), ("plain loop", reference), ("nanoGPT (reported)", 23000)):
        mfu = f"{tps * fpt / (peak * 1e9):8.1%}" if name != "nanoGPT (reported)" else f"{'-':>8}"
        print(f"{name:24}{tps:10.0f}{768 / tps * 1000:10.1f}{mfu}")
    print(f"matmul peak {peak:.1f} GFLOP/s, {fpt / 1e6:.2f} MFLOP/token, {out['parameters'] / 1e6:.2f}M parameters")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
