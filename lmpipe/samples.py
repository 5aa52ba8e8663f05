"""Samples while pretraining: the model's own text at every evaluation and at the end, so the MLflow run page
shows it learning to write.

    python -m stages.pretrain     # with pretrain.sample_prompts set (clm only): MLflow table samples.json,
                                  # the last step's samples in pretrain.samples (metrics/pretrain_samples.json)

`SampleWriter` is a Trainer callback that the clm recipe registers (lmpipe/recipes/pretrain.py). At each
evaluation, the final one included, it continues `pretrain.sample_prompts` through lmpipe.generation (transformers'
`generate`, KV cache) on the plain model (unwrapped from DDP and torch.compile), seeded by common.seed: the same
commit writes the same samples. Generation runs inside a fork of torch's RNG state, so the training stream
(dropout, the data order) is what it would be without samples and the training metrics do not change.
Under DDP only rank 0 samples. Rows (step, prompt, text) go to the run's MLflow table `samples.json`
(mlflow.log_table appends to it, so a resumed run keeps one table); a tracking server that is down keeps them
for the next evaluation, and the stage's end sends what is left.

It lives here, not in lmpipe/callbacks.py (which every training stage imports): only the pretrain stage reaches
lmpipe.generation, so an edit there re-runs no other stage (dvc.yaml's deps are each stage's import closure).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from accelerate.utils import extract_model_from_parallel
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from lmpipe.config import Pretrain
from lmpipe.errors import ConfigError
from lmpipe.generation import Sampling, encode_prompt, generate
from lmpipe.io import write_json
from lmpipe.modeling import max_positions
from lmpipe.tracking import reason

TABLE = "samples.json"
"""The run's MLflow table artifact (columns step, prompt, text), one file for the whole run."""
COLUMNS = ["step", "prompt", "text"]


def sampling(cfg: Pretrain, seed: int) -> Sampling:
    """The pretrain section's sample settings (validated by its schema) as generation's Sampling."""
    return Sampling(max_new_tokens=cfg.sample_max_new_tokens, temperature=cfg.sample_temperature,
                    top_k=cfg.sample_top_k, seed=seed)


def check_prompts(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, cfg: Pretrain) -> None:
    """Every prompt + sample_max_new_tokens fits the model's positions: refused before training, not at the
    first evaluation."""
    limit = max_positions(config)
    for i, prompt in enumerate(cfg.sample_prompts):
        n = len(encode_prompt(tokenizer, prompt))
        if n + cfg.sample_max_new_tokens > limit:
            raise ConfigError(f"pretrain.sample_prompts[{i}]: {prompt!r} is {n} tokens; with sample_max_new_tokens "
                              f"{cfg.sample_max_new_tokens} that exceeds the model's {limit} positions")


def plain_model(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside Trainer's wrappers (DDP, torch.compile's OptimizedModule): `generate`
    runs eagerly on it, so the compiled training graphs never see generation's shapes."""
    return extract_model_from_parallel(model, keep_torch_compile=False)


def sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], settings: Sampling,
           step: int) -> list[dict[str, Any]]:
    """Rows (step, prompt, text) of one seeded batch, leaving torch's RNG state and the train/eval mode of
    `model` as they were (the training that goes on after it draws the same numbers as without samples)."""
    plain = plain_model(model)
    cuda = [plain.device.index or 0] if plain.device.type == "cuda" else []
    was_training = plain.training
    with torch.random.fork_rng(devices=cuda):
        plain.eval()
        try:
            out = generate(plain, tokenizer, prompts, settings)
        finally:
            plain.train(was_training)
    return [{"step": step, "prompt": g.prompt, "text": g.text} for g in out]


@dataclass
class SampleWriter(TrainerCallback):
    """Samples at each evaluation of rank 0 (the periodic ones and the final one, once per step)."""

    tokenizer: PreTrainedTokenizerBase
    prompts: list[str]
    settings: Sampling
    rows: list[dict[str, Any]] = field(default_factory=list)
    """Every row this process generated, in step order."""
    _unsent: list[dict[str, Any]] = field(default_factory=list)
    _logged: set[int] | None = None  # steps the run's table holds (read once: a resumed run has some)

    def on_evaluate(self, args, state, control, model=None, **kw):
        if not state.is_world_process_zero or any(r["step"] == state.global_step for r in self.rows):
            return
        new = sample(model, self.tokenizer, self.prompts, self.settings, state.global_step)
        self.rows += new
        self._unsent += new
        self.send(strict=False)

    def last(self) -> list[dict[str, Any]]:
        """The rows of the newest step (the final model's samples once training is over)."""
        step = max((r["step"] for r in self.rows), default=None)
        return [r for r in self.rows if r["step"] == step]

    def send(self, strict: bool = True) -> None:
        """Append the unsent rows to the run's table. strict=False (while training): a tracking failure keeps
        them for the next call and training goes on; strict (the stage's end): a failure raises."""
        try:
            if self._logged is None:
                self._logged = _table_steps()
            new = [r for r in self._unsent if r["step"] not in self._logged]  # a resumed run re-evaluating a step
            if new:
                mlflow.log_table(pd.DataFrame(new, columns=COLUMNS), TABLE)
                self._logged |= {r["step"] for r in new}
            self._unsent = []
        except Exception as e:  # noqa: BLE001 - the server's failure modes are many; strict re-raises them
            if strict:
                raise
            print(f"pretrain: samples not logged to MLflow yet ({reason(e)}); sent with the next ones", flush=True)


def logged_table(run_id: str) -> pd.DataFrame:
    """A run's samples table (columns step, prompt, text; no rows when it has none)."""
    client = mlflow.MlflowClient()
    if TABLE not in {a.path for a in client.list_artifacts(run_id)}:
        return pd.DataFrame(columns=COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        return pd.read_json(client.download_artifacts(run_id, TABLE, tmp), orient="split", dtype=False)


def _table_steps() -> set[int]:
    """Steps already in the active run's samples table (none for a new run)."""
    return {int(s) for s in logged_table(mlflow.active_run().info.run_id)["step"]}


def write(path: Path, rows: list[dict[str, Any]], settings: Sampling | None) -> None:
    """pretrain.samples: the final step's samples with the settings that made them; `samples: []` when the
    stage writes none (another objective, or no prompts), so the DVC output always exists."""
    write_json(path, {"step": rows[0]["step"] if rows else None,
                      "sampling": settings.model_dump() if settings is not None else None,
                      "samples": [{"prompt": r["prompt"], "text": r["text"]} for r in rows]})
