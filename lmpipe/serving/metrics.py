"""Prometheus metrics of one app, in its own CollectorRegistry (several apps in one process do not collide).

    curl -s -H "Authorization: Bearer $LMPIPE_API_TOKEN" localhost:8000/metrics
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

ROUTES = ("/predict", "/embed", "/generate", "/tasks", "/health", "/metrics", "/drift", "/admin/reload")
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lmpipe_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.latency = Histogram("lmpipe_request_latency_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("lmpipe_batch_size", "Texts (/generate: requests) per batch (one call into the "
                                    "model; _count = batches)",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward_passes = Counter("lmpipe_forward_passes", "Forward passes (a batch runs in serve.forward_batch_size chunks)",
                                      registry=r)
        self.queue_texts = Gauge("lmpipe_queue_texts", "Texts (/generate: requests) waiting for a batch", registry=r)
        self.predictions = Counter("lmpipe_predictions", "Predicted labels by task", ["task", "label"], registry=r)
        self.confidence = Histogram("lmpipe_prediction_confidence", "Probability of the predicted label",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.model = Info("lmpipe_model", "The served model: name, version, variant, uri", registry=r)
        self.reloads = Counter("lmpipe_model_reloads", "Swaps to a new model version", registry=r)
        self.reload_failures = Counter("lmpipe_model_reload_failures", "New model versions that failed to load "
                                       "(the previous one stays served)", registry=r)
        self.generated_tokens = Counter("lmpipe_generated_tokens", "New tokens generated for /generate requests",
                                        registry=r)
        self.generations = Counter("lmpipe_generations", "Finished /generate requests by how they ended: eos, "
                                   "length (max_new_tokens), cancelled (the client went away), error", ["finish"],
                                   registry=r)
        self.time_to_first_token = Histogram("lmpipe_time_to_first_token_seconds", "/generate: from a request's "
                                             "arrival to its first new token", buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_token = Histogram("lmpipe_time_per_output_token_seconds", "/generate: between two "
                                        "consecutive new tokens of one request", buckets=TOKEN_BUCKETS, registry=r)
        self.drift_psi = Gauge("lmpipe_drift_psi", "PSI of the live window against the model's drift reference",
                               ["feature"], registry=r)

    def observe_predictions(self, preds: list[dict], tasks: list[str]) -> None:
        for p, task in zip(preds, tasks):
            self.predictions.labels(task, p["label"]).inc()
            self.confidence.observe(p["score"])


class MetricsMiddleware:
    """Pure ASGI: counts every HTTP request by route (unknown paths as `other`) and status, times it."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # an exception before the response started
        t0 = time.perf_counter()

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
