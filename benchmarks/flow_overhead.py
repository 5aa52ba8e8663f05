"""Prefect flow overhead with every stage cached: flow wall time minus the stages' own time.

    .venv/bin/python benchmarks/flow_overhead.py

Builds a temporary git + DVC repo from the project's tracked files with the smoke profile, runs the
flow once to fill the cache, then times a second run in which DVC skips every stage. Prints a table
and, last, one JSON line. Target: overhead <= 10 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file() and not rel.startswith("tests/"):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    import yaml

    from lmpipe import datasource
    from lmpipe.params import load_raw, merge

    raw = merge(load_raw(dest / "params.yaml"), dest / "profiles" / "smoke.yaml")
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    datasource.link(dest, datasource.data_dir(ROOT))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True)
    return dest


def main() -> None:
    os.environ.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="bench",
                      GIT_COMMITTER_EMAIL="b@b", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    with tempfile.TemporaryDirectory() as tmp, prefect_test_harness(server_startup_timeout=120):
        repo = build_repo(Path(tmp) / "repo")
        t0 = time.perf_counter()
        pipeline(workspace=str(repo))
        fill = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = pipeline(workspace=str(repo))
        wall = time.perf_counter() - t0
    stage_s = sum(r["seconds"] for r in res["stages"])
    assert all(r["cached"] for r in res["stages"]), res["stages"]
    print(f"{'first run (fills cache)':<28}{fill:8.1f} s")
    print(f"{'cached run, flow wall':<28}{wall:8.1f} s")
    print(f"{'  of which stages (dvc)':<28}{stage_s:8.1f} s")
    print(f"{'  flow overhead':<28}{wall - stage_s:8.1f} s   (target <= 10 s)")
    print(json.dumps({"flow_wall_s": round(wall, 2), "stages_s": round(stage_s, 2),
                      "overhead_s": round(wall - stage_s, 2), "first_run_s": round(fill, 2)}))


if __name__ == "__main__":
    main()
