"""Prometheus metrics and the /healthz, /readyz, /metrics endpoints every worker serves."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cascade.logging import get_logger
from workers.kafka_io import Brokers, LagProbe

log = get_logger("cascade.worker")


class WorkerMetrics:
    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.events_in = Counter("cascade_events_in_total", "Records consumed", ["role"], registry=r)
        self.answered = Counter("cascade_answered_total", "Decisions produced", ["role", "tier", "reason"], registry=r)
        self.deferred = Counter("cascade_deferred_total", "Events passed up", ["role", "to", "explored"], registry=r)
        self.cache_hits = Counter("cascade_cache_hits_total", "Events answered from the decision cache", ["role"], registry=r)
        self.duplicates = Counter("cascade_duplicates_total", "Redelivered events already decided", ["role"], registry=r)
        self.dead_letters = Counter("cascade_dead_letters_total", "Records sent to the dead-letter topic", ["role", "reason"], registry=r)
        self.llm_calls = Counter("cascade_llm_calls_total", "LLM calls made", ["role"], registry=r)
        self.llm_spend = Counter("cascade_llm_spend_total", "LLM spend in configured cost units", ["role"], registry=r)
        self.llm_retries = Counter("cascade_llm_retries_total", "LLM call retries", ["role"], registry=r)
        self.llm_in_flight = Gauge("cascade_llm_in_flight", "LLM calls in flight", ["role"], registry=r)
        self.llm_limit = Gauge("cascade_llm_limit", "LLM in-flight limit (AIMD: halved on 429s)", ["role"], registry=r)
        self.llm_queued = Gauge("cascade_llm_queued", "Admitted records waiting for a slot or a retry", ["role"], registry=r)
        self.paused_partitions = Gauge("cascade_paused_partitions", "Input partitions paused by the window", ["role"], registry=r)
        self.watermark_lag = Gauge("cascade_watermark_lag", "Admitted offsets past the committed watermarks", ["role"], registry=r)
        self.budget_exhausted = Counter("cascade_budget_exhausted_total", "Events refused an LLM call by budget", ["role"], registry=r)
        self.budget_limit = Gauge("cascade_budget_limit", "Configured LLM budget per window", ["role", "window"], registry=r)
        self.budget_remaining = Gauge("cascade_budget_remaining", "LLM budget left in the current window (last take)",
                                      ["role", "window"], registry=r)
        self.demonstrations = Counter("cascade_demonstrations_learned_total", "Demonstrations learned", ["role"], registry=r)
        self.snapshots = Counter("cascade_snapshots_total", "Snapshots published or loaded", ["role", "name", "op"], registry=r)
        self.outage = Gauge("cascade_outage", "1 while the worker waits out an outage of 'kafka' or 'state'",
                            ["role", "what"], registry=r)
        self.outage_retries = Counter("cascade_outage_retries_total", "Calls retried in an outage",
                                      ["role", "what", "op"], registry=r)
        self.redis_loss = Gauge("cascade_redis_loss_detected", "1 while a loss of the state store is detected and "
                                "not confirmed (cascade state confirm-loss)", ["role"], registry=r)
        self.state_errors = Gauge("cascade_state_errors", "State-store operations failed or skipped in outages", ["role"], registry=r)
        self.batch_seconds = Histogram(
            "cascade_batch_seconds", "Time to process, produce and commit one batch", ["role"], registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.event_latency = Histogram(
            "cascade_event_latency_seconds", "From first seen to decision", ["role"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.lag = Gauge("cascade_consumer_lag", "Records behind the end of the input topic", ["role"], registry=r)
        self.llm_unmapped_ratio = Gauge(
            "cascade_llm_unmapped_ratio", "Share of the last 100 LLM answers that map to no label", ["role"], registry=r
        )
        self.model_version = Gauge("cascade_model_version", "Version of each loaded model", ["role", "name"], registry=r)
        # The quality contract (LLM worker): scope "stream" is the whole stream, "window" the recent window.
        self.agreement_estimate = Gauge("cascade_agreement_estimate", "Estimated agreement of delivered decisions "
                                        "with the LLM, from audits", ["role", "scope"], registry=r)
        self.agreement_lower_bound = Gauge("cascade_agreement_lower_bound", "Lower confidence bound (1 - alpha) on "
                                           "that agreement", ["role", "scope"], registry=r)
        self.audit_calls = Counter("cascade_audit_calls_total", "LLM calls auditing a cheap answer", ["role"], registry=r)
        self.budget_binding = Gauge("cascade_contract_budget_binding", "1 while max_llm_fraction overrules "
                                    "min_agreement", ["role"], registry=r)


# Above this share of LLM answers naming no label, the LLM worker warns and the run report says so.
UNMAPPED_THRESHOLD = 0.2


class UnmappedWatch:
    """The share of LLM answers that map to no label over the last ``window`` answers.

    :meth:`add` returns True when a warning is due: the share is above ``threshold`` over at least
    ``min_answers`` answers, and no warning was given in the last ``every_s`` seconds.
    """

    def __init__(self, window: int = 100, threshold: float = UNMAPPED_THRESHOLD, min_answers: int = 20, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.min_answers = min_answers
        self.every_s = every_s
        self._clock = clock
        self._mapped: deque[bool] = deque(maxlen=window)
        self.examples: deque[str | None] = deque(maxlen=5)  # the latest unmapped raw answers
        self._warned_at: float | None = None

    @property
    def ratio(self) -> float:
        return 0.0 if not self._mapped else (len(self._mapped) - sum(self._mapped)) / len(self._mapped)

    def add(self, raw: str | None, mapped: bool) -> bool:
        self._mapped.append(mapped)
        if not mapped:
            self.examples.append(None if raw is None else raw[:120])
        if len(self._mapped) < self.min_answers or self.ratio <= self.threshold:
            return False
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < self.every_s:
            return False
        self._warned_at = now
        return True


class FreshGroupWatch:
    """Whether nearly all of a fresh consumer group's first batches were already decided.

    :meth:`add` returns True once, after the first ``batches`` batches (or ``min_records``
    records), when at least ``threshold`` of their records were duplicates.
    """

    def __init__(self, batches: int = 5, min_records: int = 50, threshold: float = 0.9) -> None:
        self.batches = batches
        self.min_records = min_records
        self.threshold = threshold
        self.records = 0
        self.duplicates = 0
        self._seen_batches = 0
        self.done = False

    def add(self, records: int, duplicates: int) -> bool:
        if self.done or records == 0:
            return False
        self.records += records
        self.duplicates += duplicates
        self._seen_batches += 1
        if self._seen_batches < self.batches and self.records < self.min_records:
            return False
        self.done = True
        return self.records >= 10 and self.duplicates >= self.threshold * self.records


class HealthServer:
    """/healthz: the process loop is alive (beat recently); /readyz: it has joined and is consuming."""

    def __init__(self, metrics: WorkerMetrics, port: int, stale_after_s: float = 60.0, host: str = "127.0.0.1") -> None:
        self.metrics = metrics
        self.ready = False
        self.last_beat = time.monotonic()
        self.stale_after_s = stale_after_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path == "/metrics":
                    self._send(200, generate_latest(server.metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path == "/healthz":
                    alive = time.monotonic() - server.last_beat < server.stale_after_s
                    self._send(200 if alive else 503, b"ok\n" if alive else b"stalled\n")
                elif self.path == "/readyz":
                    self._send(200 if server.ready else 503, b"ready\n" if server.ready else b"not ready\n")
                else:
                    self._send(404, b"not found\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # probes every few seconds would flood the log
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, name="health", daemon=True).start()

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class LagSampler:
    """Sets the consumer-lag gauge every ``every_s`` seconds from a thread of its own.

    Reading the lag takes several broker round trips (a ~100 ms fetch among them); in the
    consume loop that stalled every batch behind it.
    """

    def __init__(self, metrics: WorkerMetrics, bootstrap: Brokers, group: str, topics: Sequence[str], every_s: float = 10.0) -> None:
        self.metrics = metrics
        self.group = group
        self.topics = list(topics)
        self.every_s = every_s
        self._stop = threading.Event()
        self._probe = LagProbe(bootstrap)  # the thread's own: a probe is not thread-safe
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                lag = sum(self._probe.lag(self.group, self.topics).values())
                self.metrics.lag.labels(self.metrics.role).set(lag)
            except Exception as e:  # lag is for dashboards; never stop for it
                log.warning("lag_probe_failed", error=str(e))
                # A stale number would read as current: no value until a probe succeeds again.
                self.metrics.lag.labels(self.metrics.role).set(float("nan"))
            if self._stop.wait(self.every_s):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._probe.timeout_s + 5.0)
        self._probe.close()
