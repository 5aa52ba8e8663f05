"""The deploy stage's compressed variants (lmpipe/compress.py) and rollback (lmpipe/registry.py), through the
paths a user takes: `dvc repro` in a tiny repo, `python -m stages.deploy`, `lmpipe rollback`, MLflow's registry."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import make_repo, run_module, section, sh, tiny_params

LMPIPE = str(Path(sys.executable).parent / "lmpipe")
ALL = ["fp32", "int8_dynamic", "onnx", "onnx_int8", "pruned"]


def _learning_params() -> dict:
    """Tiny params whose classifier learns the tiny task (test accuracy 1.0), all variants, pruning so hard
    (95% of the weights) that the pruned variant falls to chance and the drop gate refuses it."""
    raw = tiny_params()
    raw["finetune"].update(max_steps=30, learning_rate=0.005, scratch_baseline=False)
    raw["deploy"].update(variants=ALL, serve_variant="int8_dynamic", max_accuracy_drop=0.2, sparsity=0.95)
    return raw


def test_variants_scored_gated_registered_and_the_served_one_exported(tmp_path, tiny_data):
    import mlflow

    repo = make_repo(tmp_path / "repo", _learning_params(), tiny_data)
    sh(repo, "dvc", "repro")
    ev = json.loads((repo / "metrics" / "eval.json").read_text())
    dep = json.loads((repo / "metrics" / "deploy.json").read_text())
    rows = dep["variants"]
    assert list(rows) == ALL

    # 1) each variant scored on evaluate's test split and timed; fp32 is evaluate's model, figure for figure
    assert rows["fp32"]["accuracy"] == ev["classifier"]["accuracy"] == 1.0
    assert rows["fp32"]["f1_macro"] == ev["classifier"]["f1_macro"]
    for name in ("int8_dynamic", "onnx", "onnx_int8"):
        r = rows[name]
        assert r["status"] == "passed" and r["accuracy_drop"] <= 0.2, r
        assert r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0 and r["size_mb"] > 0 and "speedup_b1" in r
    # 2) the pruned variant lost more than deploy.max_accuracy_drop: refused and recorded, the stage succeeded
    assert rows["pruned"]["status"] == "refused" and rows["pruned"]["accuracy_drop"] > 0.2
    assert "deploy.max_accuracy_drop 0.2" in rows["pruned"]["reason"] and "version" not in rows["pruned"]

    # 3) the registry: one version per passed variant, tagged with its figures; champion on the served one
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = {mv.tags["variant"]: mv for mv in client.search_model_versions("name='lmpipe-sst2'")}
    assert set(versions) == {"fp32", "int8_dynamic", "onnx", "onnx_int8"}
    for name, mv in versions.items():
        assert float(mv.tags["accuracy"]) == rows[name]["accuracy"]
        assert float(mv.tags["latency_b32_ms"]) == rows[name]["latency_b32_ms"]
        assert {"accuracy_drop", "size_mb", "source_run_id", "git.commit"} <= set(mv.tags)
    champion = client.get_model_version_by_alias("lmpipe-sst2", "champion")
    assert str(champion.version) == str(versions["int8_dynamic"].version) == dep["version"]
    run = client.get_run(dep["mlflow_run_id"])
    assert run.data.tags["deploy.variant.pruned"].startswith("refused: accuracy drop")
    assert run.data.metrics["variant.onnx_int8.accuracy"] == rows["onnx_int8"]["accuracy"]

    # 4) the exported model is the served variant; every registered variant predicts through its MLflow pyfunc
    assert json.loads((repo / "models" / "deploy" / "model" / "lmpipe_variant.json").read_text())["variant"] == \
        "int8_dynamic"
    test = pd.read_parquet(repo / "data" / "clean" / "labeled_test.parquet")
    names = json.loads((repo / "data" / "clean" / "labels.json").read_text())["names"]
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    for name, mv in versions.items():
        out = mlflow.pyfunc.load_model(f"models:/lmpipe-sst2/{mv.version}").predict(pd.DataFrame({"text": test["text"]}))
        acc = float((out["label"].map(names.index).to_numpy() == test["label"].to_numpy()).mean())
        assert acc == rows[name]["accuracy"], name
    # a plain list of strings passes the signature too (the pyfunc docstring promises it)
    served = mlflow.pyfunc.load_model("models:/lmpipe-sst2@champion")
    texts = test["text"].tolist()[:3]
    assert served.predict(texts).equals(served.predict(pd.DataFrame({"text": texts})))


def test_bad_serve_variant_is_one_line(tmp_path):
    raw = tiny_params()
    raw["deploy"].update(variants=["fp32"], serve_variant="onnx")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    res = run_module("stages.deploy", tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "deploy: error: params.yaml: deploy.serve_variant: onnx is not one of deploy.variants ['fp32']"], res.stderr
    assert not (tmp_path / "metrics").exists()


def _workdir(base: Path) -> tuple[Path, dict]:
    """A work dir under `base` with tiny params (a classifier that learns the tiny task) and tiny data beside it;
    the environment its stages run with (the data folder, a SQLite MLflow store in the work dir)."""
    from helpers import write_tiny_data

    data = write_tiny_data(base / "data")
    wd = base / "work"
    wd.mkdir()
    raw = tiny_params()
    raw["finetune"].update(learning_rate=0.005, scratch_baseline=False)
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return wd, {"LMPIPE_DATA_DIR": str(data), "MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def three_deploys(tmp_path_factory):
    """A workdir whose finetune -> evaluate -> deploy ran three times with more and more fine-tuning steps:
    three versions, each better than the last, each promoted to champion."""
    wd, env = _workdir(tmp_path_factory.mktemp("rollback"))
    for stage in ("clean", "tokenize", "pretrain"):
        res = run_module(f"stages.{stage}", wd, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
    accuracies = []
    for steps in (2, 12, 30):  # test accuracy 0.5, 0.83, 1.0 on the tiny task
        for stage in ("finetune", "evaluate", "deploy"):
            res = run_module(f"stages.{stage}", wd, "--set", f"finetune.max_steps={steps}", env=env)
            assert res.returncode == 0, res.stderr[-3000:]
        dep = json.loads((wd / "metrics" / "deploy.json").read_text())
        assert dep["promoted"] and dep["promoted_by"] == "val_accuracy", dep
        accuracies.append(dep["accuracy"])
    assert accuracies == sorted(set(accuracies)), accuracies  # strictly better each time
    return wd, env


def test_promotion_compares_validation_accuracy_and_never_the_test_split(tmp_path):
    """Choosing a champion among experiments is selection: deploy promotes by the version's val_accuracy tag; a
    challenger with the better test accuracy but the worse validation accuracy stays out."""
    import mlflow

    from lmpipe.registry import champion, promote

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    client.create_registered_model("m")
    for version, (val, test) in enumerate([(0.80, 0.70), (0.79, 0.95), (0.81, 0.60)], start=1):
        client.create_model_version("m", f"file://{tmp_path}/v{version}", tags={"val_accuracy": str(val),
                                                                                 "accuracy": str(test)})
    assert promote(client, "m", "champion", "1", 0.80, key="val_accuracy")["promoted"]
    second = promote(client, "m", "champion", "2", 0.79, key="val_accuracy")
    assert not second["promoted"] and second["previous_champion_score"] == 0.80
    assert champion(client, "m", "champion", "val_accuracy") == ("1", 0.80)
    assert promote(client, "m", "champion", "3", 0.81, key="val_accuracy")["promoted"]
    history = json.loads(client.get_registered_model("m").tags["lmpipe.alias_history.champion"])
    assert history[-1]["why"] == "deploy: val_accuracy 0.8100 beats v1 (0.8000)"


def _lmpipe(wd: Path, env: dict, *args: str):
    import subprocess

    full = {**os.environ, **env, "LMPIPE_USER": "ops-alice"}
    return subprocess.run([LMPIPE, *args], cwd=wd, env=full, capture_output=True, text=True, timeout=300)


def test_rollback_twice_then_to_a_version_then_nothing_left(three_deploys):
    import mlflow

    wd, env = three_deploys
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    holder = lambda: str(client.get_model_version_by_alias("lmpipe-sst2", "champion").version)  # noqa: E731
    assert holder() == "3"

    res = _lmpipe(wd, env, "rollback", "--reason", "latency regression")
    assert res.returncode == 0 and "lmpipe-sst2@champion: v3 -> v2" in res.stdout, res.stderr
    assert holder() == "2"
    tags = client.get_model_version("lmpipe-sst2", "2").tags
    assert tags["rollback.by"] == "ops-alice" and tags["rollback.from"] == "3"
    assert tags["rollback.why"] == "rollback from v3: latency regression" and tags["rollback.at"]

    res = _lmpipe(wd, env, "rollback")  # twice in a row: one further back
    assert res.returncode == 0 and "v2 -> v1" in res.stdout, res.stderr
    assert holder() == "1"
    res = _lmpipe(wd, env, "rollback")
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        "lmpipe: error: rollback: lmpipe-sst2@champion (v1) has no earlier holder to roll back to"], res.stderr
    assert holder() == "1"

    res = _lmpipe(wd, env, "rollback", "--to", "3")
    assert res.returncode == 0 and "v1 -> v3" in res.stdout and holder() == "3"
    res = _lmpipe(wd, env, "rollback")  # back from an explicit move goes to where it came from
    assert res.returncode == 0 and "v3 -> v1" in res.stdout and holder() == "1"
    for bad, message in ((["--to", "99"], "rollback --to 99: lmpipe-sst2 has no version 99"),
                         (["--to", "1"], "rollback --to 1: v1 already holds lmpipe-sst2@champion")):
        res = _lmpipe(wd, env, "rollback", *bad)
        assert res.returncode == 1 and res.stderr.strip() == f"lmpipe: error: {message}", res.stderr
    history = json.loads(client.get_registered_model("lmpipe-sst2").tags["lmpipe.alias_history.champion"])
    assert [h["version"] for h in history] == ["1"] and history[-1]["by"] == "ops-alice"


@pytest.mark.slow  # MLflow's own server: interop, not lmpipe's code path
def test_mlflow_models_serve_answers_for_the_champion(three_deploys):
    """Interop: MLflow's own server (`mlflow models serve --env-manager local`) serves the registered champion
    and answers like the pyfunc loaded in process."""
    import subprocess
    import time

    import mlflow
    import requests

    from helpers import NEG, POS, free_port

    wd, env = three_deploys
    port = free_port()
    bindir = str(Path(sys.executable).parent)
    full = {**os.environ, **env, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}  # it execs uvicorn
    proc = subprocess.Popen([f"{bindir}/mlflow", "models", "serve", "-m", "models:/lmpipe-sst2@champion",
                             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)], cwd=wd, env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in 180 s"
            time.sleep(1)
        texts = POS[:3] + NEG[:3]
        res = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                            json={"dataframe_records": [{"text": t} for t in texts]})
        assert res.status_code == 200, res.text
        served = res.json()["predictions"]
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        local = mlflow.pyfunc.load_model("models:/lmpipe-sst2@champion").predict(pd.DataFrame({"text": texts}))
        assert [p["label"] for p in served] == local["label"].tolist()
        assert [round(p["score"], 5) for p in served] == [round(s, 5) for s in local["score"]]
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_server_on_the_champion_follows_a_rollback(three_deploys):
    """`lmpipe serve` on models:/lmpipe-sst2@champion (alias polled every second), then `lmpipe rollback --to`:
    within a few polls /health names the version rolled back to and /predict answers with its weights."""
    import time

    import mlflow
    import requests

    from helpers import NEG, POS, Server

    wd, env = three_deploys
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    before = str(client.get_model_version_by_alias("lmpipe-sst2", "champion").version)
    target = "3" if before != "3" else "1"
    with Server(wd, "--model-uri", "models:/lmpipe-sst2@champion", "--reload-interval", "1",
                env={**env, "LMPIPE_USER": "ops-bob"}, timeout=180) as srv:
        def health():
            return requests.get(f"{srv.url}/health", timeout=5).json()

        assert str(health()["version"]) == before
        texts = POS[:3] + NEG[:3]
        res = _lmpipe(wd, env, "rollback", "--to", target, "--reason", "canary failed")
        assert res.returncode == 0, res.stderr
        deadline = time.monotonic() + 60
        while str(health()["version"]) != target:
            assert time.monotonic() < deadline, f"server still on {health()} 60 s after the rollback"
            time.sleep(0.5)
        served = requests.post(f"{srv.url}/predict", json={"texts": texts}, timeout=60).json()["predictions"]
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        local = mlflow.pyfunc.load_model(f"models:/lmpipe-sst2/{target}").predict(pd.DataFrame({"text": texts}))
        assert [p["label"] for p in served] == local["label"].tolist()
        assert [round(p["score"], 5) for p in served] == [round(s, 5) for s in local["score"]]


@pytest.fixture(scope="module")
def ensemble_work(tmp_path_factory):
    """A workdir with a registered v1 (12 steps), a weaker model kept in a folder (2 steps), and the pipeline's
    own fine-tuned model (30 steps) evaluated: deploy can ensemble all three."""
    import shutil

    wd, env = _workdir(tmp_path_factory.mktemp("ensemble"))

    def stages(*names: str, steps: int, extra: tuple[str, ...] = ()):
        for stage in names:
            res = run_module(f"stages.{stage}", wd, "--set", f"finetune.max_steps={steps}", *extra, env=env)
            assert res.returncode == 0, res.stderr[-3000:]

    stages("clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy", steps=12)  # v1
    stages("finetune", steps=2)
    shutil.copytree(wd / "models" / "finetune", wd / "weak")
    stages("finetune", "evaluate", steps=30)
    return wd, env


ENSEMBLE = ("--set", "finetune.max_steps=30", "--set", "deploy.variants=[fp32, ensemble]")


def test_the_ensemble_variant_averages_its_members_registers_serves_and_teaches(ensemble_work):
    import mlflow
    import numpy as np
    from fastapi.testclient import TestClient

    from lmpipe import compress
    from lmpipe.serving import reload
    from lmpipe.serving.app import create_app

    wd, env = ensemble_work
    res = run_module("stages.deploy", wd, *ENSEMBLE, "--set", "deploy.ensemble=[weak, models:/lmpipe-sst2/1]",
                     env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    dep = json.loads((wd / "metrics" / "deploy.json").read_text())
    ens, fp32 = dep["variants"]["ensemble"], dep["variants"]["fp32"]
    assert ens["status"] == "passed" and 0 <= ens["val_accuracy"] <= 1 and "val_accuracy" not in fp32
    assert 2.9 * fp32["size_mb"] < ens["size_mb"] < 3.5 * fp32["size_mb"]  # three models and its own tokenizer copy
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = dep["versions"]["ensemble"]
    mv = client.get_model_version("lmpipe-sst2", version)
    assert mv.tags["variant"] == "ensemble" and float(mv.tags["val_accuracy"]) == ens["val_accuracy"]

    # its probabilities are the mean of its members', each predicting alone
    test = pd.read_parquet(wd / "data" / "clean" / "labeled_test.parquet")["text"].tolist()
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    v1 = Path(mlflow.artifacts.download_artifacts(f"models:/lmpipe-sst2/1", dst_path=str(wd / "v1")))
    v1 = next(p.parent for p in v1.rglob("config.json"))
    want = np.mean([compress.load(d).predict_proba(test) for d in (wd / "models" / "finetune", wd / "weak", v1)], 0)
    got = mlflow.pyfunc.load_model(f"models:/lmpipe-sst2/{version}").predict(pd.DataFrame({"text": test}))
    assert np.allclose(got["score"].to_numpy(), want.max(1), atol=1e-6)
    assert (got["score"].to_numpy() != compress.load(wd / "weak").predict_proba(test).max(1)).any()

    # lmpipe serve's loading path: /predict answers with the ensemble, /embed names what it cannot do
    with TestClient(create_app(reload.load(f"models:/lmpipe-sst2/{version}", client),
                               cfg=section("serve"))) as http:
        r = http.post("/predict", json={"texts": test[:2]})
        assert r.status_code == 200 and [p["score"] for p in r.json()["predictions"]] == pytest.approx(
            list(want[:2].max(1)), abs=1e-6)
        r = http.post("/embed", json={"texts": test[:1]})
        assert r.status_code == 409 and "ensemble" in r.json()["detail"]

    # a distillation teacher: run once over the training texts, its averaged log-probabilities the soft labels
    res = run_module("stages.finetune", wd, "--set", "finetune.strategy=distill", "--set", "finetune.max_steps=4",
                     "--set", f"finetune.distill.teacher=models:/lmpipe-sst2/{version}", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ft = json.loads((wd / "metrics" / "finetune.json").read_text())
    assert ft["teacher"] == f"models:/lmpipe-sst2/{version}" and ft["teacher_variant"] == "ensemble"
    run = client.get_run(ft["mlflow_run_id"])
    assert run.data.metrics["teacher_soft_labels_s"] >= 0


@pytest.mark.parametrize("members,line", [
    ("[nowhere]", "deploy: error: deploy.ensemble: nowhere is not a fine-tuned model dir (no "),
    ("[models:/lmpipe-sst2/99]", "deploy: error: deploy.ensemble: cannot load models:/lmpipe-sst2/99 ("),
    ("[relabelled]", "deploy: error: deploy.ensemble: relabelled predicts default: ['x', 'y'], the fine-tuned model "
                     "default: "),
    ("[]", "deploy: error: params.yaml: deploy.ensemble: deploy.variants names ensemble but deploy.ensemble lists "
           "no other model"),
    ("[weak, weak]", "deploy: error: params.yaml: deploy.ensemble: weak is listed twice"),
    ("[models/finetune]", "deploy: error: deploy.ensemble: models/finetune is the fine-tuned model itself"),
    ("['models:/lmpipe-sst2@champion']", "deploy: error: params.yaml: deploy.ensemble: models:/lmpipe-sst2@champion "
                                         "moves to each deploy's served version"),
])
def test_a_bad_ensemble_member_is_one_line_and_nothing_is_registered(ensemble_work, members, line):
    import shutil

    import mlflow

    wd, env = ensemble_work
    if not (wd / "relabelled").exists():
        shutil.copytree(wd / "weak", wd / "relabelled")
        config = json.loads((wd / "relabelled" / "config.json").read_text())
        config.update(id2label={"0": "x", "1": "y"}, label2id={"x": 0, "y": 1})
        (wd / "relabelled" / "config.json").write_text(json.dumps(config))
    before = (wd / "metrics" / "deploy.json").read_text()
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    versions = len(client.search_model_versions("name='lmpipe-sst2'"))
    res = run_module("stages.deploy", wd, *ENSEMBLE, "--set", f"deploy.ensemble={members}", env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith(line), res.stderr[-2000:]
    assert (wd / "metrics" / "deploy.json").read_text() == before
    assert len(client.search_model_versions("name='lmpipe-sst2'")) == versions
