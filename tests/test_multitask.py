"""Multi-task fine-tuning through the stage CLI: task files parsed (malformed rows refused in one line), one
encoder with a head per task, sampling proportions as set, single-task baselines and the measured transfer,
one registered model serving every task over HTTP (/predict with `task`, /tasks, /embed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from helpers import Server, run_module, tiny_params, tiny_tasks_params, write_tiny_data, write_tiny_tasks


def _work(tmp_path: Path, monkeypatch, **finetune) -> Path:
    data = write_tiny_tasks(write_tiny_data(tmp_path / "data"))
    monkeypatch.setenv("LMPIPE_DATA_DIR", str(data))
    wd = tmp_path / "work"
    wd.mkdir()
    raw = tiny_tasks_params(tiny_params())
    raw["finetune"].update(scratch_baseline=False, **finetune)
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{wd / 'mlflow.db'}")
    return wd


def _run(wd: Path, *stages: str, args: tuple[str, ...] = ()) -> None:
    for stage in stages:
        res = run_module(f"stages.{stage}", wd, *args)
        assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"


def test_trec_and_csv_tasks_are_split_and_malformed_rows_refused_in_one_line(tmp_path, monkeypatch):
    wd = _work(tmp_path, monkeypatch)
    _run(wd, "clean")
    clean = wd / "data" / "clean"
    trec = json.loads((clean / "tasks" / "trec" / "labels.json").read_text())
    assert trec["raw"] == ["HUM", "LOC", "NUM"]  # the coarse classes of `COARSE:fine question`
    news = json.loads((clean / "tasks" / "news" / "labels.json").read_text())
    assert news["names"] == ["World", "Sports", "Business", "Sci/Tech"]
    import pandas as pd

    splits = {s: pd.read_parquet(clean / "tasks" / "news" / f"labeled_{s}.parquet") for s in ("train", "validation", "test")}
    assert sum(len(df) for df in splits.values()) == 48  # one file, split three ways, nothing lost or repeated
    assert len(set().union(*(set(df["text"]) for df in splits.values()))) == 48
    assert splits["train"]["text"].iloc[0].count(" ") >= 4  # title and description joined
    assert pd.read_parquet(clean / "tasks" / "trec" / "labeled_test.parquet")["text"].iloc[0].startswith("What city")
    metrics = json.loads((wd / "metrics" / "clean.json").read_text())
    assert metrics["tasks"]["news"]["test"] == len(splits["test"]) and metrics["tasks"]["trec"]["num_labels"] == 3

    data = Path(str(tmp_path / "data"))
    before = sorted(p.name for p in clean.rglob("*"))
    (data / "trec" / "train.label").write_text("LOC:city What city is it ?\nthis line has no label\n", encoding="latin-1")
    res = run_module("stages.clean", wd)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].endswith(
        "train.label:2: not a TREC line (expected `COARSE:fine question`): 'this line has no label'"), res.stderr
    write_tiny_tasks(data)
    with open(data / "news" / "all.csv", "a") as f:
        f.write('"1","a title","a description","one field too many"\n')
    res = run_module("stages.clean", wd)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "all.csv: malformed csv" in last and "line 49" in last, last
    assert sorted(p.name for p in clean.rglob("*")) == before  # nothing half-written


@pytest.mark.slow  # make test stays near its 15 minutes; CI runs the slow set
def test_multitask_heads_sampling_transfer_and_serving_every_task(tmp_path, monkeypatch):
    wd = _work(tmp_path, monkeypatch, sampling="temperature", sampling_temperature=3.0, max_steps=120,
               eval_every=40, single_task_baselines=True, loss_weights={"trec": 2.0})
    _run(wd, "clean", "tokenize", "pretrain", "finetune")
    ft = json.loads((wd / "metrics" / "finetune.json").read_text())
    # sampling: a counted run's batch shares match n^(1/T) / sum within tolerance
    sizes = {t: ft["tasks"][t]["train_examples"] for t in ("sst", "trec", "news")}
    weights = {t: n ** (1 / 3.0) for t, n in sizes.items()}
    for t, w in weights.items():
        expected = w / sum(weights.values())
        assert ft["tasks"][t]["expected_share"] == pytest.approx(expected)
        assert abs(ft["tasks"][t]["share"] - expected) < 0.12, (t, ft["tasks"][t])
    assert sum(ft["tasks"][t]["batches"] for t in sizes) == 120
    # one shared encoder, one head per task: an output layer of 2 + 3 + 4 rows, the layout in config.json
    config = json.loads((wd / "models" / "finetune" / "config.json").read_text())
    assert [(t["name"], len(t["labels"])) for t in config["lmpipe_tasks"]] == [("sst", 2), ("trec", 3), ("news", 4)]
    from safetensors.torch import load_file

    head = load_file(str(wd / "models" / "finetune" / "model.safetensors"))["score.weight"]
    assert head.shape[0] == 9
    for t in sizes:  # per-task validation figures, the selection metric their mean
        assert 0 <= ft["classifier"][f"val_{t}_accuracy"] <= 1
        # each single-task baseline trained the steps its task got in the multi-task run
        assert ft[f"single_{t}"]["steps"] == ft["tasks"][t]["batches"]
    assert ft["classifier"]["val_accuracy"] == pytest.approx(np.mean([ft["classifier"][f"val_{t}_accuracy"] for t in sizes]),
                                                             abs=1e-6)

    _run(wd, "evaluate", "deploy")
    ev = json.loads((wd / "metrics" / "eval.json").read_text())
    for t in sizes:
        multi, single = ev["classifier"]["tasks"][t]["accuracy"], ev["single_task_baseline"][t]["accuracy"]
        assert ev["transfer"][t] == pytest.approx({"multi": multi, "single": single, "difference": multi - single})
    assert ev["classifier"]["accuracy"] == pytest.approx(np.mean([ev["classifier"]["tasks"][t]["accuracy"] for t in sizes]))
    dep = json.loads((wd / "metrics" / "deploy.json").read_text())
    assert set(dep["variants"]["fp32"]["tasks"]) == set(sizes)

    # the registered model answers every task through its own head, over HTTP
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{wd / 'mlflow.db'}")
    mlflow.set_experiment("lmpipe")
    local = mlflow.pyfunc.load_model("models:/lmpipe-sst2@champion")
    questions = ["What city is the capital of Peru?", "Who wrote the anthem of Chile?"]
    pyfunc_trec = local.predict(questions, params={"task": "trec"})
    with Server(wd, "--model-uri", "models:/lmpipe-sst2@champion", "--allow-unauthenticated") as srv:
        listed = requests.get(f"{srv.url}/tasks", timeout=10).json()
        assert listed["default"] == "sst"
        assert {t["name"]: t["labels"] for t in listed["tasks"]} == {
            "sst": ["negative", "positive"], "trec": ["HUM", "LOC", "NUM"],
            "news": ["World", "Sports", "Business", "Sci/Tech"]}
        for task, labels in (("trec", {"HUM", "LOC", "NUM"}), ("news", {"World", "Sports", "Business", "Sci/Tech"}),
                             (None, {"negative", "positive"})):
            body = {"texts": questions} | ({"task": task} if task else {})
            r = requests.post(f"{srv.url}/predict", json=body, timeout=30)
            assert r.status_code == 200, r.text
            assert {p["label"] for p in r.json()["predictions"]} <= labels
            if task == "trec":
                assert [p["label"] for p in r.json()["predictions"]] == pyfunc_trec["label"].tolist()
        r = requests.post(f"{srv.url}/predict", json={"texts": questions, "task": "sentiment"}, timeout=10)
        assert r.status_code == 422 and r.json()["detail"] == \
            "task: unknown task 'sentiment'; the model's tasks are sst, trec, news"
        r = requests.post(f"{srv.url}/embed", json={"texts": questions}, timeout=30)
        assert r.status_code == 200, r.text
        vectors = np.array(r.json()["embeddings"])
        assert vectors.shape == (2, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        metrics = requests.get(f"{srv.url}/metrics", timeout=10).text
        assert 'task="trec"' in metrics and 'route="/embed"' in metrics


def test_single_task_params_give_the_same_result_as_naming_the_one_task(tmp_path, monkeypatch):
    """params.yaml's single-task setting (finetune.tasks: null, clean.tasks ignored) trains exactly what it trained
    before multi-task existed: a plain classifier without a task layout, the same metrics as finetune.tasks naming
    its one task (whatever the sampling: one task has no schedule)."""
    wd = _work(tmp_path, monkeypatch)
    raw = yaml.safe_load((wd / "params.yaml").read_text())
    raw["finetune"]["tasks"] = None
    (wd / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run(wd, "clean", "tokenize", "pretrain", "finetune")
    old = json.loads((wd / "metrics" / "finetune.json").read_text())
    assert "lmpipe_tasks" not in json.loads((wd / "models" / "finetune" / "config.json").read_text())
    assert "tasks" not in old
    _run(wd, "finetune", args=("--set", "finetune.tasks=[sst]", "--set", "finetune.sampling=round_robin"))
    new = json.loads((wd / "metrics" / "finetune.json").read_text())["classifier"]
    drop = ("train_seconds", "steps_per_s")
    assert {k: v for k, v in new.items() if k not in drop} == {k: v for k, v in old["classifier"].items() if k not in drop}


@pytest.mark.parametrize("sets, expected", [
    (("finetune.strategy=prefix",), "finetune.strategy: prefix with several tasks: virtual tokens shared by every "
                                    "task are not prompt learning (one prompt per task is); use full, freeze, llrd or lora"),
    (("finetune.tasks=[sst,quiz]",), "finetune.tasks: unknown task quiz; clean defines sst, trec, news"),
    (("finetune.loss_weights={news: 1.0}", "finetune.tasks=[sst,trec]"),
     "finetune.loss_weights: news not in finetune.tasks (sst, trec)"),
])
def test_bad_multitask_settings_are_one_line_and_write_nothing(tmp_path, monkeypatch, sets, expected):
    wd = _work(tmp_path, monkeypatch)
    res = run_module("stages.finetune", wd, *[a for s in sets for a in ("--set", s)])
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines()[-1].endswith(expected), res.stderr
    assert not (wd / "models").exists() and not (wd / "metrics").exists()


def test_lora_trains_every_head_of_a_multitask_model(tmp_path, monkeypatch):
    wd = _work(tmp_path, monkeypatch, strategy="lora", sampling="round_robin", max_steps=9, eval_every=9)
    _run(wd, "clean", "tokenize", "pretrain", "finetune")
    ft = json.loads((wd / "metrics" / "finetune.json").read_text())
    assert {t: v["batches"] for t, v in ft["tasks"].items()} == {"sst": 3, "trec": 3, "news": 3}
    from safetensors.torch import load_file

    adapter = load_file(str(wd / "models" / "finetune" / "adapter" / "adapter_model.safetensors"))
    heads = [k for k in adapter if "score" in k]
    assert heads and all(adapter[k].shape[0] == 9 for k in heads)  # the whole output layer: every task's head
