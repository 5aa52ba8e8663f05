"""Drift monitoring: the reference profile and PSI (lmpipe.monitoring), and live PSI over real HTTP (GET /drift,
the lmpipe_drift_psi gauges, `lmpipe monitor`) rising on shifted traffic and staying low on in-distribution texts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import requests
import yaml

from helpers import NEG, POS, ROOT, SHARED_DATA, Server, free_port, run_module, tiny_classifier
from lmpipe import monitoring

TOKEN = "drift-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# in-distribution traffic: the training sentences and their combinations (84 texts)
TEXTS = POS + NEG + [f"{p} , {n}" for p in POS for n in NEG] + [f"{n} but {p}" for p in POS for n in NEG]


def test_psi_is_zero_for_the_same_shares_and_large_for_a_shift():
    same = monitoring.shares([10, 20, 30])
    assert monitoring.psi(same, same) == 0
    assert monitoring.psi(monitoring.shares([50, 40, 10, 0]), monitoring.shares([0, 5, 15, 80])) > 1
    assert 0 < monitoring.psi(monitoring.shares([50, 50]), monitoring.shares([55, 45])) < 0.1
    with pytest.raises(ValueError, match="3 reference bins vs 2 live bins"):
        monitoring.psi([0.2, 0.3, 0.5], [0.5, 0.5])


def test_bins_and_oov_rate():
    assert [monitoring.bin_index(v, monitoring.TOKEN_EDGES) for v in (0, 7, 8, 40, 10_000)] == [0, 0, 1, 3, 7]
    assert monitoring.bin_index(-1, monitoring.OOV_EDGES) == 0
    assert monitoring.oov_rate("A gem, a GEM of a zork!", frozenset({"a", "gem", "of"})) == pytest.approx(1 / 7)
    assert monitoring.oov_rate("... !", frozenset()) == 0.0


def test_reference_profile_counts_every_text_in_each_feature():
    texts = ["a good film", "a bad film", "zork zork"]
    prof = monitoring.reference_profile(texts, ["pos", "neg", "pos"], [0.9, 0.55, 0.99], [5, 5, 300],
                                        monitoring.vocabulary(["a good film", "a bad film"]), label_names=["neg", "pos"])
    assert monitoring.check_profile(json.loads(json.dumps(prof)), "p") == prof
    f = prof["features"]
    assert f["label"]["counts"] == [1, 2] and f["label"]["bins"] == ["neg", "pos"]
    assert f["input_tokens"]["counts"][monitoring.bin_index(300, monitoring.TOKEN_EDGES)] == 1
    assert f["oov_rate"]["counts"][-1] == 1  # "zork zork": every word unseen
    for feat in f.values():
        assert sum(feat["counts"]) == 3 and sum(feat["shares"]) == pytest.approx(1)
    with pytest.raises(ValueError, match="label 'maybe' not in label_names"):
        monitoring.reference_profile(["x"], ["maybe"], [0.5], [3], [], label_names=["neg", "pos"])
    with pytest.raises(ValueError, match="not a drift reference"):
        monitoring.check_profile({"features": {}}, "model/drift_reference.json")


def _shakespeare(n: int, lines: int = 60) -> list[str]:
    """n long texts of another domain: runs of `lines` consecutive lines of tiny-shakespeare."""
    src = [l for l in (SHARED_DATA / "pretrain" / "tinyshakespeare" / "input.txt").read_text().splitlines() if l.strip()]
    return [" ".join(src[i * lines:(i + 1) * lines])[:9_000] for i in range(n)]


def _drift(srv: Server) -> dict:
    r = requests.get(f"{srv.url}/drift", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(srv: Server, done, what: str) -> dict:
    deadline = time.monotonic() + 60  # the window is filled by a monitor thread, after the responses
    while not done(report := _drift(srv)):
        assert time.monotonic() < deadline, f"{what}: {json.dumps(report)[:2000]}"
        time.sleep(0.2)
    return report


@pytest.fixture(scope="module")
def drift_server(tmp_path_factory):
    from lmpipe.package import HFClassifier

    tmp = tmp_path_factory.mktemp("drift")
    model_dir = tiny_classifier(tmp / "clf")
    clf = HFClassifier(model_dir)
    preds = clf.predict(TEXTS)
    ref = monitoring.reference_profile(TEXTS, [p["label"] for p in preds], [p["score"] for p in preds],
                                       monitoring.length_counter(clf.tokenizer)(TEXTS),
                                       monitoring.vocabulary(TEXTS), label_names=["negative", "positive"])
    (model_dir / monitoring.REFERENCE_FILE).write_text(json.dumps(ref))
    (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    with Server(tmp, "--model-uri", str(model_dir), "--set", f"serve.monitor.window={len(TEXTS)}",
                "--set", "serve.monitor.min_samples=40",
                env={"LMPIPE_API_TOKEN": TOKEN, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}) as srv:
        yield srv


def _send(srv: Server, texts: list[str]) -> None:
    for i in range(0, len(texts), 12):
        r = requests.post(f"{srv.url}/predict", json={"texts": texts[i:i + 12]}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text


def test_live_psi_stays_low_in_distribution_and_rises_on_shifted_texts(drift_server: Server, tmp_path: Path):
    srv = drift_server
    assert _drift(srv)["window"] == 0 and _drift(srv)["features"]["label"]["psi"] is None  # below min_samples

    # 1) the reference's own kind of traffic: every PSI near 0, no alert
    _send(srv, TEXTS)
    report = _wait(srv, lambda r: r["window"] == len(TEXTS), "window not filled")
    assert all(f["psi"] < 0.05 and not f["alert"] for f in report["features"].values()), report["features"]

    # 2) long texts of another domain fill the window: length and vocabulary PSI far above the alert level
    _send(srv, _shakespeare(len(TEXTS)))
    report = _wait(srv, lambda r: r["features"]["input_tokens"]["alert"] and r["features"]["oov_rate"]["alert"],
                   "no alert on shifted texts")
    for name in ("input_tokens", "oov_rate"):
        assert report["features"][name]["psi"] > report["psi_alert"] == 0.25
    metrics = requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=10).text
    gauge = next(l for l in metrics.splitlines() if l.startswith('lmpipe_drift_psi{feature="input_tokens"}'))
    assert float(gauge.split()[-1]) > 0.25
    assert "drift: input_tokens PSI" in srv.output()  # the warning line

    # 3) `lmpipe monitor` prints the report as a table
    res = run_module("lmpipe.cli", tmp_path, "monitor", "--url", srv.url, "--token", TOKEN)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines() if line.split()}
    assert "ALERT" in rows["input_tokens"] and "ALERT" in rows["oov_rate"], res.stdout
    assert f"window {len(TEXTS)} of {len(TEXTS)} texts" in res.stdout


@pytest.mark.parametrize("args,expected", [
    (["--url", "localhost:8000"], "--url localhost:8000: expected http(s)://HOST:PORT"),
    (["--url", "http://127.0.0.1:{port}"], "cannot reach the server"),
    (["--url", "{url}", "--token", "wrong"], "GET /drift answered 401 (pass --token or set LMPIPE_API_TOKEN)"),
])
def test_monitor_refuses_bad_input_in_one_line(drift_server: Server, tmp_path: Path, args, expected):
    args = [a.format(port=free_port(), url=drift_server.url) for a in args]
    res = run_module("lmpipe.cli", tmp_path, "monitor", *args, env={"LMPIPE_API_TOKEN": ""})
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1 and lines[0].startswith("lmpipe: error: "), res.stderr
    assert expected in lines[0], lines


def test_request_texts_never_reach_the_servers_logs_files_or_drift_report(drift_server: Server):
    """The drift window keeps features (label, confidence, length, OOV rate), not texts; nothing the server writes
    (its log, any file under its folder, /drift, /metrics) carries a request's text, refused requests included."""
    srv, marker = drift_server, "zqxv7marker"
    cwd = srv.cwd
    texts = [f"{marker} number {i} was a gem of a film" for i in range(12)]
    _send(srv, texts)
    for body in ({"texts": [marker * 100_000]}, {"texts": [marker, ""]}, {"text": marker}):  # 413/422: refused
        r = requests.post(f"{srv.url}/predict", json=body, headers=AUTH, timeout=60)
        assert r.status_code in (413, 422), r.text
        assert marker not in r.text  # the error names the field, not the text
    r = requests.post(f"{srv.url}/embed", json={"texts": texts[:2]}, headers=AUTH, timeout=60)
    assert r.status_code in (200, 409), r.text
    _wait(srv, lambda rep: rep["window"] >= 12, "window not filled")
    assert marker not in json.dumps(_drift(srv))
    assert marker not in requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=10).text
    files = [p for p in cwd.rglob("*") if p.is_file()]  # the server's folder: its output, the model, any store
    assert srv.log in files, files
    for path in files:
        assert marker.encode() not in path.read_bytes(), path
