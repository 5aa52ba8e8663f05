"""Generative (instruction) fine-tuning, finetune.head lm: the conversation records and their one-line refusals,
the task templates, the chat template, the assistant-only labels, and one tiny run through the real stages."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import ROOT, mlflow_runs, run_module, tiny_generative_params, tiny_params
from lmpipe import chat, conversations
from lmpipe.config import SftSource
from lmpipe.errors import ConfigError, DataError
from lmpipe.generation import Sampling
from lmpipe.params import validate

SENTENCES = ["the film is good and warm", "a dull and boring plot", "the acting is superb", "a waste of time"]


@pytest.fixture(scope="module")
def tokenizer():
    """A BPE trained on four sentences, with the role tokens and the chat template."""
    from lmpipe.tokenizer import train_tokenizer

    tok = train_tokenizer(SENTENCES * 20, "bpe", 300, 2, 64)
    chat.add_chat_format(tok)
    return tok


# -- records: the accepted forms and the one-line refusals ----------------------------------------------------

def _jsonl(folder: Path, records: list) -> Path:
    path = folder / "chat.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_both_record_forms_read_as_messages(tmp_path: Path):
    path = _jsonl(tmp_path, [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "hello"}]},
                             "", {"prompt": "2+2?", "response": "4"}])
    got = conversations.read_source(SftSource(path="chat.jsonl"), tmp_path)
    assert got[1] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert [t["role"] for t in got[0]] == ["system", "user", "assistant"]
    pd.DataFrame({"prompt": ["a?", "b?"], "response": ["x", "y"]}).to_parquet(tmp_path / "c.parquet")
    assert conversations.read_source(SftSource(path="c.parquet"), tmp_path)[1][1]["content"] == "y"


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "content must be a string (got int)"),
    ({"prompt": "only a prompt"}, "no messages and no response"),
    ('{"messages": [', "not valid JSON"),
])
def test_a_malformed_record_is_refused_naming_file_and_line(tmp_path: Path, bad, message):
    path = _jsonl(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        conversations.read_source(SftSource(path="chat.jsonl"), tmp_path)
    line = str(err.value)
    assert line.startswith(f"{path}:3: ") and message in line and "\n" not in line


def test_cleaning_normalises_drops_and_deduplicates():
    convs = [[{"role": "user", "content": " a\u00a0 b "}, {"role": "assistant", "content": "x"}],
             [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "x"}],  # same after normalising
             [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}],
             [{"role": "user", "content": "q" * 50}, {"role": "assistant", "content": "x"}]]
    kept, stats = conversations.clean_conversations(convs, max_chars=40)
    assert kept == [[{"role": "user", "content": "a b"}, {"role": "assistant", "content": "x"}]]
    assert stats == {"rows_in": 4, "rows_out": 1, "dropped_empty": 1, "dropped_too_long": 1, "dropped_duplicate": 1}
    splits = conversations.split_conversations(kept * 3, 0.34, 0.34, seed=1)
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1, 1, 1]


# -- templates --------------------------------------------------------------------------------------------------

def test_a_template_naming_a_missing_field_is_one_line():
    raw = tiny_params()
    raw["clean"]["sft"]["templates"]["sst2"]["prompt"] = "Review: {review}\nPositive?"
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert "clean.sft.templates.sst2.prompt: unknown field {review} (fields: {text}, {label})" in str(err.value)


def test_a_task_example_becomes_a_conversation_with_its_label_word():
    df = pd.DataFrame({"text": ["a warm film", "a dull plot"], "label": [1, 0]})
    template = validate(tiny_params()).clean.sft.templates["sst2"]
    out = conversations.task_split(df, ["negative", "positive"], template)
    assert out["label"].tolist() == ["positive", "negative"]
    assert chat.loads(out["messages"][0]) == [
        {"role": "user", "content": "Review: a warm film\nIs this review positive or negative?"},
        {"role": "assistant", "content": "positive"}]


def test_generative_switches_are_checked_across_sections():
    raw = tiny_generative_params(tiny_params())
    raw["tokenize"]["chat_tokens"] = False
    raw["finetune"]["strategy"] = "prefix"
    with pytest.raises(ConfigError) as err:
        validate(raw)
    assert "finetune.head: lm needs the chat role tokens" in str(err.value)
    assert "finetune.strategy: prefix with finetune.head: lm" in str(err.value)


# -- the chat template and the labels -----------------------------------------------------------------------------

def test_role_tokens_come_after_the_vocabulary_and_the_template_round_trips(tokenizer, tmp_path: Path):
    from transformers import AutoTokenizer

    from lmpipe.tokenizer import train_tokenizer

    plain = train_tokenizer(SENTENCES * 20, "bpe", 300, 2, 64)
    assert tokenizer.convert_tokens_to_ids(list(chat.ROLE_TOKENS)) == [300, 301, 302]
    assert plain("the film is superb")["input_ids"] == tokenizer("the film is superb")["input_ids"]  # same ids
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Is it good?"}]
    assert chat.prompt_text(loaded, messages) == "<|user|>Is it good?</s><|assistant|>"
    ids = loaded(chat.prompt_text(loaded, messages), add_special_tokens=False)["input_ids"]
    assert ids[0] == 301 and ids[-1] == 302  # the markers are single tokens
    assert loaded.decode(ids, skip_special_tokens=True).strip() == "Is it good?"  # (BPE's prefix space)


def test_only_assistant_tokens_have_labels(tokenizer):
    from lmpipe.sft import IGNORE, encode

    conv = [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"},
            {"role": "user", "content": "the plot"}, {"role": "assistant", "content": "dull"}]
    columns, cut = encode(tokenizer, [conv], max_length=64)
    ids, labels = columns["input_ids"][0], columns["labels"][0]
    assert cut == 0 and ids[0] == tokenizer.bos_token_id
    trained = [i for i, x in enumerate(labels) if x != IGNORE]
    assert all(labels[i] == ids[i] for i in trained)
    # exactly each reply and the EOS closing it: what follows an <|assistant|> marker up to its </s>
    assistant, eos = tokenizer.convert_tokens_to_ids("<|assistant|>"), tokenizer.eos_token_id
    expected = []
    for start in [i for i, x in enumerate(ids) if x == assistant]:
        end = ids.index(eos, start)
        expected += list(range(start + 1, end + 1))
    assert trained == expected
    assert tokenizer.decode([ids[i] for i in trained], skip_special_tokens=True).split() == ["good", "dull"]
    # cut to 8 tokens: BOS kept, the end kept, labels still on the same positions
    short, cut = encode(tokenizer, [conv], max_length=8)
    assert cut == 1 and len(short["input_ids"][0]) == 8 and short["input_ids"][0][0] == tokenizer.bos_token_id
    assert short["input_ids"][0][1:] == ids[-7:] and short["labels"][0] == [IGNORE] + labels[-7:]


# -- through the stages ---------------------------------------------------------------------------------------------

def test_malformed_chat_file_through_the_clean_stage_is_one_line_and_writes_nothing(workdir: Path, tiny_data: Path):
    (tiny_data / "chat.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}) + "\n")
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["clean"]["sft"]["sources"] = [{"path": "chat.jsonl"}]
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = run_module("stages.clean", workdir)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines[-1] == (f"clean: error: {tiny_data / 'chat.jsonl'}:2: messages[1]: unknown role 'robot' "
                         "(roles: system, user, assistant)")
    assert not (workdir / "data").exists() and not (workdir / "metrics").exists()


def test_generative_pipeline_end_to_end(workdir: Path, tiny_data: Path):
    """clean -> tokenize -> pretrain -> finetune (head lm, scratch twin) -> evaluate -> deploy (gate only) on tiny
    data, in one process (the imports paid once), with a conversation file of your own beside the task."""
    rows = [{"prompt": f"Say the word number {i}.", "response": f"word {i}"} for i in range(12)]
    (tiny_data / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    raw = tiny_generative_params(yaml.safe_load((workdir / "params.yaml").read_text()))
    raw["clean"]["sft"]["sources"] = [{"path": "chat.jsonl"}]
    raw["deploy"].update(min_exact_match=0.0, max_perplexity=1e9, model_name="tiny-generator",  # a tiny model passes
                         variants=["fp32", "int8_dynamic", "onnx"], max_perplexity_increase=10.0)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy"):
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, (stage, res.stderr[-3000:])
    clean = json.loads((workdir / "metrics" / "clean.json").read_text())
    assert clean["sft"]["sources"]["rows_out"] == 12 and clean["sft"]["sst2"]["test"] == 12
    tok = json.loads((workdir / "models" / "tokenizer" / "tokenizer_config.json").read_text())
    assert (workdir / "models" / "tokenizer" / "chat_template.jinja").is_file() or "chat_template" in tok
    ev = json.loads((workdir / "metrics" / "eval.json").read_text())
    for key in ("generator", "scratch_baseline"):
        assert 0 <= ev[key]["exact_match"] <= 1 and 0 <= ev[key]["not_a_label"] <= 1
        assert ev[key]["response_perplexity"] > 1 and ev[key]["response_tokens"] > 0
    assert set(ev["benefit"]) == {"exact_match", "response_perplexity"}
    deploy = json.loads((workdir / "metrics" / "deploy.json").read_text())
    assert deploy["head"] == "lm" and deploy["registered"] is True and deploy["promoted"] is True
    assert deploy["model_uri"] == "models:/tiny-generator/1" and (workdir / "models" / "deploy" / "model").is_dir()
    assert deploy["versions"] == {"fp32": "1", "int8_dynamic": "2"} and deploy["variants"]["onnx"]["status"] == \
        "unsupported"
    assert deploy["variants"]["fp32"]["response_perplexity"] == pytest.approx(ev["generator"]["response_perplexity"])
    runs = {r.data.tags.get("mlflow.runName"): r for r in mlflow_runs(f"sqlite:///{workdir / 'mlflow.db'}")}
    ev_run = runs["evaluate"]
    import mlflow

    table = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}").download_artifacts(
        ev_run.info.run_id, "sampled_answers.json", str(workdir))
    data = json.loads(Path(table).read_text())
    assert data["columns"] == ["source", "prompt", "expected", "greedy", "sampled"]
    assert len(data["data"]) == 2 + min(2, clean["sft"]["sources"]["test"])  # evaluate.samples.prompts per source
    assert ev_run.data.metrics["generator.exact_match"] == pytest.approx(ev["generator"]["exact_match"])
    # the registered generator: the champion loads as the generator pyfunc and writes text
    from lmpipe.package import load_predictor

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny-generator", "champion")
    assert str(version.version) == "1" and version.tags["kind"] == "generator"
    predictor = load_predictor("models:/tiny-generator@champion")
    [out] = predictor.generate(["Say the word number 3."], Sampling(max_new_tokens=4, temperature=0))
    assert out.new_tokens >= 1
    [out8] = load_predictor("models:/tiny-generator/2").generate(["Say the word number 3."],
                                                                 Sampling(max_new_tokens=4, temperature=0))
    assert out8.new_tokens >= 1  # the int8_dynamic version loads quantised and writes too
    pipeline = [r for r in runs.values() if "exact_match" in r.data.metrics]
    assert pipeline and pipeline[0].data.metrics["response_perplexity"] == pytest.approx(
        ev["generator"]["response_perplexity"])


def test_lora_on_a_causal_lm_trains_the_adapter_only(tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from helpers import section
    from lmpipe import strategies

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    cfg = section("finetune", head="lm", strategy="lora")
    strategies.check(cfg, config)  # peft's default targets for Llama exist in the causal LM
    plan = strategies.prepare(AutoModelForCausalLM.from_config(config), cfg)
    trained = [n for n, p in plan.model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert {n.split(".")[-4] for n in trained} == {"q_proj", "v_proj"}  # ...q_proj.lora_A.default.weight
    bad = section("finetune", head="lm", strategy="lora", lora={**cfg.lora.model_dump(), "target_modules": ["query"]})
    with pytest.raises(ConfigError, match="finetune.lora.target_modules: query not in LlamaForCausalLM"):
        strategies.check(bad, config)
