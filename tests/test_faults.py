"""Faults with a defined outcome: the MLflow tracking server down at a stage's start or killed while it trains
(a real `mlflow server`, killed and restarted), SIGTERM to a running flow, the Prefect server restarted under one."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import free_port, mlflow_runs, prepare_workdir, run_module

BIN = Path(sys.executable).parent


class MlflowServer:
    """`mlflow server` on a SQLite store in `folder`, on a fixed port so a restart is the same server to clients."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port, self.proc = folder, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> "MlflowServer":
        import requests

        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, "mlflow server exited at start"
            time.sleep(0.3)
        raise AssertionError("mlflow server did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its uvicorn workers, at once
            self.proc.wait()


@pytest.fixture
def server(tmp_path: Path):
    srv = MlflowServer(tmp_path / "server").start()
    yield srv
    srv.kill()


class Stage:
    """A stage process whose output is collected line by line while it runs."""

    def __init__(self, stage: str, cwd: Path, env: dict, *args: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage}", *args], cwd=cwd,
                                     env={**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(text in ln for ln in self.lines):
                return
            assert self.proc.poll() is None or any(text in ln for ln in self.lines), \
                f"exited before {text!r}:\n" + "\n".join(self.lines[-30:])
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} within {timeout} s:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        time.sleep(0.2)  # the reader thread takes the last lines
        return code, "\n".join(self.lines)


def _train_loss_steps(uri: str, run_id: str) -> list[int]:
    import mlflow

    # (step 3000 holds two points: the last per-step loss and the Trainer's whole-run train_loss)
    return sorted({m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, "train_loss")})


def _long_pretrain(workdir: Path) -> None:
    # long enough (tens of seconds) that the server is killed while steps are still being taken
    prepare_workdir(workdir, lambda r: r["pretrain"].update(max_steps=3000, log_every=20, checkpoint_every=500,
                                                          eval_every=1000, keep_last=1))


def test_a_stage_refuses_in_one_line_when_the_tracking_server_is_down(workdir: Path):
    prepare_workdir(workdir, lambda r: None)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = run_module("stages.pretrain", workdir, env={"MLFLOW_TRACKING_URI": uri}, timeout=120, process=True)
    assert res.returncode == 3
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"pretrain: error: MLflow tracking server {uri} does not answer (connection refused)"), res.stderr
    assert "Traceback" not in res.stderr
    # refused before any compute: no checkpoint folder, no output
    assert not (workdir / "checkpoints").exists() and not (workdir / "models" / "pretrain").exists()


@pytest.mark.slow  # a real server killed and restarted around a real training run: about a minute
def test_training_goes_on_while_the_tracking_server_is_down_and_flushes_when_it_is_back(workdir: Path, server):
    _long_pretrain(workdir)
    st = Stage("pretrain", workdir, {"MLFLOW_TRACKING_URI": server.uri})
    import mlflow

    client = mlflow.MlflowClient(server.uri)
    deadline = time.time() + 180
    run_id = None
    while time.time() < deadline and run_id is None:  # kill once the first training metrics are in
        runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id]) \
            if client.get_experiment_by_name("lmpipe") else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train_loss"):
            run_id = runs[0].info.run_id
        time.sleep(0.2)
    assert run_id, "no training metrics reached the server"
    server.kill()
    st.wait_for("tracking: MLflow server unreachable", timeout=120)
    time.sleep(3)  # the outage lasts a few more steps
    server.start()
    code, out = st.finish()
    assert code == 0, out
    assert "tracking: MLflow server back after" in out, out
    got = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert got["mlflow_run_id"] == run_id
    # no training step's metrics were lost: every log_every step from the first to the last is in the run
    assert _train_loss_steps(server.uri, run_id) == list(range(20, 3001, 20))
    assert mlflow.MlflowClient(server.uri).get_run(run_id).info.status == "FINISHED"


@pytest.mark.slow  # a real server killed for longer than the grace period, then the retry: about two minutes
def test_an_outage_past_the_grace_period_fails_in_one_line_and_the_retry_resumes_into_the_same_run(workdir: Path,
                                                                                                   server):
    _long_pretrain(workdir)
    st = Stage("pretrain", workdir, {"MLFLOW_TRACKING_URI": server.uri}, "--set", "common.tracking_grace_s=2")
    ckpts = workdir / "checkpoints" / "pretrain"
    deadline = time.time() + 180
    while time.time() < deadline and not list(ckpts.glob("*/mlflow_run_id")):
        time.sleep(0.2)
    time.sleep(1)
    server.kill()
    code, out = st.finish()
    assert code == 3, out
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"pretrain: error: MLflow tracking server {server.uri} unreachable for 2 s "
                           "(common.tracking_grace_s);"), out
    assert "pending_metrics.jsonl for the re-run, which resumes into the same MLflow run" in last
    assert "Traceback" not in out
    assert not (workdir / "models" / "pretrain").exists(), "nothing is written while metrics are unsent"
    from lmpipe.checkpoints import latest_checkpoint

    fp_dir = next(p for p in ckpts.iterdir() if p.is_dir())
    assert latest_checkpoint(fp_dir) is not None, "the checkpoint stays for the retry"
    first_run = (fp_dir / "mlflow_run_id").read_text().strip() if (fp_dir / "mlflow_run_id").exists() else None

    server.start()
    res = run_module("stages.pretrain", workdir, env={"MLFLOW_TRACKING_URI": server.uri}, process=True)
    assert res.returncode == 0, res.stderr
    assert "pretrain: resuming from checkpoint-" in res.stdout
    assert "metric points a previous attempt could not send are logged now" in res.stdout
    got = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    runs = [r for r in mlflow_runs(server.uri) if r.data.tags.get("lmpipe.stage") == "pretrain"]
    assert len(runs) == 1 and runs[0].info.run_id == got["mlflow_run_id"]
    if first_run:
        assert first_run == got["mlflow_run_id"]
    assert _train_loss_steps(server.uri, got["mlflow_run_id"]) == list(range(20, 3001, 20))
    assert not (fp_dir / "pending_metrics.jsonl").exists()


def _flow_run_states(prefect_home: Path) -> list[str]:
    """State names of the flow runs in a temporary Prefect API's database (read through a fresh one)."""
    code = ("import asyncio\nfrom prefect import get_client\n"
            "async def main():\n    async with get_client() as c:\n"
            "        print(','.join(r.state.name for r in await c.read_flow_runs()))\nasyncio.run(main())\n")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PREFECT_HOME": str(prefect_home)},
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1].split(",")


def _still_running(marker: str) -> list[str]:
    res = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True)
    return [ln for ln in res.stdout.splitlines() if "pgrep" not in ln]


@pytest.mark.slow  # the flow up to pretrain, SIGTERM, then the resume: about two minutes
def test_sigterm_to_a_running_flow_stops_it_within_15_s_with_its_checkpoint_and_a_crashed_run(tmp_path: Path,
                                                                                                 tiny_data: Path):
    from helpers import clean_env, make_repo, tiny_params

    from lmpipe.checkpoints import latest_checkpoint

    raw = tiny_params()
    raw["pretrain"].update(max_steps=3000, checkpoint_every=100, eval_every=1000, log_every=50, keep_last=2)
    repo = make_repo(tmp_path / "repo", raw, tiny_data)
    home = tmp_path / "prefect"
    env = clean_env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # its own session, signalled as a whole, as `timeout` and a terminal's process group are
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in proc.stdout), daemon=True).start()
    ckpts = repo / "checkpoints" / "pretrain"
    deadline = time.time() + 400
    while time.time() < deadline and not list(ckpts.glob("*/checkpoint-*")):
        assert proc.poll() is None, "\n".join(lines[-40:])
        time.sleep(0.2)
    time.sleep(1.0)  # mid-training, between checkpoints or in one
    os.killpg(proc.pid, signal.SIGTERM)
    signalled = time.time()
    code = proc.wait(timeout=15)  # the bound: the process is gone within 15 s
    assert time.time() - signalled < 15
    time.sleep(0.5)
    out = "\n".join(lines)
    assert code == 143, out[-3000:]
    assert "lmpipe: stopped by SIGTERM; the flow run is marked Crashed" in out, out[-3000:]
    assert "Connection refused" not in out, out[-3000:]
    assert not _still_running(str(repo)), "the stage (or dvc) outlived the flow"
    fp_dir = next(p for p in ckpts.iterdir() if p.is_dir())
    last = latest_checkpoint(fp_dir)
    assert last is not None and last.name != "checkpoint-3000"
    assert _flow_run_states(home) == ["Crashed"]

    # the stage resumes from the checkpoint it kept
    res = subprocess.run([sys.executable, "-m", "dvc", "repro", "pretrain"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "pretrain: resuming from checkpoint-" in res.stdout, res.stdout[-3000:]


def _cache_file(repo: Path, out: str, relpath: str) -> Path:
    """The DVC cache file behind `relpath` inside the directory output `out` (from dvc.lock and the .dir listing)."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dir_md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)
    cache = repo / ".dvc" / "cache" / "files" / "md5"
    entries = json.loads((cache / dir_md5[:2] / dir_md5[2:]).read_text())
    md5 = next(e["md5"] for e in entries if e["relpath"] == relpath)
    return cache / md5[:2] / md5[2:]


def _truncate(path: Path) -> None:
    path.chmod(0o644)  # DVC keeps cache files read-only
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow  # three stages reproduced twice on a real DVC repo: about two minutes
def test_a_truncated_file_in_the_dvc_cache_or_the_workspace_is_detected_and_reproduced_never_loaded(tmp_path: Path,
                                                                                                   tiny_data: Path):
    import hashlib

    from helpers import make_repo, sh, tiny_params

    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
    sh(repo, sys.executable, "-m", "dvc", "repro", "pretrain")
    model, parquet = repo / "models" / "pretrain" / "model.safetensors", repo / "data" / "clean" / "corpus_train.parquet"
    good = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in (model, parquet)}

    # 1) the cache copies torn (a disk fault, a killed copy), the workspace outputs gone (a fresh checkout)
    for out, rel in (("models/pretrain", "model.safetensors"), ("data/clean", "corpus_train.parquet")):
        _truncate(_cache_file(repo, out, rel))
        shutil.rmtree(repo / out)
    status = sh(repo, sys.executable, "-m", "dvc", "status").stdout
    assert "not in cache" in status, status  # DVC checks the cache file's hash, not only its name
    res = sh(repo, sys.executable, "-m", "dvc", "repro", "pretrain")
    ran = [s for s in ("clean", "tokenize", "pretrain") if f"Running stage '{s}'" in res.stdout]
    assert ran == ["clean", "pretrain"], res.stdout[-3000:]  # re-produced, not checked out from the torn cache
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in good} == good  # deterministic: the same bytes
    assert hashlib.md5(_cache_file(repo, "models/pretrain", "model.safetensors").read_bytes()).hexdigest() == good[model]

    # 2) a workspace output torn in place: `dvc status` names it, `dvc repro` restores the cached good copy
    _truncate(model)
    assert "modified:           models/pretrain" in sh(repo, sys.executable, "-m", "dvc", "status").stdout
    res = sh(repo, sys.executable, "-m", "dvc", "repro", "pretrain")
    assert hashlib.md5(model.read_bytes()).hexdigest() == good[model], res.stdout[-3000:]
    assert "Running stage 'finetune'" not in res.stdout


class PrefectServer:
    """`prefect server start` on its own SQLite database under `home`, on a fixed port (a restart is the same
    server to its clients)."""

    def __init__(self, home: Path) -> None:
        self.home, self.port, self.proc = home, free_port(), None
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                    "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": "false", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def start(self) -> "PrefectServer":
        import requests

        log = open(self.home.parent / f"prefect-server-{self.port}.log", "a")
        self.proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(self.api + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            assert self.proc.poll() is None, "prefect server exited at start"
            time.sleep(0.3)
        raise AssertionError("prefect server did not answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.slow  # a real Prefect server killed and restarted under a running flow: about three minutes
def test_a_prefect_server_restarted_during_a_flow_run_leaves_one_completed_run_and_no_stage_twice(tmp_path: Path,
                                                                                                 tiny_data: Path):
    from helpers import clean_env, make_repo, stage_runs, tiny_params

    raw = tiny_params()
    raw["pretrain"].update(max_steps=600, checkpoint_every=100, eval_every=1000, log_every=50)
    repo = make_repo(tmp_path / "repo", raw, tiny_data)
    (tmp_path / "prefect").mkdir()
    server = PrefectServer(tmp_path / "prefect").start()
    try:
        env = {**clean_env(), **{k: v for k, v in server.env.items() if k.startswith("PREFECT_")},
               "PREFECT_API_URL": server.api}
        proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "clean", "tokenize", "pretrain"],
                                cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        threading.Thread(target=lambda: lines.extend(ln.rstrip() for ln in proc.stdout), daemon=True).start()
        deadline = time.time() + 400
        while time.time() < deadline and not list((repo / "checkpoints" / "pretrain").glob("*/checkpoint-*")):
            assert proc.poll() is None, "\n".join(lines[-40:])
            time.sleep(0.2)
        server.kill()  # mid-pretrain: the flow's next state change meets a dead API
        time.sleep(3)
        server.start()
        code = proc.wait(timeout=900)
        out = "\n".join(lines)
        assert code == 0, out[-4000:]
        # the run's state reached the restarted server: one flow run, Completed, its three stage tasks Completed
        states = subprocess.run(
            [sys.executable, "-c", "import asyncio\nfrom prefect import get_client\nasync def main():\n"
             "    async with get_client() as c:\n        f = await c.read_flow_runs()\n"
             "        t = await c.read_task_runs()\n        print([r.state.name for r in f], sorted(r.state.name for r in t))\n"
             "asyncio.run(main())\n"], env=env, capture_output=True, text=True, timeout=120)
        assert states.returncode == 0, states.stderr
        assert states.stdout.strip().splitlines()[-1] == "['Completed'] ['Completed', 'Completed', 'Completed']", \
            states.stdout + out[-3000:]
        runs = stage_runs(repo)  # no stage ran twice: one MLflow run per stage, each FINISHED
        assert [len(runs[s]) for s in ("clean", "tokenize", "pretrain")] == [1, 1, 1]
        assert all(r.info.status == "FINISHED" for s in ("clean", "tokenize", "pretrain") for r in runs[s])
        assert "pretrain: resuming" not in out  # the stage was not restarted either
        assert "Traceback" not in out and "Connection refused" not in out, out[-3000:]
    finally:
        server.kill()


def _cache_intact(repo: Path) -> list[str]:
    """Cache files whose content does not hash to their name (a torn or interleaved write)."""
    import hashlib

    bad = []
    for path in (repo / ".dvc" / "cache" / "files" / "md5").glob("*/*"):
        name = path.parent.name + path.name
        if not name.endswith(".dir") and hashlib.md5(path.read_bytes()).hexdigest() != name:
            bad.append(str(path))
    return bad


@pytest.mark.slow  # two whole tiny pipelines at once through DVC's queue: about four minutes
def test_two_experiments_at_once_through_dvc_queue_finish_with_their_own_metrics(tmp_path: Path, tiny_data: Path):
    from helpers import exp_metrics, make_repo, sh, tiny_params

    import mlflow

    repo = make_repo(tmp_path / "repo", tiny_params(), tiny_data)
    names = {"lr-low": 0.001, "lr-high": 0.004}
    for name, lr in names.items():  # both change pretrain: every stage runs in both, at the same time
        sh(repo, sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, "-S", f"pretrain.learning_rate={lr}")
    sh(repo, sys.executable, "-m", "dvc", "queue", "start", "-j", "2")
    logs = {name: sh(repo, sys.executable, "-m", "dvc", "queue", "logs", "--follow", name, timeout=900).stdout
            for name in names}
    status = sh(repo, sys.executable, "-m", "dvc", "queue", "status").stdout
    assert status.count("Success") == 2, status + "\n".join(v[-2000:] for v in logs.values())
    for name, log in logs.items():
        assert "database is locked" not in log and "Traceback" not in log, log[-3000:]
        assert all(f"Running stage '{s}'" in log for s in ("pretrain", "finetune", "evaluate")), log[-3000:]

    # each experiment's metrics are its own run's: the MLflow run its metrics file names has its lr and loss
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    losses = {}
    for name, lr in names.items():
        pretrain = exp_metrics(repo, name)["metrics/pretrain.json"]["data"]
        run = client.get_run(pretrain["mlflow_run_id"])
        assert float(run.data.params["pretrain.learning_rate"]) == lr and run.info.status == "FINISHED"
        assert run.data.metrics["final.val_loss"] == pytest.approx(pretrain["val_loss"])
        losses[name] = pretrain["val_loss"]
        assert exp_metrics(repo, name)["metrics/eval.json"]["data"]["lm"]["perplexity"] > 1
    assert losses["lr-low"] != losses["lr-high"]
    assert _cache_intact(repo) == []
    pretrains = [r for r in client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
                 if r.data.tags.get("lmpipe.stage") == "pretrain"]
    assert len(pretrains) == 2  # one per experiment, none lost to a locked database
