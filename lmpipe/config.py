"""Typed params, the schema: one pydantic model per params.yaml section (its keys, types, bounds and a one-line
docstring each), and the checks across sections. Loading, merging and validating a file: lmpipe/params.py.

Every section forbids unknown keys, so a typo (`lerning_rate`) is an error, not a silent default.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmpipe.chat import template_issues
from lmpipe.names import STAGES, Head, MaskKind, Objective, Optimizer, Sampler, Scheduler, Strategy, Variant

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


class Common(Section):
    seed: int
    """Global seed for python, numpy and torch; every split and init derives from it."""
    experiment: str
    """MLflow experiment name."""
    device: Literal["auto", "cpu", "cuda"]
    """auto = cuda when present, else cpu. Env LMPIPE_DEVICE overrides."""
    tracking_grace_s: float = Field(ge=0)
    """Seconds a stage waits at its end for an unreachable MLflow server to come back, flushing the metrics
    it buffered meanwhile; after that it fails with its checkpoint intact and a re-run logs them."""


class TextSource(Section):
    path: str
    """File under the data dir (txt, csv, tsv, jsonl, parquet) or `hf:<dataset id>[:split]`."""
    text_column: str | None = None
    """Column holding the text (tabular files); txt files have none."""
    unit: Literal["line", "paragraph", "file"] = "line"
    """For txt: one document per line, per blank-line separated paragraph, or the whole file as one."""
    encoding: str = "utf-8"
    """File encoding; decoding errors are reported, never replaced."""
    header: bool = True
    """Tabular files: first row is a header. Without one, columns are named by `columns`."""
    columns: list[str] | None = None
    """Column names for header-less tabular files."""


class LabeledSource(TextSource):
    label_column: str | None = None
    """Column holding the class label (int or string); format trec has none (the label is on the line)."""
    text_columns: list[str] | None = None
    """Several text columns joined with a space into the text (AG News: title, description); instead of
    text_column."""
    format: Literal["table", "trec"] = "table"
    """table: a tabular file (csv, tsv, jsonl, parquet); trec: the TREC question files, one `COARSE:fine
    question` per line (the coarse class is the label)."""

    @model_validator(mode="after")
    def _format(self) -> "LabeledSource":
        if self.format == "table" and self.label_column is None:
            raise ValueError("label_column: missing key (format table)")
        if self.text_columns is not None and self.text_column is not None:
            raise ValueError("text_columns: give text_column or text_columns, not both")
        if self.format == "trec" and (self.label_column or self.text_column or self.text_columns):
            raise ValueError("format: trec lines carry their own label and text; drop the column keys")
        return self


TASK_NAME = r"^[a-z][a-z0-9_]*$"


class Labeled(Section):
    name: str = Field(pattern=TASK_NAME)
    """The task's name (finetune.tasks, /predict's `task`); its splits are clean.out_dir/labeled_*.parquet."""
    train: LabeledSource
    """Labelled training file; a seeded `validation_fraction` of it becomes the validation split."""
    test: LabeledSource
    """Held-out labelled file used only by evaluate (SST-2 dev by default)."""
    validation_fraction: float = Field(gt=0, lt=1)
    """Share of the labelled train file held out for model selection."""
    label_names: list[str] | None
    """Human names for the classes, in the sorted order of the raw label values (default: the values)."""


class Task(Section):
    train: LabeledSource
    """Labelled file; seeded shares of it become validation (and test, when there is no test file)."""
    test: LabeledSource | None = None
    """Held-out labelled file; null: a seeded test_fraction of train is held out instead (AG News ships only
    its test file)."""
    validation_fraction: float = Field(gt=0, lt=1)
    """Share of the train file held out for model selection."""
    test_fraction: float | None = Field(None, gt=0, lt=1)
    """With no test file: share of the train file held out as the test split."""
    label_names: list[str] | None = None
    """Human names for the classes, in the sorted order of the raw label values (default: the values)."""

    @model_validator(mode="after")
    def _test(self) -> "Task":
        if (self.test is None) == (self.test_fraction is None):
            raise ValueError("test_fraction: give a test file or a test_fraction of the train file (exactly one)")
        if self.test_fraction is not None and self.test_fraction + self.validation_fraction >= 1:
            raise ValueError(f"test_fraction: {self.test_fraction} + validation_fraction {self.validation_fraction} "
                             "leave no training rows")
        return self


class SftSource(Section):
    path: str
    """jsonl or parquet under the data dir: one conversation per line/row, a `messages` list of {role, content}
    turns (roles system, user, assistant) or `prompt` + `response` (+ optional `system`) columns."""
    encoding: str = "utf-8"
    """jsonl encoding; decoding errors are reported, never replaced."""


class TaskTemplate(Section):
    prompt: str
    """The user turn, a str.format template over {text} (the example) and {label} (its label word)."""
    response: str
    """The assistant turn, usually "{label}": the label word (clean's label_names) the model should answer."""
    system: str | None = None
    """An optional system turn (same fields)."""


class Sft(Section):
    sources: list[SftSource]
    """Your own instruction / chat data (finetune.head: lm trains on all of it); cleaned, deduplicated and split
    seeded into train / validation / test."""
    templates: dict[str, TaskTemplate]
    """Instruction-formatted versions of the labelled tasks, by task name (clean.labeled's, clean.tasks'): the
    same splits as the classifier's, each example rendered through its task's template."""
    validation_fraction: float = Field(gt=0, lt=1)
    """sources: share of the conversations held out for model selection."""
    test_fraction: float = Field(gt=0, lt=1)
    """sources: share of the conversations held out for evaluate (response perplexity)."""

    @model_validator(mode="after")
    def _templates(self) -> "Sft":
        issues = [i for name, t in self.templates.items() for i in template_issues(name, t.prompt, t.response, t.system)]
        if self.validation_fraction + self.test_fraction >= 1:
            issues.append(f"test_fraction: {self.test_fraction} + validation_fraction {self.validation_fraction} "
                          "leave no training conversations")
        if issues:
            raise ValueError("\n".join(issues))
        return self


class Clean(Section):
    corpus: list[TextSource]
    """Unlabelled pretraining sources, concatenated."""
    labeled: Labeled
    """The classification task (a single-task pipeline has only this one)."""
    tasks: dict[str, Task]
    """More named classification tasks for multi-task fine-tuning (finetune.tasks); each one's splits are
    clean.out_dir/tasks/<name>/labeled_*.parquet."""
    mask: list[MaskKind]
    """Personal data replaced by `<kind>` placeholders in every corpus document, labelled text and conversation
    before anything else (lmpipe/masking.py): email, url, ip, card, phone; [] masks nothing. Counted per kind in
    clean.metrics (`mask`)."""
    min_chars: int = Field(ge=1)
    """Drop documents shorter than this after normalisation (characters)."""
    max_chars: int = Field(ge=1)
    """Drop documents longer than this after normalisation (characters)."""
    validation_fraction: float = Field(gt=0, lt=1)
    """Share of the corpus held out for validation / perplexity (documents, or characters with split tail)."""
    split: Literal["random", "tail"]
    """random: a seeded random share of the documents is validation; tail: the last validation_fraction of
    the corpus characters, in order (nanoGPT's split; a document straddling the cut is cut there)."""
    sft: Sft
    """Instruction data for generative fine-tuning (finetune.head: lm): your own conversations and the tasks'
    instruction-formatted versions; written under clean.out_dir/sft/."""
    keep_newlines: bool = False
    """Keep line breaks inside corpus documents (verse, char-level LMs); other whitespace is still collapsed."""
    out_dir: str
    """Output folder for the parquet splits."""
    metrics: str
    """Rows in/out per rule, and the MLflow run id."""

    @model_validator(mode="after")
    def _lengths(self) -> "Clean":
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars: {self.max_chars} is below min_chars ({self.min_chars})")
        for name in self.tasks:
            if not re.match(TASK_NAME, name):
                raise ValueError(f"tasks: task name {name!r} must be lower-case letters, digits and _")
            if name == self.labeled.name:
                raise ValueError(f"tasks: {name!r} is already clean.labeled's name")
        unknown = [t for t in self.sft.templates if t not in self.task_names()]
        if unknown:
            raise ValueError(f"sft.templates: no task {unknown[0]!r}; clean defines {', '.join(self.task_names())}")
        return self

    def task_names(self) -> list[str]:
        return [self.labeled.name, *self.tasks]


class Tokenize(Section):
    kind: Literal["bpe", "wordpiece", "char", "pretrained"]
    """Tokenizer model: byte-level BPE, WordPiece, one token per character (all trained on the corpus), or
    pretrained = the tokenizer of the pretrain.init checkpoint, used as it is (continued pretraining)."""
    vocab_size: int = Field(ge=1)
    """Vocabulary size including special tokens (ignored by char, which uses the corpus alphabet, and by
    pretrained, which keeps the checkpoint's)."""
    min_frequency: int = Field(ge=1)
    """Minimum pair frequency for a merge."""
    block_size: int = Field(ge=2)
    """Tokens per packed training block."""
    chat_tokens: bool
    """Append the chat role markers (<|system|>, <|user|>, <|assistant|>) as special tokens after the trained
    vocabulary and save the chat template with the tokenizer (lmpipe/chat.py), so pretraining has them in its
    vocabulary; needed by finetune.head: lm. Every other id stays the same; off, the tokenizer is as before."""
    parallel: bool
    """The tokenizers backend's threads (one per core) for training and encoding; TOKENIZERS_PARALLELISM, when
    set, wins. The ids are the same either way."""
    tokenizer_dir: str
    """Output: a transformers fast-tokenizer directory."""
    out_dir: str
    """Output: packed blocks, one .npy per split (memory-mappable)."""
    metrics: str
    """Tokens per split, tokens/s, MLflow run id."""

    @model_validator(mode="after")
    def _vocab(self) -> "Tokenize":
        if self.kind == "pretrained":
            if self.chat_tokens:
                raise ValueError("chat_tokens: kind pretrained keeps the checkpoint's tokenizer as it is (and its own "
                                 "chat template); set chat_tokens: false")
            return self
        if self.kind != "char" and self.vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size: {self.vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens "
                f"{', '.join(SPECIAL_TOKENS)}")
        if self.kind == "bpe" and self.vocab_size <= 256 + len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size: {self.vocab_size} must exceed 256 byte tokens + {len(SPECIAL_TOKENS)} special tokens for bpe")
        return self


class Pretrain(Section):
    init: str
    """scratch = a new model built from the keys below; otherwise a checkpoint to continue pretraining
    (domain-adaptive): `package:<name>` (an installed model package's model/ folder) or a local HF model dir.
    The checkpoint's config.json is then the architecture: arch and the shape keys (hidden_size, num_layers,
    num_heads, intermediate_size, max_position_embeddings, dropout) are not used; objective must be one the
    checkpoint has (mlm for encoders, clm for decoders), and tokenize.kind must be pretrained."""
    objective: Objective
    """clm = causal LM (next token); mlm = masked LM (BERT style); simcse = unsupervised contrastive sentence
    embeddings on an encoder (lmpipe/objectives.py); mlm_nsp = BERT's masked LM + next-sentence prediction."""
    simcse_temperature: float = Field(gt=0)
    """simcse: softmax temperature of the in-batch cosine similarities (SimCSE's 0.05)."""
    pooling: Literal["mean", "cls"]
    """simcse: sentence embedding = mean of the token states, or the first ([CLS]) token's."""
    arch: Literal["llama", "gpt2", "bert"]
    """transformers architecture for the model config (init: scratch only)."""
    hidden_size: int = Field(ge=8)
    """Model width."""
    num_layers: int = Field(ge=1)
    """Transformer blocks."""
    num_heads: int = Field(ge=1)
    """Attention heads; must divide hidden_size."""
    intermediate_size: int = Field(ge=1)
    """MLP width."""
    max_position_embeddings: int = Field(ge=2)
    """Longest sequence the model accepts; block_size and finetune.max_length must fit."""
    dropout: float = Field(ge=0, lt=1)
    """Dropout in attention and MLP (0 for short pretraining runs)."""
    mlm_probability: float = Field(gt=0, lt=1)
    """Share of tokens masked per batch (mlm only)."""
    learning_rate: float = Field(gt=0)
    """Peak AdamW learning rate."""
    optimizer: Optimizer
    """Trainer's `optim`: adamw_torch_fused (AdamW, one fused kernel), adamw_torch, adafactor, sgd, adagrad, rmsprop."""
    lr_scheduler: Scheduler
    """Trainer's `lr_scheduler_type` after the warmup: cosine_with_min_lr decays to min_lr_ratio of the peak;
    linear, cosine, constant, constant_with_warmup, ... as Trainer names them."""
    min_lr_ratio: float = Field(ge=0, le=1)
    """Cosine decay floor as a share of the peak (lr_scheduler cosine_with_min_lr only)."""
    warmup_steps: int = Field(ge=0)
    """Linear warmup steps."""
    max_steps: int = Field(ge=1)
    """Optimizer steps."""
    batch_size: int = Field(ge=1)
    """Blocks per device per micro-batch."""
    gradient_accumulation_steps: int = Field(ge=1)
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory for
    more compute per step (Trainer's own option; benchmarks/checkpointing_memory.py measures both)."""
    weight_decay: float = Field(ge=0)
    """AdamW weight decay."""
    adam_beta1: float = Field(ge=0, lt=1)
    """AdamW's first-moment decay."""
    adam_beta2: float = Field(ge=0, lt=1)
    """AdamW's second-moment decay (0.95 is the usual choice for LMs; nanoGPT's small char model uses 0.99)."""
    window_stride: int | Literal["block"]
    """Training windows: block = the packed blocks as they are, each token seen once per epoch; an int N
    (1 <= N <= block_size) = windows of block_size tokens starting every N tokens of the concatenated train
    blocks, overlapping when N < block_size (1 = every start position, as nanoGPT's random windows sample).
    Validation always uses the packed blocks."""
    max_grad_norm: float = Field(gt=0)
    """Gradient clipping norm."""
    eval_every: int = Field(ge=1)
    """Validation loss/perplexity every N steps."""
    eval_batches: int = Field(ge=1)
    """At most this many validation batches per evaluation (the final one uses all)."""
    checkpoint_every: int = Field(ge=1)
    """Checkpoint every N steps."""
    keep_last: int = Field(ge=1)
    """Checkpoints kept on disk."""
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    """auto = bf16 on CUDA that supports it; on CPU bf16 only with compile on a CPU with native bf16
    (avx512_bf16/AMX), where it measured faster; fp32 otherwise."""
    compile: bool
    """torch.compile the model (Trainer's torch_compile, inductor): a one-off compile, then faster steps."""
    attention: Literal["auto", "sdpa", "eager"]
    """transformers attention implementation; auto = eager under compile (inductor fuses it: measured
    faster on CPU than SDPA's flash kernel at short contexts, much faster in bf16), sdpa otherwise."""
    fsdp: str = ""
    """Trainer's FSDP option (e.g. "full_shard auto_wrap"); empty = plain DDP when several processes run."""
    nproc_per_node: int | Literal["auto"] = Field(1)
    """Processes on this host: >1 or auto launches the stage through torchrun (DDP; gloo on CPU, nccl on GPU).
    auto = one per GPU, or one per CPU core without GPUs. batch_size stays per process."""
    log_every: int = Field(ge=1)
    """Log loss/lr/tokens-per-s to MLflow every N steps."""
    out_dir: str
    """Output: final model (HF format, safetensors)."""
    checkpoint_dir: str
    """Checkpoints, one folder per configuration fingerprint; not a DVC output, so it survives re-runs (resume)."""
    metrics: str
    """Final losses, perplexity, throughput, MLflow run id."""
    plot: str
    """Loss curve (step, split, loss) as a DVC plot."""
    sample_prompts: list[str]
    """clm: text the model continues at every evaluation and at the end (seeded by common.seed), logged to
    MLflow as the table samples.json and the last ones written to pretrain.samples; [] = no samples."""
    sample_max_new_tokens: int = Field(ge=1)
    """Tokens generated per sample prompt; prompt + these must fit the model's positions (checked, with the
    tokenizer, before training starts)."""
    sample_temperature: float = Field(ge=0)
    """Sampling temperature of the samples; 0 = greedy decoding."""
    sample_top_k: int | None = Field(ge=1)
    """Sample from the k most likely tokens only; null = the whole vocabulary."""
    samples: str
    """Output: the final samples (step, sampling settings, prompt and text), a DVC output like the metrics."""

    @model_validator(mode="after")
    def _shape(self) -> "Pretrain":
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node: {self.nproc_per_node} must be >= 1 or auto")
        if any(not p.strip() for p in self.sample_prompts):
            raise ValueError("sample_prompts: an empty prompt (give text for the model to continue)")
        if self.sample_prompts and self.fsdp:
            raise ValueError("sample_prompts: samples need the whole model on one process, which fsdp shards "
                             "(set pretrain.sample_prompts=[] with fsdp)")
        if self.init != "scratch":
            return self  # the checkpoint's config is the architecture (checked against it by the stages)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size: {self.hidden_size} is not divisible by num_heads ({self.num_heads})")
        if self.objective in ("mlm", "simcse", "mlm_nsp") and self.arch != "bert":
            raise ValueError(f"objective: {self.objective} needs arch bert (got {self.arch})")
        if self.objective == "simcse" and self.dropout == 0:
            raise ValueError("dropout: simcse needs dropout > 0 (the two dropout masks are its positive pair); "
                             "e.g. pretrain.dropout=0.1")
        if self.objective == "clm" and self.arch == "bert":
            raise ValueError("objective: clm needs arch llama or gpt2 (got bert)")
        return self


class Freeze(Section):
    layers: int = Field(ge=0)
    """Transformer layers frozen from the bottom, on top of the embeddings (0 = embeddings only)."""


class Llrd(Section):
    decay: float = Field(gt=0, le=1)
    """Learning-rate factor per layer going down: the top layer trains at learning_rate, the one below at
    learning_rate * decay, ..., the embeddings lowest; the classifier head at learning_rate."""


class Lora(Section):
    r: int = Field(ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(gt=0)
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(ge=0, lt=1)
    """Dropout on the LoRA branch input."""
    target_modules: list[str] | Literal["auto", "all-linear"]
    """Module names (or name suffixes) to adapt; auto = peft's per-architecture default (the attention
    query/value projections), all-linear = every linear layer except the head."""

    @model_validator(mode="after")
    def _targets(self) -> "Lora":
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: empty list; name modules, or use auto or all-linear")
        return self


class VirtualTokens(Section):
    num_virtual_tokens: int = Field(ge=1)
    """Trained virtual tokens; they take positions from the model, so this + max_length must fit."""


class Distill(Section):
    teacher: str | None
    """A fine-tuned classifier: a local HF model dir or models:/NAME@alias | models:/NAME/VERSION (registry)."""
    temperature: float = Field(gt=0)
    """Softmax temperature T for both teacher and student soft labels."""
    alpha: float = Field(ge=0, le=1)
    """Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy on the hard labels."""


class Adversarial(Section):
    method: Literal["none", "fgm", "pgd"]
    """Adversarial training on the word embeddings: none, FGM (one step of size epsilon along the loss gradient)
    or PGD (`steps` steps of size `alpha`, projected into the epsilon ball); the model trains on the clean plus
    the adversarial loss."""
    epsilon: float = Field(gt=0)
    """Radius of the perturbation (L2 norm per example over its tokens' embeddings)."""
    alpha: float = Field(gt=0)
    """pgd: step size of each ascent step."""
    steps: int = Field(ge=1)
    """pgd: ascent steps per training step (each one more forward and backward pass)."""


class Augment(Section):
    copies: int = Field(ge=0)
    """Augmented copies added per training example (0 = off); validation and test are never augmented."""
    probability: float = Field(gt=0, le=1)
    """Share of an example's words each operation touches (deleted, swapped or inserted; at least one)."""
    ops: list[Literal["delete", "swap", "insert", "contextual", "neighbour", "backtranslate"]] = Field(min_length=1)
    """Operations drawn from per copy: random deletion, random swap, random insertion of a word from the
    training split's vocabulary (no downloaded resources); `contextual`: words replaced by the masked LM's top
    predictions in their context (augment.model, which needs an MLM head); `neighbour`: words replaced by their
    nearest tokens in augment.model's input-embedding space (any encoder or decoder). `backtranslate` is refused:
    it needs a translation model, and none can be had offline."""
    model: str | None
    """contextual / neighbour: pretrained (the pretrain stage's model, e.g. MiniLM after continued MLM
    pretraining), package:NAME or a local model dir."""
    top_k: int = Field(ge=1)
    """contextual / neighbour: a replacement is drawn (seeded) from the word's top_k candidates."""

    @model_validator(mode="after")
    def _model_ops(self) -> "Augment":
        if "backtranslate" in self.ops:
            raise ValueError("ops: backtranslate needs a translation model, and none can be had offline (no Hugging "
                             "Face hub); use contextual or neighbour")
        needs = [op for op in self.ops if op in ("contextual", "neighbour")]
        if needs and not self.model:
            raise ValueError(f"model: augment.ops {needs} need augment.model (pretrained, package:NAME or a model dir)")
        if self.model == "scratch":
            raise ValueError("model: scratch has no learned words to propose; pretrained, package:NAME or a model dir")
        return self


class Finetune(Section):
    init: str
    """pretrained (the pretrain stage's model), scratch (same architecture, random init), or a local HF model dir."""
    scratch_baseline: bool
    """Also fine-tune a randomly initialised copy with the same budget (evaluate reports the benefit)."""
    original_baseline: bool
    """With continued pretraining (pretrain.init a checkpoint, finetune.init pretrained): also fine-tune the
    original checkpoint with the same budget, so evaluate compares continued vs original vs scratch."""
    head: Head
    """classifier: a sequence-classification head on the labelled task(s); lm: generative (instruction)
    fine-tuning of the causal LM on clean.sft's conversations, the loss on the assistant tokens only
    (lmpipe/sft.py)."""
    strategy: Strategy
    """What trains (lmpipe/strategies.py): all weights, a frozen bottom, layer-wise LRs, a PEFT adapter, or a
    student distilled from a teacher. Only the strategy's own block below is read."""
    freeze: Freeze
    """strategy freeze."""
    llrd: Llrd
    """strategy llrd (layer-wise learning-rate decay)."""
    lora: Lora
    """strategy lora (peft LoRA; merged into a plain model on save)."""
    prefix: VirtualTokens
    """strategy prefix (peft prefix tuning: trained key/value prefixes in every layer)."""
    prompt: VirtualTokens
    """strategy prompt (peft prompt tuning: trained input embeddings prepended to the text)."""
    distill: Distill
    """strategy distill (knowledge distillation from a teacher classifier)."""
    max_length: int = Field(ge=2)
    """Truncate inputs to this many tokens."""
    learning_rate: float = Field(gt=0)
    """Peak learning rate."""
    optimizer: Optimizer
    """Trainer's `optim`: adamw_torch_fused (AdamW, one fused kernel), adamw_torch, adafactor, sgd, adagrad, rmsprop."""
    lr_scheduler: Scheduler
    """Trainer's `lr_scheduler_type` after the warmup: linear (to 0 at the last step), cosine, constant,
    constant_with_warmup, ... as Trainer names them."""
    warmup_ratio: float = Field(ge=0, lt=1)
    """Share of steps spent in linear warmup (when warmup_steps is null)."""
    warmup_steps: int | None = Field(ge=0)
    """Linear warmup in steps; null = warmup_ratio of the steps."""
    weight_decay: float = Field(ge=0)
    """Weight decay (decoupled for AdamW)."""
    max_grad_norm: float = Field(gt=0)
    """Gradient clipping norm."""
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    """auto = bf16 on CUDA that supports it, fp32 on CPU; bf16 = autocast (on CPU worth it with native bf16:
    avx512_bf16/AMX); fp16 needs CUDA."""
    sampler: Sampler
    """Training batches: random, or group_by_length (Trainer's LengthGroupedSampler: batches of similar
    length padded to their longest, so a step costs what its tokens cost; evaluation too)."""
    gradient_accumulation_steps: int = Field(ge=1)
    """Micro-batches of batch_size per optimizer step (a larger batch in the same memory)."""
    gradient_checkpointing: bool
    """Recompute each layer's activations in the backward pass instead of keeping them: less memory for
    more compute per step (Trainer's own option; benchmarks/checkpointing_memory.py measures both)."""
    rdrop_alpha: float = Field(ge=0)
    """R-Drop (classifier head): each batch runs twice with different dropout masks and the loss adds
    alpha x the symmetric KL between the two predictions (lmpipe/regularization.py); 0 = off. Needs dropout
    in the model."""
    label_smoothing: float = Field(ge=0, lt=1)
    """Label smoothing of the training cross-entropy (Trainer's label_smoothing_factor); 0 = off."""
    dropout: float | None = Field(ge=0, lt=1)
    """Overrides every dropout probability of the model's config (hidden, attention, classifier); null keeps
    the checkpoint's own."""
    patience: int | None = Field(ge=1)
    """Early stopping: stop after this many evaluations without a better validation accuracy; null = off."""
    adversarial: Adversarial
    """Adversarial training (FGM / PGD on the word embeddings)."""
    augment: Augment
    """Text augmentation of the training split."""
    batch_size: int = Field(ge=1)
    """Examples per step."""
    epochs: float = Field(gt=0)
    """Passes over the training split (fractions allowed)."""
    max_steps: int = Field(ge=-1)
    """If > 0, overrides epochs: the fixed step budget for every model."""
    max_minutes: float | None = Field(gt=0)
    """Wall-clock cap on each model's training in one process: the step that crosses it is evaluated and saved,
    and training ends there (metrics: stopped_by_time_cap). A guard, not the budget (steps are, so runs
    reproduce): the schedule still plans for max_steps. null = no cap."""
    eval_every: int = Field(ge=1)
    """Validation accuracy every N steps; the best checkpoint is kept."""
    seed: int | None
    """Fine-tuning's own seed (head init, data order, augmentation); null = common.seed. The splits keep
    common.seed, so models that differ only here (an ensemble's members) were selected on one validation split."""
    tasks: list[str] | None
    """Tasks trained (clean.labeled's name and clean.tasks' names); null = clean.labeled only. With several:
    one shared encoder, one head per task (lmpipe/tasks.py), the best checkpoint by the mean of the per-task
    validation accuracies; the first task is the default one (drift reference, /predict without `task`)."""
    sampling: Literal["proportional", "temperature", "round_robin"]
    """Multi-task: each batch holds one task, drawn with probability proportional to the task's training
    examples, to n^(1/temperature), or in turn."""
    sampling_temperature: float = Field(gt=0)
    """sampling: temperature T (1 = proportional, large = uniform)."""
    loss_weights: dict[str, float] | None
    """Multi-task: a weight per task name on its examples' cross-entropy (default 1 each)."""
    single_task_baselines: bool
    """Multi-task: also fine-tune one model per task with the steps that task got in the multi-task run, so
    evaluate measures the transfer (multi-task minus single-task score)."""
    single_task_dir: str
    """Output: one folder per task with its single-task baseline."""
    out_dir: str
    """Output: the selected classifier (HF format)."""
    scratch_dir: str
    """Output: the scratch baseline classifier."""
    original_dir: str
    """Output: the classifier fine-tuned from the original checkpoint (original_baseline)."""
    checkpoint_dir: str
    """Checkpoints and finished variants, one folder per configuration fingerprint; not a DVC output, so it survives re-runs (resume)."""
    metrics: str
    """Validation metrics and MLflow run id."""


class SampledAnswers(Section):
    prompts: int = Field(ge=0)
    """finetune.head lm: test prompts per source (the first ones, so the same every run) answered with sampling
    and logged as an MLflow table (0 = none)."""
    max_new_tokens: int = Field(ge=1)
    """Longest sampled answer (tokens)."""
    temperature: float = Field(gt=0)
    """Sampling temperature (seeded by common.seed)."""
    top_p: float = Field(gt=0, le=1)
    """Nucleus sampling share."""


class Evaluate(Section):
    batch_size: int = Field(ge=1)
    """Inference batch size."""
    samples: SampledAnswers
    """finetune.head lm: the table of sampled answers to fixed prompts."""
    metrics: str
    """Output: lm.perplexity, classifier.*, scratch_baseline.*."""
    confusion: str
    """Output: one row per test example (actual, predicted) for the DVC confusion plot."""
    confusion_png: str
    """Output: the confusion matrix as an image (also an MLflow artifact)."""
    reference_profile: str
    """Output: the drift reference (lmpipe.monitoring) of the classifier's test-split predictions, with the
    training split's words; deploy ships it in the model directory as drift_reference.json."""


class Deploy(Section):
    min_accuracy: float = Field(ge=0, le=1)
    """Quality gate: register only when test accuracy reaches this."""
    min_exact_match: float = Field(ge=0, le=1)
    """finetune.head lm: quality gate on the generator's exact match (the task-derived test prompts)."""
    max_perplexity: float = Field(gt=0)
    """finetune.head lm: quality gate on the generator's response perplexity (held-out responses)."""
    max_perplexity_increase: float = Field(ge=0)
    """finetune.head lm: the int8_dynamic variant is refused when its response perplexity exceeds fp32's by more
    than this share (0.05 = 5%)."""
    model_name: str
    """MLflow registered model name."""
    alias: str
    """Alias moved to a new version only if it beats the current holder."""
    publish: bool
    """Build, measure and register the variants and move the alias; false (what sweep trials run): the
    gate outcome is recorded, nothing is registered, the alias stays."""
    variants: list[Variant] = Field(min_length=1)
    """Variants built, scored on the test split, timed and registered when they pass the drop gate
    (lmpipe/compress.py); fp32 is always measured as the reference."""
    serve_variant: Variant
    """The variant the alias points at (fp32 when it was refused by the gate)."""
    max_accuracy_drop: float = Field(ge=0, le=1)
    """A variant losing more test accuracy than this against fp32 is refused (recorded, not an error)."""
    sparsity: float = Field(gt=0, lt=1)
    """`pruned`: share of each encoder Linear's weights zeroed by L1 magnitude."""
    ensemble: list[str]
    """`ensemble`: the other classifiers whose probabilities are averaged with this run's fine-tuned model's:
    fine-tuned model dirs (relative to the checkout) or registered versions (models:/NAME/VERSION; an @alias is
    read when deploy runs). Each must predict the same tasks and labels."""
    latency_repeats: int = Field(ge=1)
    """Timed forward passes per variant, at batch 1 and at batch 32 (the first 32 test sentences); medians."""
    out_dir: str
    """Output: the deployable model (the served variant's directory)."""
    metrics: str
    """Gate outcome, per-variant table, registered versions, MLflow run id."""

    @model_validator(mode="after")
    def _served(self) -> "Deploy":
        if self.serve_variant not in self.variants:
            raise ValueError(f"serve_variant: {self.serve_variant} is not one of deploy.variants {self.variants}")
        if "ensemble" in self.variants and not self.ensemble:
            raise ValueError("ensemble: deploy.variants names ensemble but deploy.ensemble lists no other model "
                             "(fine-tuned model dirs or models:/NAME/VERSION)")
        if twice := sorted({m for m in self.ensemble if self.ensemble.count(m) > 1}):
            raise ValueError(f"ensemble: {twice[0]} is listed twice")
        if own := [m for m in self.ensemble if m == f"models:/{self.model_name}@{self.alias}"]:
            raise ValueError(f"ensemble: {own[0]} moves to each deploy's served version (an ensemble, once one is "
                             f"promoted); name a version: models:/{self.model_name}/N")
        return self


class Monitor(Section):
    window: int = Field(ge=1)
    """Live texts in the sliding window the drift PSI is computed over."""
    min_samples: int = Field(ge=1)
    """No PSI before the window holds this many texts (a handful of texts is noise, not drift)."""
    psi_alert: float = Field(gt=0)
    """A warning is logged when a feature's PSI rises above this (0.25: a major shift by the usual rule)."""


class Alerts(Section):
    p99_latency_s: float = Field(gt=0)
    """LmpipeLatencyHigh: a route's p99 request latency above this."""
    error_share: float = Field(gt=0, lt=1)
    """LmpipeErrors: the share of requests answered 5xx above this."""
    saturation_share: float = Field(gt=0, lt=1)
    """LmpipeSaturated: the share answered 503 (queue full, waited too long) or 504 (inference too slow) above this."""
    quiet_minutes: float = Field(gt=0)
    """LmpipeNoTraffic: no /predict, /embed or /generate request for this long."""
    window_minutes: int = Field(ge=1)
    """Rates and quantiles are taken over this window, and a condition must hold this long before it fires."""


class Placement(Section):
    pools: dict[str, str | None]
    """Stage -> the Prefect work pool whose workers run it (`lmpipe.placement`). A stage not named, or null, runs
    wherever the flow runs: an empty map is one host. Not a DVC param of any stage: moving a stage to other
    hardware does not change what it computes."""
    stage_timeout_s: float = Field(gt=0)
    """How long the flow waits for another pool's worker to run one stage (queued included) before it fails the
    stage, naming the pool it waited for."""
    silent_after_s: float = Field(ge=60)
    """A flow run with no heartbeat for this long is marked Crashed (a Prefect automation `python -m
    flows.deployments` registers): a stage whose host died is then handed out again and resumes from its last
    checkpoint. Longer than the flow runs' heartbeat (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default)."""

    @field_validator("pools")
    @classmethod
    def _stages(cls, pools: dict[str, str | None]) -> dict[str, str | None]:
        unknown = sorted(set(pools) - set(STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {list(STAGES)}")
        bad = [f"{k}: {v!r}" for k, v in pools.items() if v is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", v)]
        if bad:
            raise ValueError(f"pool names are letters, digits, '.', '_', '-' ({', '.join(bad)})")
        return pools


class Serve(Section):
    host: str
    """Interface `lmpipe serve` binds; a non-loopback host needs a token (or --allow-unauthenticated)."""
    port: int = Field(ge=0, le=65535)
    """TCP port."""
    max_batch_size: int = Field(ge=1)
    """Micro-batching: at most this many texts per batch, one call into the model (a request with more runs alone);
    /generate: at most this many requests as the rows of one generate call."""
    forward_batch_size: int = Field(ge=1)
    """A batch is sorted by text length and run in forward passes of this many texts: less padding (measured in
    docs/results.md)."""
    max_wait_ms: float = Field(ge=0)
    """Micro-batching: how long the first request of a batch waits for others to join (ms). /generate waits only
    when the last generate call had company (more than one row, or requests queued behind it): a lone client pays
    no wait; after a call ends, the wait counts from its end, so the clients it answered can join the next one."""
    stream_interval_ms: float = Field(ge=0)
    """/generate streaming: each request's new text goes out at most this often (one event with the text of the
    steps since), its first text and its end at once; 0 = an event per token. Fewer hand-offs from the generating
    thread to the event loop (measured in docs/results.md)."""
    max_queue: int = Field(ge=1)
    """Texts (/generate: requests) waiting for a batch at most; beyond it a request is refused at once (503)."""
    request_timeout_s: float = Field(gt=0)
    """A request still waiting for a batch slot after this long gets 503."""
    inference_timeout_s: float = Field(gt=0)
    """A forward pass (its batch) running longer than this answers its requests with 504."""
    max_body_bytes: int = Field(ge=1)
    """Request bodies above this size get 413."""
    max_texts: int = Field(ge=1)
    """Texts per request at most (422 beyond)."""
    max_chars: int = Field(ge=1)
    """Characters per text (/generate: per prompt or message) at most (422 beyond)."""
    max_new_tokens: int = Field(ge=1)
    """/generate: new tokens per request at most (422 beyond); a request that names none gets
    lmpipe.generation.Sampling's default, capped at this."""
    max_prompt_tokens: int = Field(ge=1)
    """/generate: prompt tokens at most, BOS or the chat template's tokens included (422 beyond)."""
    reload_interval_s: float = Field(gt=0)
    """A server started on models:/NAME@alias checks the alias this often and swaps to the new version."""
    threads: int = Field(ge=0)
    """torch intra-op threads of the inference thread; 0 = torch's default (one per core). 1 leaves the other
    core to the HTTP event loop: on 2 shared cores a small model's forward pass was 4x slower on 2 threads."""
    monitor: Monitor
    """Drift monitoring of live traffic against the model's drift_reference.json."""
    alerts: Alerts
    """Thresholds of the Prometheus alert rules `lmpipe alerts` writes (ops/prometheus/alerts.yml); drift's is
    monitor.psi_alert."""


class Services(Section):
    host: str
    """Interface the MLflow and Prefect servers of `lmpipe services up` bind (PostgreSQL always binds 127.0.0.1:
    only those two servers use it). A non-loopback host exposes both servers, which have no auth of their own."""
    postgres_port: int = Field(ge=0, le=65535)
    """TCP port of the PostgreSQL cluster on 127.0.0.1; 0: a free port, chosen at the first `up` and kept."""
    mlflow_port: int = Field(ge=0, le=65535)
    """TCP port of the MLflow tracking server; 0: a free port, chosen at the first `up` and kept."""
    prefect_port: int = Field(ge=0, le=65535)
    """TCP port of the Prefect server; 0: a free port, chosen at the first `up` and kept."""
    mlflow_workers: int = Field(ge=1)
    """MLflow server worker processes (uvicorn): parallel writers are served by this many processes."""
    state_dir: str
    """Folder (git-ignored) holding the cluster, artifacts, logs and pid files; env LMPIPE_SERVICES_DIR or
    `lmpipe services --state-dir` override."""
    start_timeout_s: float = Field(gt=0)
    """How long `up` waits for each server's health endpoint (Prefect migrates its database at the first start)."""


class Params(Section):
    common: Common
    clean: Clean
    tokenize: Tokenize
    pretrain: Pretrain
    finetune: Finetune
    evaluate: Evaluate
    deploy: Deploy
    serve: Serve
    services: Services
    placement: Placement

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        issues = []
        # a pretrain.init checkpoint brings its own positions: the stages check block_size and max_length
        # against its config.json (the params cannot see it)
        scratch = self.pretrain.init == "scratch"
        if scratch and self.tokenize.block_size > self.pretrain.max_position_embeddings:
            issues.append(
                f"tokenize.block_size: {self.tokenize.block_size} exceeds pretrain.max_position_embeddings "
                f"({self.pretrain.max_position_embeddings})")
        stride = self.pretrain.window_stride
        if stride != "block" and not 1 <= stride <= self.tokenize.block_size:
            issues.append(f"pretrain.window_stride: {stride} must be block or between 1 and tokenize.block_size "
                          f"({self.tokenize.block_size})")
        if (self.tokenize.kind == "pretrained") == scratch:
            issues.append(
                f"tokenize.kind: {self.tokenize.kind} with pretrain.init: {self.pretrain.init}; a checkpoint "
                "continues with its own tokenizer (tokenize.kind: pretrained), and only a checkpoint has one "
                "(pretrain.init: scratch trains a new tokenizer: bpe, wordpiece or char)")
        if scratch and self.finetune.init in ("pretrained", "scratch") and self.finetune.max_length > self.pretrain.max_position_embeddings:
            issues.append(
                f"finetune.max_length: {self.finetune.max_length} exceeds pretrain.max_position_embeddings "
                f"({self.pretrain.max_position_embeddings})")
        if self.finetune.strategy == "distill" and not self.finetune.distill.teacher:
            issues.append("finetune.distill.teacher: strategy distill needs a teacher (a fine-tuned model dir or "
                          "models:/NAME@alias)")
        if self.finetune.strategy == "distill" and self.finetune.label_smoothing > 0:
            issues.append(f"finetune.label_smoothing: {self.finetune.label_smoothing} with strategy distill: the "
                          "teacher's soft labels are the smoothing (its loss has no label-smoothing term); set 0")
        if self.finetune.original_baseline and (scratch or self.finetune.init != "pretrained"):
            issues.append(f"finetune.original_baseline: true needs continued pretraining (pretrain.init a checkpoint, "
                          f"finetune.init: pretrained); got pretrain.init: {self.pretrain.init}, finetune.init: "
                          f"{self.finetune.init}")
        if self.finetune.init == "scratch" and self.finetune.scratch_baseline:
            issues.append("finetune.scratch_baseline: true with finetune.init: scratch trains the same random-init "
                          "model twice (a benefit of 0); set finetune.scratch_baseline: false or another init")
        issues.extend(self._rdrop_issues())
        issues.extend(self._task_issues())
        issues.extend(self._head_issues())
        if issues:
            raise ValueError("\n".join(issues))
        return self

    def _rdrop_issues(self) -> list[str]:
        """finetune.rdrop_alpha: two dropout passes need dropout, and one plain classification loss to add to."""
        ft = self.finetune
        if ft.rdrop_alpha == 0 or ft.head != "classifier":
            return []
        where, issues = f"finetune.rdrop_alpha: {ft.rdrop_alpha}", []
        if ft.dropout == 0:
            issues.append(f"{where} with finetune.dropout: 0: R-Drop compares two dropout masks; set dropout > 0 "
                          "(or null for the checkpoint's own)")
        if ft.strategy == "distill":
            issues.append(f"{where} with strategy distill: the teacher's soft labels already regularise; set 0")
        if ft.adversarial.method != "none":
            issues.append(f"{where} with finetune.adversarial.method: {ft.adversarial.method}: use one of the two")
        if len(ft.tasks or []) > 1:
            issues.append(f"{where} with several finetune.tasks: R-Drop is built for the single-task loss; set 0")
        return issues

    def _head_issues(self) -> list[str]:
        """finetune.head lm: what generative fine-tuning needs and what applies to a classifier only."""
        ft = self.finetune
        if ft.head != "lm":
            return []
        issues, where = [], "finetune.head: lm"
        if ft.strategy in ("prefix", "prompt", "distill"):
            issues.append(f"finetune.strategy: {ft.strategy} with {where}: applies to the classifier head only; use "
                          "full, freeze, llrd or lora")
        own = self.pretrain.init == "scratch" and ft.init in ("pretrained", "scratch")
        if own and self.pretrain.objective != "clm":
            issues.append(f"{where} needs a causal LM: pretrain.objective {self.pretrain.objective} trains an encoder "
                          "(set pretrain.objective: clm)")
        if own and self.tokenize.kind != "pretrained" and not self.tokenize.chat_tokens:
            issues.append(f"{where} needs the chat role tokens in the pipeline's tokenizer: set tokenize.chat_tokens: "
                          "true (tokenize and pretrain then re-run)")
        tasks = ft.tasks or [self.clean.labeled.name]
        untemplated = [t for t in tasks if t not in self.clean.sft.templates]
        if ft.tasks is not None and untemplated:
            issues.append(f"finetune.tasks: {', '.join(untemplated)} has no template in clean.sft.templates (needed by "
                          f"{where})")
        for flag, why in (("original_baseline", "continued pretraining's three-way comparison"),
                          ("single_task_baselines", "the multi-task transfer measurement")):
            if getattr(ft, flag):
                issues.append(f"finetune.{flag}: {why} is measured for the classifier head only; set it false with "
                              f"{where}")
        for key, value, off in (("label_smoothing", ft.label_smoothing, 0.0), ("adversarial.method", ft.adversarial.method,
                                "none"), ("augment.copies", ft.augment.copies, 0), ("loss_weights", ft.loss_weights, None),
                                ("rdrop_alpha", ft.rdrop_alpha, 0.0)):
            if value != off:
                issues.append(f"finetune.{key}: {value} applies to the classifier head only; set "
                              f"{'null' if off is None else off} with {where}")
        return issues

    def _task_issues(self) -> list[str]:
        ft, known = self.finetune, self.clean.task_names()
        tasks = ft.tasks or [self.clean.labeled.name]
        issues = []
        if ft.tasks is not None and not ft.tasks:
            issues.append("finetune.tasks: empty list; name one or more of " + ", ".join(known))
        unknown = [t for t in tasks if t not in known]
        if unknown:
            issues.append(f"finetune.tasks: unknown task {', '.join(unknown)}; clean defines {', '.join(known)}")
        if len(set(tasks)) != len(tasks):
            issues.append(f"finetune.tasks: a task is named twice ({', '.join(tasks)})")
        extra = sorted(set(ft.loss_weights or {}) - set(tasks))
        if extra:
            issues.append(f"finetune.loss_weights: {', '.join(extra)} not in finetune.tasks ({', '.join(tasks)})")
        if any(w < 0 for w in (ft.loss_weights or {}).values()):
            issues.append("finetune.loss_weights: weights must be >= 0")
        if len(tasks) > 1 and ft.strategy in ("distill", "prefix", "prompt"):
            why = ("the teacher is a single-task classifier" if ft.strategy == "distill" else
                   "virtual tokens shared by every task are not prompt learning (one prompt per task is)")
            issues.append(f"finetune.strategy: {ft.strategy} with several tasks: {why}; use full, freeze, llrd or lora")
        if len(tasks) > 1 and ft.sampler != "random":
            issues.append(f"finetune.sampler: {ft.sampler} with several tasks: the task schedule (finetune.sampling) "
                          "orders the batches; use random")
        if ft.single_task_baselines and len(tasks) < 2:
            issues.append("finetune.single_task_baselines: true needs two or more finetune.tasks (it measures transfer)")
        return issues
