"""Regularisation pieces on models and data built in the test: augmentation semantics, the dropout override,
and FGM / PGD inside Trainer's training step checked against gradients computed by hand. The same features
through the stage CLI are in tests/test_strategies.py (they share its tiny pretrained model)."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from lmpipe.config import Adversarial, Augment
from lmpipe.regularization import DROPOUT_KEYS, augment, dropout_overrides

TEXTS = ["a gripping and beautifully acted film", "dull , lifeless and far too long",
         "the best thing i have seen this year", "an utter waste of a fine cast"]


def _df() -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS, "label": [1, 0, 1, 0]})


def test_augment_appends_seeded_copies_with_the_labels_kept():
    cfg = Augment(copies=2, probability=0.3, ops=["delete", "swap", "insert"], model=None, top_k=5)
    out = augment(_df(), cfg, seed=0)
    assert len(out) == len(TEXTS) * 3
    assert out["text"].iloc[:4].tolist() == TEXTS  # the originals first, untouched
    assert out["label"].tolist() == [1, 0, 1, 0] + [1, 1, 0, 0, 1, 1, 0, 0]
    assert augment(_df(), cfg, seed=0).equals(out)  # seeded
    assert not augment(_df(), cfg, seed=1).equals(out)
    assert augment(_df(), Augment(copies=0, probability=0.3, ops=["swap"], model=None, top_k=5), seed=0) is not None
    assert len(augment(_df(), Augment(copies=0, probability=0.3, ops=["swap"], model=None, top_k=5), seed=0)) == len(TEXTS)


@pytest.mark.parametrize("op", ["delete", "swap", "insert"])
def test_each_augmentation_does_what_it_says(op):
    out = augment(_df(), Augment(copies=3, probability=0.3, ops=[op], model=None, top_k=5), seed=0)
    vocabulary = {w for t in TEXTS for w in t.split()}
    originals = [t.split() for t in TEXTS for _ in range(3)]
    changed = 0
    for words, new in zip(originals, (t.split() for t in out["text"].iloc[len(TEXTS):])):
        changed += new != words
        if op == "delete":  # an ordered subsequence, never empty
            it = iter(words)
            assert new and all(w in it for w in new) and len(new) <= len(words)
        elif op == "swap":  # the same words, reordered
            assert Counter(new) == Counter(words)
        else:  # the original words in order, plus words of the training split's vocabulary
            assert len(new) == len(words) + max(1, round(0.3 * len(words)))
            assert set(new) <= vocabulary
            it = iter(new)
            assert all(w in it for w in words)
    assert changed >= 9  # of 12 copies: the operations really change the text


@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
    """A 1-layer BERT masked LM (random weights, seed 0) with a WordPiece vocabulary holding every word of TEXTS
    whole, and the same encoder saved without its MLM head."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    raw.train_from_iterator(TEXTS * 3 + ["good bad fine great awful movie story plot"],
                            trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    tok = BertTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    base = tmp_path_factory.mktemp("mlm")
    BertForMaskedLM(config).save_pretrained(base / "mlm")
    BertModel(config).save_pretrained(base / "encoder")
    for d in ("mlm", "encoder"):
        tok.save_pretrained(base / d)
    return base


def _replaced(out: pd.DataFrame, copies: int):
    """(original words, augmented words, positions that changed) of each augmented copy."""
    for k, text in enumerate(out["text"].iloc[len(TEXTS):]):
        words, new = TEXTS[k // copies].split(), text.split()
        assert len(new) == len(words)  # replaced in place, never added or dropped
        yield words, new, [i for i, (a, b) in enumerate(zip(words, new)) if a != b]


@pytest.mark.parametrize("op", ["contextual", "neighbour"])
def test_model_augmentation_replaces_words_with_the_models_own_candidates(tiny_mlm, op):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    cfg = Augment(copies=3, probability=0.3, ops=[op], model="m", top_k=3)
    out = augment(_df(), cfg, seed=0, model_dir=tiny_mlm / "mlm")
    assert out["label"].tolist()[4:] == [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]
    assert augment(_df(), cfg, seed=0, model_dir=tiny_mlm / "mlm").equals(out)  # seeded
    assert not augment(_df(), cfg, seed=1, model_dir=tiny_mlm / "mlm").equals(out)
    tok = AutoTokenizer.from_pretrained(tiny_mlm / "mlm")
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    changed = 0
    for words, new, at in _replaced(out, 3):
        assert len(at) <= max(1, round(0.3 * len(words)))
        changed += bool(at)
        if op == "contextual":  # each new word is among the top 3 (+ the word itself) at its mask in context
            model = AutoModelForMaskedLM.from_pretrained(tiny_mlm / "mlm").eval()
            masked = " ".join("[MASK]" if i in at else w for i, w in enumerate(words))
            enc = tok(masked, return_tensors="pt")
            with torch.no_grad():
                logits = model(**enc).logits[0]
            slots = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
            for i, slot in zip(at, slots):
                ranked = [vocab[j] for j in logits[slot].argsort(descending=True).tolist() if vocab[j].isalpha()]
                assert new[i] in [w for w in ranked if w != words[i]][:3], (words[i], new[i])
        else:  # each new word is among the 3 tokens nearest the old one by cosine of the input embeddings
            emb = AutoModel.from_pretrained(tiny_mlm / "mlm").get_input_embeddings().weight.detach()
            for i in at:
                sims = torch.nn.functional.cosine_similarity(emb[vocab.index(words[i])][None], emb, dim=-1)
                ranked = [vocab[j] for j in sims.argsort(descending=True).tolist()
                          if vocab[j].isalpha() and vocab[j] != words[i]]
                assert new[i] in ranked[:3], (words[i], new[i])
    assert changed >= 10  # of 12 copies


def test_contextual_needs_a_trained_mlm_head_and_a_model_at_all(tiny_mlm):
    from lmpipe.errors import ConfigError, DataError

    cfg = Augment(copies=1, probability=0.3, ops=["contextual"], model="m", top_k=3)
    with pytest.raises(DataError, match="has no trained masked-LM head .*contextual needs one"):
        augment(_df(), cfg, seed=0, model_dir=tiny_mlm / "encoder")
    assert len(augment(_df(), cfg.model_copy(update={"ops": ["neighbour"]}), 0, tiny_mlm / "encoder")) == 8
    with pytest.raises(ValueError, match="need augment.model"):
        Augment(copies=1, probability=0.3, ops=["swap", "neighbour"], model=None, top_k=3)
    with pytest.raises(ValueError, match="backtranslate needs a translation model"):
        Augment(copies=1, probability=0.3, ops=["backtranslate"], model="m", top_k=3)
    with pytest.raises(ConfigError):
        augment(_df(), cfg, seed=0, model_dir=None)


def test_dropout_override_covers_every_dropout_setting_of_the_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    for config in (BertConfig(), GPT2Config(), LlamaConfig()):
        got = dropout_overrides(config, 0.25)
        assert got and set(got) == {k for k in DROPOUT_KEYS if k in config.to_dict()}
        assert set(got.values()) == {0.25}
    assert dropout_overrides(BertConfig(), None) == {}


# -- adversarial training inside Trainer ----------------------------------------------------------------------

def _tiny_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # deterministic passes
    return BertForSequenceClassification(config)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 50, (4, 7), generator=g), "attention_mask": torch.ones(4, 7, dtype=torch.long),
            "labels": torch.tensor([0, 1, 1, 0])}


def _trainer(model, tmp_path, adversarial: Adversarial):
    from transformers import TrainingArguments

    from lmpipe.training import FinetuneTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4)
    trainer = FinetuneTrainer(model=model, args=args, adversarial=adversarial)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
    return trainer


def _grads_by_hand(model, batch, delta_of):
    """Gradient of L(x) + L(x + delta) with delta = delta_of(d L / d embeddings), computed without Trainer."""
    emb = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    embedded = emb(inputs["input_ids"]).detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(model(inputs_embeds=embedded, attention_mask=inputs["attention_mask"]).logits,
                                             batch["labels"])
    (g,) = torch.autograd.grad(loss, embedded)
    delta = delta_of(g, model, inputs, batch["labels"])
    model.zero_grad()
    for d in (None, delta):
        e = emb(inputs["input_ids"])
        logits = model(inputs_embeds=e if d is None else e + d, attention_mask=inputs["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, delta


def test_fgm_adds_the_gradient_at_the_worst_case_perturbation(tmp_path):
    cfg = Adversarial(method="fgm", epsilon=0.5, alpha=0.1, steps=1)
    model = _tiny_classifier()
    trainer = _trainer(model, tmp_path, cfg)
    model.zero_grad()
    trainer.training_step(model, _batch())
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    def fgm(g, *_):
        return 0.5 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)

    expected, delta = _grads_by_hand(_tiny_classifier(), _batch(), fgm)
    assert delta.flatten(1).norm(dim=1) == pytest.approx([0.5] * 4)
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-5), name
    # and the perturbation raised the loss: that is what the second pass trains against
    assert trainer._adversarial_losses[0] > float(trainer.compute_loss(model, _batch()).detach())


def test_pgd_takes_its_steps_and_stays_in_the_ball(tmp_path):
    cfg = Adversarial(method="pgd", epsilon=0.4, alpha=0.3, steps=3)
    model = _tiny_classifier()
    trainer = _trainer(model, tmp_path, cfg)
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape))
    model.zero_grad()
    trainer.training_step(model, _batch())
    assert len(calls) == 1 + (3 - 1) + 1  # clean, two more ascent steps, the adversarial pass
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    def pgd(g, model, inputs, labels):
        def project(d):
            n = d.flatten(1).norm(dim=1).clamp_min(1e-12)
            return d * (0.4 / n).clamp(max=1.0).view(-1, 1, 1)

        def unit(x):
            return x / x.flatten(1).norm(dim=1).view(-1, 1, 1)

        emb = model.get_input_embeddings()
        delta = project(0.3 * unit(g))
        for _ in range(2):
            leaf = delta.clone().requires_grad_()
            logits = model(inputs_embeds=emb(inputs["input_ids"]) + leaf, attention_mask=inputs["attention_mask"]).logits
            (step,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, labels), leaf)
            delta = project(delta + 0.3 * unit(step))
        return delta

    expected, delta = _grads_by_hand(_tiny_classifier(), _batch(), pgd)
    assert (delta.flatten(1).norm(dim=1) <= 0.4 + 1e-6).all()
    for name, grad in expected.items():
        assert torch.allclose(got[name], grad, atol=1e-5), name


def test_adversary_reaches_frozen_embeddings(tmp_path):
    """freeze and peft strategies leave the embedding matrix without gradient: the perturbation is on the
    embedded tokens, so adversarial training still works."""
    model = _tiny_classifier()
    model.get_input_embeddings().weight.requires_grad_(False)
    trainer = _trainer(model, tmp_path, Adversarial(method="fgm", epsilon=0.5, alpha=0.1, steps=1))
    trainer.training_step(model, _batch())
    assert len(trainer._adversarial_losses) == 1
    assert model.get_input_embeddings().weight.grad is None


# -- label smoothing and early stopping through lmpipe.training.finetune (what the stage calls) ----------------

def _finetune_setup(tmp_path, monkeypatch, **values):
    import mlflow
    from transformers import BertConfig, BertForSequenceClassification

    from helpers import NEG, POS, section
    from lmpipe.tokenizer import train_tokenizer
    from lmpipe.training import encode_labeled

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    mlflow.set_experiment("test")  # not whatever experiment an earlier test in this worker left active
    texts, labels = POS + NEG, [1] * len(POS) + [0] * len(NEG)
    tok = train_tokenizer(texts * 3, "wordpiece", vocab_size=120, min_frequency=1, model_max_length=32)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=2, pad_token_id=tok.pad_token_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # deterministic: the loss is reproducible
    data = encode_labeled(tok, texts, labels, 16)
    # one batch is the whole split, so a logged training loss is the loss over every example
    cfg = section("finetune", batch_size=len(texts), learning_rate=1e-12, warmup_ratio=0.0, **values)
    return model, tok, data, cfg, texts, labels


def test_label_smoothing_is_in_the_training_loss_only(tmp_path, monkeypatch):
    import mlflow

    from lmpipe.training import finetune

    model, tok, data, cfg, texts, labels = _finetune_setup(tmp_path, monkeypatch, label_smoothing=0.2,
                                                           max_steps=2, eval_every=2)
    enc = tok(texts, truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(**enc).logits, -1)  # the model before training (lr ~0)
    nll = -logp[torch.arange(len(labels)), torch.tensor(labels)]
    with mlflow.start_run():  # the stage's run
        res = finetune(model, tok, data, data, cfg, "cpu", 0, tmp_path / "ckpt", prefix="")
    first = next(h for h in res.log_history if "loss" in h)
    assert first["loss"] == pytest.approx(float((0.8 * nll - 0.2 * logp.mean(-1)).mean()), abs=1e-4)
    assert res.metrics["val_loss"] == pytest.approx(float(nll.mean()), abs=1e-4)  # evaluation: plain CE


def test_early_stopping_survives_a_crash_after_it_stopped(tmp_path, monkeypatch):
    """patience 1 and a learning rate of ~0: evaluation 2 (step 4) does not beat evaluation 1 (step 2), so
    training stops at step 4. A crash before the stage saved its result resumes from checkpoint-4: it must
    end there again, not train on to the next evaluation."""
    import mlflow

    from lmpipe.training import finetune

    model, tok, data, cfg, *_ = _finetune_setup(tmp_path, monkeypatch, patience=1, max_steps=12, eval_every=2)
    with mlflow.start_run():
        first = finetune(model, tok, data, data, cfg, "cpu", 0, tmp_path / "ckpt", prefix="")
    assert (first.metrics["steps"], first.metrics["stopped_early"]) == (4, 1.0)
    assert (tmp_path / "ckpt" / "checkpoint-4").is_dir()
    again, *_ = _finetune_setup(tmp_path, monkeypatch, patience=1, max_steps=12, eval_every=2)
    with mlflow.start_run():
        second = finetune(again, tok, data, data, cfg, "cpu", 0, tmp_path / "ckpt", prefix="")
    assert (second.metrics["steps"], second.metrics["stopped_early"]) == (4, 1.0)
    assert second.best_checkpoint == first.best_checkpoint


# -- R-Drop and gradient accumulation inside FinetuneTrainer ----------------------------------------------------

def _dropout_classifier(p: float):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=p, attention_probs_dropout_prob=p))


def test_rdrop_loss_is_the_mean_ce_of_two_dropout_passes_plus_alpha_times_their_symmetric_kl(tmp_path):
    from transformers import TrainingArguments

    from lmpipe.training import FinetuneTrainer

    model = _dropout_classifier(0.3).train()
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = FinetuneTrainer(model=model, args=args, rdrop_alpha=2.0)
    batch = _batch()
    torch.manual_seed(5)
    got = trainer.compute_loss(model, dict(batch))
    # by hand: the same two passes (the doubled batch under the same seed), then the formula
    torch.manual_seed(5)
    inputs = {k: torch.cat([v, v]) for k, v in batch.items() if k != "labels"}
    p, q = model(**inputs).logits.chunk(2)
    assert not torch.allclose(p, q)  # dropout made the two passes differ
    ce = (torch.nn.functional.cross_entropy(p, batch["labels"]) + torch.nn.functional.cross_entropy(q, batch["labels"])) / 2
    lp, lq = p.log_softmax(-1), q.log_softmax(-1)
    kl = ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1)).mean() / 2
    assert float(got.detach()) == pytest.approx(float(ce + 2.0 * kl), rel=1e-5)
    assert float(kl) > 0
    # evaluation keeps the plain cross-entropy of one pass
    model.eval()
    plain = trainer.compute_loss(model, dict(batch))
    assert float(plain) == pytest.approx(float(model(**batch).loss), rel=1e-6)


def test_rdrop_refuses_a_model_without_dropout(tmp_path):
    from transformers import TrainingArguments

    from lmpipe.errors import ConfigError
    from lmpipe.training import FinetuneTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match=r"finetune.rdrop_alpha: 1.0 needs dropout in the model"):
        FinetuneTrainer(model=_dropout_classifier(0.0), args=args, rdrop_alpha=1.0)


@pytest.mark.parametrize("rdrop_alpha", [0.0, 1.0])
def test_gradient_accumulation_trains_as_the_whole_batch_would(tmp_path, monkeypatch, rdrop_alpha):
    """One optimizer step over 8 examples: batch 8, or batches of 4 accumulated twice, give the same step, for
    the model's own loss and for R-Drop's (both computed in FinetuneTrainer; dropout 1e-7 keeps R-Drop's two
    passes practically equal while the model still has dropout). SGD: the step is the gradient itself (Adam's
    first step is about lr x its sign, which would hide a scale error)."""
    import copy

    import mlflow

    from lmpipe.training import finetune

    model, tok, data, cfg, *_ = _finetune_setup(tmp_path, monkeypatch, max_steps=1, eval_every=1,
                                               rdrop_alpha=rdrop_alpha, dropout=1e-7 if rdrop_alpha else None)
    if rdrop_alpha:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 1e-7
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = []
    for batch, accumulate in ((8, 1), (4, 2)):
        run_cfg = cfg.model_copy(update={"batch_size": batch, "gradient_accumulation_steps": accumulate,
                                         "learning_rate": 1.0, "optimizer": "sgd", "weight_decay": 0.0})
        with mlflow.start_run():
            res = finetune(copy.deepcopy(model), tok, data, data, run_cfg, "cpu", 0, tmp_path / f"ckpt{batch}", prefix="")
        assert res.metrics["steps"] == 1
        steps.append({n: p.detach() - start[n] for n, p in res.model.named_parameters()})
    assert sum(float(w.abs().sum()) for w in steps[0].values()) > 0
    for name, w in steps[0].items():
        assert torch.allclose(w, steps[1][name], rtol=1e-3, atol=1e-6), name


def test_group_by_length_batches_examples_of_similar_length(tmp_path, monkeypatch):
    """finetune.sampler group_by_length reaches Trainer: 60 examples in batches of 3 make megabatches of 15
    (Trainer's LengthGroupedSampler), each sorted by length, so the first five batches' length ranges never
    interleave (a random split almost always does)."""
    import mlflow
    from transformers import DataCollatorWithPadding

    import lmpipe.training as training

    widths: list[list[int]] = []

    class Recording(DataCollatorWithPadding):
        def __call__(self, features):
            widths.append(sorted(len(f["input_ids"]) for f in features))
            return super().__call__(features)

    monkeypatch.setattr(training, "DataCollatorWithPadding", Recording)
    model, tok, _, cfg, texts, labels = _finetune_setup(tmp_path, monkeypatch, sampler="group_by_length",
                                                        max_steps=5, eval_every=100)
    data = training.encode_labeled(tok, texts * 5, labels * 5, 16)
    cfg = cfg.model_copy(update={"batch_size": 3})
    with mlflow.start_run():
        training.finetune(model, tok, data, data, cfg, "cpu", 0, tmp_path / "ckpt", prefix="")
    train = widths[:5]  # the first megabatch's batches (evaluation's come after training)
    assert all(len(w) == 3 for w in train) and len({n for w in train for n in w}) > 2
    for i, a in enumerate(train):
        for b in train[i + 1:]:
            assert a[-1] <= b[0] or b[-1] <= a[0], train


def test_time_cap_ends_training_at_the_step_that_crosses_it_and_evaluates_it(tmp_path, monkeypatch):
    import mlflow

    from lmpipe.training import finetune

    model, tok, data, cfg, *_ = _finetune_setup(tmp_path, monkeypatch, max_minutes=1e-9, max_steps=50, eval_every=20)
    with mlflow.start_run():
        res = finetune(model, tok, data, data, cfg, "cpu", 0, tmp_path / "ckpt", prefix="")
    assert res.metrics["steps"] == 1 and res.metrics["stopped_by_time_cap"] == 1.0
    assert res.best_checkpoint.endswith("checkpoint-1")  # evaluated and saved, though eval_every is 20
    assert any("eval_accuracy" in h and h["step"] == 1 for h in res.log_history)
