"""Prometheus metrics (one registry for the process, served at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
