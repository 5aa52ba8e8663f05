"""The data location is machine configuration (DVC remote lmpipe-data), never a param."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import ROOT, clean_env
from lmpipe import datasource
from lmpipe.errors import ConfigError


def _repo(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / ".dvc" / "config").write_text((ROOT / ".dvc" / "config").read_text())
    return repo


def test_default_is_shared_data_beside_the_checkout_and_link_overrides_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LMPIPE_DATA_DIR", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    repo = _repo(tmp_path)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert datasource.data_dir(repo) == (tmp_path / "shared" / "data").resolve()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-m", "lmpipe.cli", "data", "link", str(elsewhere)], cwd=repo,
                         env=clean_env(), capture_output=True, text=True)
    assert res.returncode == 0 and str(elsewhere) in res.stdout
    assert str(elsewhere) in (repo / ".dvc" / "config.local").read_text()  # machine-local, git-ignored
    assert datasource.data_dir(repo) == elsewhere.resolve()
    assert "elsewhere" not in (repo / ".dvc" / "config").read_text()


def test_env_outside_dvc_wins_and_under_dvc_must_match_the_link(tmp_path, monkeypatch):
    repo = _repo(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    datasource.link(repo, a)
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(b))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert datasource.data_dir(repo) == b.resolve()  # a stage run by hand reads what the env names
    monkeypatch.setenv("DVC_STAGE", "clean")  # under DVC the data DVC hashes is the data read
    with pytest.raises(ConfigError, match="LMPIPE_DATA_DIR .* differs from the data DVC tracks"):
        datasource.data_dir(repo)
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(a))
    assert datasource.data_dir(repo) == a.resolve()


def test_missing_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LMPIPE_DATA_DIR", raising=False)
    repo = _repo(tmp_path)
    with pytest.raises(ConfigError, match=r"data directory .*shared/data does not exist"):
        datasource.data_dir(repo)
    res = subprocess.run([sys.executable, "-m", "lmpipe.cli", "data", "link", str(tmp_path / "nope")], cwd=repo,
                         env=clean_env(), capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
    assert not (repo / ".dvc" / "config.local").exists()
