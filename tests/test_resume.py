"""Crash-safe resume: SIGKILL the running stage at two points, re-run, get the uninterrupted result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import checkpoint_steps, copy_for_reference, kill_after, mlflow_runs, prepare_workdir, run_module


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_pretrain_survives_two_sigkills(workdir: Path, tmp_path: Path, monkeypatch):
    prepare_workdir(workdir, lambda r: r["pretrain"].update(max_steps=400, checkpoint_every=40, eval_every=200,
                                                      log_every=20, keep_last=2))
    ref = copy_for_reference(workdir, tmp_path / "ref")
    res = run_module("stages.pretrain", ref, env={"MLFLOW_TRACKING_URI": f"sqlite:///{ref / 'mlflow.db'}"}, process=True)
    assert res.returncode == 0, res.stderr
    expected = json.loads((ref / "metrics" / "pretrain.json").read_text())

    ckpts = workdir / "checkpoints" / "pretrain"
    first = kill_after("pretrain", workdir, ckpts, past=0)
    second = kill_after("pretrain", workdir, ckpts, past=first)
    assert 0 < first < second < 400
    # a checkpoint cut short by a kill (state file truncated) must never be loaded
    fp_dir = next(p for p in ckpts.iterdir() if p.is_dir())
    torn = fp_dir / "checkpoint-399"
    shutil.copytree(fp_dir / f"checkpoint-{second}", torn)
    (torn / "trainer_state.json").write_text('{"global_step": 3')

    res = run_module("stages.pretrain", workdir, process=True)
    assert res.returncode == 0, res.stderr
    # a resume says so in one line, and re-tying the embedding (lm_head.weight is not saved twice) is no warning
    assert f"pretrain: resuming from checkpoint-{second} (step {second} of 400)" in res.stdout, res.stdout
    assert "missing keys" not in res.stdout + res.stderr, res.stderr
    got = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert got["steps"] == expected["steps"] == 400
    assert abs(got["val_loss"] - expected["val_loss"]) < 1e-4, (got["val_loss"], expected["val_loss"])
    assert not torn.exists()

    runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.data.tags.get("lmpipe.stage") == "pretrain"]
    assert len(runs) == 1, "the resumed attempts must reattach to the first MLflow run"
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_id == got["mlflow_run_id"]
    assert runs[0].data.tags["pretrain.resumed_from"].endswith(f"checkpoint-{second}")
    # the loss curve has every logged step of an uninterrupted run: what was logged before each checkpoint was
    # sent when it was saved, so the resumed attempts leave no gap
    import mlflow

    ref_uri = f"sqlite:///{ref / 'mlflow.db'}"
    ref_run = next(r for r in mlflow_runs(ref_uri) if r.data.tags.get("lmpipe.stage") == "pretrain")
    # explicit store URIs: an earlier test in this process may have set mlflow's global tracking URI
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    steps = {m.step for m in client.get_metric_history(got["mlflow_run_id"], "train_loss")}
    assert steps == {m.step for m in mlflow.MlflowClient(ref_uri).get_metric_history(ref_run.info.run_id, "train_loss")}


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_finetune_survives_two_sigkills(workdir: Path, tmp_path: Path):
    prepare_workdir(workdir, lambda r: r["finetune"].update(max_steps=300, eval_every=30, batch_size=4,
                                                      scratch_baseline=False))
    res = run_module("stages.pretrain", workdir, process=True)
    assert res.returncode == 0, res.stderr
    ref = copy_for_reference(workdir, tmp_path / "ref")
    res = run_module("stages.finetune", ref, env={"MLFLOW_TRACKING_URI": f"sqlite:///{ref / 'mlflow.db'}"}, process=True)
    assert res.returncode == 0, res.stderr
    expected = json.loads((ref / "metrics" / "finetune.json").read_text())["classifier"]

    ckpts = workdir / "checkpoints" / "finetune"
    first = kill_after("finetune", workdir, ckpts, past=0)
    second = kill_after("finetune", workdir, ckpts, past=first)
    assert 0 < first < second
    res = run_module("stages.finetune", workdir, process=True)
    assert res.returncode == 0, res.stderr
    got = json.loads((workdir / "metrics" / "finetune.json").read_text())
    assert got["classifier"]["steps"] == 300
    assert abs(got["classifier"]["val_loss"] - expected["val_loss"]) < 1e-4
    assert got["classifier"]["val_accuracy"] == expected["val_accuracy"]
    runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.data.tags.get("lmpipe.stage") == "finetune"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.slow  # minutes on 2 cores; CI runs the slow set
def test_finetune_killed_during_the_scratch_twin_keeps_the_finished_classifier(workdir: Path, tmp_path: Path):
    prepare_workdir(workdir, lambda r: r["finetune"].update(max_steps=200, eval_every=20, batch_size=4,
                                                      scratch_baseline=True))
    res = run_module("stages.pretrain", workdir, process=True)
    assert res.returncode == 0, res.stderr
    ref = copy_for_reference(workdir, tmp_path / "ref")
    res = run_module("stages.finetune", ref, env={"MLFLOW_TRACKING_URI": f"sqlite:///{ref / 'mlflow.db'}"}, process=True)
    assert res.returncode == 0, res.stderr
    expected = json.loads((ref / "metrics" / "finetune.json").read_text())

    # SIGKILL while the scratch twin trains: the classifier is finished by then
    ckpts = workdir / "checkpoints" / "finetune"
    kill_after("finetune", workdir, ckpts, past=0, variant="scratch")
    killed_ms = time.time() * 1000
    fp_dir = next(p for p in ckpts.iterdir() if p.is_dir())
    assert (fp_dir / "finished" / "classifier" / "model.safetensors").is_file()

    res = run_module("stages.finetune", workdir, process=True)
    assert res.returncode == 0, res.stderr
    assert "finetune[classifier]: finished by an earlier attempt" in res.stdout, res.stdout
    got = json.loads((workdir / "metrics" / "finetune.json").read_text())
    for variant in ("classifier", "scratch"):
        assert got[variant]["steps"] == expected[variant]["steps"] == 200
        assert abs(got[variant]["val_loss"] - expected[variant]["val_loss"]) < 1e-4, (variant, got, expected)
        assert got[variant]["val_accuracy"] == expected[variant]["val_accuracy"]
    assert not any(ckpts.iterdir()), "checkpoints are deleted once the whole stage succeeded"

    import mlflow

    runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.data.tags.get("lmpipe.stage") == "finetune"]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    ref_uri = f"sqlite:///{ref / 'mlflow.db'}"
    ref_run_id = next(r.info.run_id for r in mlflow_runs(ref_uri) if r.data.tags.get("lmpipe.stage") == "finetune")
    # the classifier was not trained again: its curve was logged by the first attempt only, as in one run
    for key in ("classifier.eval_accuracy", "classifier.train_loss"):
        logged = client.get_metric_history(run_id, key)
        assert all(m.timestamp <= killed_ms for m in logged), key
        assert sorted(m.step for m in logged) == sorted(
            m.step for m in mlflow.MlflowClient(ref_uri).get_metric_history(ref_run_id, key))
    assert {m.step for m in client.get_metric_history(run_id, "scratch.eval_accuracy")} == set(range(20, 201, 20))
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"finetune_classifier_loss.png", "finetune_scratch_loss.png"} <= artifacts
    assert sorted(d.dataset.name for d in runs[0].inputs.dataset_inputs) == ["labeled_train", "labeled_validation"]


def test_a_finished_variant_alone_is_an_unfinished_run_and_refuses_another_configuration(tmp_path: Path):
    from lmpipe.checkpoints import claim_checkpoint_dir, load_finished, save_finished
    from lmpipe.errors import ConfigError

    old = claim_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.001}}, "finetune")
    save_finished(old, "classifier", lambda out: (out / "model.safetensors").write_bytes(b"weights"), {"metrics": {}})
    with pytest.raises(ConfigError, match=r"unfinished finetune run .*finetune\.learning_rate 0\.001 -> 0\.002"):
        claim_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.002}}, "finetune")
    assert load_finished(old, "classifier").record == {"metrics": {}}
    # the same configuration claims it again and finds the finished variant
    assert claim_checkpoint_dir(tmp_path, {"finetune": {"learning_rate": 0.001}}, "finetune") == old


def test_other_configuration_refuses_an_unfinished_checkpoint(workdir: Path):
    prepare_workdir(workdir, lambda r: r["pretrain"].update(max_steps=400, checkpoint_every=40, eval_every=200,
                                                      log_every=20))
    ckpts = workdir / "checkpoints" / "pretrain"
    step = kill_after("pretrain", workdir, ckpts, past=0)

    res = run_module("stages.pretrain", workdir, "--set", "pretrain.learning_rate=0.001", process=True)
    assert res.returncode == 2, res.stderr
    line = [ln for ln in res.stderr.splitlines() if "error:" in ln][-1]
    assert line.startswith("pretrain: error: ") and "another configuration" in line, line
    assert "pretrain.learning_rate 0.002 -> 0.001" in line, line
    assert step in checkpoint_steps(ckpts), "the refused run must leave the unfinished checkpoint alone"

    # cadence settings are not part of the configuration: the same run resumes with them changed
    res = run_module("stages.pretrain", workdir, "--set", "pretrain.eval_every=100", process=True)
    assert res.returncode == 0, res.stderr
    got = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert got["steps"] == 400
    run = next(r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.info.run_id == got["mlflow_run_id"])
    assert run.data.tags["pretrain.resumed_from"].endswith(f"checkpoint-{step}")


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_fails_the_checkpoint_in_one_line_and_keeps_the_previous(workdir: Path, tmp_path: Path):
    disk = tmp_path / "small-disk"
    if not _mount_tmpfs(disk, "16m"):
        pytest.skip("needs permission to mount a tmpfs (root) to make a real full disk")
    try:
        prepare_workdir(workdir, lambda r: r["pretrain"].update(max_steps=400, checkpoint_every=40, eval_every=200,
                                                          log_every=20, checkpoint_dir=str(disk / "ckpt")))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        with open(tmp_path / "stderr.txt", "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=workdir, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
            deadline = time.time() + 300
            while not checkpoint_steps(disk) and time.time() < deadline:
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-2000:]
                time.sleep(0.02)
            first = checkpoint_steps(disk)[0]
            # the disk fills up before the next checkpoint
            with open(disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass
            rc = proc.wait(timeout=300)
        assert rc != 0
        stderr = (tmp_path / "stderr.txt").read_text()
        line = stderr.strip().splitlines()[-1]  # splitlines also ends a progress bar's \r line
        assert line.startswith("pretrain: error: ") and "cannot write checkpoint (No space left on device)" in line, \
            stderr[-3000:]
        assert f"checkpoint-{first} is intact" in line, line
        assert "Traceback" not in stderr
        assert checkpoint_steps(disk) == [first]
        assert [p.name for p in disk.rglob("checkpoint-*")] == [f"checkpoint-{first}"], "no partial checkpoint left"

        # with space again, the re-run resumes from the kept checkpoint and finishes
        (disk / "filler").unlink()
        res = run_module("stages.pretrain", workdir, process=True)
        assert res.returncode == 0, res.stderr
        assert json.loads((workdir / "metrics" / "pretrain.json").read_text())["steps"] == 400
        runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"])
                if r.data.tags.get("lmpipe.stage") == "pretrain"]
        assert len(runs) == 1 and runs[0].data.tags["pretrain.resumed_from"].endswith(f"checkpoint-{first}")
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
