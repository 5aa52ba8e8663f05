"""The MLflow model registry: log a classifier variant or a generator (a causal LM) as a pyfunc model, register it,
move the alias, roll back.

    lmpipe rollback [--to VERSION] [--reason TEXT]     # champion back to the previous holder (or VERSION)

Every registered version carries its variant, accuracy, macro-F1, drop vs fp32, latency, size, git commit and
source run as tags. The alias (`champion`) moves to a new version only when it beats the holder's test
accuracy. Each move is appended to the registered model's tag `lmpipe.alias_history.<alias>` (a JSON list of
{version, at, by, why}), so a rollback pops the current holder and moves the alias to the one before, and a
second rollback goes one further back. Who/when/why of a rollback are also tags on the version it lands on.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from pathlib import Path
from typing import Any

from importlib import metadata

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from lmpipe.errors import DataError, LmpipeError
# Imported inside functions (start-up cost, docs/results.md#start-up): package (torch, transformers) where used:
# `lmpipe rollback` moves an alias without them.

HISTORY_TAG = "lmpipe.alias_history.{alias}"
HISTORY_MAX_CHARS = 5000  # MLflow's registered-model tag values are VARCHAR(5000): the oldest entries go first
SERVING_PACKAGES = ("torch", "transformers", "peft", "pandas", "mlflow")
"""What a registered model needs to load (its pip requirements): pinned to the versions this environment has, which
pyproject.toml (the one home of the pins) installed."""


def pip_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in SERVING_PACKAGES]


def model_dir(uri: str, dest: Path, field: str) -> Path:
    """The model directory inside a registered version (models:/NAME/VERSION | @alias), downloaded under `dest`:
    the artifact log_variant / log_generator logged as model_dir. `field` names the param in the one-line error
    (an unknown name, alias or version, an unreachable store)."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user gets one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{field}: cannot load {uri} ({first[:200]})") from None
    dirs = [p.parent for p in local.rglob("config.json")]
    top = min((len(d.parts) for d in dirs), default=0)
    found = [d for d in dirs if len(d.parts) == top]  # an ensemble's members lie below its own config.json
    if len(found) != 1:
        raise DataError(f"{field}: {uri} holds {len(found)} transformers model dirs, expected 1")
    return found[0]


def champion(client, name: str, alias: str, key: str = "accuracy") -> tuple[str | None, float | None]:
    """(version, its `key` tag) of the alias holder; (None, None) when the alias is unset, (version, None) when
    the holder has no such tag."""
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    acc = mv.tags.get(key)
    return str(mv.version), float(acc) if acc is not None else None


def log_variant(model_dir: Path, name: str, variant: str, tags: dict[str, Any], run) -> str:
    """Log `model_dir` (any lmpipe.compress variant) as a pyfunc model in the active run, register it under
    `name` with `tags`; returns the new version."""
    # here, not at the top: the model package loads torch and transformers (+3.2-3.4 s after mlflow, measured on
    # 2 cores), which `lmpipe rollback` never needs
    from lmpipe.package import ClassifierPyfunc

    reqs = pip_requirements() + ([f"onnxruntime=={metadata.version('onnxruntime')}"] if variant.startswith("onnx") else [])
    # the signature is given, not inferred: inferring it loads the model into the instance MLflow then
    # pickles (an ONNX Runtime session or a quantised model does not pickle). The input column is unnamed so
    # that both a DataFrame with a `text` column and a plain list of strings pass MLflow's schema check.
    signature = ModelSignature(inputs=Schema([ColSpec("string")]),
                               outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score")]),
                               params=ParamSchema([ParamSpec("task", "string", "")]))  # "": the first task
    return _register(ClassifierPyfunc(), model_dir, name, variant, {"kind": "classifier", **tags}, run, reqs, signature)


def log_generator(model_dir: Path, name: str, tags: dict[str, Any], run, variant: str = "fp32") -> str:
    """Log the causal LM in `model_dir` (a directory lmpipe.generation.load_generator reads) as a pyfunc model
    (lmpipe.package.GeneratorPyfunc) in the active run, register it under `name` with `tags` (and kind=generator);
    returns the new version. `lmpipe serve --model-uri models:/NAME@alias` serves it on POST /generate."""
    from lmpipe.package import GeneratorPyfunc

    # given, not inferred (inferring runs the model); params default to None = lmpipe.generation.Sampling's default
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "text"), ColSpec("long", "prompt_tokens"), ColSpec("long", "new_tokens")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", None), ParamSpec("temperature", "double", None),
                            ParamSpec("top_k", "long", None), ParamSpec("top_p", "double", None),
                            ParamSpec("seed", "long", None)]))
    return _register(GeneratorPyfunc(), model_dir, name, variant, {"kind": "generator", **tags}, run,
                     pip_requirements(), signature)


def _register(python_model, model_dir: Path, name: str, variant: str, tags: dict[str, Any], run,
              reqs: list[str], signature: ModelSignature) -> str:
    """Log `python_model` over `model_dir` in the active run, register it under `name`, tag the version."""
    info = mlflow.pyfunc.log_model(
        name="model" if variant == "fp32" else f"model_{variant}", python_model=python_model,
        artifacts={"model_dir": str(model_dir)}, registered_model_name=name, pip_requirements=reqs,
        signature=signature)
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {"variant": variant, **tags, "git.commit": run.data.tags.get("git.commit", ""),
                       "source_run_id": run.info.run_id}.items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def _history(client, name: str, alias: str) -> list[dict[str, Any]]:
    tags = client.get_registered_model(name).tags
    raw = tags.get(HISTORY_TAG.format(alias=alias))
    history = json.loads(raw) if raw else []
    if not history:  # an alias set before the history was kept (or by hand): its holder starts the history
        holder, _ = champion(client, name, alias)
        if holder is not None:
            history = [{"version": holder, "at": None, "by": None, "why": "holder when the history began"}]
    return history


def _move(client, name: str, alias: str, version: str, history: list[dict[str, Any]], why: str) -> dict[str, Any]:
    entry = {"version": str(version), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "by": os.environ.get("LMPIPE_USER") or getpass.getuser(), "why": why[:300]}
    history = history + [entry]
    while len(json.dumps(history)) > HISTORY_MAX_CHARS and len(history) > 1:
        history.pop(0)
    # the history first: a failed write leaves the alias where it was, never moved without a record
    client.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    client.set_registered_model_alias(name, alias, str(version))
    return entry


def promote(client, name: str, alias: str, version: str, score: float, key: str = "accuracy") -> dict[str, Any]:
    """Move the alias to `version` when its `key` tag (`score`) beats the holder's, or nobody holds the alias, or
    the holder has no `key` tag (registered before selection used it: the history says so)."""
    old_version, old_score = champion(client, name, alias, key)
    promoted = old_score is None or score > old_score
    if promoted:
        history = _history(client, name, alias)
        beaten = ("no holder" if old_version is None else f"v{old_version} (no {key})" if old_score is None
                  else f"v{old_version} ({old_score:.4f})")
        _move(client, name, alias, version, history, f"deploy: {key} {score:.4f} beats {beaten}")
    return {"promoted": promoted, "promoted_by": key, "previous_champion": old_version,
            "previous_champion_score": old_score}


def rollback(client, name: str, alias: str, to: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """Move the alias back to the previous holder (or to version `to`); returns {from, to, entry}."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        raise LmpipeError(f"rollback: no registered model {name!r} in {mlflow.get_tracking_uri()}") from None
    current, _ = champion(client, name, alias)
    if current is None:
        raise LmpipeError(f"rollback: {name}@{alias} is not set; nothing to roll back")
    history = _history(client, name, alias)
    if to is None:
        # the entries before the current holder's newest one; the nearest one that is not the holder
        while history and history[-1]["version"] == current:
            history.pop()
        if not history:
            raise LmpipeError(f"rollback: {name}@{alias} (v{current}) has no earlier holder to roll back to")
        target = history[-1]["version"]
        history.pop()  # _move appends it again, with this rollback's who/when/why
    else:
        target = str(to)
        try:
            client.get_model_version(name, target)
        except mlflow.exceptions.MlflowException:
            raise LmpipeError(f"rollback --to {to}: {name} has no version {to}") from None
        if target == current:
            raise LmpipeError(f"rollback --to {to}: v{to} already holds {name}@{alias}")
    why = f"rollback from v{current}" + (f": {reason}" if reason else "")
    entry = _move(client, name, alias, target, history, why)
    for key, value in {"rollback.at": entry["at"], "rollback.by": entry["by"], "rollback.why": why,
                       "rollback.from": current}.items():
        client.set_model_version_tag(name, target, key, value)
    return {"from": current, "to": target, "entry": entry}
