"""The generation service's Prometheus metrics (deploy/README.md, "Metrics"); tokens/s is rate() of the counters."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from ilf.metrics import Sampled

# Read from the Engine when scraped.
ENGINE = (
    Sampled("ilf_generation_queue_length", "Requests waiting for a batch slot.", lambda e: e.queued),
    Sampled("ilf_generation_running_rows", "Samples (rows) decoding now.", lambda e: e.active_rows),
    Sampled("ilf_generation_kv_cache_bytes", "Memory held by the running batches' KV caches.",
            lambda e: e.kv_cache_bytes),
    Sampled("ilf_generation_scheduler_restarts", "Times a dead decode loop was replaced.",
            lambda e: e.scheduler_restarts, counter=True),
    Sampled("ilf_generation_heap_trims", "Times the freed heap pages were handed back to the kernel.",
            lambda e: e.trimmer.trims, counter=True),
)
# Read from the ModelManager's describe() when scraped.
MODELS = (
    Sampled("ilf_generation_model_loaded", "1 for each model version in memory.",
            lambda m: {(v,): 1.0 for v in m.describe()["loaded_versions"]}, labels=("model_version",)),
    Sampled("ilf_generation_model_serving", "1 for the version serving requests that name none.",
            lambda m: {(v,): 1.0 for v in [m.describe()["serving_version"]] if v}, labels=("model_version",)),
    Sampled("ilf_generation_canary_share", "Share of new requests the canary candidate gets.",
            lambda m: {(d["canary_version"],): d["canary_share"] for d in [m.describe()] if d["canary_version"]},
            labels=("model_version",)),
)

PREFILL_TOKENS = Counter("ilf_generation_prefill_tokens", "Prompt tokens run through the model (once per request).")
DECODE_TOKENS = Counter("ilf_generation_decode_tokens", "Tokens generated, one per row and decode step.")
TIME_TO_FIRST_TOKEN = Histogram("ilf_generation_time_to_first_token_seconds",
                                "Time from a request's arrival to its first token.",
                                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
REQUESTS = Counter("ilf_generation_requests", "Requests started, by the model version serving them.",
                   ["model_version"])
SWAPS = Counter("ilf_generation_model_swaps", "Hot swaps of the serving version.")
LOAD_FAILURES = Counter("ilf_generation_model_load_failures", "Model versions that failed to load.")
