"""Prometheus metrics (one registry for the process, served at GET /metrics)."""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

QUEUE_DEPTH = Gauge("emo_queue_depth", "Sequences waiting for a batch slot", registry=REGISTRY)
RUNNING = Gauge("emo_running_requests", "Sequences in the running batch", registry=REGISTRY)
REQUESTS = Counter("emo_requests_total", "Requests answered, by profile and status", ["profile", "status"],
                   registry=REGISTRY)
GENERATED_TOKENS = Counter("emo_generated_tokens_total", "Tokens generated", registry=REGISTRY)
PROMPT_TOKENS = Counter("emo_prompt_tokens_total", "Prompt tokens prefilled", registry=REGISTRY)
TTFT = Histogram("emo_time_to_first_token_seconds", "Time from request to first token", ["profile"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=REGISTRY)
LATENCY = Histogram("emo_request_latency_seconds", "Time from request to last token", ["profile"],
                    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
PROFILE_RESIDENT = Gauge("emo_profile_resident_bytes", "Resident bytes of a profile's experts", ["profile"],
                         registry=REGISTRY)
PROCESS_RSS = Gauge("emo_process_resident_bytes", "Resident set size of the server process", registry=REGISTRY)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class ExpertLoad:
    """Tokens routed to each expert, per MoE layer, since the server started.

    The engine adds one step's counts at a time (a bincount per layer, cheap);
    /metrics reads them as one counter family `emo_expert_tokens_total{layer,
    expert}`: layers x experts series and no per-request or per-profile label,
    so the cardinality is fixed by the model (`--no-expert-metrics` for very
    large ones)."""

    def __init__(self, model, moe_layers: list[int]):
        self.ids = {i: list(model.expert_ids(i)) for i in moe_layers}
        self.counts = {i: np.zeros(len(ids), dtype=np.int64) for i, ids in self.ids.items()}
        self.lock = threading.Lock()
        _EXPERT_LOAD.current = self

    def add(self, layer: int, counts) -> None:
        with self.lock:
            self.counts[layer] += np.asarray(counts, dtype=np.int64)

    def snapshot(self) -> dict[int, list[tuple[int, int]]]:
        with self.lock:
            return {i: list(zip(self.ids[i], c.tolist())) for i, c in self.counts.items()}


class _ExpertLoadCollector(Collector):
    current: ExpertLoad | None = None

    def collect(self):
        if self.current is None:  # --no-expert-metrics: not even the family's header
            return
        fam = CounterMetricFamily("emo_expert_tokens", "Tokens routed to an expert (original id), per MoE layer",
                                  labels=["layer", "expert"])
        for i, pairs in self.current.snapshot().items():
            for e, n in pairs:
                fam.add_metric([str(i), str(e)], n)
        yield fam


_EXPERT_LOAD = _ExpertLoadCollector()
REGISTRY.register(_EXPERT_LOAD)
