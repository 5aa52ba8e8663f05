"""Drift monitoring: what the classifier saw at evaluation (a reference profile) and PSI of live traffic against it.

    python -m stages.evaluate                        # writes evaluate.reference_profile (models/monitor/reference.json)
    lmpipe monitor --url http://127.0.0.1:8000       # the server's live PSI per feature, as a table

Four features per request text, each binned on fixed edges so reference and live counts line up:

| feature        | value                                                        | bins                      |
|----------------|--------------------------------------------------------------|---------------------------|
| `label`        | predicted label                                              | the model's label names   |
| `confidence`   | probability of the predicted label                           | CONFIDENCE_EDGES          |
| `input_tokens` | tokens before truncation (what the model was asked to read)  | TOKEN_EDGES               |
| `oov_rate`     | share of the lowercased words not in the training split      | OOV_EDGES                 |

The evaluate stage computes the profile on the test split's predictions with the training split's words; the
deploy stage ships it in the registered model directory as `drift_reference.json`; the server
(lmpipe.serving.drift) keeps a sliding window of live texts and reports `psi()` per feature.
"""

from __future__ import annotations

import json
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tokenizers import Tokenizer

from lmpipe.errors import LmpipeError

FORMAT = "lmpipe-drift-reference/1"
REFERENCE_FILE = "drift_reference.json"  # its name inside a served model directory
FEATURES = ("label", "confidence", "input_tokens", "oov_rate")
# lower bin edges; the last bin is open-ended, values below the first edge go to the first bin
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
TOKEN_EDGES = (0, 8, 16, 32, 64, 128, 256, 512)
OOV_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.35, 0.5)
EDGES = {"confidence": CONFIDENCE_EDGES, "input_tokens": TOKEN_EDGES, "oov_rate": OOV_EDGES}
SMOOTHING = 0.5  # pseudo-count per bin: an empty bin on either side gives a finite PSI, not infinity
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens (runs of letters/digits), the unit of the OOV rate."""
    return _WORD.findall(text.lower())


def vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted word set of a split (the training split's, for the reference)."""
    return sorted({w for t in texts for w in words(t)})


def oov_rate(text: str, vocab: set[str] | frozenset[str]) -> float:
    """Share of the text's words not in `vocab`; 0 for a text without words."""
    ws = words(text)
    return sum(w not in vocab for w in ws) / len(ws) if ws else 0.0


def length_counter(tokenizer) -> Callable[[Sequence[str]], list[int]]:
    """texts -> tokens per text before truncation (special tokens included). Counts with a private copy of
    the fast tokenizer's backend, truncation and padding off: the model's own tokenizer changes those settings
    on every call, and the server uses it on its inference thread at the same time."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return lambda texts: [len(e.ids) for e in backend.encode_batch(list(texts))]


def bin_index(value: float, edges: Sequence[float]) -> int:
    """Index of the bin [edges[i], edges[i+1]) holding value; the last bin is [edges[-1], inf)."""
    i = 0
    while i + 1 < len(edges) and value >= edges[i + 1]:
        i += 1
    return i


def bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges, edges[1:])] + [f">= {edges[-1]:g}"]


def shares(counts: Sequence[float]) -> list[float]:
    """Smoothed shares: (count + SMOOTHING) / (total + SMOOTHING * bins)."""
    total = sum(counts) + SMOOTHING * len(counts)
    return [(c + SMOOTHING) / total for c in counts]


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index sum((a - e) * ln(a / e)) of two share vectors over the same bins.
    Rule of thumb: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift."""
    if len(expected) != len(actual):
        raise ValueError(f"psi: {len(expected)} reference bins vs {len(actual)} live bins")
    return float(sum((a - e) * math.log(a / e) for e, a in zip(expected, actual)))


def example_bins(profile: dict[str, Any], vocab: frozenset[str], text: str, label: str, score: float,
                 token_length: int) -> tuple[int, int, int, int] | None:
    """The bin of each feature (FEATURES order) for one text; None for a label the profile does not know."""
    categories = profile["features"]["label"]["bins"]
    if label not in categories:
        return None
    return (categories.index(label), bin_index(score, CONFIDENCE_EDGES), bin_index(token_length, TOKEN_EDGES),
            bin_index(oov_rate(text, vocab), OOV_EDGES))


def reference_profile(texts: Sequence[str], labels_pred: Sequence[str], scores: Sequence[float],
                      token_lengths: Sequence[int], vocab_words: Iterable[str],
                      label_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The reference: per feature its bins, counts and smoothed shares over `texts` (the test split), plus the
    training split's word set that live OOV rates are measured against. `label_names` (default: the labels
    seen) fixes the label bins, so a class the model never predicted on the test split still has one."""
    if not (len(texts) == len(labels_pred) == len(scores) == len(token_lengths)) or not texts:
        raise ValueError("reference_profile: texts, labels_pred, scores and token_lengths need the same, non-zero length")
    vocab = sorted(set(vocab_words))
    categories = list(label_names) if label_names else sorted(set(map(str, labels_pred)))
    profile: dict[str, Any] = {"format": FORMAT, "examples": len(texts),
                               "features": {"label": {"bins": categories}}, "vocabulary": vocab}
    for name, edges in EDGES.items():
        profile["features"][name] = {"edges": list(edges), "bins": bin_labels(edges)}
    counts = {f: [0] * len(profile["features"][f]["bins"]) for f in FEATURES}
    frozen = frozenset(vocab)
    for text, label, score, n in zip(texts, labels_pred, scores, token_lengths):
        bins = example_bins(profile, frozen, text, str(label), float(score), int(n))
        if bins is None:
            raise ValueError(f"reference_profile: label {label!r} not in label_names {categories}")
        for f, b in zip(FEATURES, bins):
            counts[f][b] += 1
    for f in FEATURES:
        profile["features"][f].update(counts=counts[f], shares=shares(counts[f]))
    return profile


def check_profile(profile: Any, source: str) -> dict[str, Any]:
    """The profile if it is one this module wrote; ValueError naming `source` otherwise."""
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ValueError(f"{source}: not a drift reference ({FORMAT})")
    missing = [f for f in FEATURES if f not in profile.get("features", {})]
    if missing:
        raise ValueError(f"{source}: drift reference lacks features {missing}")
    return profile


def fetch_report(url: str, token: str | None = None, timeout: float = 10) -> dict[str, Any]:
    """GET <url>/drift of a running `lmpipe serve` (token: the argument, else $LMPIPE_API_TOKEN)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LmpipeError(f"--url {url}: expected http(s)://HOST:PORT")
    token = token or os.environ.get("LMPIPE_API_TOKEN") or None
    req = urllib.request.Request(url.rstrip("/") + "/drift", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        hint = " (pass --token or set LMPIPE_API_TOKEN)" if e.code == 401 else ""
        raise LmpipeError(f"--url {url}: GET /drift answered {e.code}{hint}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise LmpipeError(f"--url {url}: cannot reach the server ({getattr(e, 'reason', None) or e})") from None


def format_report(report: dict[str, Any]) -> str:
    """The drift report as a table: one row per feature, PSI, alert, and the bin that moved most."""
    version = str(report.get("version", "?"))
    head = f"{report.get('model', '?')} {'v' + version if version.isdigit() else version} ({report.get('model_uri', '')})"
    if not report.get("enabled"):
        return f"{head}\ndrift monitoring off: {report.get('reason', '')}"
    lines = [head, f"window {report['window']} of {report['window_size']} texts (PSI from {report['min_samples']}); "
                   f"alert above {report['psi_alert']:g}", "",
             f"{'feature':<14}{'psi':>8}  {'alert':<6}most changed bin (reference -> live share)"]
    for name, f in report["features"].items():
        psi_text = "-" if f["psi"] is None else f"{f['psi']:.3f}"
        i = max(range(len(f["bins"])), key=lambda j: abs(f["live"][j] - f["reference"][j]))
        lines.append(f"{name:<14}{psi_text:>8}  {'ALERT' if f['alert'] else '-':<6}"
                     f"{f['bins'][i]}: {f['reference'][i]:.2f} -> {f['live'][i]:.2f}")
    return "\n".join(lines)
