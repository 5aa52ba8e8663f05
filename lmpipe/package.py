"""The model package: what a registered lmpipe model is (an MLflow pyfunc) and how a model URI becomes a predictor.

    python -c "import mlflow; print(mlflow.pyfunc.load_model('models:/lmpipe-sst2@champion').predict(['a gem']))"

`ClassifierPyfunc` is the pyfunc flavour the deploy stage logs (lmpipe/registry.py, `python_model=` an instance):
MLflow cloudpickles the instance, and with it the class by reference, as `lmpipe.package.ClassifierPyfunc`, so
the class stays defined here under that name (versions logged before this module existed name
`lmpipe.serving.ClassifierPyfunc`, which lmpipe/serving/__init__.py keeps as an alias). `HFClassifier` is the
classifier behind it; `load_predictor` turns a model dir or any MLflow model URI into what `lmpipe serve` calls.
The HTTP endpoint (lmpipe/serving/) imports this module; nothing here imports the endpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from lmpipe import compress
from lmpipe.embeddings import Encoder, is_encoder_only


class HFClassifier:
    """A classifier directory the pipeline wrote, of any variant (fp32, int8_dynamic, onnx, onnx_int8, pruned:
    lmpipe/compress.py): texts -> [{label, score}].

    Predicts through lmpipe.compress, which runs evaluate's own path (lmpipe.evaluation.predict_proba) for the
    torch variants, so inputs are truncated at the length stored with the model (the one it was fine-tuned and
    evaluated at): no train/serve skew."""

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.clf = compress.load(self.model_dir, device)
        self.tokenizer = self.clf.tokenizer
        self.variant = self.clf.variant
        self.device = self.clf.device

    def predict(self, texts: list[str], batch_size: int = 64, tasks: list[str | None] | None = None
                ) -> list[dict[str, Any]]:
        return self.clf.predict(texts, batch_size, tasks)

    def tasks(self) -> dict[str, list[str]]:
        return self.clf.tasks()

    def embed_unsupported(self) -> str | None:
        return self.clf.embed_unsupported()

    def embed(self, texts: list[str], batch_size: int = 64) -> list[list[float]]:
        return self.clf.embed(texts, batch_size)


# MLflow advises type hints on `predict` when the class is created, under a warnings filter of its own (so a
# filterwarnings here cannot silence it): record and drop it, or every `lmpipe` error line comes after it
with warnings.catch_warnings(record=True):
    class ClassifierPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc flavour: input a DataFrame with a `text` column (or a list of strings); a multi-task
        model answers for params={"task": NAME} (default: its first task)."""

        def load_context(self, context) -> None:
            # the truncation length comes from the model dir itself (see HFClassifier), not the model_config
            self.clf = HFClassifier(context.artifacts["model_dir"])

        def predict(self, context, model_input, params=None):
            if isinstance(model_input, pd.DataFrame):
                texts = model_input["text" if "text" in model_input.columns else model_input.columns[0]].astype(str).tolist()
            else:
                texts = [str(t) for t in model_input]
            task = (params or {}).get("task") or None
            return pd.DataFrame(self.clf.predict(texts, tasks=[task] * len(texts) if task else None))


class PyfuncPredictor:
    """Any other MLflow pyfunc model that takes a `text` column and returns label and score columns."""

    def __init__(self, model) -> None:
        self.model = model

    def tasks(self) -> dict[str, list[str]]:
        return {"default": []}  # a foreign model: one task, its labels unknown until it answers

    def predict(self, texts: list[str], batch_size: int = 64, tasks: list[str | None] | None = None
                ) -> list[dict[str, Any]]:
        df = self.model.predict(pd.DataFrame({"text": texts}))
        return [{"label": str(r["label"]), "score": float(r["score"])} for r in df.to_dict("records")]


def load_predictor(uri: str):
    """A local HF model dir (a classifier, or an encoder without a head: lmpipe.embeddings.Encoder), or any MLflow
    model URI (models:/NAME@alias, runs:/ID/model, a pyfunc dir). An lmpipe pyfunc is unwrapped to its
    HFClassifier: the server batches and tokenizes without pandas."""
    path = Path(uri)
    if path.is_dir() and (path / "config.json").is_file():
        return Encoder(path) if is_encoder_only(path) else HFClassifier(path)
    model = mlflow.pyfunc.load_model(uri)
    inner = model.unwrap_python_model()
    return inner.clf if isinstance(inner, ClassifierPyfunc) else PyfuncPredictor(model)
