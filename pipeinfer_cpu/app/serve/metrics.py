"""GET /metrics: what the statistics already know, in Prometheus' text format (prometheus_client,
its own registry so nothing global leaks in). Counters add up every answered request; the
per-stage ones are labelled with the stage's index, rank, host and layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

from pipeinfer_cpu.app.serve.api import prompt_tokens

OUTCOMES = ("completed", "cancelled", "dropped", "refused", "failed")
_STAGE_LABELS = ("stage", "rank", "host", "layers")
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_SECONDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    """The server's counters; the engine worker records into them, the HTTP thread exposes them."""

    def __init__(self) -> None:
        disable_created_metrics()  # a `_created` timestamp beside every counter is noise to a reader (library-wide)
        self.registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"pipeinfer_{name}", help, labels, registry=self.registry)

        def gauge(name: str, help: str) -> Gauge:
            return Gauge(f"pipeinfer_{name}", help, registry=self.registry)

        self.requests = counter("requests", "Requests by outcome: completed, cancelled (the client left "
                                "mid-answer), dropped (left while queued), refused (4xx), failed (engine died)",
                                ("outcome",))
        for outcome in OUTCOMES:
            self.requests.labels(outcome)  # every outcome is shown, at 0 until it happens
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of answered requests, reused ones included")
        self.reused_tokens = counter("reused_tokens", "Prompt tokens whose KV cache the stages already held")
        self.generated_tokens = counter("generated_tokens", "Tokens generated")
        self.drafted_tokens = counter("drafted_tokens", "Draft tokens sent for verification")
        self.accepted_tokens = counter("accepted_tokens", "Draft tokens the target accepted")
        self.runs_launched = counter("runs_launched", "Pipeline runs the head launched")
        self.runs_cancelled = counter("runs_cancelled", "Pipeline runs the head cancelled (early cancellation)")
        self.ttft = Histogram("pipeinfer_time_to_first_token_seconds", "Time to first token, from the request's "
                              "start on the engine", buckets=_SECONDS, registry=self.registry)
        self.itl = Histogram("pipeinfer_inter_token_latency_seconds", "Time between consecutive tokens",
                             buckets=_ITL_SECONDS, registry=self.registry)
        self.decode_rate = gauge("decode_tokens_per_second", "Decode speed of the last answer of 2+ tokens")
        self.acceptance = gauge("acceptance_rate", "Accepted / drafted tokens of the last speculative answer")
        self.waiting = gauge("requests_waiting", "Requests queued behind the one running")
        self.running = gauge("requests_running", "Requests being answered (one at a time)")
        self.stage_compute = counter("stage_compute_seconds", "Seconds each stage spent computing", _STAGE_LABELS)
        self.stage_wall = counter("stage_wall_seconds", "Wall seconds each stage spent on requests", _STAGE_LABELS)
        self.stage_runs = counter("stage_runs_computed", "Runs each stage computed", _STAGE_LABELS)
        self.stage_cancelled = counter("stage_runs_cancelled", "Runs each stage dropped, before or during their "
                                       "computation", (*_STAGE_LABELS, "when"))

    def outcome(self, outcome: str) -> None:
        self.requests.labels(outcome).inc()

    def answered(self, stats: Mapping[str, Any], cancelled: bool) -> None:
        """A request the engine answered (or stopped because its client left), with its statistics."""
        self.outcome("cancelled" if cancelled else "completed")
        self.prompt_tokens.inc(prompt_tokens(stats))
        self.reused_tokens.inc(stats.get("reused_tokens", 0))
        self.generated_tokens.inc(stats.get("n_generated", 0))
        self.drafted_tokens.inc(stats.get("drafted", 0))
        self.accepted_tokens.inc(stats.get("accepted", 0))
        self.runs_launched.inc(stats.get("runs_launched", 0))
        self.runs_cancelled.inc(stats.get("runs_cancelled", 0))
        if stats.get("n_generated"):
            self.ttft.observe(stats["ttft_s"])
        for gap in stats.get("itl_s", ()):
            self.itl.observe(gap)
        if stats.get("decode_tokens_per_s") is not None:
            self.decode_rate.set(stats["decode_tokens_per_s"])
        if stats.get("acceptance_rate") is not None:
            self.acceptance.set(stats["acceptance_rate"])
        for index, stage in enumerate(stats.get("stages", ())):
            labels = (str(index), str(stage["rank"]), stage["host"], "{}-{}".format(*stage["layers"]))
            self.stage_compute.labels(*labels).inc(stage["compute_s"])
            self.stage_wall.labels(*labels).inc(stage["wall_s"])
            self.stage_runs.labels(*labels).inc(stage.get("runs_computed", 0))
            self.stage_cancelled.labels(*labels, "before").inc(stage.get("runs_cancelled_before", 0))
            self.stage_cancelled.labels(*labels, "during").inc(stage.get("runs_cancelled_during", 0))

    def exposition(self) -> tuple[bytes, str]:
        """The text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
