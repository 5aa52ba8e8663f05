"""POST /generate: a causal LM behind `lmpipe serve`, the generator pyfunc and its registry version.

In process (FastAPI's TestClient on create_app, a tiny trained causal LM): the JSON and SSE answers, concurrent
requests batched into one generate call with each row's greedy text as if alone, the payload matrix (400/409/415/
422), chat messages, metrics. One real `lmpipe serve` process over HTTP: with and without streaming, and a client
that goes away stops its generation.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient

from helpers import ROOT, Server, endless_generator, section, tiny_classifier, tiny_generator

CHAT = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}")
PROMPTS = ["a moving", "the plot is", "a waste of time and", "wonderful", "funny , smart", "an absolute"]


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    return tiny_generator(tmp_path_factory.mktemp("gen") / "lm")


@pytest.fixture(scope="module")
def chat_dir(generator_dir: Path, tmp_path_factory) -> Path:
    """The same model, its tokenizer given a chat template."""
    from transformers import AutoTokenizer

    dest = tmp_path_factory.mktemp("chat") / "lm"
    shutil.copytree(generator_dir, dest)
    tok = AutoTokenizer.from_pretrained(dest, local_files_only=True)
    tok.chat_template = CHAT
    tok.save_pretrained(dest)
    return dest


def _app(model_dir: Path, **serve):
    from lmpipe.serving import reload
    from lmpipe.serving.app import create_app

    # after a call with company, a batch waits up to 300 ms for more, so requests sent together surely share a call;
    # an event per token, so a stream comes in many chunks
    return create_app(reload.load(str(model_dir)),
                      cfg=section("serve", **{"max_wait_ms": 300, "stream_interval_ms": 0, **serve}))


@pytest.fixture(scope="module")
def client(generator_dir: Path):
    with TestClient(_app(generator_dir)) as c:
        yield c


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text format (0 when absent)."""
    want = {k: str(v) for k, v in labels.items()}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m[1] == name and dict(re.findall(r'(\w+)="([^"]*)"', m[2] or "")) == want:
            return float(m[3])
    return 0.0


def events(body: str) -> list[tuple[str, dict]]:
    """Server-Sent Events -> [(event name, data)]: every event is `[event: NAME\\n]data: JSON\\n\\n`."""
    assert body.endswith("\n\n"), body[-200:]
    out = []
    for block in body[:-2].split("\n\n"):
        lines = block.split("\n")
        name = lines[0].removeprefix("event: ") if lines[0].startswith("event: ") else "message"
        data = lines[-1]
        assert data.startswith("data: ") and len(lines) == (2 if name != "message" else 1), block
        out.append((name, json.loads(data.removeprefix("data: "))))
    return out


def alone(model_dir: Path, prompt: str, **sampling):
    """The library's answer for one prompt on its own (lmpipe.generation.generate)."""
    from lmpipe.generation import Sampling, generate, load_generator

    model, tok = load_generator(model_dir)
    [out] = generate(model, tok, [prompt], Sampling(**sampling))
    return out


def test_json_and_sse_answers_carry_the_same_text_as_the_library(client: TestClient, generator_dir: Path):
    want = alone(generator_dir, "a moving", max_new_tokens=40, temperature=0)
    assert want.text.strip() and want.new_tokens < 40  # the tiny model ends its sentence: finish_reason eos
    r = client.post("/generate", json={"prompt": "a moving", "max_new_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["text"], got["prompt_tokens"], got["new_tokens"]) == (want.text, want.prompt_tokens, want.new_tokens)
    assert got["finish_reason"] == "eos" and 0 < got["time_to_first_token_s"] <= got["total_s"]
    assert got["kind"] == "generator" and got["version"] == "local"

    r = client.post("/generate", json={"prompt": "a moving", "max_new_tokens": 40, "temperature": 0, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    chunks, (last, done) = evs[:-1], evs[-1]
    assert len(chunks) > 3 and all(name == "message" and set(d) == {"text"} and d["text"] for name, d in chunks)
    assert "".join(d["text"] for _, d in chunks) == want.text
    assert last == "done" and set(done) == {"prompt_tokens", "new_tokens", "finish_reason", "time_to_first_token_s",
                                            "total_s"}
    assert (done["prompt_tokens"], done["new_tokens"], done["finish_reason"]) == (want.prompt_tokens,
                                                                                 want.new_tokens, "eos")

    r = client.post("/generate", json={"prompt": "a moving", "max_new_tokens": 3, "temperature": 0})
    assert r.json()["new_tokens"] == 3 and r.json()["finish_reason"] == "length"
    assert want.text.startswith(r.json()["text"])


def test_concurrent_requests_share_a_generate_call_and_each_gets_its_greedy_text(client: TestClient,
                                                                                   generator_dir: Path):
    limits = [40, 5, 40, 12, 2, 40]  # rows of one call stop at their own max_new_tokens
    want = [alone(generator_dir, p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, limits)]
    before = client.get("/metrics").text
    barrier = threading.Barrier(len(PROMPTS))

    def one(i: int):
        barrier.wait(timeout=30)
        return client.post("/generate", json={"prompt": PROMPTS[i], "max_new_tokens": limits[i], "temperature": 0,
                                              "stream": i % 2 == 1})

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(one, range(len(PROMPTS))))
    for i, (r, w) in enumerate(zip(responses, want)):
        assert r.status_code == 200, r.text
        if i % 2:
            evs = events(r.text)
            text, done = "".join(d["text"] for _, d in evs[:-1]), evs[-1][1]
        else:
            text, done = r.json()["text"], r.json()
        assert (text, done["new_tokens"]) == (w.text, w.new_tokens), PROMPTS[i]
    after = client.get("/metrics").text
    calls = metric(after, "lmpipe_batch_size_count") - metric(before, "lmpipe_batch_size_count")
    assert metric(after, "lmpipe_batch_size_sum") - metric(before, "lmpipe_batch_size_sum") == len(PROMPTS)
    assert 1 <= calls < len(PROMPTS), f"{len(PROMPTS)} requests ran in {calls} generate calls"
    new = sum(w.new_tokens for w in want)
    assert metric(after, "lmpipe_generated_tokens_total") - metric(before, "lmpipe_generated_tokens_total") == new
    assert (metric(after, "lmpipe_time_to_first_token_seconds_count")
            - metric(before, "lmpipe_time_to_first_token_seconds_count")) == len(PROMPTS)
    assert (metric(after, "lmpipe_time_per_output_token_seconds_count")
            - metric(before, "lmpipe_time_per_output_token_seconds_count")) == new - len(PROMPTS)
    ended = {f: metric(after, "lmpipe_generations_total", finish=f) - metric(before, "lmpipe_generations_total", finish=f)
             for f in ("eos", "length", "cancelled", "error")}
    assert ended == {"eos": sum(w.new_tokens < n for w, n in zip(want, limits)),
                     "length": sum(w.new_tokens == n for w, n in zip(want, limits)), "cancelled": 0, "error": 0}
    assert metric(after, "lmpipe_requests_total", route="/generate", status="200") >= len(PROMPTS)


def test_a_lone_request_waits_for_no_company_and_the_stream_interval_merges_its_steps(generator_dir: Path):
    want = alone(generator_dir, "a moving", max_new_tokens=40, temperature=0)
    with TestClient(_app(generator_dir, max_wait_ms=120_000, stream_interval_ms=120_000)) as c:
        r = c.post("/generate", json={"prompt": "a moving", "max_new_tokens": 40, "temperature": 0, "stream": True})
    evs = events(r.text)
    done = evs[-1][1]
    assert evs[-1][0] == "done" and done["new_tokens"] == want.new_tokens > 2
    assert done["total_s"] < 60  # no call ran before it: it did not wait max_wait_ms (two minutes) for company
    # its first text at once, the rest (well inside the two-minute interval) with its end
    assert [name for name, _ in evs] == ["message", "message", "done"]
    assert "".join(d["text"] for _, d in evs[:-1]) == want.text


def test_seeded_sampling_runs_alone_and_repeats(client: TestClient, generator_dir: Path):
    body = {"prompt": "the plot is", "max_new_tokens": 20, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 7}
    want = alone(generator_dir, "the plot is", max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, seed=7)
    with ThreadPoolExecutor(3) as pool:  # a greedy request sent beside it does not share its call
        answers = list(pool.map(lambda b: client.post("/generate", json=b).json(),
                                [body, {"prompt": "wonderful", "temperature": 0}, body]))
    assert answers[0]["text"] == answers[2]["text"] == want.text


NO_CHAT = "messages: the model has no chat template (no chat_template in its tokenizer_config.json): send a prompt instead of messages"
LONG = " ".join(["a moving and beautiful film"] * 40)


@pytest.mark.parametrize("send,status,detail", [
    (dict(json={"prompt": "a film", "max_new_tokens": 0}), 422,
     "max_new_tokens: Input should be greater than or equal to 1 (got 0)"),
    (dict(json={"prompt": "a film", "temperature": -0.5}), 422,
     "temperature: Input should be greater than or equal to 0 (got -0.5)"),
    (dict(json={"prompt": "a film", "top_p": 1.5}), 422, "top_p: Input should be less than or equal to 1 (got 1.5)"),
    (dict(json={"prompt": "a film", "max_new_tokens": 129}), 422, "max_new_tokens: 129, more than serve.max_new_tokens (128)"),
    (dict(json={"prompt": LONG}), 422, "tokens, more than serve.max_prompt_tokens (128)"),
    (dict(json={"prompt": "a film", "max_new_tokens": 60}), 422,
     "max_new_tokens: prompt of 6 tokens + max_new_tokens 60 exceed the model's 64 positions"),
    (dict(json={"prompt": "a" * 10_001}), 422, "prompt: longer than 10000 characters (serve.max_chars)"),
    (dict(json={"messages": [{"role": "user", "content": "hi"}]}), 422, NO_CHAT),
    (dict(json={"prompt": "a", "messages": []}), 422, "prompt: give a prompt or messages, not both"),
    (dict(json={}), 422, "prompt: field required (or messages)"),
    (dict(json={"prompt": 3}), 422, "prompt: expected a string"),
    (dict(json={"prompt": "a", "stream": "yes"}), 422, "stream: expected true or false"),
    (dict(json={"prompt": "a", "max_tokens": 5}), 422, "max_tokens: unknown field (expected prompt, messages, "),
    (dict(json=["a film"]), 422, 'body: expected a JSON object {"prompt": "..."} or {"messages": [...]}'),
    (dict(content=b'{"prompt": ', headers={"content-type": "application/json"}), 400, "body: not valid JSON"),
    (dict(content=b'{"prompt": "a"}', headers={"content-type": "text/plain"}), 415,
     "content-type: expected application/json (got text/plain)"),
])
def test_bad_generate_requests_get_one_line_naming_the_field(client: TestClient, send: dict, status: int, detail: str):
    r = client.post("/generate", **send)
    assert r.status_code == status and detail in r.json()["detail"], r.text
    assert "\n" not in r.json()["detail"]


def test_a_generator_refuses_predict_and_embed_naming_generate(client: TestClient):
    for route in ("/predict", "/embed"):
        r = client.post(route, json={"texts": ["a film"]})
        assert r.status_code == 409 and r.json()["detail"] == "the served model is a generator (a causal LM): use /generate"
    health = client.get("/health").json()
    assert health["kind"] == "generator" and health["status"] == "ok"


def test_a_classifier_refuses_generate_naming_predict(tmp_path: Path):
    with TestClient(_app(tiny_classifier(tmp_path / "clf"))) as c:
        r = c.post("/generate", json={"prompt": "a film"})
        assert r.status_code == 409, r.text
        assert r.json()["detail"] == "the served model is a classifier, it does not generate text: use /predict"
        assert c.get("/health").json()["kind"] == "classifier"
        assert c.post("/predict", json={"texts": ["a film"]}).status_code == 200


def test_messages_go_through_the_chat_template(chat_dir: Path):
    from lmpipe.generation import encode_messages, load_generator

    messages = [{"role": "user", "content": "a moving film ?"}]
    _, tok = load_generator(chat_dir)
    ids = encode_messages(tok, messages)
    assert tok.decode(ids) == "<s> user: a moving film ?</s><s> assistant:"  # byte-level BPE: a prefix space
    with TestClient(_app(chat_dir)) as c:
        r = c.post("/generate", json={"messages": messages, "max_new_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["prompt_tokens"] == len(ids), r.text
        r = c.post("/generate", json={"messages": [{"role": "user"}]})
        assert r.status_code == 422 and r.json()["detail"] == 'messages[0]: expected an object {"role": ..., "content": ...}'


def test_a_registered_generator_loads_through_the_reload_path_and_serves(tmp_path: Path, generator_dir: Path,
                                                                       monkeypatch):
    import mlflow
    import pandas as pd

    from lmpipe.registry import log_generator
    from lmpipe.serving import reload
    from lmpipe.serving.app import create_app
    from lmpipe.tracking import setup

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    setup(tmp_path, "generator-test")
    with mlflow.start_run() as run:
        version = log_generator(generator_dir, "tiny-lm", {"perplexity": 12.5}, mlflow.get_run(run.info.run_id))
    client = mlflow.MlflowClient(uri)
    client.set_registered_model_alias("tiny-lm", "champion", version)
    tags = client.get_model_version("tiny-lm", version).tags
    assert tags["kind"] == "generator" and tags["variant"] == "fp32" and tags["perplexity"] == "12.5"

    want = alone(generator_dir, "a moving", max_new_tokens=40, temperature=0)
    pyfunc = mlflow.pyfunc.load_model("models:/tiny-lm@champion")
    out = pyfunc.predict(pd.DataFrame({"prompt": ["a moving"]}), params={"max_new_tokens": 40, "temperature": 0.0})
    assert out.to_dict("records") == [{"text": want.text, "prompt_tokens": want.prompt_tokens,
                                       "new_tokens": want.new_tokens}]
    with pytest.raises(Exception, match="params.max_new_tokens: Input should be greater than or equal to 1"):
        pyfunc.predict(["a moving"], params={"max_new_tokens": 0})

    served = reload.load("models:/tiny-lm@champion", client)  # what `lmpipe serve` and hot reload call
    assert (served.kind, served.version) == ("generator", version)
    with TestClient(create_app(served, cfg=section("serve"), client=client)) as c:
        r = c.post("/generate", json={"prompt": "a moving", "max_new_tokens": 40, "temperature": 0})
        assert r.status_code == 200 and r.json()["text"] == want.text and r.json()["version"] == version, r.text


# ----------------------------------------------------------------- one real `lmpipe serve` process over HTTP


def test_served_over_http_streams_and_stops_when_the_client_goes_away(tmp_path: Path):
    model = endless_generator(tmp_path / "endless")  # greedy never ends early: a request runs to its limit
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "LMPIPE_API_TOKEN": ""}
    limit = 1800
    with Server(tmp_path, "--model-uri", str(model), "--set", f"serve.max_new_tokens={limit}", env=env) as srv:
        url = f"{srv.url}/generate"
        r = requests.post(url, json={"prompt": "a moving", "max_new_tokens": 8, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["new_tokens"] == 8 and r.json()["finish_reason"] == "length", r.text
        with requests.post(url, json={"prompt": "a moving", "max_new_tokens": 8, "temperature": 0, "stream": True},
                           stream=True, timeout=60) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            streamed = events(s.content.decode())
        assert "".join(d["text"] for _, d in streamed[:-1]) == r.json()["text"]
        assert streamed[-1] == ("done", {**streamed[-1][1], "new_tokens": 8, "finish_reason": "length"})

        def scrape() -> str:
            return requests.get(f"{srv.url}/metrics", timeout=10).text

        before = scrape()
        # a streaming client reads three events and hangs up; a plain one sends its request and hangs up
        with requests.post(url, json={"prompt": "a moving", "max_new_tokens": limit, "temperature": 0, "stream": True},
                           stream=True, timeout=60) as s:
            lines = s.iter_lines()
            assert [json.loads(next(line for line in lines if line)[6:]) for _ in range(3)]
        body = json.dumps({"prompt": "the plot", "max_new_tokens": limit, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
            raw.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while metric(after := scrape(), "lmpipe_generations_total", finish="cancelled") < 2:
            assert time.monotonic() < deadline, f"not cancelled:\n{srv.output()[-2000:]}"
            time.sleep(0.2)
        made = metric(after, "lmpipe_generated_tokens_total") - metric(before, "lmpipe_generated_tokens_total")
        assert 3 <= made < limit, f"{made} tokens generated for two requests cancelled early (limit {limit} each)"
        assert metric(after, "lmpipe_generations_total", finish="length") == 2  # only the two finished above
        time.sleep(1)  # nothing runs on after the cancel
        assert metric(scrape(), "lmpipe_generated_tokens_total") == metric(after, "lmpipe_generated_tokens_total")
