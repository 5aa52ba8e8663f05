"""Pretraining and fine-tuning on a 2-layer, hidden-16 model built inside the test."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from helpers import section
from lmpipe.checkpoints import latest_checkpoint
from lmpipe.errors import ConfigError
from lmpipe.evaluation import perplexity, predict_proba
from lmpipe.modeling import build_lm, build_lm_config, check_vocab, load_classifier
from lmpipe.tokenizer import encode_stream, pack_blocks, train_tokenizer
from lmpipe.training import encode_labeled, finetune, pretrain

TEXTS = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat and the log"] * 8


def _setup(arch="llama", objective="clm", steps=20):
    tok = train_tokenizer(TEXTS, "bpe", vocab_size=300, min_frequency=1, model_max_length=32)
    blocks = pack_blocks(encode_stream(tok, TEXTS, total=len(TEXTS)), 8, len(tok))
    cfg = section("pretrain", compile=False, objective=objective, arch=arch, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_position_embeddings=32, max_steps=steps, warmup_steps=2, batch_size=4, eval_every=10,
                   eval_batches=2, checkpoint_every=10, log_every=5, learning_rate=3e-3, sample_max_new_tokens=6)
    return tok, blocks, cfg


@pytest.mark.parametrize("arch,objective", [("llama", "clm"), ("gpt2", "clm"), ("bert", "mlm")])
def test_pretrain_lowers_loss_and_checkpoints(tmp_path, arch, objective, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")  # not whatever experiment an earlier test left active
    torch.manual_seed(0)
    tok, blocks, cfg = _setup(arch, objective)
    model = build_lm(build_lm_config(cfg, tok), objective)
    train, val = blocks[:-4], blocks[-4:]  # validation blocks never trained on
    untrained = perplexity(model, val, 4, "cpu", objective == "mlm", tok)["loss"]  # about log(vocab)
    with mlflow.start_run():
        res = pretrain(model, tok, train, val, cfg, "cpu", 0, tmp_path / "ckpt")
    evals = [r["loss"] for r in res.curve if r["split"] == "validation"]
    assert res.metrics["train_loss"] < np.log(len(tok))  # better than uniform over the vocabulary
    assert res.metrics["steps"] == 20
    # training lowered the validation loss: below the first evaluation's, which is below the untrained model's
    assert res.metrics["val_loss"] < evals[0] < untrained, (res.metrics["val_loss"], evals, untrained)
    assert res.metrics["val_loss"] < untrained - 0.25
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-20"
    # the loop's wall time in its two evaluations, two checkpoint saves and four logging steps: measured, a
    # share of the loop each, all three together less than the whole loop
    shares = [res.metrics[f"loop_share_{k}"] for k in ("evaluate", "checkpoint", "logging")]
    assert all(0 < s < 1 for s in shares) and sum(shares) < 1, shares
    assert res.metrics["final_eval_seconds"] > 0


def test_vocab_mismatch_is_refused():
    tok, _, cfg = _setup()
    config = build_lm_config(cfg, tok)
    config.vocab_size = 10
    with pytest.raises(ConfigError, match="tokenizer has"):
        check_vocab(config, tok, "pretrain")


def test_finetune_keeps_the_best_checkpoint_and_classifies(tmp_path, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")  # not whatever experiment an earlier test left active
    torch.manual_seed(0)
    tok, blocks, cfg = _setup()
    lm = build_lm(build_lm_config(cfg, tok), "clm")
    lm.save_pretrained(tmp_path / "lm")
    texts = ["the cat sat", "a cat and a cat", "the dog sat", "a dog and a dog"] * 4
    labels = [0, 0, 1, 1] * 4
    val_texts = ["a cat sat on the mat", "the cat and the mat", "a dog sat on the log", "the dog and the log",
                 "the cat", "a dog"]  # never trained on
    val_labels = np.array([0, 0, 1, 1, 0, 1])
    model = load_classifier(tmp_path / "lm", 2, {0: "cat", 1: "dog"}, False, tok.pad_token_id)
    fcfg = section("finetune", max_steps=30, eval_every=10, batch_size=8, learning_rate=3e-3)
    with mlflow.start_run():
        res = finetune(model, tok, encode_labeled(tok, texts, labels, 16),
                       encode_labeled(tok, val_texts, val_labels.tolist(), 16), fcfg, "cpu", 0, tmp_path / "ft",
                       "classifier.")
    evals = [h for h in res.log_history if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [10, 20, 30]
    best = max(evals, key=lambda h: h["eval_accuracy"])  # the first of equals, as Trainer counts improvements
    assert res.best_checkpoint.endswith(f"checkpoint-{best['step']}")
    # the returned model is that checkpoint's: its own validation accuracy and loss are the best evaluation's
    probs = predict_proba(res.model, tok, val_texts, 8, "cpu", max_length=16)
    loss = float(-np.log(probs[np.arange(len(val_labels)), val_labels]).mean())
    assert (probs.argmax(-1) == val_labels).mean() == best["eval_accuracy"] == res.metrics["val_accuracy"]
    assert loss == pytest.approx(best["eval_loss"], abs=1e-4)
    assert res.metrics["val_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)
    assert best["eval_accuracy"] >= 0.8  # it learned the task on texts it never saw
    assert res.model.config.id2label == {0: "cat", 1: "dog"}


def test_mlm_pretrain_then_finetune_and_evaluate_through_the_stages(workdir):
    """BERT-style masked LM from scratch (wordpiece), then the finetune and evaluate stages on top of it."""
    import json

    import yaml

    from helpers import run_module

    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["tokenize"]["kind"] = "wordpiece"
    raw["pretrain"].update(objective="mlm", arch="bert", max_steps=20, eval_every=10, checkpoint_every=10)
    # budget enough to learn the tiny task (whose test split holds its training sentences)
    raw["finetune"].update(max_steps=60, eval_every=20, learning_rate=0.003, scratch_baseline=False)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("clean", "tokenize", "pretrain", "finetune", "evaluate"):
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    lm = json.loads((workdir / "models" / "pretrain" / "config.json").read_text())
    assert lm["architectures"] == ["BertForMaskedLM"]
    clf = json.loads((workdir / "models" / "finetune" / "config.json").read_text())
    assert clf["architectures"] == ["BertForSequenceClassification"]
    assert clf["id2label"] == {"0": "negative", "1": "positive"}
    metrics = json.loads((workdir / "metrics" / "eval.json").read_text())
    assert metrics["lm"]["perplexity"] < len(json.loads((workdir / "models" / "tokenizer" / "tokenizer.json")
                                                        .read_text())["model"]["vocab"])  # better than uniform
    matrix = np.array(metrics["classifier"]["confusion_matrix"])
    assert matrix.sum() == metrics["test_examples"]
    assert metrics["classifier"]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert metrics["classifier"]["accuracy"] >= 0.75, metrics["classifier"]  # learned the task, not chance (0.5)


def test_training_stages_log_loss_curves_and_datasets_to_mlflow(workdir):
    """pretrain and finetune runs carry their loss curves as PNG artifacts; finetune its data splits as datasets."""
    import json
    import os

    from helpers import mlflow_runs, run_module

    for stage in ("clean", "tokenize", "pretrain", "finetune"):
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    import mlflow

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = {r.data.tags["lmpipe.stage"]: r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])}
    artifacts = {s: {a.path for a in client.list_artifacts(runs[s].info.run_id)} for s in ("pretrain", "finetune")}
    assert "pretrain_loss.png" in artifacts["pretrain"]
    # the clm samples: an MLflow table over the evaluations (steps 3 and 6), the final ones in pretrain.samples
    import yaml

    from lmpipe.samples import TABLE, logged_table

    raw = yaml.safe_load((workdir / "params.yaml").read_text())["pretrain"]
    assert TABLE in artifacts["pretrain"]
    table = logged_table(runs["pretrain"].info.run_id)
    assert table[["step", "prompt"]].values.tolist() == [[s, p] for s in (3, 6) for p in raw["sample_prompts"]]
    final = json.loads((workdir / raw["samples"]).read_text())
    assert final["step"] == 6 and final["sampling"]["seed"] == yaml.safe_load((workdir / "params.yaml").read_text())["common"]["seed"]
    assert final["samples"] == table[table["step"] == 6][["prompt", "text"]].to_dict("records")
    assert {"finetune_classifier_loss.png", "finetune_scratch_loss.png"} <= artifacts["finetune"]
    png = client.download_artifacts(runs["finetune"].info.run_id, "finetune_classifier_loss.png", str(workdir))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    inputs = {(d.dataset.name, {t.key: t.value for t in d.tags}.get("mlflow.data.context"))
              for d in runs["finetune"].inputs.dataset_inputs}
    assert inputs == {("labeled_train", "training"), ("labeled_validation", "validation")}


def test_overlapping_windows_reach_the_trainer_through_the_stage(workdir):
    """pretrain.window_stride 1 trains on a window at every start position of the packed train stream."""
    import json

    import yaml

    from helpers import run_module
    from lmpipe.tokenizer import load_blocks

    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["pretrain"].update(window_stride=1, max_steps=10, eval_every=10, checkpoint_every=10)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("clean", "tokenize", "pretrain"):
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    blocks = load_blocks(workdir / raw["tokenize"]["out_dir"] / "train.npy")
    metrics = json.loads((workdir / raw["pretrain"]["metrics"]).read_text())
    assert metrics["train_examples"] == blocks.size - blocks.shape[1] + 1 > len(blocks)


def test_adam_betas_are_what_the_checkpointed_optimizer_holds(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")
    tok, blocks, cfg = _setup(steps=10)
    cfg = cfg.model_copy(update={"adam_beta1": 0.8, "adam_beta2": 0.99})
    with mlflow.start_run():
        pretrain(build_lm(build_lm_config(cfg, tok), "clm"), tok, blocks[:-4], blocks[-4:], cfg, "cpu", 0,
                 tmp_path / "ckpt")
    groups = torch.load(latest_checkpoint(tmp_path / "ckpt") / "optimizer.pt", weights_only=True)["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.8, 0.99)}


def test_window_dataset_items_are_the_stream_at_their_start():
    from lmpipe.training import train_windows

    blocks = np.arange(40, dtype=np.uint16).reshape(5, 8)
    ds = train_windows(blocks, 3, with_labels=True, per_step=4, full_batches=False)
    assert len(ds) == (40 - 8) // 3 + 1 == 11
    assert ds[4]["input_ids"].tolist() == list(range(12, 20)) and ds[10]["input_ids"].tolist() == list(range(30, 38))
    assert len(train_windows(blocks, 3, True, per_step=4, full_batches=True)) == 8  # whole batches of 4 only
    assert len(train_windows(blocks, "block", True, per_step=4, full_batches=False)) == 5


def test_compiled_pretraining_trains_checkpoints_and_saves_a_plain_model(tmp_path, monkeypatch):
    """pretrain.compile: Trainer's torch.compile path (eager attention, bf16 where the CPU has it)."""
    import mlflow
    from safetensors import safe_open

    from lmpipe.modeling import attention_implementation
    from lmpipe.samples import SampleWriter, sampling

    monkeypatch.setenv("LMPIPE_COMPILE_CACHE", str(tmp_path / "compile-cache"))  # not the machine's
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")
    torch.manual_seed(0)
    tok, blocks, cfg = _setup("gpt2", "clm")
    cfg = cfg.model_copy(update={"compile": True})
    assert attention_implementation(cfg) == "eager"
    model = build_lm(build_lm_config(cfg, tok), "clm", attention_implementation(cfg))
    writer = SampleWriter(tok, ["the cat"], sampling(cfg, seed=0))
    with mlflow.start_run():
        res = pretrain(model, tok, blocks, blocks[:8], cfg, "cpu", 0, tmp_path / "ckpt", callbacks=[writer])
    assert res.metrics["steps"] == 20 and res.metrics["train_loss"] < np.log(len(tok))
    assert [r["step"] for r in writer.rows] == [10, 20] and all(r["text"] for r in writer.rows)  # eager generate
    assert res.metrics["train_tokens_per_s"] > 0 and res.metrics["val_blocks"] == 8
    assert res.metrics["compile_graphs_compiled"] > 0 and any((tmp_path / "compile-cache").iterdir())
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint-20"
    res.model.save_pretrained(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]  # the plain model, loadable without compile


def test_samples_are_seeded_logged_once_per_step_and_leave_training_unchanged(tmp_path, monkeypatch):
    """Samples at each evaluation (10, and 20 = the final one) are the same in a re-run, and a run with samples
    trains exactly as one without: generation runs in a fork of torch's RNG (dropout draws from it here)."""
    import mlflow

    from lmpipe.samples import SampleWriter, logged_table, sampling

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")
    tok, blocks, cfg = _setup(steps=20)
    cfg = cfg.model_copy(update={"dropout": 0.1, "sample_prompts": ["the cat", "a dog and"]})

    def run(name: str, with_samples: bool):
        torch.manual_seed(0)  # what the stage's seed_everything does before building the model
        model = build_lm(build_lm_config(cfg, tok), "clm")
        writer = SampleWriter(tok, cfg.sample_prompts, sampling(cfg, seed=5)) if with_samples else None
        with mlflow.start_run() as r:
            res = pretrain(model, tok, blocks[:-4], blocks[-4:], cfg, "cpu", 0, tmp_path / name,
                           callbacks=[writer] if writer else [])
        return res, writer, r.info.run_id

    plain, _, _ = run("plain", False)
    first, writer, run_id = run("first", True)
    second, again, _ = run("second", True)
    for key in ("train_loss", "val_loss", "steps"):
        assert plain.metrics[key] == first.metrics[key] == second.metrics[key], key
    assert plain.curve == first.curve
    assert [(r["step"], r["prompt"]) for r in writer.rows] == [(10, "the cat"), (10, "a dog and"),
                                                                (20, "the cat"), (20, "a dog and")]
    assert writer.rows == again.rows and all(r["text"] for r in writer.rows)
    assert writer.last() == writer.rows[2:]
    table = logged_table(run_id)  # the MLflow table: each step once (the final evaluation is step 20 again)
    assert table.to_dict("records") == writer.rows


def test_compile_without_a_cpp_compiler_is_refused(monkeypatch, tmp_path):
    from lmpipe.compile_cache import check_compile

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
        check_compile(True, "cpu")
    check_compile(False, "cpu")


@pytest.mark.slow  # three compiled pretrain processes: about two minutes
def test_a_second_compiled_run_loads_its_graphs_from_the_cache_and_a_new_shape_compiles_anew(workdir, tmp_path):
    import json
    import platform
    import shutil

    from helpers import prepare_workdir, run_module

    prepare_workdir(workdir, lambda r: r["pretrain"].update(compile=True, arch="gpt2"))
    env = {"LMPIPE_COMPILE_CACHE": str(tmp_path / "compile-cache")}

    def run(*args: str) -> dict:
        for out in ("models/pretrain", "checkpoints"):  # a fresh training run each time, same shapes
            shutil.rmtree(workdir / out, ignore_errors=True)
        res = run_module("stages.pretrain", workdir, *args, env=env, process=True)  # a cache across processes
        assert res.returncode == 0, res.stderr[-3000:]
        assert "torch.compile cache" in res.stdout
        return json.loads((workdir / "metrics" / "pretrain.json").read_text())

    first, second = run(), run()
    assert first["compile_graphs_compiled"] > 0
    assert second["compile_graphs_cached"] > 0 and second["compile_graphs_compiled"] == 0  # warm: nothing compiled
    # the bf16 joint graph (autocast inside it) comes from AOTAutograd's cache too, not re-traced and partitioned
    assert first["compile_autograd_bypassed"] == second["compile_autograd_bypassed"] == 0
    assert second["compile_autograd_cached"] > 0
    if platform.machine() == "x86_64":  # inductor's vector-ISA checks, run once, recorded for the next process
        assert list((tmp_path / "compile-cache").glob("vec-isa-checked-*"))
    assert second["val_loss"] == pytest.approx(first["val_loss"], abs=1e-4)  # the cached kernels compute the same
    wider = run("--set", "pretrain.hidden_size=32", "--set", "pretrain.intermediate_size=64")
    assert wider["compile_graphs_compiled"] > 0  # another shape: compiled, not loaded from the 16-wide entries


def test_compile_cache_is_lmpipes_folder_unless_the_user_names_one(tmp_path):
    """Importing Trainer makes inductor set TORCHINDUCTOR_CACHE_DIR to torch's temp-folder default; the stage's
    cache must still be ~/.cache/lmpipe/torch-compile (XDG_CACHE_HOME here), and a folder the user set wins."""
    import subprocess
    import sys

    script = ("from lmpipe.compile_cache import compile_cache; print(compile_cache())")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "LMPIPE_COMPILE_CACHE")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "xdg" / "lmpipe" / "torch-compile").resolve())
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "mine")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == str((tmp_path / "mine").resolve())
