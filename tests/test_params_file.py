"""params.yaml is changed by a comment-preserving round trip, never re-dumped (lmpipe/params_file.py): what
lmpipe's experiments write into their worktree, and `lmpipe sweep --apply-best` into the workspace."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from ruamel.yaml import YAML

from helpers import ROOT
from lmpipe.params import load_raw, merge, validate
from lmpipe.errors import ConfigError
from lmpipe.experiments import write_params
from lmpipe.params_file import update_params_file
from lmpipe.sweep import apply

PROFILES = sorted(p.name for p in (ROOT / "profiles").glob("*.yaml"))
OVERRIDES = {"pretrain.learning_rate": 1e-4, "finetune.learning_rate": 2e-5, "common.experiment": "1e5",
             "deploy.model_name": "yes", "finetune.patience": 3, "deploy.publish": False,
             "deploy.variants": ["fp32", "onnx"], "finetune.max_steps": 7}


def _comments(text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(full-line comments, end-of-line comments) in order, each with the key it goes with: the key of the next
    line that holds one (a full-line comment introduces it), the key on its own line (an end-of-line comment)."""
    full, eol, pending = [], [], []
    for line in text.splitlines():
        body = line.strip()
        if body.startswith("#"):
            pending.append(body)
        elif body:
            key = body.lstrip("- ").split(":", 1)[0]
            full += [(c, key) for c in pending]
            pending = []
            if " #" in body:
                eol.append((key, body[body.index(" #") + 1:]))
    return full + [(c, "<end>") for c in pending], eol


def _typed(tree) -> str:
    """The tree with its types (True is not 1, 1 is not 1.0, '1e5' is not 100000.0)."""
    return json.dumps(tree, sort_keys=True)


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_every_profile_keeps_every_comment_and_reads_back_as_the_merged_tree(tmp_path, profile):
    original = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    # what lmpipe.experiments.prepare makes for `lmpipe smoke --profile <profile> --set ...`
    raw = merge(load_raw(ROOT / "params.yaml"), ROOT / "profiles" / profile if profile else None, OVERRIDES)
    update_params_file(path, raw)
    text = path.read_text()
    assert _comments(text) == _comments(original)  # every comment line, before the same key
    assert yaml.safe_load(text) == raw and _typed(yaml.safe_load(text)) == _typed(raw)
    assert YAML(typ="safe").load(text) == raw  # DVC reads it (YAML 1.2) as the same values
    validate(yaml.safe_load(text))


def test_same_tree_leaves_the_file_byte_for_byte(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    update_params_file(path, load_raw(path))
    assert path.read_text() == (ROOT / "params.yaml").read_text()


def test_publish_flip_changes_that_one_line(tmp_path):
    """What `lmpipe sweep --apply-best` does after `dvc exp apply` (trials run with deploy.publish false)."""
    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    raw = load_raw(path)
    raw["deploy"]["publish"] = not raw["deploy"]["publish"]
    update_params_file(path, raw)
    before, after = (ROOT / "params.yaml").read_text().splitlines(), path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1 and changed[0][1].startswith("  publish: false  ")


def test_dvc_exp_apply_of_an_experiment_then_the_publish_flip_keep_every_comment(tmp_path, monkeypatch):
    """`lmpipe sweep --apply-best` on a saved experiment: what write_params wrote comes back through
    `dvc exp apply`, and sweep.apply sets deploy.publish back to HEAD's (a few seconds: git and DVC only)."""
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "t")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "t@t")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    original = (ROOT / "params.yaml").read_text()

    def run(*cmd: str) -> None:
        subprocess.run(list(cmd), cwd=tmp_path, check=True, capture_output=True, text=True)

    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text(original)
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    raw = merge(load_raw(tmp_path / "params.yaml"), None, {"finetune.learning_rate": 1e-5, "deploy.publish": False})
    write_params(tmp_path, raw)  # what a sweep trial's worktree holds
    run(sys.executable, "-m", "dvc", "exp", "save", "-n", "trial", "-f")
    (tmp_path / "params.yaml").write_text(original)
    apply(tmp_path, "trial")
    text = (tmp_path / "params.yaml").read_text()
    assert _comments(text) == _comments(original)
    assert yaml.safe_load(text) == {**raw, "deploy": {**raw["deploy"], "publish": True}}
    changed = [(a, b) for a, b in zip(original.splitlines(), text.splitlines()) if a != b]
    assert len(text.splitlines()) == len(original.splitlines())
    assert changed == [("  learning_rate: 0.0005", "  learning_rate: 1.0e-05")]


SOURCE = """\
# about the file
train:
  lr: 0.001          # per step
  ratio: 3e-4        # PyYAML reads this plain as a string: kept as written
  stages:            # in order
    - name: a        # first
      steps: 1
    - name: b
      steps: 2
      tags: [x, y]
  # about the pairs
  pairs:
    - {k: 1}
    - {k: 2}
  last: 1

# about eval
eval:
  batch_size: 64
"""


def test_nested_lists_new_keys_and_values_that_look_like_other_types(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(SOURCE)
    want = yaml.safe_load(SOURCE)
    want["train"]["stages"][1]["tags"] = ["x", "on", "1e5", "12:30", "", None]  # same length: item by item
    want["train"]["stages"][0]["steps"] = 10
    want["train"]["pairs"] = [{"k": 1, "v": [{"deep": 1e-5}, {"deep": True}]}]  # another length: replaced whole
    want["train"]["lr"] = 1e-4
    want["train"]["warmup"] = {"steps": 5, "kind": "0777", "factor": 2.0, "none": None, "no": "no"}  # a new key
    want["eval"]["batch_size"] = 1e16
    want["new_section"] = {"flag": False, "names": ["yes", "null", "3.0"]}
    update_params_file(path, want)
    text = path.read_text()
    assert yaml.safe_load(text) == want and _typed(yaml.safe_load(text)) == _typed(want)
    dvc = YAML(typ="safe").load(text)
    assert dvc["train"].pop("ratio") == 3e-4 and want["train"].pop("ratio") == "3e-4"  # the user's text, as it was
    assert dvc == want  # every value written here reads the same to DVC (YAML 1.2)
    full, eol = _comments(text)
    assert (full, eol) == _comments(SOURCE)  # "# about eval" still right before eval:, after the new warmup
    assert "  ratio: 3e-4        # PyYAML reads this plain as a string: kept as written" in text.splitlines()
    assert "  lr: 0.0001         # per step" in text.splitlines()
    assert "    - name: a        # first" in text.splitlines()  # the list's indentation is the file's
    assert "      steps: 10" in text.splitlines()
    assert text.index("  warmup:") < text.index("# about eval") < text.index("eval:")


def test_removed_key_emptied_section_and_bad_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(SOURCE)
    want = yaml.safe_load(SOURCE)
    del want["train"]["last"]
    update_params_file(path, want)
    text = path.read_text()
    assert yaml.safe_load(text) == want and "last:" not in text
    assert text.index("# about eval") < text.index("eval:")  # the comment after the removed key stays

    shutil.copy(ROOT / "params.yaml", path)
    want = load_raw(path)
    want["clean"]["tasks"] = {}  # what the tests' tiny params do
    update_params_file(path, want)
    assert yaml.safe_load(path.read_text()) == want
    assert "  tasks: {}                    # more tasks for multi-task fine-tuning" in path.read_text()  # same column

    path.write_text("train: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        update_params_file(path, want)
    assert path.read_text() == "train: [1\n"
