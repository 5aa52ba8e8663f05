"""pytest hooks and shared fixtures: tiny data written inside each test, hermetic MLflow stores. The plain helpers
(tiny data and params, subprocess and repo helpers, ...) are in helpers.py, which tests import instead of this file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from helpers import tiny_params, write_tiny_data

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
