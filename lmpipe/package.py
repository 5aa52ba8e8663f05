"""The model package: what a registered lmpipe model is (an MLflow pyfunc) and how a model URI becomes a predictor.

    python -c "import mlflow; print(mlflow.pyfunc.load_model('models:/lmpipe-sst2@champion').predict(['a gem']))"

`ClassifierPyfunc` is the pyfunc flavour the deploy stage logs (lmpipe/registry.py, `python_model=` an instance):
MLflow cloudpickles the instance, and with it the class by reference, as `lmpipe.package.ClassifierPyfunc`, so
the class stays defined here under that name (versions logged before this module existed name
`lmpipe.serving.ClassifierPyfunc`, which lmpipe/serving/__init__.py keeps as an alias). `HFClassifier` is the
classifier behind it. `GeneratorPyfunc` is the flavour of a causal LM (prompts -> text, `HFGenerator` behind it,
generating through lmpipe.generation); it is a pyfunc rather than MLflow's `transformers` flavour because that
flavour's text-generation pipeline encodes a prompt with the closing EOS the pipeline tokenizer appends, so the
model reads it as a finished document (docs/serving.md). `load_predictor` turns a model dir or any MLflow model URI
into what `lmpipe serve` calls.
The HTTP endpoint (lmpipe/serving/) imports this module; nothing here imports the endpoint.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from lmpipe import compress, generation
from lmpipe.embeddings import Encoder, is_encoder_only
from lmpipe.generation import Generated, Sampling


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


class HFGenerator:
    """A causal LM directory (the pretrain stage's models/pretrain, or a generative fine-tune): prompts -> new text
    through lmpipe.generation (BOS + prompt, never the closing EOS; batched and left padded)."""

    kind = "generator"

    def __init__(self, model_dir: str | Path, device: str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.model, self.tokenizer = generation.load_generator(self.model_dir, device)
        self.variant = "fp32"

    def generate(self, prompts: list[str], sampling: Sampling, batch_size: int = 32) -> list[Generated]:
        out: list[Generated] = []
        for start in range(0, len(prompts), batch_size):
            out += generation.generate(self.model, self.tokenizer, prompts[start:start + batch_size], sampling)
        return out

    def tasks(self) -> dict[str, list[str]]:
        return {}  # no classifier head


GENERATION_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
"""The pyfunc's params: lmpipe.generation.Sampling's fields."""


with warnings.catch_warnings(record=True):  # MLflow's type-hint advice, as above
    class GeneratorPyfunc(mlflow.pyfunc.PythonModel):
        """MLflow pyfunc flavour of a causal LM: input a DataFrame with a `prompt` column (or a list of strings);
        params max_new_tokens, temperature, top_k, top_p, seed (validated as lmpipe.generation.Sampling; unset =
        its defaults); output a DataFrame with `text` (the new text only), `prompt_tokens`, `new_tokens`."""

        def load_context(self, context) -> None:
            self.gen = HFGenerator(context.artifacts["model_dir"])

        def predict(self, context, model_input, params=None):
            if isinstance(model_input, pd.DataFrame):
                column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
                prompts = model_input[column].astype(str).tolist()
            else:
                prompts = [str(p) for p in model_input]
            sampling = Sampling.parse("params.", **{k: v for k, v in (params or {}).items() if k in GENERATION_PARAMS})
            return pd.DataFrame([{"text": g.text, "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens}
                                 for g in self.gen.generate(prompts, sampling)])


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
    """A local HF model dir (a causal LM: HFGenerator; a classifier; or an encoder without a head:
    lmpipe.embeddings.Encoder), or any MLflow model URI (models:/NAME@alias, runs:/ID/model, a pyfunc dir). An
    lmpipe pyfunc is unwrapped to its HFClassifier or HFGenerator: the server batches and tokenizes without pandas."""
    path = Path(uri)
    if path.is_dir() and (path / "config.json").is_file():
        if generation.is_causal_lm(path):
            return HFGenerator(path)
        return Encoder(path) if is_encoder_only(path) else HFClassifier(path)
    model = mlflow.pyfunc.load_model(uri)
    inner = model.unwrap_python_model()
    if isinstance(inner, ClassifierPyfunc):
        return inner.clf
    if isinstance(inner, GeneratorPyfunc):
        return inner.gen
    return PyfuncPredictor(model)
