"""Shared fixtures: tiny data written inside each test, hermetic MLflow stores, subprocess helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POS = ["a moving and beautiful film", "the acting is superb and warm", "funny , smart and touching",
       "a delight from start to finish", "wonderful performances all around", "an absolute joy to watch"]
NEG = ["a dull and lifeless mess", "the plot is boring and stupid", "tedious , flat and far too long",
       "a waste of time and talent", "awful writing and worse acting", "painfully slow and joyless"]


def write_tiny_data(folder: Path) -> Path:
    """A corpus txt and SST-2-style TSVs: enough to run every stage in seconds."""
    (folder / "corpus").mkdir(parents=True, exist_ok=True)
    lines = [f"{s} , said the critic number {i} about the movie ." for i in range(40) for s in (POS + NEG)[i % 12:i % 12 + 1]]
    lines += lines[:10]  # exact duplicates for the dedup rule
    (folder / "corpus" / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "task").mkdir(exist_ok=True)
    rows = [f"{t} \t1" for t in POS] + [f"{t} \t0" for t in NEG]
    (folder / "task" / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows * 4) + "\n", encoding="utf-8")
    (folder / "task" / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return folder


def tiny_params(data_dir: Path) -> dict:
    """params.yaml (repo copy) + smoke profile, shrunk further and pointed at tiny data."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["common"]["data_dir"] = str(data_dir)
    raw["clean"]["corpus"] = [{"path": "corpus/text.txt"}]
    raw["clean"]["labeled"]["train"]["path"] = "task/train.tsv"
    raw["clean"]["labeled"]["test"]["path"] = "task/dev.tsv"
    raw["clean"]["labeled"]["validation_fraction"] = 0.25
    raw["clean"]["min_chars"] = 5
    raw["tokenize"].update(vocab_size=300, block_size=16)
    raw["pretrain"].update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                           max_position_embeddings=32, max_steps=6, warmup_steps=1, batch_size=4, eval_every=3,
                           eval_batches=2, checkpoint_every=3, log_every=2,
                           compile=False)  # compiling costs ~20 s a process; test_training covers it
    raw["finetune"].update(max_length=16, batch_size=8, max_steps=6, eval_every=3)
    raw["deploy"].update(min_accuracy=0.0)
    return raw


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_tiny_data(tmp_path / "data")


@pytest.fixture
def workdir(tmp_path: Path, tiny_data: Path, monkeypatch) -> Path:
    """A folder with a tiny params.yaml and its own MLflow store; stages run with cwd=workdir."""
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_data), sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    return wd


def run_module(module: str, cwd: Path, *args: str, env: dict | None = None, timeout: int = 600):
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_runs(tracking_uri: str, experiment: str = "lmpipe"):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=1000)
