"""pretrain.nproc_per_node=2 runs the stage under torchrun (DDP, gloo on CPU)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from helpers import copy_for_reference, mlflow_runs, prepare_workdir, run_module


def _curve(path: Path) -> dict[int, float]:
    with open(path) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r["split"] == "train"}


def test_ddp_two_processes_match_single_process_on_same_global_batch(workdir: Path, tmp_path: Path):
    prepare_workdir(workdir, lambda r: r["pretrain"].update(max_steps=40, batch_size=8, eval_every=20, log_every=5,
                                                      checkpoint_every=20, learning_rate=0.003))
    ref = copy_for_reference(workdir, tmp_path / "ref")
    single = run_module("stages.pretrain", ref, env={"MLFLOW_TRACKING_URI": f"sqlite:///{ref / 'mlflow.db'}"}, process=True)
    assert single.returncode == 0, single.stderr

    # 2 processes x 4 blocks = the same global batch of 8
    ddp = run_module("stages.pretrain", workdir, "--set", "pretrain.nproc_per_node=2", "--set", "pretrain.batch_size=4", process=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "torch.distributed.run" in ddp.stdout and "--nproc_per_node=2" in ddp.stdout

    a = json.loads((ref / "metrics" / "pretrain.json").read_text())
    b = json.loads((workdir / "metrics" / "pretrain.json").read_text())
    assert a["steps"] == b["steps"] == 40
    # the shards see other block orders than the single process, so curves agree within a tolerance
    assert abs(a["val_loss"] - b["val_loss"]) / a["val_loss"] < 0.03, (a["val_loss"], b["val_loss"])
    ca, cb = _curve(ref / "plots" / "pretrain_loss.csv"), _curve(workdir / "plots" / "pretrain_loss.csv")
    assert ca.keys() == cb.keys()
    for step in ca:
        assert abs(ca[step] - cb[step]) / ca[step] < 0.05, (step, ca[step], cb[step])

    # only rank 0 logs: one MLflow run, tagged with the world size
    runs = [r for r in mlflow_runs(os.environ["MLFLOW_TRACKING_URI"]) if r.data.tags.get("lmpipe.stage") == "pretrain"]
    assert len(runs) == 1 and runs[0].data.tags["pretrain.world_size"] == "2"
    assert runs[0].info.status == "FINISHED"
    # only rank 0 samples: one row per prompt and evaluation (steps 20, 40) in the run's table
    import mlflow

    from lmpipe.samples import logged_table

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    table = logged_table(runs[0].info.run_id)
    prompts = json.loads((workdir / "metrics" / "pretrain_samples.json").read_text())["samples"]
    assert table["step"].tolist() == [20] * len(prompts) + [40] * len(prompts) and len(prompts) == 2



def test_fsdp_on_a_cpu_is_refused_in_one_line_before_any_process_starts(workdir: Path):
    """Trainer/Accelerate shard only on CUDA devices: on two CPU processes `pretrain.fsdp` ran plain DDP (measured:
    Trainer.is_fsdp_enabled stayed False), so the stage refuses it rather than train something else."""
    prepare_workdir(workdir, lambda r: r["pretrain"].update(sample_prompts=[]))
    res = run_module("stages.pretrain", workdir, "--set", "pretrain.nproc_per_node=2",
                     "--set", "pretrain.fsdp=full_shard auto_wrap", env={"LMPIPE_DEVICE": "cpu"})
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "pretrain: error: pretrain.fsdp: 'full_shard auto_wrap' needs CUDA devices (Trainer/Accelerate shard on GPUs "
        "only); on a CPU set pretrain.fsdp='' (nproc_per_node > 1 runs DDP)"]
    assert "torch.distributed.run" not in res.stdout
