"""The server's Prometheus metrics (prometheus_client, one registry per server).

Request metrics are observed as requests end: outcomes, TTFT (from arrival, queueing included), time per output
token, end-to-end latency, prompt and generated tokens, batch sizes (static: requests per batch; continuous: rows
per decode step); each request's queue time (arrival to the engine taking it) as it starts. Offload metrics are read from the engine's
cache counters when scraped, so they are exact at that moment: expert hits, misses, prefetch hits, bytes moved,
stall seconds, per-layer hit rate, and cache occupancy against the expert budget. Queue length and running
requests are read from the scheduler when scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServerMetrics:
    def __init__(self, engine, scheduler_ref):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("vismmoe_requests", "Chat requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("vismmoe_time_to_first_token_seconds", "Arrival to first token (queueing included)",
                              buckets=_LATENCY, registry=r)
        self.tpot = Histogram("vismmoe_time_per_output_token_seconds", "Decode time per output token",
                              buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("vismmoe_e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY,
                             registry=r)
        self.prompt_tokens = Counter("vismmoe_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("vismmoe_generation_tokens", "Generated tokens", registry=r)
        self.batch_size = Histogram("vismmoe_batch_size", "Requests per engine batch (continuous: rows per decode "
                                    "step)", buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.queue_time = Histogram("vismmoe_queue_time_seconds", "Arrival to the engine taking the request",
                                    buckets=_LATENCY, registry=r)
        q = Gauge("vismmoe_queue_length", "Requests (rows) waiting for the engine", registry=r)
        q.set_function(lambda: scheduler_ref().queued)
        running = Gauge("vismmoe_running_requests", "Requests (rows) the engine runs now", registry=r)
        running.set_function(lambda: scheduler_ref().running)
        r.register(_OffloadCollector(engine))

    def started(self, req) -> None:
        """`req` left the queue for the engine."""
        if req.t_start is not None:
            self.queue_time.observe(max(0.0, req.t_start - req.t_submit))

    def observe(self, req, outcome: str) -> None:
        """A request ended with `outcome` (ok, cancelled, client_error, rejected, error)."""
        self.requests.labels(outcome).inc()
        if outcome != "ok":
            return
        if req.t_first is not None:
            self.ttft.observe(req.t_first - req.t_submit)
        if req.t_end is not None:
            self.e2e.observe(req.t_end - req.t_submit)
            if len(req.token_ids) > 1:
                self.tpot.observe((req.t_end - req.t_first) / (len(req.token_ids) - 1))
        self.prompt_tokens.inc(req.prompt_tokens)
        self.generation_tokens.inc(len(req.token_ids))


class _OffloadCollector:
    """Reads the engine's cache counters at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        eng = self.engine
        tot = eng.cache.counters.total()
        for name, doc, value in (
                ("vismmoe_expert_hits", "Expert uses served from the device cache", tot.hits),
                ("vismmoe_expert_misses", "Expert uses that had to move the expert", tot.misses),
                ("vismmoe_expert_prefetch_hits", "Hits on experts a prefetch brought", tot.prefetch_hits),
                ("vismmoe_expert_bytes_moved", "Expert bytes copied to the device", tot.bytes_moved),
                ("vismmoe_expert_stall_seconds", "Seconds compute waited for expert copies", tot.stall_s)):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        occ = GaugeMetricFamily("vismmoe_expert_cache_bytes", "Expert bytes resident on the device", labels=["kind"])
        occ.add_metric(["resident"], float(len(eng.cache.slot_of) * eng.layout.nbytes))
        occ.add_metric(["peak"], float(eng.cache.peak_resident * eng.layout.nbytes))
        occ.add_metric(["budget"], float(eng.budget_bytes))
        yield occ
        per = GaugeMetricFamily("vismmoe_expert_hit_rate", "Hit rate of expert uses per MoE layer", labels=["layer"])
        for layer, c in sorted(eng.cache.counters.per_layer.items()):
            uses = c.hits + c.misses
            if uses:
                per.add_metric([str(layer)], c.hits / uses)
        yield per
