"""dvc.yaml's stage definitions: every stage depends on all the library code it runs.

Each stage lists the lmpipe modules it reaches (rather than the whole package), so an edit to the
serving code does not re-run pretraining, and an edit to code a stage runs always does."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def _imports(path: Path) -> set[str]:
    """lmpipe modules named by any import statement in the file, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmpipe":
            if node.module == "lmpipe":
                found.update(f"lmpipe.{a.name}" for a in node.names if (ROOT / "lmpipe" / f"{a.name}.py").is_file())
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lmpipe")
    return found


def source(mod: str) -> str:
    """A module's file relative to the repo: lmpipe/x.py, or lmpipe/x/__init__.py for a package."""
    path = mod.replace(".", "/")
    return f"{path}/__init__.py" if (ROOT / path).is_dir() else f"{path}.py"


def reached_modules(stage: str) -> set[str]:
    """Transitive closure over the source, plus what importing the stage module actually loads."""
    todo, seen = [ROOT / "stages" / f"{stage}.py"], set()
    while todo:
        for mod in _imports(todo.pop()):
            if mod not in seen and mod != "lmpipe":
                seen.add(mod)
                todo.append(ROOT / source(mod))
    loaded = subprocess.run([sys.executable, "-c", f"import json, sys, stages.{stage}; print(json.dumps("
                             "sorted(m for m in sys.modules if m.startswith('lmpipe.'))))"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return seen | set(json.loads(loaded))


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_all_library_code_it_runs(stage):
    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"])
    needed = {source(m) for m in reached_modules(stage)} | {f"stages/{stage}.py"}
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml: stage {stage} runs {missing} but does not depend on it"
    stale = sorted(d for d in deps if d.startswith("lmpipe/") and d not in needed)
    assert not stale, f"dvc.yaml: stage {stage} depends on {stale}, which it never runs"


def test_the_vocabulary_names_dvc_yamls_stages_in_order():
    from lmpipe import names

    assert list(names.STAGES) == STAGES
