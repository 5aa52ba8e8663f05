"""Live drift: a sliding window of served texts binned like the model's drift reference, PSI per feature.

The reference is `drift_reference.json` in the served model directory (lmpipe.monitoring writes it in the
evaluate stage; deploy ships it). Each batch's texts are binned on a monitor thread (not the inference one);
the window keeps bin counts, so a PSI costs one pass over the bins, not over the window.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from pathlib import Path
from typing import Any

from lmpipe import monitoring
from lmpipe.config import Monitor
from lmpipe.io import read_json

log = logging.getLogger("lmpipe.serving")


def load_reference(model_dir: Path | None) -> dict[str, Any] | None:
    """The model directory's drift reference, None when it ships none (drift monitoring off)."""
    path = model_dir / monitoring.REFERENCE_FILE if model_dir else None
    if path is None or not path.is_file():
        return None
    return monitoring.check_profile(read_json(path), str(path))


class DriftMonitor:
    def __init__(self, reference: dict[str, Any], cfg: Monitor, tokenizer, gauge) -> None:
        self.reference, self.cfg, self.gauge = reference, cfg, gauge
        self.vocab = frozenset(reference["vocabulary"])
        self.count_tokens = monitoring.length_counter(tokenizer)
        self.window: deque[tuple[int, ...]] = deque()
        self.counts = {f: [0] * len(reference["features"][f]["bins"]) for f in monitoring.FEATURES}
        self.alerting: set[str] = set()
        self.lock = threading.Lock()
        self.psi: dict[str, float] = {}
        gauge.clear()

    def observe(self, texts: list[str], preds: list[dict]) -> None:
        """Add a batch's texts and predictions to the window, refresh the PSI gauges, warn on a crossing."""
        lengths = self.count_tokens(texts)
        rows = [monitoring.example_bins(self.reference, self.vocab, t, p["label"], p["score"], n)
                for t, p, n in zip(texts, preds, lengths)]
        with self.lock:
            for row in filter(None, rows):
                self.window.append(row)
                for f, b in zip(monitoring.FEATURES, row):
                    self.counts[f][b] += 1
                if len(self.window) > self.cfg.window:
                    for f, b in zip(monitoring.FEATURES, self.window.popleft()):
                        self.counts[f][b] -= 1
            if len(self.window) < self.cfg.min_samples:
                return
            self.psi = {f: monitoring.psi(self.reference["features"][f]["shares"], monitoring.shares(self.counts[f]))
                        for f in monitoring.FEATURES}
            for f, value in self.psi.items():
                self.gauge.labels(f).set(value)
                if value > self.cfg.psi_alert and f not in self.alerting:
                    self.alerting.add(f)
                    log.warning("drift: %s PSI %.3f > serve.monitor.psi_alert %g over the last %d texts", f, value,
                                self.cfg.psi_alert, len(self.window))
                elif value <= self.cfg.psi_alert and f in self.alerting:
                    self.alerting.discard(f)
                    log.info("drift: %s PSI %.3f back under %g", f, value, self.cfg.psi_alert)

    def report(self) -> dict[str, Any]:
        with self.lock:
            n = len(self.window)
            features = {}
            for f in monitoring.FEATURES:
                ref = self.reference["features"][f]
                features[f] = {"psi": self.psi.get(f) if n >= self.cfg.min_samples else None,
                               "alert": f in self.alerting, "bins": ref["bins"], "reference": ref["shares"],
                               "live": monitoring.shares(self.counts[f])}
        return {"enabled": True, "window": n, "window_size": self.cfg.window, "min_samples": self.cfg.min_samples,
                "psi_alert": self.cfg.psi_alert, "reference_examples": self.reference["examples"],
                "features": features}
