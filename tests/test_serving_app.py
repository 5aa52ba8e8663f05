"""The endpoint over real HTTP: `lmpipe serve` as a uvicorn process on loopback, a tiny classifier built here.

Micro-batching (fewer forward passes than requests), Prometheus metrics, bearer-token auth, bad payloads under
load, 503/504 timeouts, a slow client, hot reload of an alias; and the CLI's one-line errors. Each payload
limit on its own (400/413/415/422 naming the field): tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from helpers import NEG, POS, ROOT, Server, run_module, tiny_classifier

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("model") / "clf")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("serve")
    (wd / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return wd


def _env(wd: Path, **extra) -> dict:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{wd / 'mlflow.db'}", "LMPIPE_API_TOKEN": "", **extra}


@pytest.fixture(scope="module")
def server(model_dir: Path, workdir: Path):
    # a batch waits up to 200 ms for company, so requests sent together surely share one
    with Server(workdir, "--model-uri", str(model_dir), "--max-wait-ms", "200", "--set", "serve.max_body_bytes=65536",
                env=_env(workdir, LMPIPE_API_TOKEN=TOKEN)) as srv:
        yield srv


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text format (0 when absent)."""
    want = {k: str(v) for k, v in labels.items()}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', m[2] or "")) == want:
            return float(m[3])
    return 0.0


def _metrics(srv: Server) -> str:
    r = requests.get(f"{srv.url}/metrics", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    return r.text


def _predict(srv: Server, texts, headers=AUTH, **kw) -> requests.Response:
    return requests.post(f"{srv.url}/predict", json={"texts": texts}, headers=headers, timeout=30, **kw)


def test_concurrent_requests_share_forward_passes(server: Server, model_dir: Path):
    from lmpipe.package import HFClassifier

    texts = (POS + NEG) * 2  # 24 requests of one text each, sent at once
    expected = HFClassifier(model_dir).predict(texts)
    before = _metrics(server)
    barrier = threading.Barrier(len(texts))

    def one(text: str) -> requests.Response:
        barrier.wait(timeout=30)
        return _predict(server, [text])

    with ThreadPoolExecutor(len(texts)) as pool:
        responses = list(pool.map(one, texts))
    assert [r.status_code for r in responses] == [200] * len(texts), [r.text for r in responses if r.status_code != 200]
    for r, want in zip(responses, expected):  # batched with others, each text still gets its own answer
        got = r.json()["predictions"][0]
        assert got["label"] == want["label"] and got["score"] == pytest.approx(want["score"], abs=1e-5)

    after = _metrics(server)
    batches = metric(after, "lmpipe_batch_size_count") - metric(before, "lmpipe_batch_size_count")
    passes = metric(after, "lmpipe_forward_passes_total") - metric(before, "lmpipe_forward_passes_total")
    assert metric(after, "lmpipe_batch_size_sum") - metric(before, "lmpipe_batch_size_sum") == len(texts)
    assert 1 <= batches <= passes < len(texts), f"{len(texts)} requests: {batches} batches, {passes} forward passes"
    # the other series: requests by route and status, latency, labels, confidence, the model's identity
    assert metric(after, "lmpipe_requests_total", route="/predict", status="200") >= len(texts)
    assert metric(after, "lmpipe_request_latency_seconds_count", route="/predict") >= len(texts)
    by_label = sum(metric(after, "lmpipe_predictions_total", task="default", label=n)
                   - metric(before, "lmpipe_predictions_total", task="default", label=n)
                   for n in ("negative", "positive"))
    assert by_label == len(texts)
    assert metric(after, "lmpipe_prediction_confidence_count") - metric(before, "lmpipe_prediction_confidence_count") == len(texts)
    info = next(line for line in after.splitlines() if line.startswith("lmpipe_model_info{"))
    assert 'version="local"' in info and 'variant="fp32"' in info and f'model="{model_dir.name}"' in info, info


def test_token_guards_everything_but_health(server: Server):
    for method, path in (("post", "/predict"), ("get", "/metrics"), ("get", "/drift"), ("post", "/admin/reload")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = requests.request(method, f"{server.url}{path}", json={"texts": ["a film"]}, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
    health = requests.get(f"{server.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["version"] == "local"
    assert _predict(server, ["a film"]).status_code == 200
    assert requests.get(f"{server.url}/drift", headers=AUTH, timeout=10).json()["enabled"] is False  # no reference


def test_bad_payloads_under_load_get_4xx_never_5xx(server: Server):
    good = [{"json": {"texts": [t]}} for t in POS + NEG]
    bad = [{"data": b"{not json", "headers": {"content-type": "application/json"}}, {"json": {"texts": []}},
           {"data": b"x" * 70_000, "headers": {"content-type": "application/json"}},
           {"data": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}}, {"json": {"texts": [1]}}]
    sends = [bad[i % len(bad)] if i % 5 == 0 else good[i % len(good)] for i in range(240)]  # 20% bad

    def one(send: dict) -> int:
        with requests.Session() as s:
            return s.post(f"{server.url}/predict", timeout=30, **{**send, "headers": {**AUTH, **send.get("headers", {})}}).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, sends))
    assert codes.count(200) == sum(1 for s in sends if s in good)
    assert all(c == 200 or 400 <= c < 500 for c in codes), sorted(set(codes))
    text = _metrics(server)
    assert not [line for line in text.splitlines() if line.startswith("lmpipe_requests_total") and 'status="5' in line]


def test_a_slow_client_does_not_block_others(server: Server):
    body = json.dumps({"texts": ["a slow film"]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     + f"Authorization: Bearer {TOKEN}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body[:5])
        t0 = time.monotonic()
        assert _predict(server, ["a quick film"]).status_code == 200  # while the slow body is still coming
        assert time.monotonic() - t0 < 20
        slow.sendall(body[5:])
        assert b" 200 " in slow.recv(4096).split(b"\r\n")[0] + b" "


def test_timeouts_answer_503_and_504_then_the_server_recovers(model_dir: Path, workdir: Path):
    # inference may take 50 ms, a request may wait 300 ms for a batch slot: one heavy request (256 long texts,
    # seconds of tokenizing) gets 504, small ones queued behind it 503, and afterwards the server answers again
    heavy = {"texts": [("a moving film and a dull mess " * 300)[:9_000]] * 256}
    with Server(workdir, "--model-uri", str(model_dir), "--set", "serve.inference_timeout_s=0.05", "--set",
                "serve.request_timeout_s=0.3", "--set", "serve.max_body_bytes=4000000", env=_env(workdir)) as srv:
        with ThreadPoolExecutor(4) as pool:
            slow = pool.submit(requests.post, f"{srv.url}/predict", json=heavy, timeout=60)
            time.sleep(0.5)  # the heavy batch is running (its 504 may already be out)
            queued = [pool.submit(_predict, srv, [t], {}) for t in POS[:3]]
            r = slow.result()
            assert r.status_code == 504 and "serve.inference_timeout_s" in r.json()["detail"], r.text
            for f in queued:
                q = f.result()
                assert q.status_code == 503 and "serve.request_timeout_s" in q.json()["detail"], q.text
        deadline = time.monotonic() + 60
        while (r := _predict(srv, ["a film"], {})).status_code != 200:
            assert r.status_code in (503, 504) and time.monotonic() < deadline, r.text
            time.sleep(0.5)
        text = requests.get(f"{srv.url}/metrics", timeout=10).text  # no token set: open
        assert metric(text, "lmpipe_requests_total", route="/predict", status="504") >= 1
        assert metric(text, "lmpipe_requests_total", route="/predict", status="503") >= 3


def _register(model_dir: Path, name: str) -> str:
    import mlflow

    from lmpipe.package import ClassifierPyfunc

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=ClassifierPyfunc(), registered_model_name=name,
                                       artifacts={"model_dir": str(model_dir)}, pip_requirements=["mlflow"])
    return str(info.registered_model_version)


def test_hot_reload_follows_the_alias_without_dropping_requests(tmp_path: Path, workdir: Path, monkeypatch):
    import mlflow

    from lmpipe.tracking import setup

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup(tmp_path, "serving-test")
    v1 = _register(tiny_classifier(tmp_path / "v1"), "tiny-sst2")
    v2 = _register(tiny_classifier(tmp_path / "v2", flip=True), "tiny-sst2")  # same weights, labels swapped
    broken = tiny_classifier(tmp_path / "v3")
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    v3 = _register(broken, "tiny-sst2")  # a version that cannot load
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias("tiny-sst2", "champion", v1)
    client.set_model_version_tag("tiny-sst2", v2, "variant", "fp32-flipped")

    with Server(workdir, "--model-uri", "models:/tiny-sst2@champion", "--reload-interval", "1",
                env=_env(workdir, MLFLOW_TRACKING_URI=uri, LMPIPE_API_TOKEN=TOKEN)) as srv:
        assert requests.get(f"{srv.url}/health", timeout=10).json()["version"] == v1
        first = _predict(srv, [POS[0]]).json()["predictions"][0]["label"]
        stop, codes = threading.Event(), []

        def traffic() -> None:  # requests in flight all through the swap
            with requests.Session() as s:
                while not stop.is_set():
                    codes.append(s.post(f"{srv.url}/predict", json={"texts": [POS[1], NEG[1]]}, headers=AUTH,
                                        timeout=30).status_code)

        background = threading.Thread(target=traffic)
        background.start()
        try:
            client.set_registered_model_alias("tiny-sst2", "champion", v2)
            deadline = time.monotonic() + 60
            while (health := requests.get(f"{srv.url}/health", timeout=10).json())["version"] != v2:
                assert time.monotonic() < deadline, f"still v{health['version']} 60 s after the alias moved"
                time.sleep(0.2)
        finally:
            stop.set()
            background.join(timeout=60)
        assert health["variant"] == "fp32-flipped"
        assert codes and set(codes) == {200}, sorted(set(codes))
        assert _predict(srv, [POS[0]]).json()["predictions"][0]["label"] == {"negative": "positive",
                                                                            "positive": "negative"}[first]
        # POST /admin/reload checks at once (the poller may have got there first: same version either way)
        client.set_registered_model_alias("tiny-sst2", "champion", v1)
        r = requests.post(f"{srv.url}/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["version"] == v1, r.text
        assert requests.get(f"{srv.url}/health", timeout=10).json()["version"] == v1
        text = _metrics(srv)
        assert metric(text, "lmpipe_model_reloads_total") >= 2
        assert f'version="{v1}"' in next(line for line in text.splitlines() if line.startswith("lmpipe_model_info{"))
        assert metric(text, "lmpipe_model_reload_failures_total") == 0
        # a version that fails to load: still v1, each failed load counted (the alert LmpipeReloadFailed reads it)
        client.set_registered_model_alias("tiny-sst2", "champion", v3)
        r = requests.post(f"{srv.url}/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 502, r.text
        failed = metric(_metrics(srv), "lmpipe_model_reload_failures_total")
        assert failed in (1, 2)  # this call's load, and the poller's if it got to v3 first
        time.sleep(2.5)  # the poller (every second) does not load a version that failed again
        assert requests.get(f"{srv.url}/health", timeout=10).json()["version"] == v1
        assert metric(_metrics(srv), "lmpipe_model_reload_failures_total") == failed


def test_a_model_logged_before_the_model_package_moved_still_loads(tmp_path: Path, model_dir: Path):
    """MLflow pickles the pyfunc's class by reference: versions logged before lmpipe/package.py name
    lmpipe.serving.ClassifierPyfunc, new ones lmpipe.package.ClassifierPyfunc; both load and serve."""
    import mlflow
    import pandas as pd

    from lmpipe.package import ClassifierPyfunc, HFClassifier, PyfuncPredictor, load_predictor

    texts = POS[:2] + NEG[:2]
    expected = HFClassifier(model_dir).predict(texts)
    new, old = tmp_path / "new", tmp_path / "old"
    mlflow.pyfunc.save_model(str(new), python_model=ClassifierPyfunc(), artifacts={"model_dir": str(model_dir)},
                             pip_requirements=["mlflow"])
    raw = (new / "python_model.pkl").read_bytes()
    assert b"lmpipe.package" in raw and b"ClassifierPyfunc" in raw  # by reference: module and name, no code
    # the old name has the same length, so the pickle stays valid byte for byte
    mlflow.pyfunc.save_model(str(old), python_model=ClassifierPyfunc(), artifacts={"model_dir": str(model_dir)},
                             pip_requirements=["mlflow"])
    (old / "python_model.pkl").write_bytes(raw.replace(b"lmpipe.package", b"lmpipe.serving"))
    for path in (new, old):
        got = mlflow.pyfunc.load_model(str(path)).predict(pd.DataFrame({"text": texts})).to_dict("records")
        assert [g["label"] for g in got] == [e["label"] for e in expected], path.name
        served = load_predictor(str(path))  # what `lmpipe serve` loads: the classifier, unwrapped
        assert not isinstance(served, PyfuncPredictor) and served.predict(texts) == expected, path.name


@pytest.mark.parametrize("args,env,expected", [
    (["--token-file", "{wd}/empty.txt"], {}, "--token-file {wd}/empty.txt: empty"),
    (["--token-file", "{wd}/missing.txt"], {}, "--token-file {wd}/missing.txt: cannot read"),
    (["--host", "0.0.0.0"], {}, "--host 0.0.0.0 is not loopback and no token is set"),
    (["--max-batch-size", "0"], {}, "--max-batch-size: Input should be greater than or equal to 1"),
])
def test_serve_refuses_bad_input_in_one_line(workdir: Path, model_dir: Path, args, env, expected):
    (workdir / "empty.txt").write_text("  \n")
    args = [a.format(wd=workdir) for a in args]
    res = run_module("lmpipe.cli", workdir, "serve", "--model-uri", str(model_dir), *args, env=_env(workdir, **env),
                     timeout=120)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmpipe: error: ") and expected.format(wd=workdir) in lines[0], res.stderr


def test_non_loopback_host_with_a_token_or_explicitly_open_is_allowed():
    from lmpipe.errors import LmpipeError
    from lmpipe.serving.auth import check_bind

    check_bind("0.0.0.0", "tok", False)
    check_bind("0.0.0.0", None, True)
    check_bind("::1", None, False)
    check_bind("localhost", None, False)
    with pytest.raises(LmpipeError):
        check_bind("10.0.0.5", None, False)
