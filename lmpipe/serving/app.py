"""The endpoint: FastAPI routes, payload limits, and `serve` (what `lmpipe serve` runs).

    lmpipe serve [--model-uri models:/lmpipe-sst2@champion] [--host 127.0.0.1] [--port 8000] [--token-file F]

| route               | auth  | answers                                                                     |
|---------------------|-------|-----------------------------------------------------------------------------|
| GET /health         | open  | status and the served model's uri, name, version, variant                  |
| POST /predict       | token | {"texts": [...], "task"?: NAME} -> {"predictions": [{label, score}, ...]}, micro-batched |
| POST /embed         | token | {"texts": [...]} -> {"embeddings": [[...], ...]} (L2-normalised), micro-batched |
| GET /tasks          | token | the model's tasks, each with its labels; the default (first) task            |
| GET /metrics        | token | Prometheus text format (lmpipe.serving.metrics)                            |
| GET /drift          | token | PSI per feature of the live window vs the model's drift reference          |
| POST /admin/reload  | token | check the alias now; swap when it moved                                     |

/predict refuses, before any model work: no/wrong token 401, body over serve.max_body_bytes 413, a content
type other than application/json 415, invalid JSON 400, a wrong shape 422 naming the field; and ends every
request in bounded time (503 queue full / waited too long for a batch, 504 inference too slow).
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
from typing import Any

import mlflow
import torch
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmpipe.config import Serve
from lmpipe.params import load_params, repo_root
from lmpipe.errors import LmpipeError
from lmpipe.serving import auth, reload
from lmpipe.serving.batching import Batcher, Refused
from lmpipe.serving.drift import DriftMonitor, load_reference
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


def parse_texts(body: bytes, max_texts: int, max_chars: int, fields: tuple[str, ...] = ("texts",)
                ) -> tuple[list[str], dict[str, Any]]:
    """{"texts": [...], <optional fields>} -> (the texts, the other fields given); PayloadError 400 (not JSON)
    or 422 (naming the field) otherwise."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PayloadError(400, f"body: not valid JSON ({e})") from None
    except RecursionError:  # e.g. 100 KB of "[": nested deeper than the parser goes
        raise PayloadError(400, "body: not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise PayloadError(422, 'body: expected a JSON object {"texts": [...]}')
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
    holder = reload.Holder(served, client, cfg.reload_interval_s, prepare)
    batcher = Batcher(run, cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue, cfg.request_timeout_s,
                      cfg.inference_timeout_s, on_batch=metrics.batch_size.observe, on_queue=metrics.queue_texts.set)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # process-wide; the inference thread is the only torch user
        await batcher.start()
        holder.start()
        yield
        holder.stop()
        await batcher.stop()
        monitor_pool.shutdown(wait=False, cancel_futures=True)

    # no /docs, /redoc, /openapi.json: with a token set, /health is the only open route (README)
    app = FastAPI(title="lmpipe classifier", version="2", lifespan=lifespan, docs_url=None, redoc_url=None,
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
    log.info("serving %s (%s v%s, %s) on http://%s:%s, auth %s", model_uri, served.name, served.version,
             served.variant, host, port, "bearer token" if token else "off")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
