"""The MLflow UI's run comparison, checked in a real browser (issue #8, item 10).

A temporary repo runs the pipeline twice, the second time as a DVC experiment that changes one param
(`dvc repro`, commit, `dvc exp run -S pretrain.learning_rate=...`). `mlflow ui` serves its
`mlflow.db` on a free loopback port, and headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) opens the experiment, ticks the two `pipeline` summary runs in the runs table,
clicks *Compare*, and reads the changed param and both runs' accuracy off the compare page, formatted
as the UI formats metrics. The screenshot is saved in the test's tmp dir and its path printed.

Chromium is installed with apt when it is missing (CI runs as root). The test skips only when that
cannot be done. `docs/screenshots.py` reuses these helpers to regenerate the PNGs in docs/.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import requests
import yaml

from conftest import clean_env, free_port, make_repo, mlflow_runs, sh, tiny_params, write_tiny_data

PARAM = "pretrain.learning_rate"  # the one param the two executions differ in
NEW_VALUE = "0.01"  # params.yaml (and tiny_params) have 0.002
WAIT_S = 120  # explicit waits: the UI shares 2 cores with whatever else runs


# ---------------------------------------------------------------------------------------------- setup


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver; apt-get installs them when missing (root only), else skip."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver are missing and cannot be installed here "
                    "(needs root and apt-get: apt-get install chromium chromium-driver)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    lock = ["-o", "DPkg::Lock::Timeout=600"]  # wait for another apt instead of failing
    for cmd in (["apt-get", *lock, "update", "-q"],
                ["apt-get", *lock, "install", "-y", "-q", "chromium", "chromium-driver"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        except subprocess.TimeoutExpired:
            pytest.skip(f"chromium could not be installed: {' '.join(cmd)} timed out")
        if res.returncode != 0:
            pytest.skip(f"chromium could not be installed: {' '.join(cmd)} exited {res.returncode}: "
                        f"{(res.stderr or res.stdout).strip()[-500:]}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("apt-get install chromium chromium-driver succeeded but the binaries are not on PATH")
    return found  # type: ignore[return-value]


def two_executions(base: Path) -> Path:
    """A repo with two pipeline executions: the committed baseline and an experiment changing PARAM."""
    data = write_tiny_data(base / "data")
    repo = base / "repo"
    repo.mkdir()
    make_repo(repo, tiny_params(), data)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline run")
    section, name = PARAM.split(".")
    assert str(yaml.safe_load((repo / "params.yaml").read_text())[section][name]) != NEW_VALUE
    sh(repo, "dvc", "exp", "run", "-S", f"{PARAM}={NEW_VALUE}")
    return repo


def summary_runs(repo: Path) -> list:
    runs = [r for r in mlflow_runs(f"sqlite:///{repo / 'mlflow.db'}") if r.data.tags.get("lmpipe.kind") == "summary"]
    assert len(runs) == 2 and {r.info.run_name for r in runs} == {"pipeline"}, runs
    return runs


def accuracy_key(run) -> str:
    """The summary's headline accuracy: plain `accuracy`, or `classifier.accuracy` before the rename."""
    return "accuracy" if "accuracy" in run.data.metrics else "classifier.accuracy"


def format_metric(value: float) -> str:
    """MLflow UI's Utils.formatMetric (server/js, used by the compare view), in Python."""
    def js_str(x: float) -> str:  # JS Number#toString for the values this can produce
        return str(int(x)) if x == int(x) else repr(x)

    def js_round(x: float) -> float:  # Math.round: halves go up
        return float(math.floor(x + 0.5))

    if value == 0:
        return "0"
    if abs(value) < 1e-3:  # toExponential(3): "1.235e-4"
        mantissa, exp = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exp):+d}"
    if abs(value) < 10:
        return js_str(js_round(value * 1000) / 1000)
    if abs(value) < 100:
        return js_str(js_round(value * 100) / 100)
    return js_str(js_round(value * 10) / 10)


@contextlib.contextmanager
def mlflow_ui(repo: Path, log: Path):
    """`mlflow ui` on a free loopback port over the repo's mlflow.db; yields the base URL."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{repo / 'mlflow.db'}",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"mlflow ui exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"mlflow ui did not answer in 240 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextlib.contextmanager
def chrome(chromium: str, chromedriver: str, log: Path, width: int = 1280, height: int = 800):
    """Headless Chromium with a width x height viewport."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=en-US",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)  # --no-sandbox: Chromium refuses its sandbox as root
    driver = webdriver.Chrome(service=Service(chromedriver, log_output=str(log)), options=opts)
    try:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        yield driver
    finally:
        driver.quit()


# ------------------------------------------------------------------------------------------- browser


def _wait(driver, timeout: float = WAIT_S):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))


def _pipeline_rows(driver) -> set[str]:
    """Run ids (ag-grid row-id) of the rows whose run-name link reads `pipeline`."""
    from selenium.webdriver.common.by import By

    ids = set()
    for link in driver.find_elements(By.CSS_SELECTOR, "div[role=row] a[href*='/runs/']"):
        if link.text.strip() == "pipeline":
            ids.add(link.find_element(By.XPATH, "ancestor::div[@role='row'][1]").get_attribute("row-id"))
    return ids


def _row_checkbox(driver, run_id: str):
    from selenium.webdriver.common.by import By

    # ag-grid draws its own box over the (transparent) input: Selenium calls it not displayed, clicks work
    boxes = driver.find_elements(By.CSS_SELECTOR, f"div[role=row][row-id='{run_id}'] input.ag-checkbox-input")
    return boxes[0] if boxes else None


# the compare page's metrics are two react-virtualized grids: names (links) and values, one row = one `top`
_METRIC_CELLS_JS = """
const key = arguments[0];
const grids = [...document.querySelectorAll('.ReactVirtualized__Grid')];
for (let i = 0; i + 1 < grids.length; i++) {
  for (const a of grids[i].querySelectorAll('a')) {
    if (a.textContent.trim() !== key) continue;
    const top = a.parentElement.style.top;
    const cells = [...grids[i + 1].querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
      .filter(c => c.style.top === top)
      .sort((x, y) => parseFloat(x.style.left) - parseFloat(y.style.left));
    return cells.map(c => c.textContent.trim());
  }
}
// not rendered yet (virtualized): scroll the values grids on and report nothing
for (const g of grids) if (getComputedStyle(g).overflowY === 'auto') g.scrollTop += 200;
return null;
"""


# if the metric's row is below the fold, scroll the page just enough to show it (and a bit of the next row)
_SHOW_METRIC_JS = """
const link = [...document.querySelectorAll('.ReactVirtualized__Grid a')].find(a => a.textContent.trim() === arguments[0]);
if (!link) return;
let box = link.parentElement;
let pane = box.parentElement;
while (pane && !(pane.scrollHeight > pane.clientHeight && /auto|scroll/.test(getComputedStyle(pane).overflowY))) pane = pane.parentElement;
const below = box.getBoundingClientRect().bottom + 30 - window.innerHeight;
if (pane && below > 0) pane.scrollTop += below;
"""


def compare_in_ui(driver, base: str, experiment_id: str, runs: list, param: str, shots: Path) -> dict:
    """Select the two summary runs in the runs table, click Compare, check param and accuracy; screenshot.

    Returns {"order": run ids as the compare page lays them out, "screenshot": path}.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    want = {r.info.run_id: r for r in runs}
    driver.get(f"{base}/#/experiments/{experiment_id}/runs")
    wait = _wait(driver)
    # 1) the runs table: both `pipeline` rows by name, tick their checkboxes
    found = wait.until(lambda d: (ids := _pipeline_rows(d)) >= set(want) and ids,
                       f"runs table never showed both pipeline runs {sorted(want)}")
    assert found == set(want), f"pipeline rows in the table {found} != summary runs {set(want)}"
    for run_id in want:
        box = wait.until(lambda d: _row_checkbox(d, run_id), f"no checkbox in the row of run {run_id}")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        wait.until(lambda d: (b := _row_checkbox(d, run_id)) and b.is_enabled() and b).click()
        wait.until(lambda d: _row_checkbox(d, run_id).is_selected(), f"run {run_id} did not get selected")
    driver.save_screenshot(str(shots / "mlflow-runs-selected.png"))
    # 2) Compare
    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Compare']"))).click()
    wait.until(lambda d: "/compare-runs?" in d.current_url, "Compare did not open the compare page")
    query = parse_qs(urlsplit(urlsplit(driver.current_url).fragment).query)
    order = json.loads(unquote(query["runs"][0]))
    assert set(order) == set(want), order
    wait.until(EC.visibility_of_element_located((By.XPATH, "//*[contains(normalize-space(), 'Comparing 2 Runs')]")))

    # 3) the changed param: its row in the Parameters table holds both values, in the page's run order
    switch = (By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']")
    table = "//button[@aria-label='Parameters - Show diff only']/following::table[1]"
    row = (By.XPATH, f"{table}//tr[th[normalize-space()='{param}']]")
    wait.until(EC.visibility_of_element_located(row))
    values = [td.text.strip() for td in driver.find_element(*row).find_elements(By.TAG_NAME, "td")]
    assert values == [want[i].data.params[param] for i in order], values
    # with "Show diff only" on, it is the only row left
    driver.find_element(*switch).click()
    wait.until(lambda d: d.find_element(*switch).get_attribute("aria-checked") == "true")
    shown = wait.until(lambda d: (names := [th.text.strip() for th in d.find_elements(By.XPATH, f"{table}//tr/th")])
                       and len(names) == 1 and names, "Show diff only left more than one param row")
    assert shown == [param], shown
    assert driver.find_element(*row).is_displayed()

    # 4) accuracy of both runs, as the UI formats it, in the same order
    key = accuracy_key(want[order[0]])
    assert all(accuracy_key(want[i]) == key for i in order)
    expected = [format_metric(want[i].data.metrics[key]) for i in order]
    cells = wait.until(lambda d: d.execute_script(_METRIC_CELLS_JS, key), f"metric {key} not on the compare page")
    assert cells == expected, f"{key}: page shows {cells}, MLflow API has {expected}"

    # 5) screenshot: assistant panel closed, plots folded, the run details / param / metrics on screen
    for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
            break
    with contextlib.suppress(Exception):
        driver.find_element(By.CSS_SELECTOR, "[aria-label='collapse Visualizations']").click()
    time.sleep(0.5)  # let the folding animation settle
    heading = driver.find_element(By.XPATH, "//*[normalize-space()='Comparing 2 Runs from 1 Experiment']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
    driver.execute_script(_SHOW_METRIC_JS, key)
    time.sleep(0.3)
    shot = shots / "mlflow-compare.png"
    driver.save_screenshot(str(shot))
    return {"order": order, "screenshot": shot, "metric": key, "expected": expected}


# ---------------------------------------------------------------------------------------------- test


@pytest.mark.slow
def test_mlflow_ui_compare_two_pipeline_runs_in_chromium(tmp_path):
    chromium, chromedriver = ensure_chromium()  # first: skip before two minutes of pipeline
    repo = two_executions(tmp_path)

    runs = summary_runs(repo)
    a, b = (r.data.params for r in runs)
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {PARAM}, "the executions differ in more than one param"
    section, name = PARAM.split(".")
    assert {a[PARAM], b[PARAM]} == {str(tiny_params()[section][name]), NEW_VALUE}

    import mlflow

    experiment_id = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_experiment_by_name("lmpipe").experiment_id
    with mlflow_ui(repo, tmp_path / "mlflow-ui.log") as base, \
            chrome(chromium, chromedriver, tmp_path / "chromedriver.log") as driver:
        result = compare_in_ui(driver, base, experiment_id, runs, PARAM, tmp_path)
    print(f"\nMLflow compare page screenshot: {result['screenshot']}\n"
          f"{result['metric']} {result['expected']} for runs {result['order']}")
    assert result["screenshot"].stat().st_size > 10_000


def test_format_metric_matches_the_mlflow_ui():
    """Values as the compare page showed them (MLflow 3.17): 3 decimals below 10, then 2, then 1."""
    cases = {0.0: "0", 0.5: "0.5", 1.0: "1", 1 / 3: "0.333", 5.64444: "5.644", 12.0: "12", 30.0: "30",
             282.5213: "282.5", 66.4449: "66.44", 0.000123456: "1.235e-4", -0.25: "-0.25", 0.7833333: "0.783"}
    assert {v: format_metric(v) for v in cases} == cases
