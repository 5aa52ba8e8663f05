"""Fine-tuning strategies through the stage a user runs (`python -m stages.finetune --set finetune.strategy=...`)
on a tiny pretrained model, plus the layer naming and the distillation loss on models built in the test."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import copy_for_reference, run_module, tiny_params, write_tiny_data

# -- a tiny pretrained model per architecture, made once per module; each test works on a copy --------------

_ARCHS = {"llama": {}, "bert": {"tokenize": {"kind": "wordpiece"}, "pretrain": {"arch": "bert", "objective": "mlm"}}}


def _prepared(tmp_path_factory, arch: str) -> Path:
    base = tmp_path_factory.mktemp(f"pretrained-{arch}")
    data = write_tiny_data(base / "data")
    wd = base / "work"
    wd.mkdir()
    raw = tiny_params()
    for section, values in _ARCHS[arch].items():
        raw[section].update(values)
    raw["finetune"]["scratch_baseline"] = False
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {"LMPIPE_DATA_DIR": str(data), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}
    for stage in ("clean", "tokenize", "pretrain"):
        res = run_module(f"stages.{stage}", wd, env=env)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
    return wd


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return _prepared(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory) -> Path:
    return _prepared(tmp_path_factory, "bert")


def _copy(base: Path, tmp_path: Path, monkeypatch) -> Path:
    wd = copy_for_reference(base, tmp_path / "work")  # without the MLflow store and checkpoints
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    return wd


@pytest.fixture
def work(llama_base, tmp_path, monkeypatch) -> Path:
    return _copy(llama_base, tmp_path, monkeypatch)


def _finetune(wd: Path, *sets: str) -> dict:
    args = [a for s in sets for a in ("--set", s)]
    res = run_module("stages.finetune", wd, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((wd / "metrics" / "finetune.json").read_text())


def _client(wd: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")


def _artifact(wd: Path, run_id: str, path: str) -> Path:
    return Path(_client(wd).download_artifacts(run_id, path, str(wd / "downloaded")))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _classifier_from(folder: Path, wd: Path):
    """The pretrained LM as a classifier (the base the strategies start from)."""
    from lmpipe.modeling import load_classifier, load_tokenizer

    tok = load_tokenizer(wd / "models" / "tokenizer")
    return load_classifier(folder, 2, {0: "negative", 1: "positive"}, False, tok.pad_token_id)


def _encode(folder: Path, texts: list[str]):
    from lmpipe.modeling import load_tokenizer

    return load_tokenizer(folder)(texts, padding=True, return_tensors="pt")


TEXTS = ["a moving and beautiful film", "dull", "the plot is boring and stupid , flat and far too long"]

# -- in-process: where the layers are, the distillation loss ---------------------------------------------------


def _tiny(arch: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

    config = {"llama": LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32),
              "gpt2": GPT2Config(vocab_size=50, n_embd=16, n_inner=32, n_layer=3, n_head=2, n_positions=32,
                                 bos_token_id=1, eos_token_id=1),
              "bert": BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, max_position_embeddings=32, type_vocab_size=1)}[arch]
    config.pad_token_id = 0
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("arch,layers,embeddings,head", [
    ("llama", "model.layers", ["model.embed_tokens.weight"], ["model.norm.weight", "score.weight"]),
    ("gpt2", "transformer.h", ["transformer.wte.weight", "transformer.wpe.weight"],
     ["transformer.ln_f.weight", "transformer.ln_f.bias", "score.weight"]),
    ("bert", "bert.encoder.layer", ["bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.bias"],
     ["bert.pooler.dense.weight", "classifier.weight", "classifier.bias"]),
])
def test_layers_embeddings_and_head_come_from_the_model(arch, layers, embeddings, head):
    from lmpipe.strategies import blocks, depths, llrd_scales

    model = _tiny(arch)
    assert blocks(model) == (layers, 3)
    d = depths(model)
    assert all(d[n] == 0 for n in embeddings) and all(d[n] == 4 for n in head)
    assert {d[n] for n in d if n.startswith(f"{layers}.1.")} == {2}
    scales = llrd_scales(model, 0.5)
    assert scales[embeddings[0]] == 0.5 ** 3 and scales[head[-1]] == 1.0
    assert {scales[n] for n in d if n.startswith(f"{layers}.0.")} == {0.25}


def test_distillation_loss_mixes_soft_and_hard_targets():
    import torch.nn.functional as F

    from lmpipe.strategies import distillation_loss

    torch.manual_seed(0)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    ce = F.cross_entropy(s, y)
    kl = (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert torch.equal(distillation_loss(s, t, y, 2.0, 0.0), ce)
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 1.0), 4 * kl)
    assert torch.allclose(distillation_loss(s, t, y, 2.0, 0.3), 0.3 * 4 * kl + 0.7 * ce)
    assert distillation_loss(t, t, y, 2.0, 1.0).abs() < 1e-6  # the teacher's own logits: nothing to learn


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_prefix_tuning_runs_on_every_architecture_and_ignores_padding(arch):
    """peft's prefix tuning through lmpipe.modeling.accept_past_key_values (transformers renamed the argument)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from lmpipe.modeling import accept_past_key_values

    model = get_peft_model(accept_past_key_values(_tiny(arch)),
                           PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4))
    ids = torch.randint(2, 50, (2, 9))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0  # row 0: 6 tokens + 3 padding
    out = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        alone = model(input_ids=ids[:1, :6], attention_mask=mask[:1, :6]).logits
        padded = model(input_ids=ids, attention_mask=mask).logits[:1]
    assert (alone - padded).abs().max() < 1e-5


# -- through the stage ------------------------------------------------------------------------------------------


def test_freeze_keeps_embeddings_and_lowest_layers_bit_identical(work):
    got = _finetune(work, "finetune.strategy=freeze", "finetune.freeze.layers=1", "finetune.scratch_baseline=true")
    before, after = _weights(work / "models" / "pretrain"), _weights(work / "models" / "finetune")
    frozen = sorted(n for n in after if n.startswith(("model.embed_tokens.", "model.layers.0.")))
    trained = sorted(n for n in after if n.startswith("model.layers.1."))
    assert frozen and trained
    assert all(torch.equal(before[n], after[n]) for n in frozen)  # bit-identical after training
    assert all(not torch.equal(before[n], after[n]) for n in trained if n.endswith("proj.weight"))
    for variant in ("classifier", "scratch"):  # the scratch twin: same strategy from a random init
        record = json.loads(_artifact(work, got["mlflow_run_id"], f"finetune_{variant}_optimizer.json").read_text())
        assert sorted(record["frozen"]) == frozen  # requires_grad False when training started
        in_optimizer = {n for g in record["groups"] for n in g["params"]}
        assert not in_optimizer & set(frozen)
        assert got[variant]["trainable_params"] == sum(g["numel"] for g in record["groups"])
        assert got[variant]["total_params"] - got[variant]["trainable_params"] == sum(after[n].numel() for n in frozen)
        assert got[variant]["steps_per_s"] > 0


@pytest.mark.slow  # a whole finetune stage with layer-wise LR (about 1 min on CI): keeps make test under 15 min
def test_llrd_parameter_groups_decay_geometrically(work):
    got = _finetune(work, "finetune.strategy=llrd", "finetune.llrd.decay=0.5", "finetune.learning_rate=0.001")
    record = json.loads(_artifact(work, got["mlflow_run_id"], "finetune_classifier_optimizer.json").read_text())
    lr_of = {n: g["lr"] for g in record["groups"] for n in g["params"]}
    # 2 layers: head and the top layer at learning_rate, layer 0 x 0.5, embeddings x 0.25
    assert lr_of["score.weight"] == lr_of["model.norm.weight"] == 0.001
    assert {lr_of[n] for n in lr_of if n.startswith("model.layers.1.")} == {0.001}
    assert {lr_of[n] for n in lr_of if n.startswith("model.layers.0.")} == {0.0005}
    assert lr_of["model.embed_tokens.weight"] == 0.00025
    # Trainer's weight-decay split survives: norms and biases without decay
    wd_of = {n: g["weight_decay"] for g in record["groups"] for n in g["params"]}
    assert wd_of["model.layers.0.input_layernorm.weight"] == 0.0 and wd_of["model.layers.0.mlp.up_proj.weight"] > 0
    assert got["classifier"]["trainable_params"] == got["classifier"]["total_params"]


@pytest.mark.slow  # finetune + evaluate + deploy of a LoRA model through the stages (about 1.5 min on CI)
def test_lora_trains_peft_count_and_merges_to_a_plain_model(work):
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    got = _finetune(work, "finetune.strategy=lora", "finetune.lora.r=4", "finetune.scratch_baseline=true")
    expected = get_peft_model(_classifier_from(work / "models" / "pretrain", work),
                              LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=16, lora_dropout=0.1))
    trainable, total = expected.get_nb_trainable_parameters()
    for variant in ("classifier", "scratch"):
        assert (got[variant]["trainable_params"], got[variant]["total_params"]) == (trainable, total)
        record = json.loads(_artifact(work, got["mlflow_run_id"], f"finetune_{variant}_optimizer.json").read_text())
        assert sum(g["numel"] for g in record["groups"]) == trainable
        assert all("lora_" in n or "modules_to_save" in n for g in record["groups"] for n in g["params"])
    out = work / "models" / "finetune"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and not (out / "adapter_config.json").exists()
    merged_weights = _weights(out)
    assert not any("lora" in k for k in merged_weights)
    assert torch.equal(merged_weights["model.embed_tokens.weight"],
                       _weights(work / "models" / "pretrain")["model.embed_tokens.weight"])
    # the adapter logged to MLflow, applied to the pretrained base, predicts what the merged model predicts
    adapter = _artifact(work, got["mlflow_run_id"], "classifier_adapter")
    assert (adapter / "adapter_model.safetensors").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(_classifier_from(work / "models" / "pretrain", work), str(adapter)).eval()
    from lmpipe.modeling import load_finetuned

    merged = load_finetuned(out).eval()
    batch = _encode(out, TEXTS)
    with torch.no_grad():
        diff = (merged(**batch).logits - peft_model(**batch).logits).abs().max()
    assert diff <= 1e-4, diff
    run = _client(work).get_run(got["mlflow_run_id"])
    assert run.data.params["finetune.strategy"] == "lora"
    assert run.data.metrics["classifier.trainable_percent"] == pytest.approx(100 * trainable / total)


@pytest.mark.parametrize("strategy", ["prefix", "prompt"])
def test_prefix_and_prompt_keep_the_adapter_and_every_loader_applies_it(work, strategy):
    from peft import PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import accept_past_key_values, load_finetuned, load_tokenizer
    from lmpipe.package import HFClassifier

    got = _finetune(work, f"finetune.strategy={strategy}", f"finetune.{strategy}.num_virtual_tokens=8")
    config_cls = PrefixTuningConfig if strategy == "prefix" else PromptTuningConfig
    expected = get_peft_model(accept_past_key_values(_classifier_from(work / "models" / "pretrain", work)),
                              config_cls(task_type=TaskType.SEQ_CLS, num_virtual_tokens=8))
    assert (got["classifier"]["trainable_params"], got["classifier"]["total_params"]) == \
        expected.get_nb_trainable_parameters()
    out = work / "models" / "finetune"
    assert (out / "adapter_config.json").is_file() and (out / "config.json").is_file()
    assert {p.name for p in _artifact(work, got["mlflow_run_id"], "classifier_adapter").iterdir()} == \
        {"adapter_config.json", "adapter_model.safetensors"}
    with pytest.raises(ValueError):  # a plain loader cannot silently drop the virtual tokens
        AutoModelForSequenceClassification.from_pretrained(out)
    model, tok = load_finetuned(out), load_tokenizer(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    # a prediction does not depend on the other texts in its batch (padding; prompt pads a decoder on the
    # left, where rotary positions shift by the padding: equal up to float rounding)
    assert tok.padding_side == ("left" if strategy == "prompt" else "right")
    together = predict_proba(model, tok, TEXTS, 8, "cpu")
    alone = np.concatenate([predict_proba(model, tok, [t], 1, "cpu") for t in TEXTS])
    assert np.abs(together - alone).max() < 1e-4
    assert HFClassifier(out).predict(TEXTS[:1])[0]["label"] in ("negative", "positive")
    res = run_module("stages.evaluate", work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 <= json.loads((work / "metrics" / "eval.json").read_text())["classifier"]["accuracy"] <= 1


@pytest.mark.parametrize("strategy", ["lora", "prefix"])
def test_adapters_on_bert_name_its_modules(bert_base, tmp_path, monkeypatch, strategy):
    work = _copy(bert_base, tmp_path, monkeypatch)
    got = _finetune(work, f"finetune.strategy={strategy}", "finetune.lora.target_modules=[query, value]")
    assert 0 < got["classifier"]["trainable_params"] < got["classifier"]["total_params"] / 4
    res = run_module("stages.evaluate", work)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_distill_reads_the_teacher_and_uses_both_loss_terms(work):
    # the teacher: this model fine-tuned in full, registered by deploy as lmpipe-sst2@champion
    plain = _finetune(work)
    shutil.copytree(work / "models" / "finetune", work / "teacher")
    for stage in ("evaluate", "deploy"):
        res = run_module(f"stages.{stage}", work)
        assert res.returncode == 0, res.stderr[-3000:]
    plain_weights = _weights(work / "teacher")

    # alpha 0: only the hard labels, exactly plain training
    got = _finetune(work, "finetune.strategy=distill", "finetune.distill.teacher=teacher", "finetune.distill.alpha=0")
    assert got["teacher"] == "teacher" and got["classifier"]["val_loss"] == plain["classifier"]["val_loss"]
    assert all(torch.equal(v, plain_weights[k]) for k, v in _weights(work / "models" / "finetune").items())
    # alpha 1: only the teacher's soft labels, read from the registry
    got = _finetune(work, "finetune.strategy=distill", "finetune.distill.teacher=models:/lmpipe-sst2@champion",
                    "finetune.distill.alpha=1")
    assert got["teacher"] == "models:/lmpipe-sst2@champion"
    assert got["classifier"]["val_loss"] != plain["classifier"]["val_loss"]
    assert any(not torch.equal(v, plain_weights[k]) for k, v in _weights(work / "models" / "finetune").items())


def _other_labels_teacher(work: Path) -> str:
    from lmpipe.modeling import load_classifier, load_tokenizer, save_classifier

    tok = load_tokenizer(work / "models" / "tokenizer")
    model = load_classifier(work / "models" / "pretrain", 3, {0: "cat", 1: "dog", 2: "fish"}, False, tok.pad_token_id)
    save_classifier(model, tok, 16, work / "animals")
    return "finetune.distill.teacher=animals"


@pytest.mark.parametrize("sets,expected", [
    (["finetune.strategy=lora", "finetune.lora.target_modules=[q_proj, qkv]"],
     "finetune.lora.target_modules: qkv not in LlamaForSequenceClassification; its adaptable modules: down_proj, "
     "embed_tokens, gate_proj, k_proj, o_proj, q_proj, score, up_proj, v_proj"),
    (["finetune.strategy=freeze", "finetune.freeze.layers=3"], "finetune.freeze.layers: 3 exceeds the model's 2 layers"),
    (["finetune.strategy=prompt", "finetune.prompt.num_virtual_tokens=17"],
     "finetune.prompt.num_virtual_tokens: 17 virtual tokens + finetune.max_length 16 exceed the model's 32 positions"),
    (["finetune.strategy=distill", _other_labels_teacher],
     "finetune.distill.teacher: animals predicts labels ['cat', 'dog', 'fish'], the task's are ['negative', 'positive']"),
    (["finetune.strategy=distill", "finetune.distill.teacher=models:/nope@champion"],
     "finetune.distill.teacher: cannot load models:/nope@champion"),
    (["finetune.augment.ops=[]"], "finetune.augment.ops: List should have at least 1 item"),
    (["finetune.augment.copies=1", "finetune.augment.ops=[swap, contextual]"],
     "finetune.augment.model: augment.ops ['contextual'] need augment.model (pretrained, package:NAME or a model dir)"),
    (["finetune.augment.copies=1", "finetune.augment.ops=[neighbour]", "finetune.augment.model=nowhere"],
     "finetune.augment.model: nowhere: "),
    (["finetune.augment.copies=1", "finetune.augment.ops=[contextual]", "finetune.augment.model=pretrained"],
     "(LlamaConfig) is not a masked LM: contextual needs a masked LM"),
    (["finetune.augment.ops=[backtranslate]"],
     "finetune.augment.ops: backtranslate needs a translation model, and none can be had offline"),
    (["finetune.adversarial.method=free"], "finetune.adversarial.method: Input should be 'none', 'fgm' or 'pgd'"),
])
def test_bad_strategy_input_is_one_line_and_writes_nothing(work, sets, expected):
    sets = [s(work) if callable(s) else s for s in sets]
    res = run_module("stages.finetune", work, *[a for s in sets for a in ("--set", s)])
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("finetune: error:")]
    assert len(lines) == 1 and expected in lines[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (work / "models" / "finetune").exists() and not (work / "metrics" / "finetune.json").exists()
    assert not list(work.rglob("checkpoint-*")) and not list(work.rglob("finished"))


# -- regularisation, adversarial training, augmentation (lmpipe/regularization.py) ------------------------------

def test_regularisation_reaches_the_trainer_and_the_saved_model(work):
    import pandas as pd

    from lmpipe.evaluation import predict_proba
    from lmpipe.modeling import load_finetuned, load_tokenizer

    # a learning rate of ~0 keeps the validation accuracy where it starts: evaluation 2 (step 4) does not
    # beat evaluation 1 (step 2), so patience 1 stops training at step 4 of 12
    got = _finetune(work, "finetune.dropout=0.3", "finetune.label_smoothing=0.2", "finetune.patience=1",
                    "finetune.learning_rate=1e-12", "finetune.max_steps=12", "finetune.eval_every=2")
    assert got["classifier"]["steps"] == 4 and got["classifier"]["stopped_early"] == 1
    out = work / "models" / "finetune"
    assert json.loads((out / "config.json").read_text())["attention_dropout"] == 0.3  # Llama's one dropout
    # label smoothing is a training loss: the validation loss stays the plain cross-entropy of the saved model
    val = pd.read_parquet(work / "data" / "clean" / "labeled_validation.parquet")
    probs = torch.from_numpy(predict_proba(load_finetuned(out), load_tokenizer(out), val["text"].tolist(), 64, "cpu"))
    nll = -probs.log()[torch.arange(len(val)), torch.tensor(val["label"].to_numpy())]
    assert got["classifier"]["val_loss"] == pytest.approx(float(nll.mean()), abs=1e-4)
    run = _client(work).get_run(got["mlflow_run_id"])
    assert run.data.params["finetune.label_smoothing"] == "0.2"


def test_optimizer_schedule_sampler_accumulation_and_rdrop_reach_the_trainer(work):
    got = _finetune(work, "finetune.optimizer=sgd", "finetune.lr_scheduler=constant", "finetune.learning_rate=0.01",
                    "finetune.sampler=group_by_length", "finetune.gradient_accumulation_steps=2",
                    "finetune.rdrop_alpha=1.0", "finetune.dropout=0.1", "finetune.max_minutes=60")
    run_id = got["mlflow_run_id"]
    record = json.loads(_artifact(work, run_id, "finetune_classifier_optimizer.json").read_text())
    assert record["optimizer"] == "SGD" and {g["lr"] for g in record["groups"]} == {0.01}
    lrs = [m.value for m in _client(work).get_metric_history(run_id, "classifier.lr")]
    assert lrs and set(lrs) == {0.01}  # constant: no warmup, no decay
    assert got["classifier"]["steps"] == 6 and got["classifier"]["stopped_by_time_cap"] == 0
    params = _client(work).get_run(run_id).data.params
    assert (params["finetune.rdrop_alpha"], params["finetune.gradient_accumulation_steps"]) == ("1.0", "2")


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_gradient_checkpointing_recomputes_activations_and_trains_the_same_model(work, strategy):
    # dropout on: the recomputed forward must draw the same masks (torch restores the RNG state)
    common = (f"finetune.strategy={strategy}", "finetune.dropout=0.1", "finetune.max_steps=4", "finetune.eval_every=2")
    plain = _finetune(work, *common)
    shutil.rmtree(work / "checkpoints" / "finetune")  # a second run from scratch, not a resume of the first
    recomputed = _finetune(work, *common, "finetune.gradient_checkpointing=true")
    assert (plain["classifier"]["gradient_checkpointing"], recomputed["classifier"]["gradient_checkpointing"]) == (0, 1)
    assert recomputed["classifier"]["val_loss"] == pytest.approx(plain["classifier"]["val_loss"], rel=1e-5)
    # every stage run records the hardware it ran on (lmpipe.host.hardware), so speeds compare in the UI
    tags = _client(work).get_run(recomputed["mlflow_run_id"]).data.tags
    from lmpipe.host import cpu_model

    assert (tags["host.device"], tags["host.cpu"], tags["host.torch"]) == ("cpu", cpu_model(), torch.__version__)
    assert tags["host.workspace"] == str(work) and int(tags["host.cpu_cores"]) >= 1


@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_adversarial_training_logs_a_higher_loss_on_perturbed_embeddings(work, method):
    got = _finetune(work, f"finetune.adversarial.method={method}", "finetune.adversarial.epsilon=0.5",
                    "finetune.dropout=0.0")  # no dropout: the clean and the perturbed pass see the same model
    client = _client(work)
    adversarial = {m.step: m.value for m in client.get_metric_history(got["mlflow_run_id"], "classifier.adversarial_loss")}
    clean = {m.step: m.value for m in client.get_metric_history(got["mlflow_run_id"], "classifier.train_loss")}
    assert adversarial and set(adversarial) == set(clean)
    assert sum(adversarial.values()) > sum(clean.values())


def test_neighbour_augmentation_swaps_words_for_the_pretrained_models_nearest_tokens(work):
    import pandas as pd

    n = len(pd.read_parquet(work / "data" / "clean" / "labeled_train.parquet"))
    got = _finetune(work, "finetune.augment.copies=1", "finetune.augment.ops=[neighbour]",
                    "finetune.augment.model=pretrained", "finetune.augment.top_k=3")
    assert (got["train_examples"], got["augmented_examples"]) == (2 * n, n)
    table = json.loads(_artifact(work, got["mlflow_run_id"], "augment_samples.json").read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == min(n, 50)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "models" / "pretrain")

    def one_token(word: str) -> bool:
        return any(len(tok(f, add_special_tokens=False)["input_ids"]) == 1 for f in (word, " " + word))

    changed = 0
    for r in rows:
        before, after = r["original"].split(), r["augmented"].split()
        assert len(before) == len(after)  # words replaced in place
        for old, new in zip(before, after):
            if old != new:  # only a word that is one token of the vocabulary has neighbours; its is one, too
                changed += 1
                assert one_token(old) and one_token(new) and new.isalpha(), (old, new)
    assert changed >= 5, rows[:5]  # a 300-token vocabulary: most words are several tokens and stay


def test_finetune_seed_varies_the_model_and_keeps_the_split(work):
    """finetune.seed: null is common.seed; another value trains another model on the same splits (what an
    ensemble's members vary, so every member was selected on one validation split)."""
    import yaml

    common = yaml.safe_load((work / "params.yaml").read_text())["common"]["seed"]
    default = _finetune(work)
    weights = _weights(work / "models" / "finetune")
    split = (work / "data" / "clean" / "labeled_validation.parquet").read_bytes()
    same = _finetune(work, f"finetune.seed={common}")
    assert same["classifier"]["val_loss"] == default["classifier"]["val_loss"]
    assert all(torch.equal(v, weights[k]) for k, v in _weights(work / "models" / "finetune").items())
    other = _finetune(work, f"finetune.seed={common + 1}")
    assert other["classifier"]["val_loss"] != default["classifier"]["val_loss"]
    assert (work / "data" / "clean" / "labeled_validation.parquet").read_bytes() == split


def test_augmentation_adds_copies_of_the_training_split_only(work):
    import pandas as pd

    n = len(pd.read_parquet(work / "data" / "clean" / "labeled_train.parquet"))
    got = _finetune(work, "finetune.augment.copies=2", "finetune.augment.ops=[swap, delete]")
    assert (got["train_examples"], got["augmented_examples"]) == (3 * n, 2 * n)
    run = _client(work).get_run(got["mlflow_run_id"])
    assert run.data.metrics["augmented_examples"] == 2 * n and run.data.metrics["train_examples"] == 3 * n
    # the validation split is the one clean wrote: its dataset digest in MLflow is the file's
    inputs = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    import mlflow

    expected = mlflow.data.from_pandas(pd.read_parquet(work / "data" / "clean" / "labeled_validation.parquet"),
                                       targets="label").digest
    assert inputs["labeled_validation"].digest == expected


def test_distill_without_a_teacher_is_refused_by_validation():
    from lmpipe.errors import ConfigError
    from lmpipe.params import validate

    raw = tiny_params()
    raw["finetune"]["strategy"] = "distill"
    with pytest.raises(ConfigError, match=r"^params.yaml: finetune\.distill\.teacher: strategy distill needs a teacher"):
        validate(raw)


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_lora_survives_sigkill_and_resumes_to_the_same_metrics(work, tmp_path):
    from helpers import kill_after

    params = yaml.safe_load((work / "params.yaml").read_text())
    params["finetune"].update(strategy="lora", max_steps=60, eval_every=10, batch_size=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ref = copy_for_reference(work, tmp_path / "ref")
    res = run_module("stages.finetune", ref, env={"MLFLOW_TRACKING_URI": f"sqlite:///{ref / 'mlflow.db'}"})
    assert res.returncode == 0, res.stderr[-3000:]
    expected = json.loads((ref / "metrics" / "finetune.json").read_text())["classifier"]

    step = kill_after("finetune", work, work / "checkpoints" / "finetune", past=0)
    assert 0 < step < 60
    res = run_module("stages.finetune", work)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((work / "metrics" / "finetune.json").read_text())["classifier"]
    assert got["steps"] == 60
    assert abs(got["val_loss"] - expected["val_loss"]) < 1e-4 and got["val_accuracy"] == expected["val_accuracy"]
    assert _weights(work / "models" / "finetune").keys() == _weights(ref / "models" / "finetune").keys()
    from helpers import mlflow_runs

    runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.data.tags.get("lmpipe.stage") == "finetune"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
