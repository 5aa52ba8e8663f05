"""No train/serve skew: every prediction path truncates where the classifier was fine-tuned (stored with it)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import requests

from conftest import NEG, POS, free_port, run_module


def _serve(model_dir: Path, workdir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "serve", "--model-uri", str(model_dir),
                             "--port", str(port)], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_long_text_gets_the_same_answer_from_evaluate_pyfunc_and_http(workdir: Path):
    from transformers import AutoModelForSequenceClassification

    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_tokenizer
    from lmpipe.serving import ClassifierPyfunc

    for stage in ("clean", "tokenize", "pretrain", "finetune"):
        res = run_module(f"stages.{stage}", workdir, "--set", "finetune.scratch_baseline=false")
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    model_dir = workdir / "models" / "finetune"
    tok = load_tokenizer(model_dir)
    assert tok.model_max_length == 16  # finetune.max_length of the tiny params, stored with the model
    text = " ".join(POS + NEG)
    assert len(tok(text)["input_ids"]) > 32  # beyond max_length and the model's 32 positions

    # 1) evaluate's path: predict_proba on the saved model dir
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    probs = predict_proba(model, tok, [text], 8, "cpu")[0]
    expected = {"label": model.config.id2label[int(probs.argmax())], "score": float(probs.max())}
    # truncating anywhere else gives another answer, so agreement below means the same truncation
    assert float(predict_proba(model, tok, [text], 8, "cpu", max_length=32)[0].max()) != pytest.approx(
        expected["score"], abs=1e-6)

    # 2) the MLflow pyfunc: the length in the model dir wins over a model_config that says otherwise
    pyfunc = ClassifierPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model_dir": str(model_dir)}, model_config={"max_length": 128}))
    got = pyfunc.predict(None, pd.DataFrame({"text": [text]})).to_dict("records")[0]
    assert got["label"] == expected["label"] and got["score"] == pytest.approx(expected["score"], abs=1e-6)

    # 3) `lmpipe serve --model-uri <dir>` over HTTP
    port = free_port()
    proc = _serve(model_dir, workdir, port)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server not up in 120 s"
            time.sleep(0.3)
        r = requests.post(f"{base}/predict", json={"texts": [text]}, timeout=30)
        assert r.status_code == 200, r.text
        served = r.json()["predictions"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert served["label"] == expected["label"]
    assert served["score"] == pytest.approx(expected["score"], abs=1e-6)
