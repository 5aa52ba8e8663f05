"""The served model and hot reload: load a model URI with what /health and /metrics say about it; follow an alias.

A server started on `models:/NAME@alias` checks the alias every `serve.reload_interval_s` (and on
POST /admin/reload). When it points at another version, that version is loaded in full on the checking thread,
then `Holder.current` is swapped in one assignment: the batcher reads it once per batch, so a batch already
running finishes on the old model and no request is dropped.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.embeddings import Encoder
from lmpipe.names import model_uri, parse_model_uri
from lmpipe.package import HFGenerator, PyfuncPredictor, load_predictor

log = logging.getLogger("lmpipe.serving")


@dataclass
class Served:
    """One loaded model: the predictor and its identity."""

    predictor: Any  # .predict(texts, batch_size) -> [{label, score}]; an HFGenerator: .model, .tokenizer
    uri: str
    name: str
    version: str
    variant: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> Path | None:
        return getattr(self.predictor, "model_dir", None) if not isinstance(self.predictor, PyfuncPredictor) else None

    @property
    def kind(self) -> str:
        """generator (a causal LM: POST /generate), encoder (no head: POST /embed) or classifier (POST /predict)."""
        if isinstance(self.predictor, HFGenerator):
            return "generator"
        return "encoder" if isinstance(self.predictor, Encoder) else "classifier"

    def info(self) -> dict[str, str]:
        return {"model_uri": self.uri, "model": self.name, "version": self.version, "variant": self.variant,
                "kind": self.kind}


def load(uri: str, client=None) -> Served:
    """Load `uri` (an alias is resolved to its version first, and that version loaded: no race with a move)."""
    name, version, tags = Path(uri).name or uri, "local", {}
    target = uri
    ref = parse_model_uri(uri)
    if ref is not None and ref.alias is not None:
        mv = client.get_model_version_by_alias(ref.name, ref.alias)
        name, version, tags = ref.name, str(mv.version), mv.tags
        target = model_uri(name, version=version)
    elif ref is not None:
        mv = client.get_model_version(ref.name, ref.version)
        name, version, tags = ref.name, str(mv.version), mv.tags
    elif uri.startswith(("runs:/", "models:/")):
        name, version = uri, ""
    predictor = load_predictor(target)
    served = Served(predictor, uri, name, version, "")
    served.variant = tags.get("variant") or getattr(predictor, "variant", None) or "fp32"  # lmpipe/compress.py
    return served


class Holder:
    """The current model, and (for an alias URI) the poller that moves it along with the alias."""

    def __init__(self, served: Served, client, interval_s: float, on_swap, on_failure=lambda: None) -> None:
        self.current = served
        self.client, self.interval_s, self.on_swap, self.on_failure = client, interval_s, on_swap, on_failure
        ref = parse_model_uri(served.uri)
        self.alias = ref if ref is not None and ref.alias is not None else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failed: str | None = None  # a version that failed to load: warned once, not retried by the poller

    def start(self) -> None:
        if self.alias:
            threading.Thread(target=self._poll, name="lmpipe-reload", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check(retry_failed=False)
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the poller
                log.warning("reload: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def check(self, retry_failed: bool = True) -> dict[str, Any]:
        """Swap to the alias's version when it moved; what happened, as /admin/reload answers it. The poller
        passes retry_failed=False: a version that failed to load is not loaded again every interval (until the
        alias moves on, or /admin/reload asks)."""
        if not self.alias:
            return {"reloaded": False, "version": self.current.version,
                    "reason": f"{self.current.uri} is not models:/NAME@alias; nothing to follow"}
        with self._lock:
            old = self.current
            mv = self.client.get_model_version_by_alias(self.alias.name, self.alias.alias)
            if str(mv.version) == old.version:
                return {"reloaded": False, "version": old.version}
            if not retry_failed and self._failed == str(mv.version):
                return {"reloaded": False, "version": old.version, "reason": f"v{mv.version} failed to load"}
            try:
                new = load(old.uri, self.client)  # resolves the alias again and loads that version in full
            except Exception as e:
                self.on_failure()  # each failed load (the poller tries a version once; /admin/reload each time asked)
                self._failed = str(mv.version)
                log.warning("reload: %s v%s failed to load, still serving v%s (%s: %s)", old.name, mv.version,
                            old.version, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                if retry_failed:
                    raise  # /admin/reload answers 502 with the reason
                return {"reloaded": False, "version": old.version, "reason": f"v{mv.version} failed to load"}
            self.on_swap(new)
            self.current = new  # the swap: the next batch runs on the new model
            log.info("reload: %s@%s v%s -> v%s", old.name, self.alias.alias, old.version, new.version)
            return {"reloaded": True, "version": new.version, "previous": old.version}
