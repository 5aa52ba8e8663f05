"""Regenerate the README's screenshots: docs/mlflow-compare.png, docs/dvc-plots-diff.png, docs/mlflow-sweep-sorted.png.

    .venv/bin/python docs/screenshots.py [--out docs] [--keep DIR] [--only compare|sweep] [--from-run CHECKOUT]
                                         [--sweep-run CHECKOUT]

With --from-run CHECKOUT (a checkout where `make run` ran), the compare and plots-diff pictures show that real run
against `dvc exp run -S finetune.learning_rate=0.001` of a copy of it, instead of the tiny repos below. With
--sweep-run CHECKOUT (a checkout where `make sweep` ran the shipped sweeps/finetune-lr-strategy.yaml), the sweep
picture shows that sweep's complete trials (read from its mlflow.db; nothing runs) instead of the tiny sweep.

Builds the same temporary repos as tests/test_mlflow_ui.py, with the same helpers (tests/helpers.py), then in
headless Chromium (Debian's chromium + chromium-driver, apt-installed when missing and root):

1. (compare) tiny data, `dvc repro`, commit, then `dvc exp run -S pretrain.learning_rate=0.01`; `mlflow ui`
   over the repo's mlflow.db: the test's own steps (tick the two pipeline runs, Compare, check param and
   accuracy), screenshot of the compare page;
2. (compare) `dvc plots diff HEAD -o dvc_plots` (HEAD = the committed baseline, workspace = the experiment),
   screenshot of dvc_plots/index.html. That page loads vega, vega-lite and vega-embed from a CDN;
   for an offline machine this script fetches the same versions with `npm pack` and points the page's
   <script> tags at them (the page is otherwise DVC's, unchanged);
3. (sweep) a second repo runs the test's three-trial grid sweep (`lmpipe sweep sweeps/tiny.yaml`); `mlflow ui`
   over it: the test's steps (expand `sweep tiny`, Sort: objective, filter on the sweep's run id, check the
   order both ways), screenshot of the trials best first.

The PNGs are cut down to a 256-colour palette (no dithering, text stays sharp) to keep the repo small.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pytest  # noqa: E402  (ensure_chromium skips through pytest)
import yaml  # noqa: E402

import helpers as ui  # noqa: E402  (tests/helpers.py)
from helpers import sh  # noqa: E402

FROM_RUN_PARAM, FROM_RUN_VALUE = "finetune.learning_rate", "0.001"  # params.yaml has 0.0005
CDN = re.compile(r'<script src="https://cdn\.jsdelivr\.net/npm/(vega(?:-lite|-embed)?)@([0-9.]+)"></script>')


def small_png(src: Path, dest: Path) -> None:
    from PIL import Image

    img = Image.open(src).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(dest, optimize=True)
    print(f"{dest}: {img.width}x{img.height}, {dest.stat().st_size // 1024} KiB")


def offline_vega(html: Path, work: Path) -> None:
    """Point dvc_plots/index.html's CDN <script> tags at the same packages fetched with `npm pack`."""
    text = html.read_text()
    libs = CDN.findall(text)
    assert libs, "no vega <script> tags in the page: dvc_render changed its template?"
    for name, version in libs:
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=work, check=True,
                       capture_output=True, timeout=300)
        with tarfile.open(work / f"{name}-{version}.tgz") as tar:
            member = tar.extractfile(f"package/build/{name}.min.js")
            (html.parent / f"{name}.min.js").write_bytes(member.read())
    html.write_text(CDN.sub(lambda m: f'<script src="{m.group(1)}.min.js"></script>', text))


def plots_diff_screenshot(driver, html: Path, shot: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.get(html.as_uri())
    n_vega = len(re.findall(r"vegaEmbed\(", html.read_text()))
    ui.browser_wait(driver).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".vega-embed svg, .vega-embed canvas")) >= n_vega,
        f"the {n_vega} vega plots did not render")
    time.sleep(0.5)
    driver.save_screenshot(str(shot))


def from_make_run(src: Path, work: Path, param: str, value: str) -> Path:
    """A copy of a checkout where `make run` ran (its outputs, dvc.lock, DVC cache and MLflow store; MLflow keeps
    writing artifacts where the source's store says), committed, then `dvc exp run -S param=value`: two executions of
    the default pipeline on the real data."""
    repo = work / "repo"
    if not (src / "dvc.lock").is_file() or not (src / "mlflow.db").is_file():
        raise SystemExit(f"screenshots: error: {src}: no dvc.lock and mlflow.db; run `make run` there first")
    shutil.copytree(src, repo, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".lmpipe", "checkpoints"))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "make run", "--allow-empty")
    sh(repo, "dvc", "exp", "run", "-S", f"{param}={value}", timeout=3600)
    return repo


def compare_and_plots(work: Path, out: Path, chromium: str, chromedriver: str, source: Path | None = None) -> None:
    param = ui.PARAM if source is None else FROM_RUN_PARAM
    repo = ui.two_executions(work) if source is None else from_make_run(source, work, param, FROM_RUN_VALUE)
    runs = ui.summary_runs(repo)
    import mlflow

    exp_id = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_experiment_by_name("lmpipe").experiment_id
    sh(repo, "dvc", "plots", "diff", "HEAD", "-o", "dvc_plots")
    html = repo / "dvc_plots" / "index.html"
    offline_vega(html, work)
    with ui.mlflow_ui(repo, work / "mlflow-ui.log") as base, \
            ui.chrome(chromium, chromedriver, work / "chromedriver.log") as driver:
        result = ui.compare_in_ui(driver, base, exp_id, runs, param, work)
        plots_diff_screenshot(driver, html, work / "dvc-plots-diff.png")
    small_png(result["screenshot"], out / "mlflow-compare.png")
    small_png(work / "dvc-plots-diff.png", out / "dvc-plots-diff.png")


def made_sweep(repo: Path) -> tuple:
    """(the newest sweep run, its complete trials, the sweep's direction, its varied params) of a checkout where
    `make sweep` ran: every figure the picture shows is that sweep's own."""
    runs = ui.mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}")
    sweeps = [r for r in runs if r.data.tags.get("lmpipe.kind") == "sweep"]
    if not sweeps:
        raise SystemExit(f"screenshots: error: {repo}: no sweep run in mlflow.db; run `make sweep` there first")
    parent = max(sweeps, key=lambda r: r.info.start_time)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
              and r.data.tags.get("optuna.state") == "COMPLETE"]
    spec = yaml.safe_load((repo / "sweeps" / f"{parent.info.run_name.removeprefix('sweep ')}.yaml").read_text())
    return parent, trials, spec["direction"], tuple(spec["space"])


def sweep_sorted(work: Path, out: Path, chromium: str, chromedriver: str, source: Path | None = None) -> None:
    if source is None:
        repo = ui.swept(work / "sweep")
        (parent, trials), direction, params = ui.sweep_runs(repo), ui.SWEEP["direction"], ("finetune.learning_rate",)
    else:
        repo = source
        parent, trials, direction, params = made_sweep(repo)
    import mlflow

    exp_id = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_experiment_by_name("lmpipe").experiment_id
    # 480 px high: three rows, no empty page below them; 40 px a further row
    with ui.mlflow_ui(repo, work / "mlflow-ui-sweep.log") as base, \
            ui.chrome(chromium, chromedriver, work / "chromedriver-sweep.log",
                      height=480 + 40 * max(0, len(trials) - 3)) as driver:
        result = ui.sweep_sorted_in_ui(driver, base, exp_id, parent, trials, work, direction, params)
    small_png(result["screenshot"], out / "mlflow-sweep-sorted.png")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--keep", type=Path, help="build the repos here and keep them (default: a temp dir, removed)")
    ap.add_argument("--only", choices=["compare", "sweep"], help="just the compare + plots-diff pair, or the sweep")
    ap.add_argument("--from-run", type=Path, help="a checkout where `make run` ran: the compare and plots-diff "
                    f"pictures show it against `dvc exp run -S {FROM_RUN_PARAM}={FROM_RUN_VALUE}` of it")
    ap.add_argument("--sweep-run", type=Path, help="a checkout where `make sweep` ran: the sweep picture shows "
                    "that sweep's complete trials")
    args = ap.parse_args()
    try:
        chromium, chromedriver = ui.ensure_chromium()
    except pytest.skip.Exception as exc:
        print(f"screenshots: error: {exc}", file=sys.stderr)
        return 1
    work = args.keep or Path(tempfile.mkdtemp(prefix="lmpipe-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "compare"):
            compare_and_plots(work, args.out, chromium, chromedriver, args.from_run)
        if args.only in (None, "sweep"):
            sweep_sorted(work, args.out, chromium, chromedriver, args.sweep_run)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
