"""Prometheus metrics, in a registry per app so that several apps (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.request_seconds = Histogram("http_request_duration_seconds", "Total request time", ["route"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("inference_queue_wait_seconds", "Time a prepared image waited for the model",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("inference_batch_seconds", "Forward pass time per batch",
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("inference_batch_size", "Images per forward pass",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.in_service = Gauge("inference_in_service", "Classify requests admitted and not yet answered", registry=r)
        self.rejected = Counter("inference_overload_rejections", "Requests refused with 503 because the queue was full",
                                registry=r)
        self.model = Info("model", "The model being served", registry=r)
        self.reloads = Counter("model_reloads", "Model reloads asked for with SIGHUP, by result (switched, refused)",
                               ["result"], registry=r)
        self.corrections = Counter("feedback_corrections", "Corrections kept (FEEDBACK_DIR), by the label chosen",
                                   ["label"], registry=r)

    def observe_batch(self, size: int, waits: list[float], seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)
        for wait in waits:
            self.queue_wait.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
