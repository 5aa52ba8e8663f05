"""The endpoint: FastAPI routes, payload limits, and `serve` (what `lmpipe serve` runs).

    lmpipe serve [--model-uri models:/lmpipe-sst2@champion] [--host 127.0.0.1] [--port 8000] [--token-file F]

| route               | auth  | answers                                                                     |
|---------------------|-------|-----------------------------------------------------------------------------|
| GET /health         | open  | status and the served model's uri, name, version, variant                  |
| POST /predict       | token | {"texts": [...], "task"?: NAME} -> {"predictions": [{label, score}, ...]}, micro-batched |
| POST /embed         | token | {"texts": [...]} -> {"embeddings": [[...], ...]} (L2-normalised), micro-batched |
| POST /generate      | token | {"prompt" or "messages", sampling, "stream"?} -> {text, counts, timings} or SSE; a generator only |
| GET /tasks          | token | the model's tasks, each with its labels; the default (first) task            |
| GET /metrics        | token | Prometheus text format (lmpipe.serving.metrics)                            |
| GET /drift          | token | PSI per feature of the live window vs the model's drift reference          |
| POST /admin/reload  | token | check the alias now; swap when it moved                                     |

/predict refuses, before any model work: no/wrong token 401, body over serve.max_body_bytes 413, a content
type other than application/json 415, invalid JSON 400, a wrong shape 422 naming the field; and ends every
request in bounded time (503 queue full / waited too long for a batch, 504 inference too slow). /generate
refuses the same way (409 when the served model is not a generator, 422 beyond serve.max_new_tokens or
serve.max_prompt_tokens); its batching is lmpipe.serving.generating.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import mlflow
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmpipe.config import Serve
from lmpipe.generation import Sampling, encode_messages, encode_prompt
from lmpipe.modeling import max_positions
from lmpipe.params import load_params, repo_root
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.serving import auth, reload
from lmpipe.serving.batching import Batcher, Refused
from lmpipe.serving.drift import DriftMonitor, load_reference
from lmpipe.serving.generating import Done, Generating, Job
from lmpipe.serving.metrics import Metrics, MetricsMiddleware

log = logging.getLogger("lmpipe.serving")
MONITOR_BACKLOG = 8  # batches waiting for the drift thread at most; beyond, batches are left out of the window


class PayloadError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 as soon as it is known to exceed `limit` bytes (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadError(413, f"body: {declared} bytes, more than serve.max_body_bytes ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(413, f"body: more than serve.max_body_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(body: bytes, shape: str) -> dict[str, Any]:
    """The body as a JSON object; PayloadError 400 (not JSON) or 422 (not an object: expected `shape`)."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(400, f"body: not valid JSON ({e})") from None
    except RecursionError:  # e.g. 100 KB of "[": nested deeper than the parser goes
        raise PayloadError(400, "body: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise PayloadError(422, f"body: expected a JSON object {shape}")
    return data


def parse_texts(body: bytes, max_texts: int, max_chars: int, fields: tuple[str, ...] = ("texts",)
                ) -> tuple[list[str], dict[str, Any]]:
    """{"texts": [...], <optional fields>} -> (the texts, the other fields given); PayloadError 400 (not JSON)
    or 422 (naming the field) otherwise."""
    data = parse_object(body, '{"texts": [...]}')
    extra = sorted(set(data) - set(fields))
    if extra:
        raise PayloadError(422, f"{extra[0]}: unknown field (expected {' and '.join(fields)})")
    texts = data.get("texts")
    if texts is None:
        raise PayloadError(422, "texts: field required")
    if not isinstance(texts, list):
        raise PayloadError(422, "texts: expected a list of strings")
    if not texts:
        raise PayloadError(422, "texts: empty list")
    if len(texts) > max_texts:
        raise PayloadError(422, f"texts: {len(texts)} texts, more than serve.max_texts ({max_texts})")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise PayloadError(422, f"texts[{i}]: expected a string")
        if not t.strip():
            raise PayloadError(422, f"texts[{i}]: empty text")
        if len(t) > max_chars:
            raise PayloadError(422, f"texts[{i}]: longer than {max_chars} characters (serve.max_chars)")
    return texts, {k: v for k, v in data.items() if k != "texts"}


def check_task(task: Any, known: dict[str, list[str]]) -> str | None:
    """The `task` field of /predict: None (the default task) or one of the model's task names; 422 otherwise."""
    if task is None:
        return None
    if not isinstance(task, str):
        raise PayloadError(422, "task: expected a string (a task name)")
    if task not in known:
        raise PayloadError(422, f"task: unknown task {task!r}; the model's tasks are {', '.join(known)}")
    return task


SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
GENERATE_FIELDS = ("prompt", "messages", *SAMPLING_FIELDS, "stream")
ROUTE_OF = {"classifier": "/predict", "encoder": "/embed", "generator": "/generate"}
"""The route each kind of served model answers on (reload.Served.kind)."""


@dataclass
class GenerateRequest:
    ids: list[int]
    """The prompt's token ids (lmpipe.generation.encode_prompt, or the chat template's for messages)."""
    sampling: Sampling
    stream: bool


def parse_generate(body: bytes, cfg: Serve, tokenizer, positions: int) -> GenerateRequest:
    """{"prompt": str | "messages": [{role, content}], sampling fields, "stream"?} -> the request, tokenized;
    PayloadError 400 or 422 (naming the field; the caps serve.max_new_tokens / max_prompt_tokens, and the model's
    `positions`) otherwise. max_new_tokens left out: lmpipe.generation.Sampling's default, capped."""
    data = parse_object(body, '{"prompt": "..."} or {"messages": [...]}')
    extra = sorted(set(data) - set(GENERATE_FIELDS))
    if extra:
        raise PayloadError(422, f"{extra[0]}: unknown field (expected {', '.join(GENERATE_FIELDS)})")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise PayloadError(422, "stream: expected true or false")
    try:
        sampling = Sampling.parse(**{k: data.get(k) for k in SAMPLING_FIELDS})
    except ConfigError as e:
        raise PayloadError(422, str(e)) from None
    if data.get("max_new_tokens") is None:
        sampling = sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, cfg.max_new_tokens)})
    elif sampling.max_new_tokens > cfg.max_new_tokens:
        raise PayloadError(422, f"max_new_tokens: {sampling.max_new_tokens}, more than serve.max_new_tokens "
                                f"({cfg.max_new_tokens})")
    field, ids = _prompt_ids(data, cfg.max_chars, tokenizer)
    if len(ids) > cfg.max_prompt_tokens:
        raise PayloadError(422, f"{field}: {len(ids)} tokens, more than serve.max_prompt_tokens "
                                f"({cfg.max_prompt_tokens})")
    if len(ids) + sampling.max_new_tokens > positions:
        raise PayloadError(422, f"max_new_tokens: {field} of {len(ids)} tokens + max_new_tokens "
                                f"{sampling.max_new_tokens} exceed the model's {positions} positions")
    return GenerateRequest(ids, sampling, stream)


def _prompt_ids(data: dict[str, Any], max_chars: int, tokenizer) -> tuple[str, list[int]]:
    """(the field the prompt came from, its token ids)."""
    prompt, messages = data.get("prompt"), data.get("messages")
    if prompt is not None and messages is not None:
        raise PayloadError(422, "prompt: give a prompt or messages, not both")
    if messages is None:
        if prompt is None:
            raise PayloadError(422, "prompt: field required (or messages)")
        if not isinstance(prompt, str):
            raise PayloadError(422, "prompt: expected a string")
        if len(prompt) > max_chars:
            raise PayloadError(422, f"prompt: longer than {max_chars} characters (serve.max_chars)")
        ids = encode_prompt(tokenizer, prompt)
        if not ids:
            raise PayloadError(422, "prompt: empty, and the model has no BOS token to start from")
        return "prompt", ids
    if not isinstance(messages, list) or not messages:
        raise PayloadError(422, 'messages: expected a non-empty list of {"role": ..., "content": ...} objects')
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise PayloadError(422, f'messages[{i}]: expected an object {{"role": ..., "content": ...}}')
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise PayloadError(422, f"messages[{i}].{key}: expected a string")
        if len(message["content"]) > max_chars:
            raise PayloadError(422, f"messages[{i}].content: longer than {max_chars} characters (serve.max_chars)")
    try:
        return "messages", encode_messages(tokenizer, messages)
    except ConfigError as e:
        raise PayloadError(422, f"messages: {e}") from None
    except TemplateError as e:  # the template's own raise_exception(...), e.g. roles that do not alternate
        raise PayloadError(422, f"messages: the model's chat template refused them ({e})") from None


async def wait_disconnect(request: Request, on_gone) -> None:
    """Call `on_gone()` when the client closes the connection: once the body is read, receive() answers
    http.disconnect then (uvicorn; the test client when the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    on_gone()


def sse(event: str | None, data: dict[str, Any]) -> str:
    """One Server-Sent Event (a message when `event` is None)."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data)}\n\n"


def create_app(model, model_uri: str | None = None, cfg: Serve | None = None, token: str | None = None,
               client=None) -> FastAPI:
    """The app around `model` (a reload.Served, or any predictor with .predict(texts, batch_size)); `cfg`
    defaults to params.yaml's serve section, `token` None = open (auth.py)."""
    if cfg is None:
        cfg = load_params(repo_root() / "params.yaml").serve
    served = model if isinstance(model, reload.Served) else reload.Served(model, model_uri or "", model_uri or "",
                                                                            "local", "fp32")
    metrics = Metrics()
    monitor_pool = ThreadPoolExecutor(1, thread_name_prefix="lmpipe-drift")
    backlog = threading.BoundedSemaphore(MONITOR_BACKLOG)

    def prepare(new: reload.Served) -> None:
        """Before a model is swapped in: its drift monitor (if it ships a reference) and the Info metric."""
        new.extra["tasks"] = new.predictor.tasks()
        reference = load_reference(new.model_dir)
        new.extra["drift"] = (DriftMonitor(reference, cfg.monitor, new.predictor.tokenizer, metrics.drift_psi)
                              if reference else None)
        metrics.model.info(new.info())
        if new is not served:
            metrics.reloads.inc()

    def run(queries: list[tuple[str, str | None, str]]) -> list[Any]:
        """One batch on the inference thread, on whichever model is current now. Queries are (text, task, kind):
        predictions of every task come from one call (the encoder is shared), embeddings from another; each
        call runs its texts in length-sorted forward passes of forward_batch_size texts (token lengths:
        lmpipe.evaluation.length_batches), so each pads little; answers in the queries' order."""
        current = holder.current
        out: list[Any] = [None] * len(queries)
        for kind in ("predict", "embed"):
            idx = [i for i, q in enumerate(queries) if q[2] == kind]
            if not idx:
                continue
            texts = [queries[i][0] for i in idx]
            if kind == "predict":
                answers = current.predictor.predict(texts, batch_size=cfg.forward_batch_size,
                                                    tasks=[queries[i][1] for i in idx])
            else:
                answers = current.predictor.embed(texts, batch_size=cfg.forward_batch_size)
            for i, answer in zip(idx, answers):
                out[i] = answer
            metrics.forward_passes.inc(-(-len(texts) // cfg.forward_batch_size))
        predicted = [i for i, q in enumerate(queries) if q[2] == "predict"]
        if predicted:
            default = next(iter(current.extra["tasks"]))
            metrics.observe_predictions([out[i] for i in predicted], [queries[i][1] or default for i in predicted])
            # the drift reference describes the default task's predictions: only those join the window
            own = [i for i in predicted if (queries[i][1] or default) == default]
            drift = current.extra.get("drift")
            if own and drift is not None and backlog.acquire(blocking=False):
                monitor_pool.submit(drift.observe, [queries[i][0] for i in own], [out[i] for i in own]
                                    ).add_done_callback(lambda f: backlog.release())
        return out

    prepare(served)
    holder = reload.Holder(served, client, cfg.reload_interval_s, prepare, on_failure=metrics.reload_failures.inc)
    batcher = Batcher(run, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue, cfg.request_timeout_s,
                      cfg.inference_timeout_s, on_batch=metrics.batch_size.observe, on_queue=metrics.queue_texts.set)
    generating = Generating(cfg.max_batch_size, cfg.max_wait_ms, cfg.stream_interval_ms, cfg.max_queue,
                            cfg.request_timeout_s, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # process-wide; the inference thread is the only torch user
        await batcher.start()
        await generating.start()
        holder.start()
        yield
        holder.stop()
        await generating.stop()
        await batcher.stop()
        monitor_pool.shutdown(wait=False, cancel_futures=True)

    # no /docs, /redoc, /openapi.json: with a token set, /health is the only open route (README)
    app = FastAPI(title="lmpipe", version="2", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.holder, app.state.metrics = holder, metrics

    def require_token(request: Request) -> None:
        if not auth.authorized(request.headers.get("authorization"), token):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **holder.current.info()}

    async def answer(request: Request, kind: str) -> Response:
        require_token(request)
        try:
            if holder.current.kind == "generator":
                raise PayloadError(409, "the served model is a generator (a causal LM): use /generate")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise PayloadError(415, f"content-type: expected application/json (got {ctype or 'none'})")
            fields = ("texts", "task") if kind == "predict" else ("texts",)
            texts, extra = parse_texts(await read_body(request, cfg.max_body_bytes), cfg.max_texts, cfg.max_chars,
                                       fields)
            current = holder.current
            task = check_task(extra.get("task"), current.extra["tasks"]) if kind == "predict" else None
            if kind == "predict" and not current.extra["tasks"]:
                raise PayloadError(409, "the served model is an encoder without a classifier head: use /embed")
            if kind == "embed" and (why := embed_unsupported(current.predictor)):
                raise PayloadError(409, why)
            results = await batcher.submit([(t, task, kind) for t in texts])
        except PayloadError as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        except Refused as e:
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        return JSONResponse({"predictions": results} if kind == "predict" else {"embeddings": results})

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await answer(request, "predict")

    @app.post("/embed")
    async def embed(request: Request) -> Response:
        return await answer(request, "embed")

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        require_token(request)
        job = watcher = None
        try:
            current = holder.current
            if current.kind != "generator":
                raise PayloadError(409, f"the served model is a {current.kind}, it does not generate text: use "
                                        f"{ROUTE_OF[current.kind]}")
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                raise PayloadError(415, f"content-type: expected application/json (got {ctype or 'none'})")
            model = current.predictor
            req = parse_generate(await read_body(request, cfg.max_body_bytes), cfg, model.tokenizer,
                                 max_positions(model.model.config))
            job = generating.submit(current, req.ids, req.sampling)
            watcher = asyncio.create_task(wait_disconnect(request, lambda: generating.cancel(job)))
            await job.started  # 503 when it waited too long; a request is answered with its status before streaming
        except PayloadError as e:
            return JSONResponse({"detail": e.detail}, status_code=e.status)
        except Refused as e:
            if watcher is not None:
                watcher.cancel()
            return JSONResponse({"detail": str(e)}, status_code=e.status)
        if req.stream:
            return StreamingResponse(stream_events(job, watcher), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        try:
            chunks = []
            while isinstance(event := await job.events.get(), str):
                chunks.append(event)
        finally:
            watcher.cancel()
        if not isinstance(event, Done):
            return JSONResponse({"detail": str(event)}, status_code=getattr(event, "status", 500))
        return JSONResponse({"text": "".join(chunks), **event.as_dict(), **current.info()})

    async def stream_events(job: Job, watcher: asyncio.Task):
        """SSE: {"text": chunk} per chunk, then `event: done` with counts and timings (`event: error` if the
        generate call failed). The client going away ends this generator: its row is cancelled."""
        try:
            while isinstance(event := await job.events.get(), str):
                yield sse(None, {"text": event})
            if isinstance(event, Done):
                yield sse("done", event.as_dict())
            else:
                yield sse("error", {"detail": str(event)})
        finally:
            watcher.cancel()
            generating.cancel(job)  # a no-op once its row has ended

    @app.get("/tasks")
    def list_tasks(request: Request) -> dict[str, Any]:
        require_token(request)
        known = holder.current.extra["tasks"]
        return {"tasks": [{"name": t, "labels": labels} for t, labels in known.items()],
                "default": next(iter(known), None), **holder.current.info()}

    @app.get("/metrics")
    def prometheus(request: Request) -> Response:
        require_token(request)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/drift")
    def drift(request: Request) -> dict[str, Any]:
        require_token(request)
        monitor = holder.current.extra.get("drift")
        if monitor is None:
            return {"enabled": False, "reason": "the served model directory has no drift_reference.json", **holder.current.info()}
        return {**monitor.report(), **holder.current.info()}

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        require_token(request)
        try:
            result = await asyncio.to_thread(holder.check)
        except Exception as e:  # noqa: BLE001 - the registry or the new version's files: say which, keep serving
            return JSONResponse({"reloaded": False, "version": holder.current.version,
                                 "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"},
                                status_code=502)
        return JSONResponse(result, status_code=200 if holder.alias else 409)

    return app


def embed_unsupported(predictor) -> str | None:
    """Why `predictor` cannot embed (None when it can)."""
    why = getattr(predictor, "embed_unsupported", None)
    if why is None:
        return "the served model cannot embed (not an lmpipe model directory)"
    return why()


def _logging() -> None:
    logger = logging.getLogger("lmpipe.serving")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)-9s %(message)s"))  # uvicorn's look
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def serve(model_uri: str, host: str | None = None, port: int | None = None, cfg: Serve | None = None,
          token_file: str | None = None, allow_unauthenticated: bool = False) -> None:
    """Check token and bind first (one-line errors, before the model loads), load, run uvicorn."""
    if cfg is None:
        cfg = load_params(repo_root() / "params.yaml").serve
    host = host or cfg.host
    port = cfg.port if port is None else port
    token = auth.resolve_token(token_file)
    auth.check_bind(host, token, allow_unauthenticated)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise LmpipeError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the drift thread tokenizes beside inference
    _logging()
    if cfg.threads:  # before the first load: an ONNX Runtime session takes its thread count when it is built
        torch.set_num_threads(cfg.threads)
    client = mlflow.MlflowClient()
    try:
        served = reload.load(model_uri, client)
        app = create_app(served, model_uri, cfg, token=token, client=client)  # reads the drift reference
    except LmpipeError as e:  # a torn model file, ...: its own line names the file
        raise LmpipeError(f"--model-uri {model_uri}: {e}") from None
    except Exception as e:  # unknown alias, missing files, not a classifier, a broken drift reference, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmpipeError(f"--model-uri {model_uri}: cannot load model ({type(e).__name__}: {first})") from None
    log.info("serving %s (%s %s v%s, %s) on http://%s:%s, auth %s", model_uri, served.kind, served.name,
             served.version, served.variant, host, port, "bearer token" if token else "off")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
