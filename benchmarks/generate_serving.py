"""The served generator under 1, 4 and 16 concurrent streaming clients, against a plain sequential generate loop.

    .venv/bin/python benchmarks/generate_serving.py [--new-tokens 64] [--rounds 2] [--requests-per-client 3]

The model has params.yaml's pretrain shape (llama, hidden 192, 4 layers, 4 heads, intermediate 768,
max_position_embeddings 256) with a byte-level BPE tokenizer of tokenize.vocab_size tokens trained on the data
folder's SST-2 train sentences, RANDOM weights (seed 0): the speed of a forward pass does not depend on what
was learned, and no pipeline run is needed. It is saved once to .lmpipe/bench/generate_serving/model.

Each round: (1) the reference, a plain loop of `model.generate` calls, one prompt at a time, in this process
(same prompts, same sampling, torch threads = serve.threads); (2) a real `lmpipe serve --model-uri <dir>`
process (params.yaml's serve section) driven by 1, 4 and 16 client threads, each with its own keep-alive
connection, sending streaming /generate requests back to back and reading the Server-Sent Events. Prompts are
SST-2 dev sentences; sampling at temperature 1, no seed (so concurrent requests share generate calls);
new tokens counted from each answer's final event. Figures: aggregate new tokens/s (wall of the whole level),
time to first token p50/p99 (client side: request sent -> first text event; the reference: generate called ->
its first new token), best round of each. Targets: 16 clients >= 3x the plain loop's tokens/s, one client
>= 0.9x. Prints the CPU model, a table side by side with the reference, then one JSON line.

`measure()` returns the figures (benchmarks/generate_speed.py calls it); `main()` parses the flags and prints.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe import host  # noqa: E402
from lmpipe.processes import free_port  # noqa: E402

CACHE = ROOT / ".lmpipe" / "bench" / "generate_serving"
LEVELS = (1, 4, 16)


def cpu_model() -> str:
    """'<model name> (<n> cores visible)'."""
    return f"{host.cpu_model()} ({os.cpu_count()} cores visible)"


def sentences(split: str) -> list[str]:
    from lmpipe import datasource

    with open(datasource.data_dir(ROOT) / "sst2" / f"{split}.tsv", newline="", encoding="utf-8") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def build_model(dest: Path) -> Path:
    """params.yaml's pretrain shape with random weights and a tokenizer of tokenize.vocab_size, saved to `dest`."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmpipe.modeling import build_lm_config
    from lmpipe.params import load_params
    from lmpipe.tokenizer import train_tokenizer

    params = load_params(ROOT / "params.yaml")
    cfg = params.pretrain
    tok = train_tokenizer(sentences("train"), "bpe", params.tokenize.vocab_size, 2, cfg.max_position_embeddings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(build_lm_config(cfg, tok))
    tmp = dest.with_name(dest.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)
    return dest


def reference(model_dir: Path, prompts: list[str], new_tokens: int, threads: int) -> dict:
    """The plain loop: `model.generate` per prompt, one after the other; tokens/s and time to first token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from lmpipe.generation import encode_prompt

    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.at = None

        def put(self, value):
            if value.dim() == 1 and self.at is None:  # the first put is the prompt, (1, T)
                self.at = time.perf_counter()

        def end(self):
            pass

    ttft, made = [], 0
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([encode_prompt(tok, prompts[0])]), max_new_tokens=4, do_sample=True,
                       pad_token_id=tok.pad_token_id)  # warm-up
        t0 = time.perf_counter()
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, p)])
            first = FirstToken()
            start = time.perf_counter()
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                 streamer=first)
            ttft.append(first.at - start)
            row = out[0, ids.shape[1]:].tolist()
            made += row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "new_tokens": made, "wall_s": wall, "tokens_per_s": made / wall,
            **_percentiles(ttft)}


def _percentiles(ttft: list[float]) -> dict:
    s = sorted(ttft)
    return {"ttft_p50_s": statistics.median(s), "ttft_p99_s": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]}


def stream_one(conn: http.client.HTTPConnection, prompt: str, new_tokens: int) -> tuple[float, int]:
    """One streaming /generate: (seconds to the first text event, new tokens from the final event)."""
    body = json.dumps({"prompt": prompt, "max_new_tokens": new_tokens, "temperature": 1.0, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/generate", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"/generate answered {resp.status}: {resp.read()[:300]!r}")
    first, done, event = None, None, None
    for line in resp:  # chunked SSE, line by line
        if line.startswith(b"event: "):
            event = line[7:].strip()
        elif line.startswith(b"data: "):
            if event == b"done":
                done = json.loads(line[6:])
            elif event is None and first is None:
                first = time.perf_counter() - t0
            elif event == b"error":
                raise RuntimeError(f"/generate failed: {line[6:300]!r}")
        elif line == b"\n":
            event = None
    if done is None:
        raise RuntimeError("/generate: the stream ended without its done event")
    return (first if first is not None else done["total_s"]), done["new_tokens"]


def drive(port: int, prompts: list[str], clients: int, per_client: int, new_tokens: int) -> dict:
    """`clients` threads, each sending `per_client` streaming requests back to back on its own connection."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        mine = []
        try:
            for j in range(per_client):
                mine.append(stream_one(conn, prompts[(k * per_client + j) % len(prompts)], new_tokens))
        except BaseException as e:  # noqa: BLE001 - reported after the level
            errors.append(e)
        finally:
            conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    made = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "new_tokens": made, "wall_s": wall,
            "tokens_per_s": made / wall, **_percentiles([t for t, _ in results])}


def serve(model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMPIPE_API_TOKEN": "", "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{CACHE / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "serve", "--model-uri", str(model_dir), "--port",
                             str(port)], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"generate_serving: lmpipe serve exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"generate_serving: lmpipe serve not up in 180 s:\n{log.read_text()[-3000:]}")


def measure(new_tokens: int = 64, rounds: int = 2, per_client: int = 3) -> dict:
    """Build (once) and measure: {"cpu", "model", "reference", "served": {clients: figures}, "ratios"}, each the
    best round (highest tokens/s) of `rounds`."""
    from lmpipe.params import load_params

    model_dir = CACHE / "model"
    if not (model_dir / "config.json").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        build_model(model_dir)
    threads = load_params(ROOT / "params.yaml").serve.threads
    prompts = [s for s in sentences("dev") if 4 <= len(s.split()) <= 30]
    n_ref = max(LEVELS) * per_client // 2  # as many prompts as 8 clients' share: seconds, not minutes
    best_ref: dict | None = None
    best: dict[int, dict] = {}
    for r in range(rounds):
        ref = reference(model_dir, prompts[:n_ref], new_tokens, threads)
        print(f"round {r + 1}: plain loop {ref['tokens_per_s']:.1f} tok/s", file=sys.stderr)
        if best_ref is None or ref["tokens_per_s"] > best_ref["tokens_per_s"]:
            best_ref = ref
        port = free_port()
        proc = serve(model_dir, port, CACHE / f"serve-{port}.log")
        try:
            drive(port, prompts, 2, 1, 8)  # warm-up
            for clients in LEVELS:
                got = drive(port, prompts, clients, per_client * (4 if clients == 1 else 1), new_tokens)
                print(f"round {r + 1}: {clients} clients {got['tokens_per_s']:.1f} tok/s", file=sys.stderr)
                if clients not in best or got["tokens_per_s"] > best[clients]["tokens_per_s"]:
                    best[clients] = got
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return {"cpu": cpu_model(), "model": "params.yaml pretrain shape, random weights", "new_tokens": new_tokens,
            "torch_threads": threads, "reference": best_ref, "served": best,
            "ratios": {"clients_16_vs_loop": best[16]["tokens_per_s"] / best_ref["tokens_per_s"],
                       "clients_1_vs_loop": best[1]["tokens_per_s"] / best_ref["tokens_per_s"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64, help="max_new_tokens of every request")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; each figure is its best round")
    ap.add_argument("--requests-per-client", type=int, default=3, help="(one client sends 4x as many)")
    args = ap.parse_args()
    report(args.new_tokens, args.rounds, args.requests_per_client)


def report(new_tokens: int = 64, rounds: int = 2, per_client: int = 3) -> dict:
    """measure(), printed side by side with the plain loop (benchmarks/generate_speed.py calls this too)."""
    load_before = os.getloadavg()[0]
    res = measure(new_tokens, rounds, per_client)
    # the host is shared: its 1-minute load average before and after says how much else ran beside the benchmark
    res["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    ref = res["reference"]
    print(f"CPU: {res['cpu']}; model: {res['model']}; {res['new_tokens']} new tokens per request, "
          f"torch threads {res['torch_threads']}; load average before/after {res['loadavg_1min']}")
    print(f"{'':<28}{'tokens/s':>10}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'requests':>10}{'vs loop':>9}")
    print(f"{'plain model.generate loop':<28}{ref['tokens_per_s']:>10.1f}{ref['ttft_p50_s']:>12.3f}"
          f"{ref['ttft_p99_s']:>12.3f}{ref['requests']:>10}{1:>8.2f}x")
    for clients, got in res["served"].items():
        print(f"{f'lmpipe serve, {clients} client(s)':<28}{got['tokens_per_s']:>10.1f}{got['ttft_p50_s']:>12.3f}"
              f"{got['ttft_p99_s']:>12.3f}{got['requests']:>10}{got['tokens_per_s'] / ref['tokens_per_s']:>8.2f}x")
    print(f"16 clients / loop: {res['ratios']['clients_16_vs_loop']:.2f}x (target >= 3x); "
          f"1 client / loop: {res['ratios']['clients_1_vs_loop']:.2f}x (target >= 0.9x)")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
