"""Params validation: every shipped config parses; every problem is listed, one line each, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import ROOT, run_module
from lmpipe.errors import ConfigError
from lmpipe.params import load_params, validate


@pytest.mark.parametrize("profile", [None, *sorted((ROOT / "profiles").glob("*.yaml"))])
def test_shipped_params_and_profiles_validate(profile):
    params = load_params(ROOT / "params.yaml", profile=profile)
    assert params.pretrain.max_steps >= 1


def _raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_unknown_key_and_wrong_type_listed_together():
    raw = _raw()
    raw["pretrain"]["lerning_rate"] = 0.1
    raw["pretrain"]["learning_rate"] = "abc"
    with pytest.raises(ConfigError) as err:
        validate(raw)
    lines = str(err.value).splitlines()
    assert "params.yaml: pretrain.lerning_rate: unknown key" in lines
    assert any(line.startswith("params.yaml: pretrain.learning_rate:") and "abc" in line for line in lines)
    assert len(lines) == 2


def test_vocab_too_small_for_special_tokens():
    raw = _raw()
    raw["tokenize"]["vocab_size"] = 4
    with pytest.raises(ConfigError, match=r"tokenize\.vocab_size: 4 must exceed"):
        validate(raw)


def test_block_size_beyond_model_positions():
    raw = _raw()
    raw["tokenize"]["block_size"] = 512
    raw["pretrain"]["max_position_embeddings"] = 256
    with pytest.raises(ConfigError, match=r"tokenize\.block_size: 512 exceeds pretrain\.max_position_embeddings"):
        validate(raw)


def test_scratch_init_with_a_scratch_baseline_is_refused_in_one_line():
    raw = _raw()
    raw["finetune"].update(init="scratch", scratch_baseline=True)
    with pytest.raises(ConfigError) as err:
        validate(raw)
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith("params.yaml: finetune.scratch_baseline: "), lines
    assert "finetune.init: scratch" in lines[0] and "twice" in lines[0], lines
    raw["finetune"]["scratch_baseline"] = False
    assert validate(raw).finetune.init == "scratch"


def test_override_applies_dotted_keys():
    p = load_params(ROOT / "params.yaml", overrides={"pretrain.learning_rate": 3e-4})
    assert p.pretrain.learning_rate == 3e-4


@pytest.mark.parametrize("edit,expected", [  # unknown key, wrong type, vocab too small, ...: tests/test_bad_inputs.py
    (lambda r: r["tokenize"].__setitem__("block_size", 1024), "tokenize.block_size: 1024 exceeds"),
])
def test_stage_cli_rejects_bad_params_with_exit_2_and_no_outputs(tmp_path: Path, edit, expected):
    raw = _raw()
    edit(raw)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    res = run_module("stages.clean", tmp_path, env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"})
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and expected in err[0], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_bad_override_value_is_one_line(tmp_path: Path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    res = run_module("stages.clean", tmp_path, "--set", "pretrain.learning_rate=[")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not valid YAML" in res.stderr


def test_flow_cli_rejects_bad_input_before_prefect_starts():
    res = run_module("flows.pipeline", ROOT, "--set", "pretrain.lerning_rate=1")
    assert res.returncode == 2 and "pretrain.lerning_rate: unknown key" in res.stderr
    res = run_module("flows.pipeline", ROOT, "--stages", "bogus")
    assert res.returncode == 2 and "unknown stage(s) ['bogus']" in res.stderr
    res = run_module("flows.pipeline", ROOT, "--profile", "nope")
    assert res.returncode == 2 and "profile 'nope'" in res.stderr


def _defaults_also_in_params_yaml(model, node, prefix=""):
    """Keys written in params.yaml whose pydantic field also carries a default (two homes for one value)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from lmpipe.config import LabeledSource, TextSource

    found = []
    for name, field in model.model_fields.items():
        if not isinstance(node, dict) or name not in node:
            continue
        has_default = field.default is not PydanticUndefined or field.default_factory is not None
        if has_default and model not in (TextSource, LabeledSource):  # a data file's format options
            found.append(f"{prefix}{name}")
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            found += _defaults_also_in_params_yaml(ann, node[name], f"{prefix}{name}.")
    return found


def test_every_default_has_one_home():
    """A value in params.yaml has no second default in lmpipe/config.py; options params.yaml leaves out
    (fsdp, nproc_per_node, keep_newlines, ...) keep theirs in the model only."""
    from lmpipe.config import Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _defaults_also_in_params_yaml(Params, raw) == []
    # and the guard can fail: a model whose field has a default, written in params.yaml too
    from lmpipe.config import Section

    class Probe(Section):
        seed: int = 1

    assert _defaults_also_in_params_yaml(Probe, {"seed": 2}) == ["seed"]
