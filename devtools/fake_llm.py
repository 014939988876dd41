"""A fake OpenAI-compatible chat-completions server (stdlib only) with realistic latency.

Latency follows a lognormal body fitted to a p50 and a p95, with a steeper lognormal tail through
the p99 (one lognormal cannot have p50 0.8 s, p95 3 s and p99 8 s at once), capped at 20 s. Each request is
answered after its latency on its own thread, so many calls overlap. Optionally a share of the
requests gets 429 with a Retry-After. The answer is a label of the task, chosen from the text (so
the same text always gets the same label): a label named in the text, else a hash of the text.

Tests and benchmarks start it in-process (:class:`FakeLLM`); ``python -m devtools.fake_llm``
serves it from the command line. ``POST /admin`` with a JSON body changes the 429 share or the
latency scale while it runs; ``GET /stats`` reports what it served. A text containing
``slow_marker`` takes ``slow_s`` seconds (a call stuck on one partition, in tests).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from statistics import NormalDist

_Z95 = NormalDist().inv_cdf(0.95)
_Z99 = NormalDist().inv_cdf(0.99)


@dataclass
class Latency:
    """Quantile-matched latency: lognormal through p50 and p95, a steeper one above p95 through p99,
    capped at ``max_s`` (the steep tail would reach minutes by p99.99; real endpoints time out)."""

    p50_s: float = 0.8
    p95_s: float = 3.0
    p99_s: float = 8.0
    max_s: float = 20.0

    def at(self, z: float) -> float:
        """The latency at standard-normal quantile ``z``."""
        if z <= _Z95:
            return self.p50_s * math.exp(math.log(self.p95_s / self.p50_s) / _Z95 * z)
        return min(self.max_s, self.p95_s * math.exp(math.log(self.p99_s / self.p95_s) / (_Z99 - _Z95) * (z - _Z95)))

    def sample(self, rng: random.Random) -> float:
        return self.at(rng.gauss(0.0, 1.0))

    def mean(self, samples: int = 200_000, seed: int = 0) -> float:
        rng = random.Random(seed)
        return sum(self.sample(rng) for _ in range(samples)) / samples


@dataclass
class Settings:
    labels: list[str]
    latency: Latency = field(default_factory=Latency)
    scale: float = 1.0  # every latency multiplied by this (fast tests)
    throttle_rate: float = 0.0  # share of requests answered 429
    retry_after_s: float = 1.0
    slow_marker: str | None = None
    slow_s: float = 0.0
    seed: int = 0


@dataclass
class Stats:
    requests: int = 0
    answered: int = 0  # completed with an answer
    throttled: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    latency_sum_s: float = 0.0  # of the answered calls
    latencies: list[float] = field(default_factory=list)  # of the answered calls, in completion order

    def as_dict(self) -> dict[str, float]:
        mean = self.latency_sum_s / self.answered if self.answered else 0.0
        return {"requests": self.requests, "answered": self.answered, "throttled": self.throttled,
                "in_flight": self.in_flight, "max_in_flight": self.max_in_flight, "mean_latency_s": mean}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def handle_error(self, request: object, client_address: object) -> None:
        """Quiet about clients that went away mid-answer (a killed worker); loud about the rest."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class FakeLLM:
    """The server on a thread: ``start()``, ``base_url``, ``stop()`` (also a context manager)."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.stats = Stats()
        self.lock = threading.Lock()
        self.rng = random.Random(settings.seed)
        self.server = _Server((host, port), _handler(self))
        self._thread = threading.Thread(target=self.server.serve_forever, name="fake-llm", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeLLM:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def label_for(self, text: str) -> str:
        labels = self.settings.labels
        for label in labels:
            if re.search(rf"\b{re.escape(label)}\b", text, re.IGNORECASE):
                return label
        return labels[int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "big") % len(labels)]

    def plan(self, text: str) -> tuple[bool, float]:
        """(throttled, seconds to wait) for one request."""
        s = self.settings
        with self.lock:
            self.stats.requests += 1
            if s.throttle_rate and self.rng.random() < s.throttle_rate:
                self.stats.throttled += 1
                return True, 0.0
            delay = s.latency.sample(self.rng) * s.scale
            if s.slow_marker and s.slow_marker in text:
                delay = s.slow_s
            self.stats.in_flight += 1
            self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        return False, delay

    def done(self, delay: float) -> None:
        with self.lock:
            self.stats.in_flight -= 1
            self.stats.answered += 1
            self.stats.latency_sum_s += delay
            self.stats.latencies.append(delay)


def _handler(fake: FakeLLM) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the backend reuses its connections

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
            pass

        def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            with fake.lock:
                self._send(200, fake.stats.as_dict())

        def do_POST(self) -> None:  # noqa: N802
            body = self._body()
            if self.path.endswith("/admin"):
                with fake.lock:
                    for key in ("throttle_rate", "scale", "retry_after_s"):
                        if key in body:
                            setattr(fake.settings, key, float(body[key]))
                self._send(200, {"ok": True})
                return
            text = "\n".join(str(m.get("content", "")) for m in body.get("messages", []) if m.get("role") == "user")
            throttled, delay = fake.plan(text)
            if throttled:
                self._send(429, {"error": {"message": "rate limited"}},
                           {"Retry-After": f"{fake.settings.retry_after_s:g}"})
                return
            try:
                time.sleep(delay)
                content = json.dumps({"label": fake.label_for(text)})
                self._send(200, {
                    "id": "fake", "object": "chat.completion", "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(text) // 4 + 20, "completion_tokens": 6},
                })
            finally:
                fake.done(delay)

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--labels", default="joy,fear,anger,sadness,surprise,love")
    ap.add_argument("--p50", type=float, default=0.8)
    ap.add_argument("--p95", type=float, default=3.0)
    ap.add_argument("--p99", type=float, default=8.0)
    ap.add_argument("--throttle-rate", type=float, default=0.0, help="share of requests answered 429 (e.g. 0.02)")
    ap.add_argument("--retry-after", type=float, default=1.0)
    args = ap.parse_args(argv)
    settings = Settings(labels=args.labels.split(","), latency=Latency(args.p50, args.p95, args.p99),
                        throttle_rate=args.throttle_rate, retry_after_s=args.retry_after)
    fake = FakeLLM(settings, port=args.port).start()
    print(f"fake LLM on {fake.base_url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
