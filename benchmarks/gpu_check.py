"""One short check of a CUDA host: the smoke profile's pipeline on the GPU, then its pretraining speed.

    .venv/bin/python benchmarks/gpu_check.py                       # profiles/smoke.yaml, compile on, precision auto
    .venv/bin/python benchmarks/gpu_check.py --profile profiles/nanogpt-shakespeare-char.yaml --peak-tflops 989

Runs `lmpipe smoke --profile <profile>` (a DVC experiment: params.yaml untouched) with LMPIPE_DEVICE=cuda,
pretrain.compile=true and pretrain.precision=auto, then reads the pretrain stage's MLflow run and prints: the GPU
(host.* tags), tokens/s (steady state, evaluations and saves left out), MFU = 6 x parameters x tokens/s over the
device's dense bf16 peak (a table of known parts, or --peak-tflops), and whether bf16 autocast and torch.compile
were used. The smoke model is tiny, so its MFU is a floor, not the GPU's: pass a larger profile for a real figure.
On a machine without CUDA it says so in one line and exits 0. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOPS), matched in this order against the name."""


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="profiles/smoke.yaml")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
              "nothing to check (on a GPU host: the README's CUDA install, then this script)")
        return 0
    import mlflow

    from lmpipe.tracking import tracking_uri
    from lmpipe.training import precision_flags

    name = f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    sets = ["pretrain.compile=true", "pretrain.precision=auto", *args.set]
    cmd = [str(Path(sys.executable).parent / "lmpipe"), "smoke", "--profile", args.profile, "--name", name,
           *[a for s in sets for a in ("--set", s)]]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "LMPIPE_DEVICE": "cuda"})
    if res.returncode != 0:
        print(f"gpu_check: the smoke pipeline failed (exit {res.returncode})", file=sys.stderr)
        return res.returncode
    client = mlflow.MlflowClient(tracking_uri(ROOT))
    runs = [r for e in client.search_experiments() for r in client.search_runs(
        [e.experiment_id], "tags.`lmpipe.stage` = 'pretrain'", order_by=["attributes.start_time DESC"], max_results=5)
        if r.info.start_time / 1000 >= t0]
    if not runs:
        print("gpu_check: no pretrain run of this check in MLflow", file=sys.stderr)
        return 1
    run = runs[0]
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    tokens_s = m.get("train_tokens_per_s") or m.get("tokens_per_s", 0.0)
    compiled = p.get("pretrain.compile", "").lower() == "true"
    bf16 = precision_flags(p.get("pretrain.precision", "auto"), "cuda", compiled)["bf16"]
    gpu = tags.get("host.gpu", torch.cuda.get_device_name(0))
    peak = args.peak_tflops or peak_tflops(gpu)
    mfu = 6 * m.get("parameters", 0) * tokens_s / (peak * 1e12) if peak else None
    print(f"gpu: {gpu} x{tags.get('host.gpu_count', '?')}, {tags.get('host.gpu_memory_gib', '?')} GiB; CUDA "
          f"{tags.get('host.cuda', torch.version.cuda)}, cuDNN {tags.get('host.cudnn', '?')}; torch {torch.__version__}")
    print(f"pretrain: {tokens_s:,.0f} tokens/s, {int(m.get('parameters', 0)):,} parameters; MFU "
          f"{f'{mfu:.2%} of {peak:g} TFLOPS bf16' if mfu is not None else 'n/a (unknown peak: --peak-tflops)'}; "
          f"bf16 autocast {'yes' if bf16 else 'no'}; torch.compile {'yes' if compiled else 'no'}")
    print(json.dumps({"gpu": gpu, "tokens_per_s": tokens_s, "parameters": m.get("parameters"), "mfu": mfu,
                      "peak_tflops": peak, "bf16": bf16, "compile": compiled, "run_id": run.info.run_id,
                      "experiment": name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
