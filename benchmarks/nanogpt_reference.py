"""The reference for benchmarks/stage_wall.py: nanoGPT's shakespeare_char CPU run, model and loop as nanoGPT
writes them (model.py's GPT, train.py's loop), in one process, so its wall time compares with a stage's.

    .venv/bin/python benchmarks/nanogpt_reference.py --compile false [--max-iters 2000] [--out DIR]
    .venv/bin/python benchmarks/nanogpt_reference.py --text input.txt --eval-final DIR/final.pt

The first trains and writes the final weights to DIR/final.pt after its timing; the second (run untimed) scores
them the way the lmpipe stage scores its model: the mean loss over every non-overlapping 64-token validation
block, each position predicting the next token of its block (63 targets a block), so the two val losses
compare number to number beside nanoGPT's own estimate on 20 random batches.

What nanoGPT runs for the issue's figures:
    python data/shakespeare_char/prepare.py
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 \
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
Kept from nanoGPT: the character vocabulary of the whole text and its 90/10 split by characters; random
windows per batch; GPT with bias-free LayerNorm/Linear, tied embeddings, GELU MLP, SDPA attention, its init;
AdamW (weight decay on 2-D parameters, betas 0.9/0.99, not fused on CPU), warmup 100 then cosine to 1e-4,
clipping at 1.0, fp32 on CPU (nanoGPT's nullcontext), evaluation every 250 iterations on 20 batches of each
split, a checkpoint whenever val loss improves. Prints one JSON line: val loss, steady tokens/s, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import time

T0 = time.perf_counter()  # process start, as near as Python gets: imports are part of the wall time

import os  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


class LayerNorm(nn.Module):
    def __init__(self, ndim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn = LayerNorm(n_embd), CausalSelfAttention(n_embd, n_head)
        self.ln_2 = LayerNorm(n_embd)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd), wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)]), ln_f=LayerNorm(n_embd)))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.size(1), dtype=torch.long)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        if targets is None:  # nanoGPT's inference path: the last position's logits only, (B, 1, vocab)
            return self.lm_head(self.transformer.ln_f(x)[:, [-1], :])
        logits = self.lm_head(self.transformer.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """nanoGPT's GPT.generate (what its sample.py calls): every new token runs the whole context, cropped
        to block_size, through the model again (no KV cache)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.block_size else idx[:, -self.block_size:]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True, help="tiny-shakespeare input.txt")
    ap.add_argument("--compile", choices=["true", "false"], default="false")
    ap.add_argument("--max-iters", type=int, default=2000)
    ap.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    ap.add_argument("--eval-final", default=None, help="score a final.pt on every validation block and exit")
    args = ap.parse_args()
    block_size, batch_size, eval_interval, eval_iters, warmup, lr, min_lr = 64, 12, 250, 20, 100, 1e-3, 1e-4
    torch.manual_seed(1337)

    # data/shakespeare_char/prepare.py: the characters of the whole text, the first 90% train, the rest val
    text = Path(args.text).read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = len(ids)
    data = {"train": torch.from_numpy(ids[: int(n * 0.9)].astype(np.int64)),
            "val": torch.from_numpy(ids[int(n * 0.9):].astype(np.int64))}

    def get_batch(split: str):
        d = data[split]
        ix = torch.randint(len(d) - block_size, (batch_size,))
        return torch.stack([d[i:i + block_size] for i in ix]), torch.stack([d[i + 1:i + 1 + block_size] for i in ix])

    model = GPT(len(chars), block_size, 4, 4, 128)
    if args.eval_final:
        model.load_state_dict(torch.load(args.eval_final, weights_only=True))
        model.eval()
        val = data["val"][: len(data["val"]) // block_size * block_size].view(-1, block_size)
        with torch.inference_mode():
            total = sum(float(model(b[:, :-1].contiguous(), b[:, 1:].contiguous())) * len(b) for b in val.split(256))
        print(json.dumps({"val_loss_all_blocks": round(total / len(val), 4), "val_blocks": len(val)}))
        return
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))
    fwd = torch.compile(model) if args.compile == "true" else model

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {split: float(torch.stack([fwd(*get_batch(split)) for _ in range(eval_iters)]).mean())
               for split in ("train", "val")}
        model.train()
        return out

    def lr_at(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (args.max_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(ratio, 1.0))) * (lr - min_lr)

    out_dir = Path(args.out or tempfile.mkdtemp())
    best, losses, step_times = 1e9, {}, []
    x, y = get_batch("train")
    for it in range(args.max_iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(it)
        if it % eval_interval == 0:
            losses = estimate_loss()
            if losses["val"] < best:
                best = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it},
                               out_dir / "ckpt.pt")
        if it == args.max_iters:
            break
        t0 = time.perf_counter()
        loss = fwd(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT reads the loss at every log_interval=1
        step_times.append(time.perf_counter() - t0)
    steady = float(np.median(step_times[len(step_times) // 10:]))
    seconds = time.perf_counter() - T0
    torch.save(model.state_dict(), out_dir / "final.pt")  # for --eval-final, after the timing
    print(json.dumps({"compile": args.compile == "true", "val_loss": round(losses["val"], 4),
                      "train_loss": round(losses["train"], 4), "tokens_per_s": round(batch_size * block_size / steady),
                      "seconds_in_process": round(seconds, 2), "threads": torch.get_num_threads(),
                      "pid": os.getpid()}))


if __name__ == "__main__":
    main()
