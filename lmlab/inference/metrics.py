"""/metrics of `lmlab serve`: the Prometheus text the server's counters and its engine's statistics render to."""

from __future__ import annotations

import threading


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (thread-safe observe)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
            self.sum += value
            self.count += 1


class Stats:
    """What /metrics reports about the engine (written by the engine thread, read by the server)."""

    def __init__(self):
        self.requests_finished = 0
        self.prompt_tokens = 0
        self.prefill_tokens = 0  # prompt tokens computed (the rest came from the prefix cache)
        self.generation_tokens = 0
        self.decode_steps = 0
        self.batch_size = 0  # rows in the last decode step
        self.draft_tokens = 0  # tokens drafted by prompt lookup (--speculate)...
        self.accepted_tokens = 0  # ...and accepted by the model
        self.kv_cache_waits = 0  # requests that had a row free but had to wait for KV cache blocks
        self.ttft = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
        self.itl = Histogram((0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))


def prometheus_text(http_requests: dict, engine) -> str:
    """The server's /metrics in the Prometheus text exposition format (version 0.0.4): HTTP requests by endpoint
    and status, and, when the server runs an engine (not an embedding model alone), its counters, gauges, prefix
    cache and latency histograms."""
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value}" for labels, value in samples)

    metric("lmlab_http_requests_total", "counter", "HTTP requests by endpoint and status code.",
           [(f'{{endpoint="{e}",status="{s}"}}', c) for (e, s), c in sorted(http_requests.items())])
    if engine is None:  # an embedding model alone: no engine to report on
        return "\n".join(lines) + "\n"
    stats = engine.stats
    metric("lmlab_requests_finished_total", "counter", "Generation requests completed by the engine.",
           [("", stats.requests_finished)])
    metric("lmlab_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", stats.prompt_tokens)])
    metric("lmlab_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generation_tokens)])
    metric("lmlab_decode_steps_total", "counter", "Batched decode steps run.", [("", stats.decode_steps)])
    metric("lmlab_spec_draft_tokens_total", "counter", "Tokens drafted by prompt lookup (--speculate).",
           [("", stats.draft_tokens)])
    metric("lmlab_spec_accepted_tokens_total", "counter", "Drafted tokens the model accepted.",
           [("", stats.accepted_tokens)])
    metric("lmlab_queue_depth", "gauge", "Requests waiting for a batch row or being prefilled.",
           [("", engine.queue_depth())])
    metric("lmlab_running_sequences", "gauge", "Sequences decoding in the running batch.",
           [("", engine.running())])
    metric("lmlab_batch_size", "gauge", "Rows in the last decode step.", [("", stats.batch_size)])
    metric("lmlab_max_batch", "gauge", "Rows the engine can batch (--max-batch).", [("", engine.max_batch)])
    pool = engine.pool
    metric("lmlab_prefill_tokens_total", "counter", "Prompt tokens computed (the others came from the prefix "
           "cache).", [("", stats.prefill_tokens)])
    metric("lmlab_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           [("", pool.query_tokens)])
    metric("lmlab_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
           [("", pool.hit_tokens)])
    metric("lmlab_prefix_cache_hit_rate", "gauge", "Prompt tokens found in the prefix cache / looked up.",
           [("", pool.hit_tokens / pool.query_tokens if pool.query_tokens else 0.0)])
    metric("lmlab_kv_cache_blocks_used", "gauge", f"KV cache blocks ({pool.block_size} tokens) held by "
           "sequences.", [("", pool.used())])
    metric("lmlab_kv_cache_blocks_free", "gauge", "KV cache blocks free (cached prefixes among them, evicted "
           "least recently used first).", [("", pool.free())])
    metric("lmlab_kv_cache_bytes", "gauge", "Memory of the KV cache pool (keys and values of every layer, the spare "
           "block that padding uses included), all taken at start.", [("", pool.bytes)])
    metric("lmlab_kv_cache_waits_total", "counter", "Requests that found a batch row free but too few free KV "
           "cache blocks, and waited for blocks to free.", [("", stats.kv_cache_waits)])
    for name, hist, help_ in (("lmlab_time_to_first_token_seconds", stats.ttft,
                               "Time from a request's arrival to its first token."),
                              ("lmlab_inter_token_latency_seconds", stats.itl,
                               "Time between consecutive tokens of a sequence.")):
        samples = [(f'_bucket{{le="{b}"}}', c) for b, c in zip(hist.buckets, hist.counts)]
        samples += [('_bucket{le="+Inf"}', hist.count), ("_sum", hist.sum), ("_count", hist.count)]
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} histogram"])
        lines.extend(f"{name}{suffix} {value}" for suffix, value in samples)
    return "\n".join(lines) + "\n"
