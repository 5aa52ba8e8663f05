"""Versioned, comparable results on real DVC repos: experiments reuse the workspace's cached stages,
carry their metrics (`dvc exp show`, `dvc metrics diff`, `dvc plots diff`), and two checkouts at
different paths agree on every upstream hash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, STAGES, clean_env, exp_metrics, make_repo, sh, tiny_params

UPSTREAM = ("clean", "tokenize", "pretrain")


def _ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.mark.slow  # the flow test runs the same experiment mechanism in the default set
def test_experiments_reuse_cached_stages_and_carry_metrics(tmp_path, tiny_data):
    repo = make_repo(tmp_path / "repo", tiny_params())
    sh(repo, "dvc", "repro")
    sh(repo, "git", "commit", "-qm", "results")  # DVC staged dvc.lock, which versions metrics and plots
    assert not sh(repo, "git", "status", "--porcelain").stdout.strip()
    committed = (repo / "metrics" / "eval.json").read_text()
    shutil.rmtree(repo / "metrics")
    sh(repo, "dvc", "checkout")  # the committed run's metrics come back from DVC's cache
    assert (repo / "metrics" / "eval.json").read_text() == committed

    # lmpipe's experiment (what make smoke runs), changing only finetune.*: every upstream stage from cache
    res = sh(repo, sys.executable, "-m", "lmpipe.cli", "smoke", "--profile", "", "--name", "ft-short",
             "--set", "finetune.max_steps=3", "--set", "finetune.learning_rate=0.001")
    assert not set(_ran(res.stdout)) & set(UPSTREAM), _ran(res.stdout)
    assert {"finetune", "evaluate"} <= set(_ran(res.stdout))
    # DVC's own queue, same change: runs in DVC's temporary workspace, reads the linked data
    sh(repo, "dvc", "exp", "run", "--queue", "-n", "ft-queued", "-S", "finetune.max_steps=4")
    sh(repo, "dvc", "queue", "start")
    log = sh(repo, "dvc", "queue", "logs", "--follow", "ft-queued", timeout=600).stdout  # until it ends
    assert not set(_ran(log)) & set(UPSTREAM), _ran(log)

    # dvc exp show carries each experiment's metrics; the workspace's are versioned in git
    for name in ("ft-short", "ft-queued"):
        metrics = exp_metrics(repo, name)
        ev = metrics["metrics/eval.json"]["data"]
        assert 0 <= ev["classifier"]["accuracy"] <= 1 and ev["lm"]["perplexity"] > 1
        assert "benefit" in ev and "metrics/pretrain.json" in metrics
    head = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    shown, ev = head[""]["data"]["metrics/eval.json"]["data"], json.loads(committed)
    assert shown["classifier"]["accuracy"] == ev["classifier"]["accuracy"] and shown["lm"] == ev["lm"]

    # comparisons between experiments print numbers
    diff = sh(repo, "dvc", "metrics", "diff", "ft-short", "ft-queued", "--json").stdout
    finetune_diff = json.loads(diff)["metrics/finetune.json"]
    assert any(isinstance(v.get("old"), (int, float)) and isinstance(v.get("new"), (int, float))
               for v in finetune_diff.values()), finetune_diff
    out = tmp_path / "plots"
    sh(repo, "dvc", "plots", "diff", "ft-short", "ft-queued", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "confusion" in html and "pretrain_loss" in html

    # the user's params.yaml and outputs stayed as they were
    assert not sh(repo, "git", "status", "--porcelain").stdout.strip()


def test_overrides_are_refused_before_anything_runs(tmp_path, tiny_data):
    repo = make_repo(tmp_path / "repo", tiny_params())
    for bad, needle in ((["--set", "finetune.max_steps=abc"], "finetune.max_steps"),
                        (["--set", "finetune.lerning_rate=0.1"], "finetune.lerning_rate: unknown key"),
                        (["--set", "finetune.init=scratch"], "finetune.init")):
        res = subprocess.run([sys.executable, "-m", "lmpipe.cli", "smoke", "--profile", "", *bad], cwd=repo,
                             env=clean_env(), capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith("lmpipe: error:") and needle in res.stderr, res.stderr
        assert not (repo / ".lmpipe" / "worktrees").exists() or not any((repo / ".lmpipe" / "worktrees").iterdir())
    assert "Running stage" not in sh(repo, "dvc", "exp", "show", "--json").stdout
    assert not (repo / "metrics").exists()


def test_two_checkouts_at_different_paths_agree_on_upstream_hashes(tmp_path, tiny_data):
    """The data location is machine config (the lmpipe-data remote), not a param or dependency path, so a
    second host with its data elsewhere gets the first host's results from a shared DVC remote."""
    a = make_repo(tmp_path / "host-a" / "repo", tiny_params())
    other_data = shutil.copytree(tiny_data, tmp_path / "elsewhere" / "data")  # same content, another path
    b = tmp_path / "host-b" / "nested" / "checkout"
    b.parent.mkdir(parents=True)
    sh(tmp_path, "git", "clone", "-q", str(a), str(b))
    sh(b, sys.executable, "-m", "lmpipe.cli", "data", "link", str(other_data))
    remote = tmp_path / "dvc-remote"
    for repo in (a, b):
        sh(repo, "dvc", "remote", "add", "--local", "-d", "shared", str(remote))
    assert "Running stage 'tokenize'" in sh(a, "dvc", "repro", "tokenize").stdout
    sh(a, "dvc", "push", "--run-cache")
    out = sh(b, "dvc", "repro", "--pull", "tokenize").stdout  # fetches the run cache and outputs it needs
    assert "Running stage" not in out and "Stage 'clean' is cached" in out, out  # DVC's run cache matched
    locks = [yaml.safe_load((r / "dvc.lock").read_text())["stages"] for r in (a, b)]
    for stage in ("clean", "tokenize"):
        assert locks[0][stage] == locks[1][stage], stage
    assert "remote://lmpipe-data" in [d["path"] for d in locks[0]["clean"]["deps"]]
    assert not any(str(tmp_path) in json.dumps(lock) for lock in locks)  # no machine path in the record
    assert (b / "data" / "clean" / "labeled_test.parquet").is_file()


@pytest.mark.parametrize("profile", sorted(p.name for p in (ROOT / "profiles").glob("*.yaml")))
def test_profile_as_dvc_exp_run_overrides_gives_the_merged_params(tmp_path, profile):
    """`lmpipe exp-run PROFILE` hands DVC one -S per key: DVC's own parser (Hydra) must rebuild exactly the
    params the profile means (lists of dicts, quoted strings, floats, booleans)."""
    from dvc.utils.hydra import apply_overrides

    from lmpipe.params import load_raw, merge, validate
    from lmpipe.experiments import dvc_set_params

    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    args = dvc_set_params(ROOT, ROOT / "profiles" / profile)
    assert args[::2] == ["-S"] * (len(args) // 2)
    apply_overrides(tmp_path / "params.yaml", args[1::2])
    # as the stages read them (DVC writes 5e-05, which YAML 1.1 loads as a string; validation makes it a float)
    assert validate(yaml.safe_load((tmp_path / "params.yaml").read_text())) == \
        validate(merge(load_raw(ROOT / "params.yaml"), ROOT / "profiles" / profile))


@pytest.mark.parametrize("bad,expected", [
    ("finetune.max_steps=lots", "finetune.max_steps: Input should be a valid integer"),
    ("finetune.nope=1", "dvc exp run -S: Invalid `--set-param` value: Could not override 'finetune.nope'"),
])
def test_exp_run_refuses_bad_overrides_in_one_line_before_dvc_runs(tmp_path, bad, expected):
    repo = make_repo(tmp_path / "repo", tiny_params())
    res = subprocess.run([str(Path(sys.executable).parent / "lmpipe"), "exp-run", "profiles/smoke.yaml", "-S", bad],
                         cwd=repo, env=clean_env(), capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("lmpipe: error:")]
    assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr
    assert not (repo / "metrics").exists() and not sh(repo, "dvc", "exp", "ls").stdout.strip()
    assert sh(repo, "git", "status", "--porcelain").stdout.strip() == ""  # params.yaml untouched
