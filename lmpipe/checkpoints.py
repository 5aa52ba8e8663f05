"""Crash-safe resume in one place: fingerprint, checkpoint folder, complete checkpoints, MLflow run reattach.

    python -m stages.pretrain         # killed? run it again: it resumes here, in the same MLflow run

A stage's checkpoints live in `<stage>.checkpoint_dir/<fingerprint of its resume key>/`, which is not a
DVC output, so DVC leaves it in place between runs:

    lmpipe_resume_key.json      what the fingerprint covers; names the differences when another configuration is refused
    mlflow_run_id               the stage's MLflow run: a re-run after a crash reattaches to it
    checkpoint-<step>/          Trainer checkpoints (pretrain)
    <variant>/checkpoint-<step>/  Trainer checkpoints of one finetune variant (classifier, scratch)
    finished/<variant>/         a finished variant's model + record: a re-run reuses it instead of training again

The stage deletes the folder once all its outputs are written (`release`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lmpipe.config import Params
from lmpipe.params import flatten
from lmpipe.errors import ConfigError, DataError, LmpipeError
from lmpipe.io import atomic_dir, atomic_path, file_md5, read_json, write_failure, write_json
from lmpipe.names import STRATEGIES, checkpoint_step, model_uri, parse_model_uri
from lmpipe.tracking import tracking_uri
# Imported inside functions (start-up cost, docs/results.md#start-up): modeling (torch, transformers) and mlflow where
# used: stage.py imports this module, and the clean stage and `lmpipe validate` never load either.

RESUME_KEY_FILE = "lmpipe_resume_key.json"
RUN_ID_FILE = "mlflow_run_id"
FINISHED = "finished"
FINISHED_RECORD = "lmpipe_finished.json"


def fingerprint(*parts: Any) -> str:
    """Short stable hash of everything that makes a checkpoint resumable (config, data, params)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# -- what a checkpoint depends on ---------------------------------------------------------------------------

def _pretrain_key(params: Params, root: Path) -> dict[str, Any]:
    """The training params, seed, tokenizer and data, and the init checkpoint's files (continued pretraining:
    the reference alone could name other weights after a package upgrade). Cadence settings (eval,
    checkpoint, logging) are left out: changing them resumes all the same."""
    cfg = params.pretrain
    key = {"pretrain": cfg.model_dump(exclude={"out_dir", "metrics", "plot", "log_every", "checkpoint_dir",
                                               "eval_every", "eval_batches", "checkpoint_every", "keep_last"}),
           "common.seed": params.common.seed, "tokenize.block_size": params.tokenize.block_size,
           "tokenizer.json md5": file_md5(root / params.tokenize.tokenizer_dir / "tokenizer.json"),
           "train.npy md5": file_md5(root / params.tokenize.out_dir / "train.npy")}
    if cfg.init != "scratch":
        from lmpipe.modeling import resolve_model_ref

        init = resolve_model_ref(cfg.init, root, "pretrain.init")
        key["init md5"] = _model_files_md5(init)
    return key


def _model_files_md5(folder: Path) -> dict[str, str]:
    """md5 of a model dir's config and weights: a reference (package:, models:/ alias) can name other weights later."""
    files = [*folder.iterdir(), *(folder / "members").rglob("*")]  # an ensemble variant's members, too
    return {str(f.relative_to(folder)): file_md5(f) for f in sorted(files)
            if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt", ".onnx"))}


def _finetune_key(params: Params, root: Path) -> dict[str, Any]:
    """The fine-tuning params (every variant), seed, base model, the labelled splits, and what the params only
    name: the original checkpoint (original_baseline) and a teacher dir's weights (distill)."""
    from lmpipe.modeling import resolve_init, resolve_model_ref

    cfg = params.finetune
    source = resolve_init(cfg.init, root, params.pretrain.out_dir) if cfg.init != "scratch" else None
    base = source if source is not None else root / params.pretrain.out_dir
    clean = root / params.clean.out_dir
    settings = cfg.model_dump(exclude={"out_dir", "scratch_dir", "original_dir", "metrics", "checkpoint_dir"})
    # blocks that do nothing when their feature is off do not change what trains
    if cfg.adversarial.method == "none":
        settings["adversarial"] = "none"
    if cfg.augment.copies == 0:
        settings["augment"] = "off"
    for strategy in STRATEGIES:  # only the chosen strategy's block (full has none)
        if cfg.strategy != strategy:
            settings.pop(strategy, None)
    key = {"finetune": settings,
           "common.seed": params.common.seed, "base config.json md5": file_md5(base / "config.json"),
           "base model.safetensors md5": file_md5(base / "model.safetensors"),
           "labeled_train.parquet md5": file_md5(clean / "labeled_train.parquet"),
           "labeled_validation.parquet md5": file_md5(clean / "labeled_validation.parquet")}
    if cfg.head == "lm":  # the conversations it trains and selects on (lmpipe/conversations.py's layout)
        for path in sorted((clean / "sft").rglob("*.parquet")):
            if path.stem in ("train", "validation"):
                key[f"{path.relative_to(clean)} md5"] = file_md5(path)
    if cfg.original_baseline:
        key["original md5"] = _model_files_md5(resolve_model_ref(params.pretrain.init, root, "pretrain.init"))
    teacher = cfg.distill.teacher if cfg.strategy == "distill" else None
    if teacher and not teacher.startswith("models:/"):
        path = Path(teacher).expanduser()
        path = path if path.is_absolute() else root / path
        if path.is_dir():
            key["teacher md5"] = _model_files_md5(path)
    elif teacher:
        key["teacher version"] = _registry_version(teacher, root)
    if cfg.augment.copies and {"contextual", "neighbour"} & set(cfg.augment.ops):  # the words it proposes
        key["augment model md5"] = _model_files_md5(resolve_init(cfg.augment.model, root, params.pretrain.out_dir,
                                                                 "finetune.augment.model"))
    return key


def _registry_version(uri: str, root: Path) -> str:
    """models:/NAME@alias -> models:/NAME/VERSION it points at now (an alias that moves names another teacher);
    models:/NAME/VERSION as it is. An unknown name or alias, or an unreachable store: one line."""
    import mlflow


    ref = parse_model_uri(uri)
    if ref is None or ref.alias is None:
        return uri
    try:
        version = mlflow.MlflowClient(tracking_uri(root)).get_model_version_by_alias(ref.name, ref.alias).version
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"finetune.distill.teacher: cannot load {uri} ({first[:200]})") from None
    return model_uri(ref.name, version=version)


_KEYS: dict[str, Callable[[Params, Path], dict[str, Any]]] = {"pretrain": _pretrain_key, "finetune": _finetune_key}


def resume_key(stage: str, params: Params, root: Path) -> dict[str, Any]:
    """Everything that makes `stage`'s checkpoints resumable (pretrain or finetune)."""
    return _KEYS[stage](params, root)


def checkpoint_dir(stage: str, params: Params, root: Path) -> Path:
    """<stage>.checkpoint_dir/<fingerprint of the resume key>: only an identical configuration resumes from it."""
    return root / getattr(params, stage).checkpoint_dir / fingerprint(resume_key(stage, params, root))


# -- claiming the folder ------------------------------------------------------------------------------------

def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(json.loads(json.dumps(old, default=str))), flatten(json.loads(json.dumps(new, default=str)))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _holds_progress(folder: Path) -> bool:
    """A complete checkpoint (in the folder or a variant subfolder) or a finished variant: work to resume."""
    if finished_variants(folder):
        return True
    subdirs = [p for p in folder.iterdir() if p.is_dir() and p.name != FINISHED and checkpoint_step(p) is None]
    return any(latest_checkpoint(d) is not None for d in (folder, *subdirs))


def claim_checkpoint_dir(parent: Path, key: dict[str, Any], where: str) -> Path:
    """The checkpoint folder `parent/<fingerprint of key>` for this configuration.

    A folder of another configuration that holds a complete checkpoint or a finished variant is an
    unfinished run: it is refused in one line naming what differs, never loaded and never deleted. Folders
    with nothing to resume (a run that failed before its first save) are removed."""
    folder = parent / fingerprint(key)
    others = sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".")) if parent.is_dir() else []
    for other in others:
        if other == folder:
            continue
        if not _holds_progress(other):
            shutil.rmtree(other, ignore_errors=True)
            continue
        try:
            diffs = _differences(json.loads((other / RESUME_KEY_FILE).read_text()), key)
        except (OSError, ValueError):
            diffs = ["(its configuration was not recorded)"]
        raise ConfigError(
            f"{other}: holds an unfinished {where} run of another configuration (differs in: "
            f"{'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}); re-run with those values to resume it, "
            f"or delete that folder to start this configuration")
    write_json(folder / RESUME_KEY_FILE, key)
    return folder


def claim(stage: str, params: Params, root: Path) -> Path:
    """Claim `stage`'s checkpoint folder for this configuration (see claim_checkpoint_dir)."""
    return claim_checkpoint_dir(root / getattr(params, stage).checkpoint_dir, resume_key(stage, params, root), stage)


def release(folder: Path) -> None:
    """Delete a stage's checkpoints once its outputs are written: left in place they would make a forced
    re-run (or one after a code change) "resume" at max_steps and train nothing."""
    shutil.rmtree(folder, ignore_errors=True)


# -- Trainer checkpoints ------------------------------------------------------------------------------------

def checkpoint_complete(path: Path) -> bool:
    """Trainer writes trainer_state.json last: a checkpoint is complete when it parses and names its step.
    A checkpoint cut short by a kill (no or truncated state file) is never loaded."""
    step = checkpoint_step(path)
    try:
        state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return step is not None and state.get("global_step") == step and any(path.glob("*.safetensors"))


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest complete Trainer checkpoint in folder; incomplete ones are removed."""
    if not folder.is_dir():
        return None
    found = []
    for p in folder.iterdir():
        if checkpoint_step(p) is not None and p.is_dir():
            if checkpoint_complete(p):
                found.append((checkpoint_step(p), p))
            else:
                shutil.rmtree(p, ignore_errors=True)
    return max(found)[1] if found else None


def resume_point(folder: Path, who: str, max_steps: int) -> Path | None:
    """latest_checkpoint, said in one line when there is one: `pretrain: resuming from checkpoint-80 (step 80
    of 120)`, so a resumed run is never mistaken for a fresh one."""
    found = latest_checkpoint(folder)
    if found is not None:
        step = checkpoint_step(found)
        print(f"{who}: resuming from {found.name} (step {step} of {max_steps})", flush=True)
    return found


def checkpoint_write_error(folder: Path, exc: BaseException) -> LmpipeError:
    """A checkpoint write that failed, as one line: the partial folder is removed, the previous complete
    checkpoint (which a re-run resumes from) is named."""
    shutil.rmtree(folder, ignore_errors=True)
    previous = latest_checkpoint(folder.parent)
    kept = f"; {previous.name} is intact and a re-run resumes from it" if previous else ""
    return LmpipeError(f"{folder}: cannot write checkpoint ({write_failure(exc, folder.parent)}){kept}")


# -- finished variants (a stage that trains several models resumes per model) --------------------------------

@dataclass
class Finished:
    path: Path
    """The saved model (whatever `save` wrote)."""
    record: dict[str, Any]
    """What the stage recorded with it (metrics, curve, MLflow run id)."""


def finished_variants(folder: Path) -> list[str]:
    done = folder / FINISHED
    return sorted(p.name for p in done.iterdir() if (p / FINISHED_RECORD).is_file()) if done.is_dir() else []


def load_finished(folder: Path, variant: str) -> Finished | None:
    """The variant a previous attempt finished in this checkpoint folder, or None."""
    path = folder / FINISHED / variant
    try:
        return Finished(path, read_json(path / FINISHED_RECORD))
    except (OSError, ValueError):
        return None


def save_finished(folder: Path, variant: str, save: Callable[[Path], None], record: dict[str, Any]) -> Finished:
    """Keep a finished variant (save(dir) writes the model) with its record, atomically, then drop its
    Trainer checkpoints: a re-run after a later crash reuses it instead of training it again."""
    with atomic_dir(folder / FINISHED / variant) as out:
        save(out)
        write_json(out / FINISHED_RECORD, record)
    shutil.rmtree(folder / variant, ignore_errors=True)
    return Finished(folder / FINISHED / variant, record)


def copy_finished(done: Finished, dest: Path) -> None:
    """The finished model (without the record) to a stage output, atomically."""
    with atomic_dir(dest) as out:
        shutil.copytree(done.path, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(FINISHED_RECORD))


# -- MLflow run reattach ------------------------------------------------------------------------------------

def run_id_file(stage: str, params: Params, root: Path) -> Path:
    """Where `stage` keeps its MLflow run id, next to the checkpoints it belongs to."""
    return checkpoint_dir(stage, params, root) / RUN_ID_FILE


def resumable_run_id(path: Path | None) -> str | None:
    """The MLflow run a crashed attempt left behind (so a resumed stage continues the same run)."""
    if path is None or not path.is_file():
        return None
    import mlflow

    run_id = path.read_text().strip()
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception:  # deleted run, other tracking store: start a fresh run
        return None
    return run_id if run.info.status in ("RUNNING", "FAILED", "KILLED") else None


def remember_run_id(path: Path, run_id: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(run_id)
