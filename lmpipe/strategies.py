"""Fine-tuning strategies: which weights train, at which learning rate, against which targets, and how the
result is saved so that evaluate, deploy and serving see an ordinary classifier.

    python -m stages.finetune --set finetune.strategy=lora     # full | freeze | llrd | lora | prefix | prompt | distill

Layers are found in the model itself: the ModuleList holding its `num_hidden_layers` blocks
(bert.encoder.layer.N, model.layers.N, transformer.h.N), so every strategy works on the project's Llama,
GPT-2 and BERT models and on MiniLM. Parameters registered before the first block are the embeddings,
those after the last block the head (final norm, pooler, classifier). Trainer trains what `prepare`
returns; the Trainer side (parameter groups, distillation loss) is in lmpipe/training.py.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model
from peft.utils import ModulesToSaveWrapper
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from lmpipe import registry
from lmpipe.config import Finetune
from lmpipe.errors import ConfigError, DataError
from lmpipe.modeling import (
    ADAPTER_CONFIG,
    accept_past_key_values,
    load_finetuned,
    load_tokenizer,
    max_positions,
    save_classifier,
    stored_max_length,
    variant_of,
)
from lmpipe.names import STRATEGIES
# Imported inside functions (start-up cost, docs/results.md#start-up): compress (ONNX Runtime) for a teacher that is a
# deploy variant, which only distillation from such a teacher needs.

ADAPTER_SUBDIR = "adapter"
"""LoRA: where the adapter is kept next to the merged model."""


@dataclass
class Teacher:
    """strategy distill: the teacher classifier, its own tokenizer (the student's may differ) and the loss mix.
    An fp32 teacher runs beside the student on each batch (`model`); any other deploy variant (an ensemble above
    all: several models) is run once over the training texts before training (`predictor`), and its
    log-probabilities are the soft labels."""

    model: torch.nn.Module | None
    tokenizer: PreTrainedTokenizerBase | None
    max_length: int
    temperature: float
    alpha: float
    source: str
    """What finetune.distill.teacher named (a dir or a models:/ URI)."""
    variant: str = "fp32"
    """The teacher's deploy variant (lmpipe/compress.py)."""
    predictor: Any = None
    """lmpipe.compress.Classifier of a non-fp32 teacher, until its soft labels are computed (with_teacher_inputs
    lets it go: the models are not needed during training)."""

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.temperature, self.alpha)

    def collator(self, student_collator: Any) -> "DistillCollator":
        return DistillCollator(student_collator, self.tokenizer and DataCollatorWithPadding(self.tokenizer))


@dataclass
class Plan:
    """What Trainer trains, and how."""

    model: torch.nn.Module
    """The classifier itself, or its peft wrapper (adapter strategies)."""
    lr_scale: dict[str, float] | None = None
    """llrd: learning-rate multiplier per trainable parameter name (Trainer builds the parameter groups)."""
    frozen: list[str] = field(default_factory=list)
    """freeze: parameter names with requires_grad False."""
    teacher: Teacher | None = None
    """distill: soft labels come from here."""


# -- where the layers are ---------------------------------------------------------------------------------

def blocks(model: torch.nn.Module) -> tuple[str, int]:
    """(name, count) of the model's transformer blocks: the first ModuleList holding config.num_hidden_layers
    modules (bert.encoder.layer, model.layers, transformer.h)."""
    n = int(model.config.num_hidden_layers)
    for name, module in model.named_modules():
        if name and isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return name, n
    raise ConfigError(f"finetune.strategy: cannot find the {n} transformer layers of {type(model).__name__}")


def depths(model: torch.nn.Module) -> dict[str, int]:
    """Parameter name -> depth: 0 = embeddings (registered before the first block), 1..L = the blocks bottom-up,
    L + 1 = the head (registered after the last block: final norm, pooler, classifier)."""
    prefix, n = blocks(model)
    block = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    out: dict[str, int] = {}
    past_blocks = False
    for name, _ in model.named_parameters():
        m = block.match(name)
        if m:
            out[name], past_blocks = int(m.group(1)) + 1, True
        else:
            out[name] = n + 1 if past_blocks else 0
    return out


def freeze(model: torch.nn.Module, layers: int) -> list[str]:
    """Embeddings and the lowest `layers` blocks stop training (requires_grad False); returns their names."""
    d = depths(model)
    frozen = []
    for name, p in model.named_parameters():
        if d[name] <= layers:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def llrd_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per parameter: the top block 1, each block below x decay, the embeddings
    decay ** L (lowest), the head 1."""
    d = depths(model)
    n = blocks(model)[1]
    return {name: 1.0 if depth > n else decay ** (n - depth) for name, depth in d.items()}


# -- checks before anything is written --------------------------------------------------------------------

def _skeleton(config: PretrainedConfig, head: str = "classifier") -> torch.nn.Module:
    """The model's module tree without weights (meta device): names and shapes for the checks. head lm: the
    causal LM itself (generative fine-tuning, lmpipe/sft.py)."""
    auto = AutoModelForCausalLM if head == "lm" else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


def _adaptable_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the modules LoRA can adapt (linear, embedding, GPT-2's Conv1D)."""
    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and isinstance(m, kinds)})


# -- the model Trainer trains -------------------------------------------------------------------------------

def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; peft's own count for a peft model (the adapter included in the total)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# -- saving: an ordinary classifier in the output, the adapter beside it -------------------------------------

def _trained_heads(peft_model) -> torch.nn.Module:
    """The base model of a prompt-learning peft model with each wrapped head (modules_to_save) replaced by its
    trained copy: a plain module tree whose state dict loads into the architecture."""
    base = peft_model.get_base_model()
    for name, module in list(base.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, module.modules_to_save["default"])
    return base


def adapter_files(model_dir: Path) -> list[Path]:
    """The adapter a saved classifier carries (logged to MLflow), or [] for a plain model."""
    for folder in (model_dir / ADAPTER_SUBDIR, model_dir):
        if (folder / ADAPTER_CONFIG).is_file():
            return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith("adapter_"))
    return []


# -- one object per strategy: what it checks, trains, saves ---------------------------------------------------

class Strategy:
    """finetune.strategy `full`: every weight trains, the classifier is saved as it is. The other strategies
    override what differs. A new strategy is a subclass here, registered in STRATEGY, plus its name in
    lmpipe/names.py and its params block in lmpipe/config.py's Finetune (resume keys include that block)."""

    name = "full"

    def issues(self, cfg: Finetune, model: torch.nn.Module, config: PretrainedConfig) -> list[str]:
        """The strategy's params against the model they will act on (a weightless skeleton), one line each."""
        return []

    def pads_left(self, model: torch.nn.Module) -> bool:
        """Whether the tokenizer pads on the left for this strategy on this (skeleton) model."""
        return False

    def prepare(self, model: torch.nn.Module, cfg: Finetune, teacher: Teacher | None) -> Plan:
        """A freshly loaded classifier -> what Trainer trains."""
        return Plan(model)

    def save(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int, out: Path) -> None:
        """Write the trained classifier to `out` as an ordinary classifier."""
        save_classifier(model, tokenizer, max_length, out)


class Freeze(Strategy):
    """Embeddings and the lowest finetune.freeze.layers blocks stop training."""

    name = "freeze"

    def issues(self, cfg, model, config):
        n = blocks(model)[1]
        return [f"finetune.freeze.layers: {cfg.freeze.layers} exceeds the model's {n} layers"] \
            if cfg.freeze.layers > n else []

    def prepare(self, model, cfg, teacher):
        return Plan(model, frozen=freeze(model, cfg.freeze.layers))


class Llrd(Strategy):
    """Layer-wise learning-rate decay: each block below the top at finetune.llrd.decay times the one above."""

    name = "llrd"

    def prepare(self, model, cfg, teacher):
        return Plan(model, lr_scale=llrd_scales(model, cfg.llrd.decay))


class Distill(Strategy):
    """The loss mixes the labels with a teacher classifier's soft labels (finetune.distill)."""

    name = "distill"

    def prepare(self, model, cfg, teacher):
        return Plan(model, teacher=teacher)


class Adapter(Strategy):
    """A peft adapter trains, the base model frozen; task SEQ_CLS makes the classifier head trained and saved
    (modules_to_save)."""

    def peft_config(self, cfg: Finetune):
        raise NotImplementedError

    def prepare(self, model, cfg, teacher):
        try:
            peft_model = get_peft_model(model, self.peft_config(cfg))
        except ValueError as e:  # e.g. target_modules auto on an architecture peft has no default for
            raise ConfigError(f"finetune.{self.name}: peft refuses {type(model).__name__}: "
                              f"{str(e).strip().splitlines()[0]}") from None
        peft_model.peft_config["default"].base_model_name_or_path = None  # no machine path in the outputs
        return Plan(peft_model)


class Lora(Adapter):
    """LoRA: saved merged into a plain model, the adapter in out/adapter."""

    name = "lora"

    def issues(self, cfg, model, config):
        if not isinstance(cfg.lora.target_modules, list):
            return []
        names = [n for n, _ in model.named_modules() if n]
        unknown = [t for t in cfg.lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
        return [f"finetune.lora.target_modules: {', '.join(unknown)} not in {type(model).__name__}; "
                f"its adaptable modules: {', '.join(_adaptable_names(model))}"] if unknown else []

    def peft_config(self, cfg):
        targets = None if cfg.lora.target_modules == "auto" else cfg.lora.target_modules
        # head lm: the causal LM's own output layer (tied to the embeddings) stays frozen; only the adapter trains
        task = TaskType.CAUSAL_LM if cfg.head == "lm" else TaskType.SEQ_CLS
        return LoraConfig(task_type=task, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                          lora_dropout=cfg.lora.dropout, target_modules=targets)

    def save(self, model, tokenizer, max_length, out):
        model.save_pretrained(str(out / ADAPTER_SUBDIR))
        (out / ADAPTER_SUBDIR / "README.md").unlink(missing_ok=True)  # peft's model card template
        save_classifier(model.merge_and_unload(), tokenizer, max_length, out)


class PromptLearning(Adapter):
    """Virtual tokens (prefix or prompt tuning): they cannot be merged into the weights, so the base model with
    the trained head is saved with the adapter files beside it (lmpipe.modeling.load_finetuned applies them)."""

    def issues(self, cfg, model, config):
        virtual = getattr(cfg, self.name).num_virtual_tokens
        if virtual + cfg.max_length > max_positions(config):
            return [f"finetune.{self.name}.num_virtual_tokens: {virtual} virtual tokens + finetune.max_length "
                    f"{cfg.max_length} exceed the model's {max_positions(config)} positions"]
        return []

    def peft_config(self, cfg):
        config_cls = PrefixTuningConfig if self.name == "prefix" else PromptTuningConfig
        return config_cls(task_type=TaskType.SEQ_CLS, num_virtual_tokens=getattr(cfg, self.name).num_virtual_tokens)

    def save(self, model, tokenizer, max_length, out):
        model.save_pretrained(str(out))
        (out / "README.md").unlink(missing_ok=True)
        save_classifier(_trained_heads(model), tokenizer, max_length, out)


class Prefix(PromptLearning):
    name = "prefix"

    def prepare(self, model, cfg, teacher):
        accept_past_key_values(model)
        return super().prepare(model, cfg, teacher)


class Prompt(PromptLearning):
    name = "prompt"

    def pads_left(self, model):
        # on a decoder (head `score`, which reads the last non-pad token) the virtual tokens arrive as embeddings,
        # so the model cannot find the padding and reads the last position; left padding makes that the last real
        # token. Saved with the tokenizer, so evaluate and serving pad the same way.
        return hasattr(model, "score")


STRATEGY: dict[str, Strategy] = {s.name: s for s in (Strategy(), Freeze(), Llrd(), Lora(), Prefix(), Prompt(), Distill())}
assert set(STRATEGY) == set(STRATEGIES), "lmpipe/names.py and the strategy objects name the same strategies"
ADAPTERS = tuple(n for n, s in STRATEGY.items() if isinstance(s, Adapter))
"""Strategies that train a peft adapter (the base model frozen)."""
PROMPT_LEARNING = tuple(n for n, s in STRATEGY.items() if isinstance(s, PromptLearning))
"""Adapters that add virtual tokens: they cannot be merged into the weights."""


def check(cfg: Finetune, config: PretrainedConfig) -> None:
    """The strategy's params against the model they will act on; one line per problem (ConfigError)."""
    issues = STRATEGY[cfg.strategy].issues(cfg, _skeleton(config, cfg.head), config)
    if issues:
        raise ConfigError("\n".join(issues))


def pads_left(strategy: str, config: PretrainedConfig) -> bool:
    return STRATEGY[strategy].pads_left(_skeleton(config))


def prepare(model: torch.nn.Module, cfg: Finetune, teacher: Teacher | None = None) -> Plan:
    """A freshly loaded classifier (or causal LM, finetune.head lm) -> what Trainer trains under cfg.strategy."""
    return STRATEGY[cfg.strategy].prepare(model, cfg, teacher)


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, max_length: int, out: Path,
         strategy: str) -> None:
    """Write the trained classifier to `out` (consumes a peft model: merged or unwrapped in place)."""
    STRATEGY[strategy].save(model, tokenizer, max_length, out)


# -- distillation -------------------------------------------------------------------------------------------

def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels) (Hinton et al. 2015; T^2
    keeps the soft term's gradients on the hard term's scale). logits: (B, C), labels: (B,)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                    reduction="batchmean", log_target=True)
    return alpha * t * t * soft + (1 - alpha) * F.cross_entropy(student_logits, labels)


def load_teacher(cfg: Finetune, labels: list[str], root: Path, device: str) -> Teacher:
    """The teacher named by finetune.distill.teacher (a fine-tuned model dir or models:/NAME@alias |
    models:/NAME/VERSION), in eval mode on `device`; refused when it predicts other labels than the task's."""
    ref = str(cfg.distill.teacher)
    with tempfile.TemporaryDirectory(prefix="lmpipe-teacher-") as tmp:
        if ref.startswith("models:/"):
            path = registry.model_dir(ref, Path(tmp), "finetune.distill.teacher")
        else:
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else root / path
            if not (path / "config.json").is_file():
                raise DataError(f"finetune.distill.teacher: {path} is not a fine-tuned model dir (no config.json)")
        if variant_of(path) != "fp32":  # an ensemble, int8, ONNX: predicted through lmpipe.compress, all in memory
            from lmpipe import compress

            clf = compress.load(path, device)
            _same_labels([str(clf.id2label[i]) for i in sorted(clf.id2label)], labels, ref)
            return Teacher(None, None, clf.max_length, cfg.distill.temperature, cfg.distill.alpha, ref, clf.variant, clf)
        model = load_finetuned(path)
        tokenizer = load_tokenizer(path)
    id2label = model.config.id2label
    _same_labels([str(id2label[i]) for i in sorted(id2label)], labels, ref)
    max_length = stored_max_length(tokenizer, model.config)
    for p in model.parameters():
        p.requires_grad_(False)
    return Teacher(model.eval().to(device), tokenizer, max_length, cfg.distill.temperature, cfg.distill.alpha, ref)


def _same_labels(names: list[str], labels: list[str], ref: str) -> None:
    if names != [str(x) for x in labels]:
        raise ConfigError(f"finetune.distill.teacher: {ref} predicts labels {names}, the task's are {list(labels)}")


def with_teacher_inputs(dataset, texts: list[str], teacher: Teacher, batch_size: int = 64):
    """The training split with the teacher's own encoding of each text (columns teacher_input_ids, ...): the
    teacher reads the text with its tokenizer, whatever the student's is. A variant teacher's soft labels
    instead: its log-probabilities of each text (column teacher_log_probs), computed here once."""
    if teacher.predictor is not None:
        probs = teacher.predictor.predict_proba(texts, batch_size)
        teacher.predictor = None  # every member's memory back before training starts
        return dataset.add_column("teacher_log_probs", np.log(np.clip(probs, 1e-12, None)).tolist())
    enc = teacher.tokenizer(texts, truncation=True, max_length=teacher.max_length)
    for key, values in enc.items():
        dataset = dataset.add_column(f"teacher_{key}", values)
    return dataset


@dataclass
class DistillCollator:
    """Pads the student's and the teacher's encodings separately (each with its own tokenizer)."""

    student: Any
    teacher: Any

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        own = [{k: v for k, v in f.items() if not k.startswith("teacher_")} for f in features]
        theirs = [{k[len("teacher_"):]: v for k, v in f.items() if k.startswith("teacher_")} for f in features]
        batch = self.student(own)
        if theirs and "log_probs" in theirs[0]:  # soft labels computed before training: (B, num_labels)
            batch["teacher_log_probs"] = torch.tensor([t["log_probs"] for t in theirs], dtype=torch.float32)
        elif theirs and theirs[0]:
            batch.update({f"teacher_{k}": v for k, v in self.teacher(theirs).items()})
        return batch
