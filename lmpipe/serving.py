"""Serving: an MLflow pyfunc wrapper for the classifier and a FastAPI app around any predictor.

    lmpipe serve --port 8000 --model-uri models:/lmpipe-sst2@champion
    curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"texts": ["a gem of a film"]}'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

MAX_TEXTS = 256
MAX_CHARS = 10_000


class PredictRequest(BaseModel):
    """POST /predict body: 1..256 texts."""

    model_config = ConfigDict(extra="forbid")
    texts: list[str] = Field(min_length=1, max_length=MAX_TEXTS)


class HFClassifier:
    """A transformers sequence classifier from a local directory: texts -> [{label, score}].

    Predicts through lmpipe.evaluation.predict_proba, evaluate's own path, so inputs are truncated at the
    length stored with the model (the one it was fine-tuned and evaluated at): no train/serve skew."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        from lmpipe.modeling import load_finetuned, load_tokenizer

        self.tokenizer = load_tokenizer(Path(model_dir))
        self.model = load_finetuned(Path(model_dir)).eval().to(device)  # plain, or base + prefix/prompt adapter
        self.device = device

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        from lmpipe.evaluation import predict_proba

        probs = predict_proba(self.model, self.tokenizer, texts, batch_size, self.device)  # (N, num_labels)
        return [{"label": self.model.config.id2label[int(i)], "score": float(p[i])}
                for i, p in zip(probs.argmax(-1), probs)]


import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="Add type hints to the `predict` method")


class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc flavour: input a DataFrame with a `text` column (or a list of strings)."""

    def load_context(self, context) -> None:
        # the truncation length comes from the model dir itself (see HFClassifier), not the model_config
        self.clf = HFClassifier(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text" if "text" in model_input.columns else model_input.columns[0]].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        return pd.DataFrame(self.clf.predict(texts))


class PyfuncPredictor:
    def __init__(self, uri: str) -> None:
        self.model = mlflow.pyfunc.load_model(uri)

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        df = self.model.predict(pd.DataFrame({"text": texts}))
        return [{"label": str(r["label"]), "score": float(r["score"])} for r in df.to_dict("records")]


def load_predictor(uri: str):
    """A local HF model dir, or any MLflow model URI (models:/NAME@alias, runs:/ID/model, ...)."""
    path = Path(uri)
    if path.is_dir() and (path / "config.json").is_file():
        return HFClassifier(path)
    return PyfuncPredictor(uri)


def create_app(predictor, model_uri: str):
    from fastapi import FastAPI

    app = FastAPI(title="lmpipe classifier", version="1")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model_uri": model_uri}

    @app.post("/predict")
    def predict(req: PredictRequest) -> dict[str, list[dict[str, Any]]]:
        from fastapi import HTTPException

        for i, t in enumerate(req.texts):
            if not t.strip():
                raise HTTPException(status_code=422, detail=f"texts[{i}]: empty text")
            if len(t) > MAX_CHARS:
                raise HTTPException(status_code=422, detail=f"texts[{i}]: longer than {MAX_CHARS} characters")
        return {"predictions": predictor.predict(req.texts)}

    return app


def serve(model_uri: str, host: str, port: int) -> None:
    import socket

    import uvicorn

    from lmpipe.errors import LmpipeError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        predictor = load_predictor(model_uri)
    except Exception as e:  # unknown alias, missing files, not a classifier, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LmpipeError(f"--model-uri {model_uri}: cannot load model ({type(e).__name__}: {first})") from None
    try:
        with socket.socket() as s:  # fail with one line before uvicorn logs its own traceback
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise LmpipeError(f"serve: cannot listen on {host}:{port} ({e.strerror})") from None
    uvicorn.run(create_app(predictor, model_uri), host=host, port=port, log_level="info")
