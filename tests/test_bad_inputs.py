"""The bad-input matrix: each bad input through the command a user runs, checked the same four ways.

Every case exits non-zero (an HTTP 4xx for a serve payload) with ONE line naming the problem: the last line
of stderr, the only error line, no traceback. No partial output is left and every output that existed
before is byte-identical after. The stages run on a copy of one tiny work dir whose clean, tokenize and
pretrain outputs are built once per module; the serve payloads share one running server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import requests
import yaml

from helpers import (ROOT, Server, clean_env, free_port, make_repo, run_module, tiny_classifier, tiny_params,
                     write_tiny_data)
from lmpipe.params import set_dotted
from lmpipe.io import file_md5

IGNORED = {"mlflow.db", "mlflow.db.lock", "mlartifacts",  # the MLflow store records the failed run: not an output
           ".git", ".dvc"}  # a repo's own state (DVC's lock and tmp files)
BOOKKEEPING = {"mlflow_run_id", "lmpipe_resume_key.json"}
"""What a resumable stage (pretrain, finetune) writes under its checkpoint_dir before its body runs, so a re-run
reattaches to the same MLflow run (lmpipe.checkpoints): not a DVC output; a claim of another configuration
removes a folder with nothing to resume in it."""


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """work/ (tiny params, 2 pretrain steps) with the clean, tokenize and pretrain outputs and its MLflow store,
    and data/ (write_tiny_data): the three stages in one process, so their imports are paid once."""
    root = tmp_path_factory.mktemp("bad-inputs")
    write_tiny_data(root / "data")
    (root / "work").mkdir()
    raw = tiny_params()
    raw["pretrain"].update(max_steps=2, eval_every=2, checkpoint_every=2, log_every=1)
    (root / "work" / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    # then the registry learns deploy.model_name, with no version holding deploy.alias (nothing deployed yet)
    code = textwrap.dedent("""
        import sys
        import mlflow
        from stages import clean, pretrain, tokenize
        if clean.main([]) or tokenize.main([]) or pretrain.main([]):
            sys.exit(1)
        mlflow.MlflowClient().create_registered_model("lmpipe-sst2")
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=root / "work", capture_output=True, text=True, timeout=600,
                         env={**os.environ, **_env(root / "work", root / "data")})
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def _env(wd: Path, data: Path) -> dict[str, str]:
    return {"LMPIPE_DATA_DIR": str(data), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}",
            "LMPIPE_API_TOKEN": ""}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("classifier") / "clf")


@pytest.fixture(scope="module")
def server(classifier: Path, tmp_path_factory):
    wd = tmp_path_factory.mktemp("serve")
    (wd / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with Server(wd, "--model-uri", str(classifier), "--set", "serve.max_body_bytes=65536",
                env={"MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}", "LMPIPE_API_TOKEN": ""}) as srv:
        yield srv


# -- the cases --------------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    """One case's copy: work dir, data dir, environment, and what the case needs from the module."""

    wd: Path
    data: Path
    env: dict[str, str]
    classifier: Path | None = None
    port: int = 0
    """The shared server's port (port in use), else a free one."""
    roots: list[Path] = field(default_factory=list)
    """More folders whose files must be unchanged (an output dir outside the work dir)."""
    cleanup: list[Callable[[], None]] = field(default_factory=list)


@dataclass
class Case:
    cmd: tuple[str, ...]
    """`python -m <cmd[0]> <cmd[1:]>`, formatted with {port} and {classifier}."""
    edit: Callable[[Ctx], None]
    code: int
    """Exit code: 2 params, 1 data, 3 a service (lmpipe/errors.py)."""
    expected: str
    """In the error line (formatted with {wd}, {data}, {port})."""
    resumable: bool = False
    """Fails inside pretrain/finetune's body: their resume bookkeeping (BOOKKEEPING) may be new."""
    server: bool = False
    classifier: bool = False


def params(**dotted) -> Callable[[Ctx], None]:
    """Edit the copy's params.yaml: params(clean__min_chars=3) sets clean.min_chars."""
    def edit(ctx: Ctx) -> None:
        raw = yaml.safe_load((ctx.wd / "params.yaml").read_text())
        for key, value in dotted.items():
            set_dotted(raw, key.replace("__", "."), value)
        (ctx.wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return edit


def replace_text(rel: str, old: str, new: str) -> Callable[[Ctx], None]:
    def edit(ctx: Ctx) -> None:
        path = ctx.wd / rel
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new, 1))
    return edit


def data_file(rel: str, content: bytes | None) -> Callable[[Ctx], None]:
    """Overwrite (or with None delete) a file of the copy's data dir."""
    def edit(ctx: Ctx) -> None:
        if content is None:
            (ctx.data / rel).unlink()
        else:
            (ctx.data / rel).write_bytes(content)
    return edit


def truncate(rel: str, size: int) -> Callable[[Ctx], None]:
    """Cut a file of the work dir to `size` bytes: a copy torn short."""
    def edit(ctx: Ctx) -> None:
        with open(ctx.wd / rel, "r+b") as f:
            f.truncate(size)
    return edit


def env(**values) -> Callable[[Ctx], None]:
    def edit(ctx: Ctx) -> None:
        ctx.env.update({k: v.format(port=free_port(), wd=ctx.wd) for k, v in values.items()})
    return edit


def remove_tokenizer(ctx: Ctx) -> None:
    shutil.rmtree(ctx.wd / "models" / "tokenizer")


def unseen_label(ctx: Ctx) -> None:
    with open(ctx.data / "task" / "dev.tsv", "a") as f:
        f.write("a strange and unclassifiable film \t2\n")


def full_disk(ctx: Ctx) -> None:
    """clean.out_dir on a real full disk: a tiny tmpfs holding the previous output, the rest filled up."""
    disk = ctx.wd.parent / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs (root) to make a real full disk")
    ctx.cleanup.append(lambda: subprocess.run(["umount", "-l", str(disk)], capture_output=True))
    shutil.copytree(ctx.wd / "data" / "clean", disk / "clean")
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    ctx.roots.append(disk)
    params(clean__out_dir=str(disk / "clean"))(ctx)


def torn_classifier(ctx: Ctx) -> None:
    shutil.copytree(ctx.classifier, ctx.wd / "clf")
    truncate("clf/model.safetensors", 1000)(ctx)


def bad_sweep(ctx: Ctx) -> None:
    (ctx.wd / "sweeps").mkdir()
    (ctx.wd / "sweeps" / "bad.yaml").write_text("space:\n  finetune.learning_rate: {type: float, low: 1e-4\n")


def nothing(ctx: Ctx) -> None:
    pass


CLEAN, TOKENIZE, PRETRAIN, FINETUNE = (("stages.clean",), ("stages.tokenize",), ("stages.pretrain",),
                                       ("stages.finetune",))
# (a params error is the same line from every stage: each validates the whole file; `dvc repro` runs clean first)
SERVE = ("lmpipe.cli", "serve", "--port", "{port}")

CASES = {
    # params.yaml
    "malformed-yaml": Case(CLEAN, replace_text("params.yaml", "seed: 1337", "seed: [1337"), 2,
                           "params.yaml: line 3: not valid YAML (expected ',' or ']'"),
    "unknown-key": Case(CLEAN, params(pretrain__lerning_rate=0.1), 2,
                        "params.yaml: pretrain.lerning_rate: unknown key"),
    "wrong-type": Case(CLEAN, params(pretrain__learning_rate="fast"), 2,
                       "params.yaml: pretrain.learning_rate: Input should be a valid number"),
    "out-of-range": Case(CLEAN, params(pretrain__batch_size=0), 2,
                         "params.yaml: pretrain.batch_size: Input should be greater than or equal to 1 (got 0)"),
    "window-stride-past-block": Case(CLEAN, params(pretrain__window_stride=17), 2,
                                     "params.yaml: pretrain.window_stride: 17 must be block or between 1 and "
                                     "tokenize.block_size (16)"),
    "vocab-too-small": Case(TOKENIZE, params(tokenize__vocab_size=4), 2,
                            "params.yaml: tokenize.vocab_size: 4 must exceed the 5 special tokens"),
    "unknown-optimizer": Case(CLEAN, params(finetune__optimizer="adam"), 2,
                              "params.yaml: finetune.optimizer: Input should be 'adamw_torch', 'adamw_torch_fused', "
                              "'adafactor', 'sgd', 'adagrad' or 'rmsprop' (got 'adam')"),
    "unknown-scheduler": Case(CLEAN, params(pretrain__lr_scheduler="onecycle"), 2,
                              "params.yaml: pretrain.lr_scheduler: Input should be 'linear', 'cosine', "),
    "rdrop-with-dropout-off": Case(CLEAN, params(finetune__rdrop_alpha=1.0, finetune__dropout=0.0), 2,
                                   "params.yaml: finetune.rdrop_alpha: 1.0 with finetune.dropout: 0: R-Drop compares "
                                   "two dropout masks; set dropout > 0"),
    # the tiny pretrained model has no dropout (pretrain.dropout 0) and finetune.dropout null keeps it
    "rdrop-on-a-model-without-dropout": Case(FINETUNE, params(finetune__rdrop_alpha=1.0), 2,
                                             "finetune.rdrop_alpha: 1.0 needs dropout in the model, and every dropout "
                                             "of this one is 0; set finetune.dropout", resumable=True),
    "fp16-on-cpu": Case(FINETUNE, params(finetune__precision="fp16"), 2,
                        "finetune.precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)", resumable=True),
    "params-file-missing": Case((*CLEAN, "--params", "nope.yaml"), nothing, 2, "nope.yaml: params file not found"),
    # input data
    "data-dir-missing": Case(CLEAN, env(LMPIPE_DATA_DIR="{wd}/no-such-dir"), 2,
                             "data directory {wd}/no-such-dir does not exist (LMPIPE_DATA_DIR)"),
    "data-file-missing": Case(CLEAN, data_file("corpus/text.txt", None), 1,
                              "{data}/corpus/text.txt: data file not found"),
    "empty-corpus-after-filters": Case(CLEAN, params(clean__min_chars=10_000, clean__max_chars=20_000), 1,
                                       "clean.corpus: 0 documents left after cleaning"),
    "label-column-missing": Case(CLEAN, params(clean__labeled__train__label_column="sentiment"), 1,
                                 "task/train.tsv: no column 'sentiment' (label_column)"),
    "unseen-label": Case(CLEAN, unseen_label, 1, "task/dev.tsv: labels ['2'] do not occur in the training file"),
    "non-utf8-file": Case(CLEAN, data_file("corpus/text.txt", "caf\xe9 au lait is a fine drink\n".encode("latin-1")), 1,
                          "{data}/corpus/text.txt: not valid utf-8 (byte 0xe9 at offset 3)"),
    "empty-file": Case(CLEAN, data_file("task/train.tsv", b""), 1, "{data}/task/train.tsv: empty file"),
    # stage inputs a previous stage wrote
    "torn-parquet": Case(TOKENIZE, truncate("data/clean/corpus_train.parquet", 300), 1,
                         "{wd}/data/clean/corpus_train.parquet: not a readable parquet file (Parquet magic bytes not "
                         "found in footer); re-run the clean stage"),
    "tokenizer-missing": Case(PRETRAIN, remove_tokenizer, 1, "{wd}/models/tokenizer: tokenizer directory missing",
                              resumable=True),
    "corrupted-model-file": Case(FINETUNE, truncate("models/pretrain/model.safetensors", 1000), 1,
                                 "{wd}/models/pretrain: cannot load the model (SafetensorError: Error while "
                                 "deserializing header", resumable=True),
    # outputs that cannot be written
    "unwritable-output-dir": Case(CLEAN, params(clean__out_dir="/proc/lmpipe-out"), 1,
                                  "/proc/lmpipe-out: cannot create output directory"),
    # tokenize.out_dir under a regular file, with another vocab_size: tokenizer and blocks are swapped in together,
    # so the new tokenizer is not kept either
    "output-under-a-file": Case(TOKENIZE, params(tokenize__vocab_size=280, tokenize__out_dir="params.yaml/tokens"), 1,
                                "{wd}/params.yaml/tokens: cannot create output directory ({wd}/params.yaml is a file)"),
    "full-disk": Case(CLEAN, full_disk, 1,
                      "disk/clean: cannot write output (No space left on device); the previous clean is kept"),
    # services
    "mlflow-unreachable": Case(CLEAN, env(MLFLOW_TRACKING_URI="http://127.0.0.1:{port}"), 3,
                               "MLflow tracking server http://127.0.0.1:"),
    "prefect-unreachable": Case(("flows.pipeline",), env(PREFECT_API_URL="http://127.0.0.1:{port}/api"), 3,
                                "Prefect API http://127.0.0.1:"),
    "sweep-malformed-yaml": Case(("lmpipe.cli", "sweep", "sweeps/bad.yaml"), bad_sweep, 2,
                                 "{wd}/sweeps/bad.yaml: not valid YAML"),
    # serve
    "port-in-use": Case((*SERVE, "--model-uri", "{classifier}"), nothing, 1,
                        "serve: cannot listen on 127.0.0.1:{port} (Address already in use)", server=True,
                        classifier=True),
    "unknown-model-alias": Case(SERVE, nothing, 1,  # the default --model-uri; base registered the name only
                                "--model-uri models:/lmpipe-sst2@champion: cannot load model (MlflowException: "
                                "Registered model alias champion not found."),
    "corrupted-served-model": Case((*SERVE, "--model-uri", "clf"), torn_classifier, 1,
                                   "cannot load the model (SafetensorError", classifier=True),
}


def _snapshot(*roots: Path) -> dict[str, str]:
    """Every file (md5) and folder under the roots, by path; the MLflow store left out."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if rel.parts[0] in IGNORED:
                continue
            out[f"{root.name}/{rel}"] = "dir" if p.is_dir() else file_md5(p)
    return out


def _error_line(res: subprocess.CompletedProcess, prefix: str) -> str:
    """The one line: stderr's last, the only one starting with `prefix`, no traceback anywhere."""
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]  # splitlines also ends a progress bar's \r line
    assert lines and lines[-1].startswith(prefix), res.stderr[-3000:]
    assert [ln for ln in lines if ln.startswith(prefix)] == [lines[-1]], res.stderr[-3000:]
    return lines[-1]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_leaves_outputs_as_they_were(name: str, base: Path, tmp_path: Path, request):
    case = CASES[name]
    shutil.copytree(base, tmp_path, dirs_exist_ok=True)
    wd, data = tmp_path / "work", tmp_path / "data"
    ctx = Ctx(wd, data, _env(wd, data))
    if case.classifier:
        ctx.classifier = request.getfixturevalue("classifier")
    ctx.port = request.getfixturevalue("server").port if case.server else free_port()
    try:
        case.edit(ctx)
        before = _snapshot(wd, data, *ctx.roots)
        fmt = dict(port=ctx.port, wd=wd, data=data, classifier=ctx.classifier)
        res = run_module(case.cmd[0], wd, *(a.format(**fmt) for a in case.cmd[1:]), env=ctx.env, timeout=300)
        after = _snapshot(wd, data, *ctx.roots)
    finally:
        for undo in ctx.cleanup:
            undo()
    stage = case.cmd[0].removeprefix("stages.") if case.cmd[0].startswith("stages.") else "lmpipe"
    prefix = f"{stage}: error: "
    line = _error_line(res, prefix)
    print(f"{name}: exit {res.returncode}: {line}")  # -s: the lines docs/bad-input.md's table quotes
    assert res.returncode == case.code, res.stderr[-3000:]
    assert case.expected.format(**fmt) in line, line
    changed = sorted(k for k in before if after.get(k) != before[k])
    bookkeeping = {k for k in after if case.resumable and k.startswith("work/checkpoints/")
                   and (after[k] == "dir" or Path(k).name in BOOKKEEPING)}
    new = sorted(after.keys() - before.keys() - bookkeeping)
    assert changed == [] and new == [], f"changed {changed}, new {new}"


def test_dvc_repro_on_malformed_params_yaml_runs_nothing(tmp_path: Path, base: Path):
    """DVC itself reads params.yaml (dvc.yaml's ${...} come from it) and refuses before any stage: its own
    ERROR line names the file; the YAML parser's context lines follow it, which lmpipe cannot shorten
    (`python -m stages.clean` / `lmpipe validate` say the same in one line: the malformed-yaml case)."""
    repo = make_repo(tmp_path / "repo", tiny_params(), base / "data")
    text = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(text.replace("seed: 1337", "seed: [1337", 1))
    before = _snapshot(repo)
    res = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, capture_output=True, text=True,
                         timeout=300, env=clean_env())
    assert res.returncode != 0 and "Traceback" not in res.stderr + res.stdout, res.stderr
    first = res.stderr.strip().splitlines()[0]
    print(f"dvc-repro-malformed-yaml: exit {res.returncode}: {first}")
    assert first.startswith("ERROR: unable to read: 'params.yaml', YAML file structure is corrupted"), res.stderr
    assert _snapshot(repo) == before  # no stage ran: nothing written, dvc.lock not created


# -- serve payloads: one server, many requests -------------------------------------------------------------------

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("send,status,detail", [
    (dict(data=b'{"texts": ["a film"', headers=JSON), 400, "body: not valid JSON"),
    (dict(data=b"[" * 50_000, headers=JSON), 400, "body: not valid JSON (nested too deeply)"),
    (dict(data=b'{"texts": ["a film"]}', headers={"content-type": "text/plain"}), 415, "application/json"),
    (dict(json=["a film"]), 422, "body: expected a JSON object"),
    (dict(json={"text": ["a film"]}), 422, "text: unknown field"),
    (dict(json={}), 422, "texts: field required"),
    (dict(json={"texts": "a film"}), 422, "texts: expected a list of strings"),
    (dict(json={"texts": ["ok", 3]}), 422, "texts[1]: expected a string"),
    (dict(json={"texts": []}), 422, "texts: empty list"),
    (dict(json={"texts": ["ok", "  "]}), 422, "texts[1]: empty text"),
    (dict(json={"texts": ["a"] * 257}), 422, "texts: 257 texts, more than serve.max_texts (256)"),
    (dict(json={"texts": ["a" * 10_001]}), 422, "texts[0]: longer than 10000 characters (serve.max_chars)"),
    (dict(data=b'{"texts": ["' + b"a" * 70_000 + b'"]}', headers=JSON), 413, "more than serve.max_body_bytes (65536)"),
], ids=["invalid-json", "nested-too-deeply", "wrong-content-type", "not-an-object", "unknown-field", "texts-missing",
        "texts-not-a-list", "text-not-a-string", "empty-list", "blank-text", "too-many-texts", "text-too-long",
        "oversized-body"])
def test_bad_payload_is_a_4xx_naming_the_field(server: Server, send: dict, status: int, detail: str):
    r = requests.post(f"{server.url}/predict", timeout=30, **send)
    assert r.status_code == status, r.text
    got = r.json()["detail"]
    print(f"{status}: {got}")
    assert detail in got and "\n" not in got, got
    assert requests.post(f"{server.url}/predict", json={"texts": ["a film"]}, timeout=30).status_code == 200
