"""Shared fixtures: tiny data written inside each test, hermetic MLflow stores, subprocess helpers."""

from __future__ import annotations

import os
import shutil
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
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two xdist workers on a 2-core machine: one thread each (and in the stage processes
    # they start, which inherit the environment), instead of four threads fighting over two cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def pytest_runtest_setup(item):
    """CI runs the slow set only while it fits its time limit: .ci/run sets LMPIPE_SLOW_DEADLINE (epoch seconds,
    its limit less the longest slow test), and a slow test that would start after it is skipped, saying so."""
    deadline = os.environ.get("LMPIPE_SLOW_DEADLINE")
    if deadline and item.get_closest_marker("slow") is not None:
        import time

        if time.time() > float(deadline):
            pytest.skip("CI time limit: no time left to start this slow test (LMPIPE_SLOW_DEADLINE passed)")


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


TREC = {"LOC": ["What city is the capital of {}?", "Where is the river in {}?"],
        "HUM": ["Who was the first king of {}?", "Who wrote the anthem of {}?"],
        "NUM": ["How many people live in {}?", "When was {} founded?"]}
NEWS = {"1": "World", "2": "Sports", "3": "Business", "4": "Sci/Tech"}
NEWS_WORDS = {"1": "minister election war treaty", "2": "match goal season coach",
              "3": "shares profit market bank", "4": "software space chip research"}


def write_tiny_tasks(folder: Path) -> Path:
    """Two more tasks beside write_tiny_data's: TREC-format questions (train + test files) and an AG News-style
    header-less CSV (one file, split by clean)."""
    places = ["France", "Peru", "Kenya", "Japan", "Chile", "Norway", "Egypt", "India"]
    (folder / "trec").mkdir(parents=True, exist_ok=True)
    lines = [f"{label}:{'city' if label == 'LOC' else 'ind' if label == 'HUM' else 'count'} {q.format(p)}"
             for p in places for label, qs in TREC.items() for q in qs]
    (folder / "trec" / "train.label").write_text("\n".join(lines) + "\n", encoding="latin-1")
    (folder / "trec" / "test.label").write_text("\n".join(lines[::3]) + "\n", encoding="latin-1")
    (folder / "news").mkdir(exist_ok=True)
    rows = [f'"{k}","{w.split()[i % 4]} news {i}","the {w} report number {i}"' for i in range(12)
            for k, w in NEWS_WORDS.items()]
    (folder / "news" / "all.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def tiny_tasks_params(raw: dict) -> dict:
    """clean.tasks for write_tiny_tasks' files (names: trec, news) and finetune.tasks over all three."""
    raw["clean"]["labeled"]["name"] = "sst"
    raw["clean"]["tasks"] = {
        "trec": {"train": {"path": "trec/train.label", "format": "trec", "encoding": "latin-1"},
                 "test": {"path": "trec/test.label", "format": "trec"}, "validation_fraction": 0.25},
        "news": {"train": {"path": "news/all.csv", "header": False, "columns": ["label", "title", "description"],
                           "text_columns": ["title", "description"], "label_column": "label"},
                 "validation_fraction": 0.2, "test_fraction": 0.2, "label_names": list(NEWS.values())}}
    raw["finetune"]["tasks"] = ["sst", "trec", "news"]
    return raw


def section(name: str, **values):
    """One validated params section: params.yaml's values (their one home) with `values` on top."""
    from lmpipe.config import Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())[name]
    return Params.model_fields[name].annotation.model_validate({**raw, **values})


def tiny_params() -> dict:
    """params.yaml (repo copy), shrunk for tiny data (the data folder is not a param: see tiny_data)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["clean"]["corpus"] = [{"path": "corpus/text.txt"}]
    raw["clean"]["labeled"]["train"]["path"] = "task/train.tsv"
    raw["clean"]["labeled"]["test"]["path"] = "task/dev.tsv"
    raw["clean"]["labeled"]["validation_fraction"] = 0.25
    raw["clean"]["tasks"] = {}  # tiny_tasks_params adds tiny ones
    raw["clean"]["min_chars"] = 5
    raw["tokenize"].update(vocab_size=300, block_size=16)
    raw["pretrain"].update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                           max_position_embeddings=32, max_steps=6, warmup_steps=1, batch_size=4, eval_every=3,
                           eval_batches=2, checkpoint_every=3, log_every=2,
                           compile=False)  # compiling costs ~20 s a process; test_training covers it
    raw["finetune"].update(max_length=16, batch_size=8, max_steps=6, eval_every=3)
    raw["deploy"].update(min_accuracy=0.0, variants=["fp32"], serve_variant="fp32",  # tests/test_deploy.py: the rest
                         latency_repeats=2)
    return raw


@pytest.fixture
def tiny_data(tmp_path: Path, monkeypatch) -> Path:
    """Tiny data, named by LMPIPE_DATA_DIR: stages run outside DVC read it, and make_repo links it."""
    folder = write_tiny_data(tmp_path / "data")
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def harness():
    """A real Prefect API (the test harness's temporary server) for the flows of one test module."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(monkeypatch):
    """The environment a flow run in this process sees: no inherited MLflow/lmpipe settings, a git identity."""
    for key in ("MLFLOW_TRACKING_URI", "LMPIPE_DATA_DIR", "LMPIPE_PARENT_RUN_ID", "LMPIPE_RUN_TAGS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
                           GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1").items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def workdir(tmp_path: Path, tiny_data: Path, monkeypatch) -> Path:
    """A folder with a tiny params.yaml and its own MLflow store; stages run with cwd=workdir."""
    wd = tmp_path / "work"
    wd.mkdir()
    (wd / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
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


def prepare_workdir(workdir: Path, edit) -> None:
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    edit(raw)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for stage in ("clean", "tokenize"):
        res = run_module(f"stages.{stage}", workdir)
        assert res.returncode == 0, res.stderr


def copy_for_reference(workdir: Path, dest: Path) -> Path:
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "checkpoints"))
    return dest


STAGES = ["clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy"]


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1", **extra)
    return env


def make_repo(dest: Path, params: dict | None, data: Path | None = None) -> Path:
    """Copy the project's tracked files into a fresh git repo (with .dvc), link its data (`data`, else
    $LMPIPE_DATA_DIR, else the shared data) and commit."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        src = ROOT / rel
        if src.is_file() and not rel.startswith("tests/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    if params is not None:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(dest, "git", "init", "-q")
    if not (dest / ".dvc").is_dir():
        sh(dest, "dvc", "init", "-q")
    sh(dest, sys.executable, "-m", "lmpipe.cli", "data", "link",
       str(data or os.environ.get("LMPIPE_DATA_DIR") or SHARED_DATA))
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "init")
    return dest


def sh(cwd: Path, *cmd: str, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    res = subprocess.run(list(cmd), cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def stage_runs(repo: Path) -> dict[str, list]:
    runs = mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    out: dict[str, list] = {s: [] for s in STAGES}
    for r in runs:
        stage = r.data.tags.get("lmpipe.stage")
        if stage:
            out[stage].append(r)
    return out


def tiny_classifier(dest: Path, max_length: int = 16, flip: bool = False) -> Path:
    """A 2-layer Llama sequence classifier (random init, seeded) with a BPE tokenizer trained on POS + NEG,
    saved like the finetune stage saves one (truncation length stored as the tokenizer's model_max_length).
    `flip` swaps the label names: the same weights then give the other label (a visibly different version)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lmpipe.tokenizer import train_tokenizer

    tok = train_tokenizer([s for s in POS + NEG for _ in range(3)], "bpe", vocab_size=300, min_frequency=1,
                          model_max_length=max_length)
    torch.manual_seed(0)
    names = ["positive", "negative"] if flip else ["negative", "positive"]
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         pad_token_id=tok.pad_token_id, num_labels=2, id2label=dict(enumerate(names)),
                         label2id={n: i for i, n in enumerate(names)})
    LlamaForSequenceClassification(config).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


class Server:
    """`lmpipe serve ARGS` as a real uvicorn process on 127.0.0.1 and a free port; `with` waits for /health
    and stops it (SIGTERM, then SIGKILL) on exit. Its output is kept in `log` (a file, read with .output())."""

    def __init__(self, cwd: Path, *args: str, env: dict | None = None, timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cwd, self.timeout = cwd, timeout
        self.args = [sys.executable, "-m", "lmpipe.cli", "serve", "--port", str(self.port), *args]
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    **(env or {})}
        self.log = cwd / f"serve-{self.port}.log"

    def __enter__(self) -> "Server":
        import time

        import requests

        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(self.args, cwd=self.cwd, env=self.env, stdout=self._out,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"server not up in {self.timeout} s:\n{self.output()}")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self._out.close()

    def output(self) -> str:
        return self.log.read_text()
