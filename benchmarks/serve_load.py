"""Load test: `lmpipe serve` against `mlflow models serve --env-manager local`, same model, 32 concurrent clients.

    .venv/bin/python benchmarks/serve_load.py [--model-uri PYFUNC_URI] [--requests 2000] [--clients 32]

Without --model-uri it builds a model once (kept in .lmpipe/bench/serve_load/): the smoke profile's data with
params.yaml's model (Llama 3.1M, finetune.max_length 64) and a few training steps, run by the stages
themselves (clean, tokenize, pretrain, finetune) in a temporary folder, saved as an MLflow pyfunc model
directory that both servers load. Each server runs alone on 127.0.0.1. The clients are threads with keep-alive
connections (stdlib http.client) sending one SST-2 dev sentence per request (the data folder's sst2/dev.tsv),
with 10% malformed or oversized payloads mixed in (invalid JSON, wrong content type, wrong schema, a 1.1 MB
body). Prints p50/p99 latency, requests/s and 5xx count per server side by side with the ratio, then one JSON
line. Both mixes are driven on the same server process, after a 64-request warm-up. Target: lmpipe >= 2x
mlflow serve's requests/s at equal or lower p99.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmpipe.processes import free_port  # noqa: E402

CACHE = ROOT / ".lmpipe" / "bench" / "serve_load"
STAGES = ("clean", "tokenize", "pretrain", "finetune")
# the smoke profile's data and step budget, params.yaml's architecture and lengths
OVERRIDES = {"pretrain.compile": False, "pretrain.max_steps": 30, "pretrain.warmup_steps": 5, "pretrain.eval_every": 15,
             "pretrain.checkpoint_every": 15, "pretrain.batch_size": 16, "finetune.max_steps": 60,
             "finetune.eval_every": 30, "finetune.max_length": 64, "finetune.scratch_baseline": False}


def build_model(dest: Path) -> Path:
    """Train the benchmark's classifier with the pipeline's own stages; save it as a pyfunc model dir."""
    import yaml

    from lmpipe import datasource
    from lmpipe.params import load_raw, merge

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        smoke = load_raw(ROOT / "profiles" / "smoke.yaml")
        raw = merge(load_raw(ROOT / "params.yaml"), overrides={"clean.corpus": smoke["clean"]["corpus"], **OVERRIDES})
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        env = {**os.environ, "LMPIPE_DATA_DIR": str(datasource.data_dir(ROOT)), "HF_HUB_OFFLINE": "1",
               "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
        for stage in STAGES:
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=work, env=env, capture_output=True,
                                 text=True)
            if res.returncode:
                sys.exit(f"serve_load: stage {stage} failed:\n{res.stderr[-3000:]}")
            print(f"built: {stage} {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        import mlflow

        from lmpipe.package import ClassifierPyfunc

        shutil.rmtree(dest, ignore_errors=True)
        mlflow.pyfunc.save_model(str(dest), python_model=ClassifierPyfunc(),
                                 artifacts={"model_dir": str(work / raw["finetune"]["out_dir"])},
                                 pip_requirements=["torch==2.13.0", "transformers>=5,<6", "mlflow>=3,<4"])
    return dest


def sentences() -> list[str]:
    from lmpipe import datasource

    with open(datasource.data_dir(ROOT) / "sst2" / "dev.tsv", newline="", encoding="utf-8") as f:
        return [row["sentence"].strip() for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def payloads(kind: str, texts: list[str], n: int, bad_share: float) -> list[tuple[bytes, str, bool]]:
    """n (body, content type, well formed) for `kind` (lmpipe | mlflow); every 1/bad_share-th one is malformed."""
    def good(t: str) -> bytes:
        doc = {"texts": [t]} if kind == "lmpipe" else {"dataframe_records": [{"text": t}]}
        return json.dumps(doc).encode()

    bad = [(b'{"texts": ["unterminated', "application/json"),                    # invalid JSON
           (good("a fine film"), "text/plain"),                                 # wrong content type
           (b'{"wrong": 1}', "application/json"),                               # wrong schema
           (good("a long review " * 80_000), "application/json")]               # 1.1 MB body
    every = round(1 / bad_share) if bad_share else 0
    out = []
    for i in range(n):
        if every and i % every == every - 1:
            body, ctype = bad[(i // every) % len(bad)]
            out.append((body, ctype, False))
        else:
            out.append((good(texts[i % len(texts)]), "application/json", True))
    return out


def drive(port: int, path: str, work: list[tuple[bytes, str, bool]], clients: int) -> dict:
    """`clients` threads, each with its own keep-alive connection, take the next payload until none is left."""
    counter = itertools.count()
    results: list[tuple[float, int, bool]] = []  # (seconds, status or -1 for a connection error, well formed)
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        while (i := next(counter)) < len(work):
            body, ctype, ok = work[i]
            t0 = time.perf_counter()
            try:
                conn.request("POST", path, body, {"Content-Type": ctype})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
            except (OSError, http.client.HTTPException):
                status = -1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            mine.append((time.perf_counter() - t0, status, ok))
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(r[0] * 1000 for r in results)
    return {"requests": len(results), "wall_s": round(wall, 2), "rps": round(len(results) / wall, 1),
            "p50_ms": round(statistics.median(lat), 1), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))], 1),
            "5xx": sum(500 <= r[1] < 600 for r in results), "conn_errors": sum(r[1] == -1 for r in results),
            "ok_200": sum(r[1] == 200 for r in results),
            "good_not_200": sum(r[2] and r[1] != 200 for r in results)}


def start(cmd: list[str], port: int, health: str, env: dict, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", health)
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            sys.exit(f"serve_load: {cmd[:3]} exited:\n{log.read_text()[-3000:]}")
        time.sleep(0.3)
    proc.kill()
    sys.exit(f"serve_load: {cmd[:3]} not up in 180 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-uri", default=None, help="an MLflow pyfunc model (default: build one, cached)")
    ap.add_argument("--requests", type=int, default=2000, help="requests per server and traffic mix")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--bad-share", type=float, default=0.1, help="share of malformed/oversized payloads")
    args = ap.parse_args()
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # mlflow execs uvicorn
    uri = args.model_uri or str(CACHE / "pyfunc")
    if args.model_uri is None and not (CACHE / "pyfunc" / "MLmodel").is_file():
        build_model(CACHE / "pyfunc")
    texts = sentences()
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMPIPE_API_TOKEN": "",
                "MLFLOW_TRACKING_URI": f"sqlite:///{CACHE / 'mlflow.db'}"}
    servers = {
        "lmpipe serve": (lambda p: [sys.executable, "-m", "lmpipe.cli", "serve", "--model-uri", uri, "--port", str(p)],
                         "/health", "/predict", "lmpipe", {}),
        "mlflow models serve": (lambda p: [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri,
                                           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(p)],
                                "/ping", "/invocations", "mlflow", {}),
    }
    mixes = {f"{args.bad_share:.0%} bad": args.bad_share, "all valid": 0.0}
    rows: dict[str, dict[str, dict]] = {m: {} for m in mixes}
    for name, (cmd, health, path, kind, extra) in servers.items():
        port = free_port()
        proc = start(cmd(port), port, health, {**base_env, **extra}, CACHE / f"{kind}-{port}.log")
        try:
            drive(port, path, payloads(kind, texts, 64, 0.0), args.clients)  # warm-up
            for mix, share in mixes.items():
                rows[mix][name] = drive(port, path, payloads(kind, texts, args.requests, share), args.clients)
                print(f"measured: {name}, {mix}: {rows[mix][name]}", file=sys.stderr)
        finally:
            stop(proc)
    keys = ("requests", "rps", "p50_ms", "p99_ms", "5xx", "conn_errors", "good_not_200")
    summary = {}
    for mix, by_server in rows.items():
        print(f"\n{args.clients} clients, {mix}:")
        print(f"{'':<16}" + "".join(f"{name:>22}" for name in by_server))
        for k in keys:
            print(f"{k:<16}" + "".join(f"{by_server[name][k]:>22}" for name in by_server))
        lm, ml = by_server["lmpipe serve"], by_server["mlflow models serve"]
        summary[mix] = {"rps_ratio": round(lm["rps"] / ml["rps"], 2), "p99_ratio": round(lm["p99_ms"] / ml["p99_ms"], 2)}
        print(f"lmpipe / mlflow: {summary[mix]['rps_ratio']:.2f}x requests/s, p99 {summary[mix]['p99_ratio']:.2f}x "
              "(target >= 2x at <= 1x p99)")
    print(json.dumps({"clients": args.clients, "requests": args.requests, "mixes": rows, "ratios": summary}))

if __name__ == "__main__":
    main()
