"""The pipeline's vocabulary, one home each: stage, objective, strategy and deploy-variant names, the metric keys
the pipeline run leads with, `models:/` references, checkpoint folder names, lmpipe's own folders, the DVC
command, perplexity, and the "run X first" error.

    from lmpipe.names import STAGES, need, perplexity

A new strategy, objective or variant name is added here (its `Literal` type) and nowhere else: params
validation (lmpipe/config.py) and the modules that list them read these.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Literal, NamedTuple, get_args

from lmpipe.errors import DataError

# -- stages -------------------------------------------------------------------------------------------------
STAGES = ("clean", "tokenize", "pretrain", "finetune", "evaluate", "deploy")
"""The pipeline's stages in order: a DVC stage, a params.yaml section, stages/<name>.py, lmpipe/recipes/<name>.py
and the MLflow stage run's name."""

# -- what a stage can be asked to do ---------------------------------------------------------------------------
Objective = Literal["clm", "mlm", "simcse", "mlm_nsp"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
MASKED_OBJECTIVES = ("mlm", "mlm_nsp")
"""Objectives whose model has a masked-LM head (perplexity over masked tokens)."""
SENTENCE_OBJECTIVES = ("simcse", "mlm_nsp")
"""Objectives that train on sentences of the clean corpus, not on packed token blocks."""

Strategy = Literal["full", "freeze", "llrd", "lora", "prefix", "prompt", "distill"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)

Head = Literal["classifier", "lm"]
HEADS: tuple[str, ...] = get_args(Head)
"""finetune.head: a classification head, or the causal LM itself fine-tuned on conversations (generative)."""

Optimizer = Literal["adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
"""pretrain.optimizer / finetune.optimizer: Trainer's own `optim` names (those that need no extra package)."""

Scheduler = Literal["linear", "cosine", "cosine_with_min_lr", "cosine_with_restarts", "polynomial", "constant",
                    "constant_with_warmup", "inverse_sqrt"]
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
"""pretrain.lr_scheduler / finetune.lr_scheduler: Trainer's own `lr_scheduler_type` names."""

Sampler = Literal["random", "group_by_length"]
"""finetune.sampler: Trainer's `train_sampling_strategy` (group_by_length: batches of similar length, padded
to their longest, so a step costs what its tokens cost)."""

Variant = Literal["fp32", "int8_dynamic", "onnx", "onnx_int8", "pruned", "ensemble"]
VARIANTS: tuple[str, ...] = get_args(Variant)
"""Deploy variants (lmpipe/compress.py builds them); fp32 is the reference every other one is gated against."""

# -- metric keys -----------------------------------------------------------------------------------------------
HEADLINE = {"accuracy": ("classifier", "accuracy"), "f1_macro": ("classifier", "f1_macro"),
            "perplexity": ("lm", "perplexity"), "benefit_accuracy": ("benefit", "accuracy"),
            "benefit_f1_macro": ("benefit", "f1_macro"), "scratch_accuracy": ("scratch_baseline", "accuracy"),
            "original_accuracy": ("original_baseline", "accuracy"),
            "benefit_continued_accuracy": ("benefit_continued", "accuracy"),
            "exact_match": ("generator", "exact_match"), "response_perplexity": ("generator", "response_perplexity"),
            "scratch_exact_match": ("scratch_baseline", "exact_match")}
"""The figures people compare, under plain names -> where they are in evaluate.metrics (section, key). They lead
the MLflow compare view (sorted before dotted names) and `lmpipe compare`."""

# -- personal data the clean stage can mask (lmpipe/masking.py) -------------------------------------------------
MaskKind = Literal["email", "url", "ip", "card", "phone"]
"""clean.mask's kinds, in the order lmpipe.masking matches them; each becomes the placeholder `<kind>`."""

# -- folders and commands --------------------------------------------------------------------------------------
LMPIPE_DIR = ".lmpipe"
"""lmpipe's own state inside a checkout (git-ignored): experiment worktrees, services, locks."""
WORKTREES = f"{LMPIPE_DIR}/worktrees"
PLACED = f"{LMPIPE_DIR}/placed"
"""Worktrees of stages this host runs for a flow run started elsewhere (flows/stage.py), one per flow run and
stage: a stage stopped half-way resumes from its checkpoint there."""
POOL_ENV = "LMPIPE_POOL"
"""The Prefect work pool a worker serves (set by the pool's job template, flows/deployments.py): the flow runs a
stage in place when params `placement.pools` names this pool for it."""
DVC = [sys.executable, "-m", "dvc"]
"""The dvc of this interpreter, whatever PATH a worker has."""

# -- checkpoints ---------------------------------------------------------------------------------------------
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
"""Trainer's checkpoint folders: checkpoint-<global step>."""


def checkpoint_step(path: Path | str) -> int | None:
    """The global step of a Trainer checkpoint folder (checkpoint-<step>); None for any other name."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


# -- model references ----------------------------------------------------------------------------------------
class ModelRef(NamedTuple):
    """A registered model version: models:/NAME@ALIAS or models:/NAME/VERSION (one of alias / version set)."""

    name: str
    alias: str | None
    version: str | None


MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def parse_model_uri(ref: str) -> ModelRef | None:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> ModelRef; None for anything else."""
    m = MODEL_URI.match(ref)
    return ModelRef(m["name"], m["alias"], m["version"]) if m else None


def model_uri(name: str, alias: str | None = None, version: str | int | None = None) -> str:
    return f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"


# -- figures -------------------------------------------------------------------------------------------------
def perplexity(loss: float) -> float:
    """exp(mean cross-entropy in nats); capped at exp(50) so a diverged run reports a number, not inf."""
    return math.exp(min(float(loss), 50))


# -- the "run X first" error -------------------------------------------------------------------------------
def missing(path: Path | str, stage: str, what: str = "missing") -> DataError:
    """An input another stage produces is not there: the one line that says which stage to run."""
    return DataError(f"{path}: {what}; run the {stage} stage first (dvc repro {stage})")


def need(path: Path, stage: str) -> Path:
    """`path` (a file or folder the `stage` stage writes), or the "run X first" error."""
    if not Path(path).exists():
        raise missing(path, stage)
    return path
