"""Metrics of a stage's MLflow run, sent in batches and buffered through a tracking-server outage.

Metrics logged while training go through `MetricLog`: while the server is unreachable they are buffered and
training goes on; they are flushed when it answers again, and at the stage's end it waits up to
`common.tracking_grace_s` for it. Metrics still unsent then are kept next to the stage's checkpoints
(`pending_metrics.jsonl`) and logged by the re-run, which resumes into the same MLflow run.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmpipe.errors import ServiceError
from lmpipe.io import atomic_path
from lmpipe.tracking import reason
# Imported inside functions (start-up cost, docs/results.md#start-up): mlflow where used: the buffer is written and
# read without it.

PENDING_FILE = "pending_metrics.jsonl"


class MetricLog:
    """The metrics of one MLflow run, sent in batches; buffered while the server is unreachable.

    `log` never raises for an unreachable server: it keeps the points and retries at most every
    `retry_every` seconds, so a training loop is never held up by an outage for more than one failed
    call (a refused connection fails at once; MLflow's own retries are off for these calls).
    `finish(grace_s)` sends what is left, waiting up to grace_s for the server; what it still cannot
    send is written to `pending_file` (next to the checkpoints) and ServiceError is raised. A later
    MetricLog on the same run and file logs those points first. Points are sent at most every `send_every`
    seconds (one batch, one store transaction), so a fast loop logging every few steps pays one call a
    second rather than one per logging step; the UI lags the loop by at most that much. Trainer flushes them
    before each checkpoint (`flush_metrics`), so what a resume restarts from was logged."""

    def __init__(self, run_id: str, pending_file: Path | None = None, retry_every: float = 5.0,
                 send_every: float = 1.0) -> None:
        self.run_id, self.pending_file, self.retry_every = run_id, pending_file, retry_every
        self.send_every = send_every
        self.pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self.down_since: float | None = None
        self._next_try = 0.0
        if pending_file is not None and pending_file.is_file():
            for line in pending_file.read_text().splitlines():
                key, value, ts, step = json.loads(line)
                self.pending.append((key, float(value), int(ts), int(step)))
            if self.pending:
                print(f"tracking: {len(self.pending)} metric points a previous attempt could not send are "
                      f"logged now", flush=True)

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        now_ms = int(time.time() * 1000)
        self.pending += [(k, v, now_ms, int(step or 0)) for k, v in metrics.items()]  # finite floats
        if time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> None:
        """One attempt to send the pending points now; the next batch waits send_every seconds."""
        if self.pending and self._send():
            self._next_try = time.monotonic() + self.send_every

    def _send(self) -> bool:
        import mlflow
        from mlflow.entities import Metric

        while self.pending:
            chunk = self.pending[:1000]  # MLflow's log_batch limit
            saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
            os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
            try:
                mlflow.MlflowClient().log_batch(self.run_id, metrics=[Metric(k, v, ts, st) for k, v, ts, st in chunk],
                                                synchronous=True)
            except Exception as e:
                if self.down_since is None:
                    self.down_since = time.monotonic()
                    print(f"tracking: MLflow server unreachable ({reason(e)}); training goes on, metrics are "
                          f"buffered ({len(self.pending)} so far)", flush=True)
                self._next_try = time.monotonic() + self.retry_every
                return False
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            del self.pending[:len(chunk)]
        if self.down_since is not None:
            print(f"tracking: MLflow server back after {time.monotonic() - self.down_since:.0f} s; "
                  f"buffered metrics sent", flush=True)
            self.down_since = None
        if self.pending_file is not None and self.pending_file.is_file():
            self.pending_file.unlink()
        return True

    def finish(self, grace_s: float) -> None:
        """Send everything, waiting up to grace_s for the server; else keep the points and raise."""
        deadline = time.monotonic() + grace_s
        while not self._send():
            if time.monotonic() >= deadline:
                n, kept = len(self.pending), self.keep()
                import mlflow

                raise ServiceError(f"MLflow tracking server {mlflow.get_tracking_uri()} unreachable for {grace_s:g} s "
                                   f"(common.tracking_grace_s); {n} metric points not sent, {kept}")
            time.sleep(min(self.retry_every, max(0.0, deadline - time.monotonic())))
            self._next_try = 0.0

    def keep(self) -> str:
        """Write the unsent points to pending_file (atomically); says where they went."""
        if self.pending_file is None:
            return "lost (this stage keeps no checkpoints)"

        with atomic_path(self.pending_file) as tmp:
            tmp.write_text("".join(json.dumps(p) + "\n" for p in self.pending))
        return f"kept in {self.pending_file} for the re-run, which resumes into the same MLflow run"


_active: MetricLog | None = None


@contextmanager
def metric_log(run_id: str, pending_file: Path | None, grace_s: float) -> Iterator[MetricLog]:
    """The run's MetricLog for the body of a stage (log_metrics_bounded writes to it). Finished (sent, or
    ServiceError) when the body returns; when it raises, what cannot be sent at once is kept."""
    global _active
    _active = MetricLog(run_id, pending_file)
    try:
        yield _active
    except BaseException:
        if _active.pending and not _active._send():
            _active.keep()
        raise
    else:
        _active.finish(grace_s)
    finally:
        _active = None


def flush_metrics() -> None:
    """One attempt to send the points MetricLog holds back (its once-a-second batching); a down server keeps
    them buffered, as MetricLog.log does."""
    if _active is not None and _active.down_since is None:
        _active.flush()


def settle(grace_s: float) -> None:
    """Before a stage writes its outputs: every metric so far sent (waiting up to grace_s for the server),
    else ServiceError with nothing written (the checkpoint stays; the re-run resumes and sends them)."""
    if _active is not None:
        _active.finish(grace_s)


def log_metrics_bounded(metrics: dict[str, float], step: int | None = None) -> None:
    """Finite numbers only; through the stage's MetricLog when one is open (outage-proof), else directly."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    if not clean:
        return
    if _active is not None:
        _active.log(clean, step)
    else:
        mlflow.log_metrics(clean, step=step)
