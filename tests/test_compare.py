"""lmpipe compare: one row per experiment, the params that differ, the headline metrics (the table logic in
process on records shaped like `dvc.api.exp_show`'s; the CLI on a real repo is in test_pipeline's e2e test)."""

from __future__ import annotations

import pytest

from lmpipe.compare import format_table, table
from lmpipe.errors import LmpipeError

KEYS = ["common.seed", "finetune.learning_rate", "finetune.strategy", "clean.min_chars"]
RECORDS = [
    {"Experiment": None, "rev": "workspace", "typ": "workspace", "common.seed": 1337, "finetune.learning_rate": 0.001,
     "finetune.strategy": "full", "clean.min_chars": 1, "metrics/eval.json:classifier.accuracy": 0.75,
     "classifier.f1_macro": 0.74, "lm.perplexity": 60.5, "corpus.rows_in": 100},
    {"Experiment": None, "rev": "abc1234def", "typ": "baseline", "common.seed": 1337, "finetune.learning_rate": 0.001,
     "finetune.strategy": "full", "clean.min_chars": 1, "classifier.accuracy": "!", "classifier.f1_macro": "!",
     "corpus.rows_in": 100},
    {"Experiment": "ft-lora", "rev": "9f8e7d6", "typ": "branch_commit", "common.seed": 1337,
     "finetune.learning_rate": 0.0005, "finetune.strategy": "lora", "clean.min_chars": 1,
     "metrics/eval.json:classifier.accuracy": 0.7, "classifier.f1_macro": 0.69, "lm.perplexity": 60.5,
     "corpus.rows_in": 100},
]


def test_rows_keep_only_the_params_that_differ_and_the_headline_metrics():
    tab = table(RECORDS, KEYS)
    assert tab["columns"] == ["experiment", "finetune.learning_rate", "finetune.strategy", "accuracy", "f1_macro",
                              "perplexity"]
    assert tab["rows"] == [["workspace", 0.001, "full", 0.75, 0.74, 60.5], ["abc1234", 0.001, "full", None, None, None],
                           ["ft-lora", 0.0005, "lora", 0.7, 0.69, 60.5]]
    text = format_table(tab).splitlines()
    assert text[0].split() == tab["columns"] and text[3].split() == ["ft-lora", "0.0005", "lora", "0.7000", "0.6900",
                                                                      "60.5000"]


def test_named_rows_and_an_unknown_name():
    tab = table(RECORDS, KEYS, ["ft-lora", "workspace"])
    assert [r[0] for r in tab["rows"]] == ["ft-lora", "workspace"]
    assert tab["columns"][1:3] == ["finetune.learning_rate", "finetune.strategy"]
    same = table(RECORDS, KEYS, ["workspace"])
    assert same["columns"] == ["experiment", "accuracy", "f1_macro", "perplexity"]  # one row: nothing differs
    with pytest.raises(LmpipeError, match="no experiment named nope"):
        table(RECORDS, KEYS, ["nope"])
