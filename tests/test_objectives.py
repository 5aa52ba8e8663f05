"""The sentence-level pretraining objectives through the stage CLI: SimCSE (loss falls, alignment/uniformity and
the frozen probes before/after in evaluate and MLflow, fine-tuning starts from the encoder, /embed serves it)
and MLM + NSP (BertForPreTraining, NSP accuracy beside MLM perplexity)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from helpers import Server, run_module, tiny_params, write_tiny_data


def _work(tmp_path: Path, monkeypatch, **pretrain) -> Path:
    data = write_tiny_data(tmp_path / "data")
    rng = random.Random(0)  # documents of several sentences (NSP pairs consecutive ones)
    words = "the film story actor scene plot music camera director critic audience ending".split()
    docs = [" ".join(("The " if j % 2 else "A ") + " ".join(rng.choice(words) for _ in range(6)) + f" number {i}."
                     for j in range(4)) for i in range(60)]
    (data / "corpus" / "text.txt").write_text("\n".join(docs) + "\n")
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(data))
    wd = tmp_path / "work"
    wd.mkdir()
    raw = tiny_params()
    raw["clean"]["validation_fraction"] = 0.2
    raw["tokenize"].update(kind="wordpiece", block_size=32)
    raw["pretrain"].update(arch="bert", max_position_embeddings=64, max_steps=12, eval_every=6, checkpoint_every=6,
                           log_every=1, **pretrain)
    raw["finetune"]["scratch_baseline"] = False
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    return wd


def _run(wd: Path, *stages: str) -> None:
    for stage in stages:
        res = run_module(f"stages.{stage}", wd)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"


@pytest.mark.slow  # make test stays near its 15 minutes; CI runs the slow set
def test_simcse_trains_an_encoder_measured_before_and_after_and_served_for_embed(tmp_path, monkeypatch):
    wd = _work(tmp_path, monkeypatch, objective="simcse", dropout=0.1, learning_rate=0.003)
    _run(wd, "clean", "tokenize", "pretrain")
    config = json.loads((wd / "models" / "pretrain" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["lmpipe_pooling"] == "mean"
    curve = [r for r in __import__("csv").DictReader(open(wd / "plots" / "pretrain_loss.csv")) if r["split"] == "train"]
    losses = [float(r["loss"]) for r in curve]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses  # the contrastive loss falls

    _run(wd, "finetune", "evaluate")  # fine-tuning starts from the SimCSE encoder like from any other
    ev = json.loads((wd / "metrics" / "eval.json").read_text())
    emb = ev["embeddings"]
    for when in ("before", "after"):
        assert set(emb[when]) == {"alignment", "uniformity", "linear_probe_accuracy", "knn_accuracy"}
        assert 0 <= emb[when]["alignment"] <= 4 and emb[when]["uniformity"] <= 0
    assert emb["difference"]["uniformity"] == emb["after"]["uniformity"] - emb["before"]["uniformity"]
    assert emb["after"]["uniformity"] != emb["before"]["uniformity"]  # the objective moved the embeddings
    assert "lm" not in ev  # no LM head: no perplexity to report
    import mlflow

    run = mlflow.MlflowClient(f"sqlite:///{wd / 'mlflow.db'}").get_run(ev["mlflow_run_id"])
    assert run.data.metrics["embeddings.after.uniformity"] == emb["after"]["uniformity"]
    assert "embeddings.before.linear_probe_accuracy" in run.data.metrics

    with Server(wd, "--model-uri", str(wd / "models" / "pretrain"), "--allow-unauthenticated") as srv:
        texts = ["A film about the music", "The critic and the audience", "A film about the music"]
        r = requests.post(f"{srv.url}/embed", json={"texts": texts}, timeout=30)
        assert r.status_code == 200, r.text
        vectors = np.array(r.json()["embeddings"])
        assert vectors.shape == (3, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(vectors[0], vectors[1], atol=1e-3)
        r = requests.post(f"{srv.url}/predict", json={"texts": texts}, timeout=10)
        assert r.status_code == 409 and "use /embed" in r.json()["detail"]
        assert requests.get(f"{srv.url}/tasks", timeout=10).json()["tasks"] == []


@pytest.mark.slow  # make test stays near its 15 minutes; CI runs the slow set
def test_mlm_nsp_trains_both_bert_heads_and_reports_nsp_accuracy(tmp_path, monkeypatch):
    from lmpipe.objectives import nsp_pairs

    docs = [f"A first sentence of doc {i}. The second one of doc {i}. The third one of doc {i}." for i in range(200)]
    pairs = nsp_pairs(docs, seed=1)
    assert len(pairs) == 400 and 0.4 < np.mean([p[2] for p in pairs]) < 0.6  # about half are random
    assert all(p[1].split()[-1] == p[0].split()[-1] for p in pairs if p[2] == 0)  # consecutive: the same doc

    wd = _work(tmp_path, monkeypatch, objective="mlm_nsp")
    _run(wd, "clean", "tokenize", "pretrain", "finetune", "evaluate")
    config = json.loads((wd / "models" / "pretrain" / "config.json").read_text())
    assert config["architectures"] == ["BertForPreTraining"] and config["type_vocab_size"] == 2
    m = json.loads((wd / "metrics" / "pretrain.json").read_text())
    assert 0 <= m["val_nsp_accuracy"] <= 1 and m["val_perplexity"] > 1
    ev = json.loads((wd / "metrics" / "eval.json").read_text())
    assert ev["lm"]["perplexity"] > 1  # the MLM head, evaluated like any masked LM


def test_simcse_without_dropout_is_refused_in_one_line(tmp_path, monkeypatch):
    wd = _work(tmp_path, monkeypatch, objective="simcse", dropout=0.0)
    res = run_module("stages.pretrain", wd)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].endswith(
        "pretrain.dropout: simcse needs dropout > 0 (the two dropout masks are its positive pair); e.g. pretrain.dropout=0.1")
