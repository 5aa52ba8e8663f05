"""Helpers shared by the tests and docs/screenshots.py: tiny data and params, subprocess and repo helpers,
a served model, stages killed mid-run, DVC experiment metrics, and the MLflow UI driven in headless Chromium.

Plain functions, constants and classes only: pytest's hooks and fixtures live in conftest.py, which takes what
it needs from here. Test files get their helpers here too, never out of conftest.py or another test file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
import yaml

from lmpipe.processes import free_port  # noqa: F401 (the tests' one name for it)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


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
    raw["clean"]["sft"]["templates"] = {"sst": raw["clean"]["sft"]["templates"].pop("sst2")}
    return raw


def tiny_generative_params(raw: dict) -> dict:
    """tiny_params turned generative (profiles/generative.yaml's switches): role tokens in the tokenizer,
    finetune.head lm on the templated task, a few sampled answers."""
    raw["tokenize"]["chat_tokens"] = True
    raw["tokenize"]["vocab_size"] = 320
    raw["pretrain"]["max_position_embeddings"] = 64
    raw["finetune"].update(head="lm", max_length=48)
    raw["evaluate"]["samples"].update(prompts=2, max_new_tokens=4)
    return raw


def save_tiny_lm(folder: Path, positions: int = 64) -> Path:
    """A causal LM + tokenizer saved as the pretrain stage saves them: byte-level BPE trained on a few KB of
    write_tiny_data's sentences, a 2-layer Llama of hidden size 32 (random weights: generation, not quality)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmpipe.tokenizer import train_tokenizer

    texts = [f"{s} , said the critic number {i} about the movie ." for i in range(40) for s in POS + NEG]
    tok = train_tokenizer(texts, "bpe", vocab_size=300, min_frequency=1, model_max_length=positions)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(str(folder))
    return folder


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
    raw["clean"]["sft"]["templates"] = {"sst2": raw["clean"]["sft"]["templates"]["sst2"]}  # templates name tasks
    raw["clean"]["min_chars"] = 5
    raw["tokenize"].update(vocab_size=300, block_size=16)
    raw["pretrain"].update(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                           max_position_embeddings=32, max_steps=6, warmup_steps=1, batch_size=4, eval_every=3,
                           eval_batches=2, checkpoint_every=3, log_every=2,
                           compile=False)  # compiling costs ~20 s a process; test_training covers it
    raw["pretrain"].update(sample_prompts=["a moving", "the plot is"], sample_max_new_tokens=8)  # fit 32 positions
    raw["finetune"].update(max_length=16, batch_size=8, max_steps=6, eval_every=3)
    raw["deploy"].update(min_accuracy=0.0, variants=["fp32"], serve_variant="fp32",  # tests/test_deploy.py: the rest
                         latency_repeats=2)
    return raw


def run_module(module: str, cwd: Path, *args: str, env: dict | None = None, timeout: int = 600,
               process: bool = False) -> subprocess.CompletedProcess:
    """`python -m <module> args` in `cwd`. A stage (stages.*) runs in this process unless `process`: its
    `main(argv)` with cwd, environment and SIGTERM handler set and restored, stdout/stderr captured, the exit
    code returned as a process would, so the torch/transformers/MLflow imports are paid once per test worker.
    Tests of what only a process shows (signals, kills, torchrun, a tracking server going away) pass process=True."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    if module.startswith("stages.") and not process:
        return _run_stage_here(module, cwd, list(args), full_env)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _run_stage_here(module: str, cwd: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    import contextlib
    import importlib
    import io
    import signal

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_term = dict(os.environ), os.getcwd(), signal.getsignal(signal.SIGTERM)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(module).main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_term)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code or 0, out.getvalue(), err.getvalue())


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


def tiny_generator(dest: Path, chat_template: str | None = None) -> Path:
    """A 2-layer Llama causal LM (hidden 32) with a BPE tokenizer trained on POS + NEG, trained for a few seconds
    on those sentences (`<s> sentence </s>`), so greedy decoding is peaked (ties between random logits would make
    batched and alone decoding differ by rounding) and ends with `</s>`. Saved like the pretrain stage saves one;
    `chat_template` (a Jinja string) is stored with the tokenizer when given."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmpipe.tokenizer import train_tokenizer

    sentences = [f"{s} , said the critic ." for s in POS + NEG]
    tok = train_tokenizer(sentences * 3, "bpe", vocab_size=300, min_frequency=1, model_max_length=64)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    batch = tok(sentences, padding=True, return_tensors="pt")  # <s> ... </s>, right padded
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    if chat_template is not None:
        tok.chat_template = chat_template
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def endless_generator(dest: Path, positions: int = 2048) -> Path:
    """A random-init 2-layer Llama causal LM (hidden 32) whose `</s>` logit is always 0 (its output row zeroed,
    untied): greedy decoding never ends early, so a request runs to its max_new_tokens (cancellation tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmpipe.tokenizer import train_tokenizer

    tok = train_tokenizer([s for s in POS + NEG for _ in range(3)], "bpe", vocab_size=300, min_frequency=1,
                          model_max_length=positions)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # 0 against the max of ~300 random logits: never the largest
        model.lm_head.weight[tok.eos_token_id] = 0
    model.save_pretrained(dest)
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


# ----------------------------------------------------------------- stages killed mid-run (crash-safe resume)


def checkpoint_steps(folder: Path, variant: str | None = None) -> list[int]:
    """Steps of the complete checkpoints under folder (of one finetune variant only, when given)."""
    from lmpipe.checkpoints import checkpoint_complete

    try:
        found = list(folder.rglob("checkpoint-*"))
    except FileNotFoundError:  # Trainer rotated a checkpoint away while we walked: look again later
        return []
    return sorted(int(p.name.split("-")[1]) for p in found
                  if checkpoint_complete(p) and (variant is None or p.parent.name == variant))


def _start_stage(stage: str, workdir: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after(stage: str, workdir: Path, ckpt_root: Path, past: int, timeout: float = 300,
               variant: str | None = None) -> int:
    """Start the stage, SIGKILL it once a checkpoint beyond `past` (of `variant`) is complete; returns that step."""
    proc = _start_stage(stage, workdir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [s for s in checkpoint_steps(ckpt_root, variant) if s > past]
        if done:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done[-1]
        assert proc.poll() is None, f"{stage} finished before it could be killed"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


# ------------------------------------------------------------------------------------------- DVC experiments


def exp_metrics(repo, name: str) -> dict:
    """The metrics `dvc exp show --json` reports for the experiment `name`."""
    for rev in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in rev.get("experiments") or []:
            for run in exp.get("revs") or []:
                if run.get("name") == name:
                    return run["data"]["metrics"]
    raise AssertionError(f"experiment {name} not in dvc exp show")


# ----------------------------------------------------------------- MLflow UI in headless Chromium (Selenium)


PARAM = "pretrain.learning_rate"  # the one param the two executions differ in
NEW_VALUE = "0.01"  # params.yaml (and tiny_params) have 0.002
WAIT_S = 120  # explicit waits: the UI shares 2 cores with whatever else runs
# three grid points whose validation losses differ (tiny data's 12 validation rows give accuracies that tie);
# no from-scratch twin to train and evaluate in each trial
SWEEP = {"fixed": {"finetune.scratch_baseline": False},
         "space": {"finetune.learning_rate": {"type": "categorical", "choices": [0.05, 0.005, 0.0005]}},
         "sampler": "grid", "objective": "val_loss", "direction": "minimize", "seed": 0}


# ---------------------------------------------------------------------------------------------- setup


def ensure_debian(binaries: tuple[str, ...], packages: tuple[str, ...]) -> tuple[str, ...]:
    """Paths of `binaries`; apt-get installs `packages` when one is missing (root only), else skip."""
    found = tuple(shutil.which(b) for b in binaries)
    if all(found):
        return found  # type: ignore[return-value]
    wanted = " ".join(packages)
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip(f"{', '.join(binaries)} missing and cannot be installed here (needs root: apt-get install {wanted})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # wait for another apt instead of failing
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", *packages]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{wanted} could not be installed: {' '.join(cmd)} timed out")
        if res.returncode != 0:
            pytest.skip(f"{wanted} could not be installed: {' '.join(cmd)} exited {res.returncode}: "
                        f"{(res.stderr or res.stdout).strip()[-500:]}")
    found = tuple(shutil.which(b) for b in binaries)
    if not all(found):
        pytest.skip(f"apt-get install {wanted} succeeded but {', '.join(binaries)} are not on PATH")
    return found  # type: ignore[return-value]


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver (apt-get installs them when missing, as root)."""
    return ensure_debian(("chromium", "chromedriver"), ("chromium", "chromium-driver"))  # type: ignore[return-value]


def two_executions(base: Path) -> Path:
    """A repo with two pipeline executions: the committed baseline and an experiment changing PARAM."""
    data = write_tiny_data(base / "data")
    repo = base / "repo"
    repo.mkdir()
    make_repo(repo, tiny_params(), data)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")
    section, name = PARAM.split(".")
    assert str(yaml.safe_load((repo / "params.yaml").read_text())[section][name]) != NEW_VALUE
    sh(repo, "dvc", "exp", "run", "-S", f"{PARAM}={NEW_VALUE}")
    return repo


def summary_runs(repo: Path) -> list:
    runs = [r for r in mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}") if r.data.tags.get("lmpipe.kind") == "summary"]
    assert len(runs) == 2, runs
    # named after the execution: the baseline `dvc repro` workspace@<its commit>, the experiment by its DVC name
    expected = [r.data.tags.get("dvc.exp_name") or "workspace@" + r.data.tags["git.commit"][:7] for r in runs]
    assert [r.info.run_name for r in runs] == expected and sum(n.startswith("workspace@") for n in expected) == 1, \
        [r.info.run_name for r in runs]
    return runs


def swept(base: Path) -> Path:
    """A repo that ran SWEEP as `sweeps/tiny.yaml` through the CLI: `lmpipe sweep sweeps/tiny.yaml`."""
    repo = make_repo(base / "repo", tiny_params(), write_tiny_data(base / "data"))
    (repo / "sweeps").mkdir(exist_ok=True)
    (repo / "sweeps" / "tiny.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    sh(repo, "git", "add", "sweeps")
    sh(repo, "git", "commit", "-qm", "sweep file")
    res = subprocess.run([str(Path(sys.executable).parent / "lmpipe"), "sweep", "sweeps/tiny.yaml"], cwd=repo,
                         env=clean_env(), capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return repo


def sweep_runs(repo: Path) -> tuple:
    """(the `sweep tiny` run, its trial runs): three complete pipeline runs with distinct objectives."""
    runs = mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    (parent,) = [r for r in runs if r.data.tags.get("lmpipe.kind") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.run_name == "sweep tiny" and len(trials) == 3, [r.info.run_name for r in runs]
    assert all(r.info.run_name == r.data.tags["dvc.exp_name"] for r in trials)  # named after their experiments
    assert sorted(r.data.tags["sweep.trial"] for r in trials) == ["0", "1", "2"]
    assert {r.data.tags["optuna.state"] for r in trials} == {"COMPLETE"}
    assert len({r.data.metrics["objective"] for r in trials}) == 3, "tied objectives: the order would prove nothing"
    return parent, trials


def accuracy_key(run) -> str:
    """The summary's headline accuracy: plain `accuracy`, or `classifier.accuracy` before the rename."""
    return "accuracy" if "accuracy" in run.data.metrics else "classifier.accuracy"


def format_metric(value: float) -> str:
    """MLflow UI's Utils.formatMetric (server/js, used by the compare view), in Python."""
    def js_str(x: float) -> str:  # JS Number#toString for the values this can produce
        return str(int(x)) if x == int(x) else repr(x)

    def js_round(x: float) -> float:  # Math.round: halves go up
        return float(math.floor(x + 0.5))

    if value == 0:
        return "0"
    if abs(value) < 1e-3:  # toExponential(3): "1.235e-4"
        mantissa, exp = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    if abs(value) < 10:
        return js_str(js_round(value * 1000) / 1000)
    if abs(value) < 100:
        return js_str(js_round(value * 100) / 100)
    return js_str(js_round(value * 10) / 10)


def js_number(value: float) -> str:
    """JavaScript's Number#toString, as the runs table shows a metric (the compare page uses format_metric):
    the shortest digits that round-trip (Python's repr has the same), an exponent only below 1e-6 or from 1e21."""
    if value == int(value) and abs(value) < 1e21:
        return str(int(value))
    if 1e-6 <= abs(value) < 1e21:
        return format(Decimal(repr(value)), "f")  # repr writes 1e-05 where JS writes 0.00001
    mantissa, exp = repr(value).split("e")
    return f"{mantissa}e{int(exp):+d}"  # 1.5e-07 -> 1.5e-7


@contextlib.contextmanager
def mlflow_ui(repo: Path, log: Path):
    """`mlflow ui` on a free loopback port over the repo's mlflow.db; yields the base URL."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # one browser: the default 4 workers only take longer to start on 2 cores
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"mlflow ui exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"mlflow ui did not answer in 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextlib.contextmanager
def chrome(chromium: str, chromedriver: str, log: Path, width: int = 1280, height: int = 800):
    """Headless Chromium with a width x height viewport."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)  # --no-sandbox: Chromium refuses its sandbox as root
    driver = webdriver.Chrome(service=Service(chromedriver, log_output=str(log)), options=opts)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------- browser


def browser_wait(driver, timeout: float = WAIT_S):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))


def _pipeline_rows(driver, names: set[str]) -> set[str]:
    """Run ids (ag-grid row-id) of the rows whose run-name link reads one of `names`."""
    from selenium.webdriver.common.by import By

    ids = set()
    for link in driver.find_elements(By.CSS_SELECTOR, "div[role=row] a[href*='/runs/']"):
        if link.text.strip() in names:
            ids.add(link.find_element(By.XPATH, "ancestor::div[@role='row'][1]").get_attribute("row-id"))
    return ids


def _row_checkbox(driver, run_id: str):
    from selenium.webdriver.common.by import By

    # ag-grid draws its own box over the (transparent) input: Selenium calls it not displayed, clicks work
    boxes = driver.find_elements(By.CSS_SELECTOR, f"div[role=row][row-id='{run_id}'] input.ag-checkbox-input")
    return boxes[0] if boxes else None


# the compare page's metrics are two react-virtualized grids: names (links) and values, one row = one `top`
_METRIC_CELLS_JS = """
const key = arguments[0];
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
for (let i = 0; i + 1 < grids.length; i++) {
  for (const a of grids[i].querySelectorAll('a')) {
    if (a.textContent.trim() !== key) continue;
    const top = a.parentElement.style.top;
    const cells = [...grids[i + 1].querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
      .filter(c => c.style.top === top)
      .sort((x, y) => parseFloat(x.style.left) - parseFloat(y.style.left));
    return cells.map(c => c.textContent.trim());
  }
}
// not rendered yet (virtualized): scroll the values grids on and report nothing
for (const g of grids) if (getComputedStyle(g).overflowY === 'auto') g.scrollTop += 200;
return null;
"""


# if the metric's row is below the fold, scroll the page just enough to show it (and a bit of the next row)
_SHOW_METRIC_JS = """
const link = [...document.querySelectorAll('.ReactVirtualized__Grid a')].find(a => a.textContent.trim() === arguments[0]);
if (!link) return;
let box = link.parentElement;
let pane = box.parentElement;
while (pane && !(pane.scrollHeight > pane.clientHeight && /auto|scroll/.test(getComputedStyle(pane).overflowY))) pane = pane.parentElement;
const below = box.getBoundingClientRect().bottom + 30 - window.innerHeight;
if (pane && below > 0) pane.scrollTop += below;
"""


def compare_in_ui(driver, base: str, experiment_id: str, runs: list, param: str, shots: Path) -> dict:
    """Select the two summary runs in the runs table, click Compare, check param and accuracy; screenshot.

    Returns {"order": run ids as the compare page lays them out, "screenshot": path}.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    want = {r.info.run_id: r for r in runs}
    driver.get(f"{base}/#/experiments/{experiment_id}/runs")
    wait = browser_wait(driver)
    # 1) the runs table: both pipeline rows by name, tick their checkboxes
    names = {r.info.run_name for r in runs}
    found = wait.until(lambda d: (ids := _pipeline_rows(d, names)) >= set(want) and ids,
                       f"runs table never showed both pipeline runs {sorted(want)}")
    assert found == set(want), f"pipeline rows in the table {found} != summary runs {set(want)}"
    for run_id in want:
        box = wait.until(lambda d: _row_checkbox(d, run_id), f"no checkbox in the row of run {run_id}")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        wait.until(lambda d: (b := _row_checkbox(d, run_id)) and b.is_enabled() and b).click()
        wait.until(lambda d: _row_checkbox(d, run_id).is_selected(), f"run {run_id} did not get selected")
    driver.save_screenshot(str(shots / "mlflow-runs-selected.png"))
    # 2) Compare
    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Compare']"))).click()
    wait.until(lambda d: "/compare-runs?" in d.current_url, "Compare did not open the compare page")
    query = parse_qs(urlsplit(urlsplit(driver.current_url).fragment).query)
    order = json.loads(unquote(query["runs"][0]))
    assert set(order) == set(want), order
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[contains(normalize-space(), 'Comparing 2 Runs')]")))

    # 3) the changed param: its row in the Parameters table holds both values, in the page's run order
    switch = (By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']")
    table = "//button[@aria-label='Parameters - Show diff only']/following::table[1]"
    row = (By.XPATH, f"{table}//tr[th[normalize-space()='{param}']]")
    wait.until(EC.visibility_of_element_located(row))
    values = [td.text.strip() for td in driver.find_element(*row).find_elements(By.TAG_NAME, "td")]
    assert values == [want[i].data.params[param] for i in order], values
    # with "Show diff only" on, it is the only row left
    driver.find_element(*switch).click()
    wait.until(lambda d: d.find_element(*switch).get_attribute("aria-checked") == "true")
    shown = wait.until(lambda d: (names := [th.text.strip() for th in d.find_elements(By.XPATH, f"{table}//tr/th")])
                       and len(names) == 1 and names, "Show diff only left more than one param row")
    assert shown == [param], shown
    assert driver.find_element(*row).is_displayed()

    # 4) accuracy of both runs, as the UI formats it, in the same order
    key = accuracy_key(want[order[0]])
    assert all(accuracy_key(want[i]) == key for i in order)
    expected = [format_metric(want[i].data.metrics[key]) for i in order]
    cells = wait.until(lambda d: d.execute_script(_METRIC_CELLS_JS, key), f"metric {key} not on the compare page")
    assert cells == expected, f"{key}: page shows {cells}, MLflow API has {expected}"

    # 5) screenshot: assistant panel closed, plots folded, the run details / param / metrics on screen
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            break
    with contextlib.suppress(Exception):
        driver.find_element(By.CSS_SELECTOR, "[aria-label='collapse Visualizations']").click()
    time.sleep(0.5)  # let the folding animation settle
    heading = driver.find_element(By.XPATH, "//*[normalize-space()='Comparing 2 Runs from 1 Experiment']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
    driver.execute_script(_SHOW_METRIC_JS, key)
    time.sleep(0.3)
    shot = shots / "mlflow-compare.png"
    driver.save_screenshot(str(shot))
    return {"order": order, "screenshot": shot, "metric": key, "expected": expected}


OBJECTIVE_COL = "metrics.`objective`"
TRIAL_COL = "tags.`sweep.trial`"

# the runs table's rows top to bottom (ag-grid's row-index, not DOM order): run id + the text of the given
# columns' cells (the center part of the grid; the run name sits in the pinned-left part)
_TABLE_ROWS_JS = """
const cols = arguments[0];
const text = (row, col) => {
  const c = row.querySelector('[col-id="' + col + '"]');
  return c ? c.textContent.trim() : null;
};
const name = id => {  // the name cell also holds the run colour's hex code
  const r = document.querySelector('.ag-pinned-left-cols-container div[role=row][row-id="' + id + '"]');
  return r ? text(r, 'attributes.`Run Name`').replace(/^#[0-9a-f]{6}/, '') : null;
};
return [...document.querySelectorAll('.ag-center-cols-container div[role=row][row-id]')]
  .sort((a, b) => Number(a.getAttribute('row-index')) - Number(b.getAttribute('row-index')))
  .map(r => [r.getAttribute('row-id'), name(r.getAttribute('row-id')), ...cols.map(c => text(r, c))]);
"""


def _table_rows(driver, cols: list[str]) -> list[list]:
    return driver.execute_script(_TABLE_ROWS_JS, cols)


def _url_query(driver) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(urlsplit(driver.current_url).fragment).query).items()}


def _sort_menu(driver):
    """Open the Sort dropdown (a radix menu) and return it."""
    from selenium.webdriver.common.by import By

    wait = browser_wait(driver)
    wait.until(lambda d: d.find_element(By.XPATH, "//button[starts-with(normalize-space(), 'Sort:')]")).click()
    return wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "[role=menu][data-state=open]"),
                      "the Sort menu did not open")


def _sort_by(driver, metric: str, descending: bool) -> None:
    """Sort: <metric> via the dropdown's search, then its direction arrow; waits for the URL to say so."""
    from selenium.webdriver.common.by import By

    wait = browser_wait(driver)
    key = f"metrics.`{metric}`"
    if _url_query(driver).get("orderByKey") != key:
        menu = _sort_menu(driver)
        menu.find_element(By.CSS_SELECTOR, "input[type=search]").send_keys(metric)
        wait.until(lambda d: menu.find_element(By.CSS_SELECTOR, f"[data-testid='sort-select-{metric}']")).click()
        wait.until(lambda d: _url_query(d).get("orderByKey") == key, f"the Sort menu did not sort by {key}")
    want = "false" if descending else "true"
    if _url_query(driver).get("orderByAsc") != want:
        # the arrow buttons close the menu: open it again for them
        _sort_menu(driver).find_element(
            By.CSS_SELECTOR, f"[data-testid='sort-select-{'desc' if descending else 'asc'}']").click()
        wait.until(lambda d: _url_query(d).get("orderByAsc") == want, f"the sort did not turn {want=}")
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "[role=menu][data-state=open]"))


def _toggle_columns(driver, titles: list[str]) -> None:
    """Columns dropdown: tick/untick each title (found with the dropdown's search), then close it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait = browser_wait(driver)
    wait.until(lambda d: d.find_element(By.XPATH, "//button[normalize-space()='Columns']")).click()
    pop = wait.until(lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-component-id='mlflow.experiment_page.runs_table.column_selector']"))
    search = pop.find_element(By.CSS_SELECTOR, "input[placeholder='Search columns']")

    def node(title):
        found = [n for n in pop.find_elements(By.CSS_SELECTOR, ".du-bois-light-tree-treenode")
                 if n.text.strip() == title]
        return found[0] if found else None

    for title in titles:
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)  # a React input: clear() does not reach its state
        search.send_keys(title)
        before = "checkbox-checked" in wait.until(lambda d: node(title), f"no column {title!r}").get_attribute("class")
        node(title).find_element(By.CSS_SELECTOR, ".du-bois-light-tree-checkbox").click()
        wait.until(lambda d: ("checkbox-checked" in node(title).get_attribute("class")) != before,
                   f"column {title!r} did not toggle")
    search.send_keys(Keys.ESCAPE)
    wait.until(lambda d: not d.find_elements(
        By.CSS_SELECTOR, "[data-component-id='mlflow.experiment_page.runs_table.column_selector']"))


def sweep_sorted_in_ui(driver, base: str, experiment_id: str, parent, trials: list, shots: Path,
                       direction: str = SWEEP["direction"], params: tuple = ("finetune.learning_rate",)) -> dict:
    """The complete trials of a sweep in the runs table, sorted by `objective` both ways; screenshot, best on top.

    trials: the sweep's complete trials (pruned ones carry no objective; the search filters them out).
    Returns {"rows": the rows as the page showed them best first, "screenshot": path}.
    """
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    parent_id, trial_ids, name = parent.info.run_id, {r.info.run_id for r in trials}, parent.info.run_name
    driver.get(f"{base}/#/experiments/{experiment_id}/runs")
    wait = browser_wait(driver)
    # 1) the default view (newest first) nests runs under their parent: expand the sweep's run to see its trials
    row = f"div[role=row][row-id='{parent_id}']"
    wait.until(lambda d: [r[1] for r in _table_rows(d, []) if r[0] == parent_id] == [name],
               f"the runs table never showed the `{name}` run")
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():  # the assistant panel: it takes a third of the width
            button.click()
            break
    expander = f".ag-pinned-left-cols-container {row} [col-id='attributes.`Run Name`'] button"
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, expander)).click()
    nested = wait.until(lambda d: (rows := _table_rows(d, [])) and {r[0] for r in rows} >= trial_ids and rows,
                        f"expanding `{name}` did not show its trials")
    order = [r[0] for r in nested]
    assert all(order.index(t) > order.index(parent_id) for t in trial_ids), order
    trial_names = {r.info.run_id: r.info.run_name for r in trials}
    assert all(r[1] == trial_names[r[0]] for r in nested if r[0] in trial_ids), nested

    # 2) Sort: objective. MLflow nests child runs only when sorted by Created, so the table turns flat; the
    # search box keeps this sweep's complete trials (its run id is the trials' mlflow.parentRunId tag)
    _sort_by(driver, "objective", descending=True)
    search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[data-testid='search-box']"))
    query = f"tags.mlflow.parentRunId = '{parent_id}' and tags.`optuna.state` = 'COMPLETE'"
    search.send_keys(query)
    search.send_keys(Keys.ENTER)
    wait.until(lambda d: _url_query(d).get("searchFilter") == query)
    wait.until(lambda d: d.find_element(By.XPATH, f"//*[normalize-space()='{len(trials)} matching runs']"),
               f"the filter did not leave the {len(trials)} complete trials")
    # 3) columns: objective (added by the sort) next to the trial number and learning rate, no clutter
    _toggle_columns(driver, ["Dataset", "Source", "Models", *params, "sweep.trial"])

    # 4) the rows, descending then ascending, against the MLflow API's values
    cols = [OBJECTIVE_COL, TRIAL_COL, *(f"params.`{p}`" for p in params)]

    def expected(descending: bool) -> list[list]:
        ranked = sorted(trials, key=lambda r: r.data.metrics["objective"], reverse=descending)
        return [[r.info.run_id, r.info.run_name, js_number(r.data.metrics["objective"]), r.data.tags["sweep.trial"],
                 *(r.data.params[p] for p in params)] for r in ranked]

    def shown() -> list[list]:
        return [r for r in _table_rows(driver, cols) if r[0] != parent_id]

    best_on_top = direction == "maximize"  # descending puts the best trial first
    for descending in (not best_on_top, best_on_top):  # the best-first order last, for the screenshot
        _sort_by(driver, "objective", descending=descending)
        want = expected(descending)
        with contextlib.suppress(TimeoutException):
            wait.until(lambda d: shown() == want)
        assert shown() == want, f"sorted {descending=}, the page shows {shown()}, the MLflow API has {want}"

    # 5) screenshot: the sorted objective column's header in view
    header = driver.find_element(By.CSS_SELECTOR, f".ag-header-cell[col-id='{OBJECTIVE_COL}']")
    assert header.is_displayed() and header.text.strip() == "objective", header.text
    time.sleep(0.3)  # let the column toggles' re-layout settle
    shot = shots / "mlflow-sweep-sorted.png"
    driver.save_screenshot(str(shot))
    return {"rows": want, "screenshot": shot}


# -- a real Prefect server and workers (tests/test_deployments.py, test_placement.py, test_services.py) --------
def prefect_env(home: Path, api: str | None = None, **extra) -> dict:
    """clean_env without any PREFECT_ setting of this machine: PREFECT_HOME `home`, the API `api`, then `extra`."""
    env = {k: v for k, v in clean_env().items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false",
               PREFECT_CLI_PROMPT="false", **extra)
    if api:
        env["PREFECT_API_URL"] = api
    return env


def start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """A background process in a session of its own, its output into `log`."""
    with open(log, "w") as fh:  # the child keeps its own handle
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    """End a process this test started, and its process group (a server's or worker's children)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"


@contextlib.contextmanager
def prefect_server(folder: Path, timeout: float = 180):
    """`prefect server start` on a free loopback port with its database and home under `folder`; yields
    (api url, PREFECT_HOME) once /health answers; stopped on exit."""
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = folder / "server.log"
    env = prefect_env(home, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{folder / 'prefect.db'}")
    server = start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                   folder, env, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, f"prefect server exited:\n{tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy in {timeout:g} s:\n{tail(log)}"
            time.sleep(1)
        yield api, home
    finally:
        stop(server)


def wait_final(client, flow_run_id, timeout: float, *workers: tuple[subprocess.Popen, Path]):
    """The flow run's final state; fails when a worker exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final():
            return state
        for proc, log in workers:
            assert proc.poll() is None, f"worker exited:\n{tail(log)}"
        logs = "\n".join(tail(log) for _, log in workers)
        assert time.monotonic() < deadline, f"flow run still {state.name if state else None}:\n{logs}"
        time.sleep(3)
