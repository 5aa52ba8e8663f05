"""The MLflow UI's run comparison, checked in a real browser (issue #8, item 10).

A temporary repo runs the pipeline twice, the second time as a DVC experiment that changes one param
(`dvc repro`, commit, `dvc exp run -S pretrain.learning_rate=...`). `mlflow ui` serves its
`mlflow.db` on a free loopback port, and headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) opens the experiment, ticks the two `pipeline` summary runs in the runs table,
clicks *Compare*, and reads the changed param and both runs' accuracy off the compare page, formatted
as the UI formats metrics. The screenshot is saved in the test's tmp dir and its path printed.

A sweep (issue #10: "the MLflow parent run of a sweep shows the trials sorted by the objective") runs
three grid trials through `lmpipe sweep`; in the runs table Chromium expands the `sweep tiny` run to find
its three `pipeline` trials, sorts by `objective` with the Sort dropdown, filters on the sweep's run id
with the search box, and reads the rows' order and values, descending and then ascending.

Chromium is installed with apt when it is missing (CI runs as root). The tests skip only when that
cannot be done. The repos, the `mlflow ui` server and the browser steps are in helpers.py, where
`docs/screenshots.py` reuses them to regenerate the PNGs in docs/.
"""

from __future__ import annotations

import pytest

from helpers import (NEW_VALUE, PARAM, SWEEP, chrome, compare_in_ui, ensure_chromium, format_metric, js_number,
                     mlflow_ui, summary_runs, sweep_runs, sweep_sorted_in_ui, swept, tiny_params, two_executions)


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


def test_js_number_matches_javascript():
    """Number#toString's output (node) for the values a runs-table metric cell can show."""
    cases = {0.0: "0", 1.0: "1", 0.722605: "0.722605", 0.7226052284240723: "0.7226052284240723",
             1 / 3: "0.3333333333333333", 0.1 + 0.2: "0.30000000000000004", 1e-05: "0.00001", 1.5e-07: "1.5e-7",
             -0.25: "-0.25", 282.5213: "282.5213", 1e21: "1e+21", 123456789012.5: "123456789012.5"}
    assert {v: js_number(v) for v in cases} == cases


@pytest.mark.slow
def test_mlflow_ui_sorts_a_sweeps_trials_by_objective_in_chromium(tmp_path):
    chromium, chromedriver = ensure_chromium()  # first: skip before minutes of sweep
    repo = swept(tmp_path)
    parent, trials = sweep_runs(repo)

    with mlflow_ui(repo, tmp_path / "mlflow-ui.log") as base, \
            chrome(chromium, chromedriver, tmp_path / "chromedriver.log") as driver:
        result = sweep_sorted_in_ui(driver, base, parent.info.experiment_id, parent, trials, tmp_path)
    print(f"\nMLflow sweep trials sorted by objective, screenshot: {result['screenshot']}")
    for run_id, _, objective, trial, lr in result["rows"]:
        print(f"  trial {trial}  learning_rate {lr}  objective ({SWEEP['objective']}) {objective}  run {run_id}")
    assert result["screenshot"].stat().st_size > 10_000
