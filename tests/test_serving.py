"""No train/serve skew: every prediction path truncates where the classifier was fine-tuned (stored with it)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import requests
import torch

from helpers import NEG, POS, free_port, run_module, section


def _serve(model_dir: Path, workdir: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "serve", "--model-uri", str(model_dir),
                             "--port", str(port)], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_long_text_gets_the_same_answer_from_evaluate_pyfunc_and_http(workdir: Path):
    from transformers import AutoModelForSequenceClassification

    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_tokenizer
    from lmpipe.package import ClassifierPyfunc

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


# -- length-sorted batches: the same answers as batches in file order ----------------------------------------

# short and long texts interleaved, so a batch in file order pads the short ones; ties and a repeat included
MIXED = [POS[0], "bad", " ".join(NEG), POS[1], "a dull mess", " ".join(POS[2:5]), "bad", NEG[3], POS[5] + " " + NEG[0],
         "fun", " ".join(POS + NEG), NEG[1]]


def _tiny_classifier(arch: str, tmp_path: Path, num_labels: int = 2):
    """A tokenizer trained on the fixture sentences and a 2-layer, hidden-16 classifier of `arch`, saved and loaded
    as every prediction path loads it."""
    from transformers import AutoModelForSequenceClassification

    from lmpipe.modeling import build_lm_config, save_classifier
    from lmpipe.tokenizer import train_tokenizer

    kind = "wordpiece" if arch == "bert" else "bpe"
    tok = train_tokenizer(POS + NEG, kind, vocab_size=200, min_frequency=1, model_max_length=32)
    cfg = section("pretrain", arch=arch, objective="mlm" if arch == "bert" else "clm", hidden_size=16, num_layers=2,
                  num_heads=2, intermediate_size=32, max_position_embeddings=32)
    config = build_lm_config(cfg, tok)
    config.num_labels, config.pad_token_id = num_labels, tok.pad_token_id
    torch.manual_seed(0)
    save_classifier(AutoModelForSequenceClassification.from_config(config), tok, 24, tmp_path / "clf")
    return tmp_path / "clf"


def _file_order(model, tok, texts, batch_size, max_length):
    """The prediction loop before length sorting: batches in file order, each padded to its longest, no_grad."""
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], truncation=True, max_length=max_length, padding=True,
                      return_tensors="pt")
            out.append(torch.softmax(model(**enc).logits.float(), dim=-1).numpy())
    return np.concatenate(out)


def test_length_batches_cover_every_text_once_longest_first():
    from lmpipe.evaluation import length_batches
    from lmpipe.tokenizer import train_tokenizer

    tok = train_tokenizer(POS + NEG, "bpe", vocab_size=200, min_frequency=1, model_max_length=32)
    batches = list(length_batches(tok, MIXED, 5, max_length=12))
    idx = np.concatenate([i for i, _ in batches])
    assert sorted(idx.tolist()) == list(range(len(MIXED)))  # a permutation: nothing lost, nothing twice
    lengths = [int(enc["attention_mask"].sum(1).max()) for _, enc in batches]
    assert lengths == sorted(lengths, reverse=True) and lengths[0] == 12  # longest first, truncated at 12
    for i, enc in batches:  # each batch encoded exactly as that batch in file order would be
        alone = tok([MIXED[j] for j in i], truncation=True, max_length=12, padding=True, return_tensors="pt")
        assert torch.equal(enc["input_ids"], alone["input_ids"])
    assert list(length_batches(tok, [], 5, 12)) == []


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_length_sorted_predictions_equal_file_order(arch, tmp_path):
    from lmpipe.compress import Classifier
    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_finetuned, load_tokenizer

    model_dir = _tiny_classifier(arch, tmp_path)
    model, tok = load_finetuned(model_dir).eval(), load_tokenizer(model_dir)
    expected = _file_order(model, tok, MIXED, 4, 24)
    alone = np.concatenate([_file_order(model, tok, [t], 1, 24) for t in MIXED])  # no padding at all
    for batch_size in (1, 4, 5, 64):
        got = predict_proba(model, tok, MIXED, batch_size, "cpu")
        assert got.shape == expected.shape and np.array_equal(got.argmax(-1), expected.argmax(-1))
        # padded positions are masked out; only float rounding of other matmul shapes differs
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)
    # the serving path (lmpipe.compress, which HFClassifier and the pyfunc call): labels in file order too
    labels = [p["label"] for p in Classifier(model_dir).predict(MIXED, batch_size=4)]
    assert labels == [model.config.id2label[int(k)] for k in expected.argmax(-1)]
    assert predict_proba(model, tok, [], 4, "cpu").shape == (0, 2)


def test_length_sorted_embeddings_equal_one_text_at_a_time(tmp_path):
    from lmpipe.embeddings import encode
    from lmpipe.modeling import load_finetuned, load_tokenizer

    model_dir = _tiny_classifier("bert", tmp_path)
    model, tok = load_finetuned(model_dir), load_tokenizer(model_dir)
    got = encode(model, tok, MIXED, 4, "cpu", "mean", 24)
    alone = np.concatenate([encode(model, tok, [t], 1, "cpu", "mean", 24) for t in MIXED])
    assert got.shape == (len(MIXED), 16)
    np.testing.assert_allclose(got, alone, rtol=0, atol=1e-6)
