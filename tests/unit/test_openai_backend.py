"""The `openai` backend against a tiny stdlib HTTP server with canned responses (real HTTP, fast)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cascade.config import LLMConfig, TaskConfig, load_config
from cascade.messages import Event
from cascade.task import Task
from cascade.tiers.circuit import CircuitBreaker, CircuitOpen
from cascade.tiers.llm import LLMError, call_with_retries, make_backend
from cascade.tiers.openai_compat import AnswerParser, OpenAIBackend, render, retry_after_seconds
from devtools.services import free_port

LABELS = ["joy", "sadness", "anger"]
Reply = tuple[int, dict[str, str], bytes]


def completion(content: str | None, prompt_tokens: int = 20, completion_tokens: int = 5, usage: bool = True) -> Reply:
    body: dict[str, Any] = {"id": "x", "object": "chat.completion",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    if usage:
        body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}
    return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


class Canned:
    """An HTTP server whose reply to each POST is ``handler(request_json, headers)``."""

    def __init__(self, handler: Callable[[dict, dict[str, str]], Reply]) -> None:
        self.handler = handler
        self.requests: list[tuple[dict, dict[str, str]]] = []
        canned = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {k.lower(): v for k, v in self.headers.items()}
                canned.requests.append((body, headers))
                status, extra, payload = canned.handler(body, headers)
                try:
                    self.send_response(status)
                    for k, v in extra.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[dict, dict[str, str]], Reply]], Canned]]:
    servers: list[Canned] = []

    def start(handler: Callable[[dict, dict[str, str]], Reply]) -> Canned:
        servers.append(Canned(handler))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def backend(url: str, **kw: Any) -> OpenAIBackend:
    task = Task(TaskConfig(name="emo", labels=LABELS, label_aliases={"happy": "joy"}))
    b = make_backend(task, LLMConfig(backend="openai", name="tiny", base_url=url, **kw))
    assert isinstance(b, OpenAIBackend)
    return b


EV = Event(id="e1", text="I won the lottery!")


def test_answer_usage_prompt_and_schema(serve) -> None:
    srv = serve(lambda body, h: completion('{"label": "joy"}', 31, 6))
    b = backend(srv.url, cost=7.0)
    [a] = b.answer([EV])
    assert (a.raw, a.label, a.tokens_in, a.tokens_out, a.cost) == ('{"label": "joy"}', "joy", 31, 6, 7.0)
    assert a.latency_s > 0
    body, headers = srv.requests[0]
    assert body["model"] == "tiny" and "authorization" not in headers
    system, user = body["messages"]
    assert "joy, sadness, anger" in system["content"] and "Classify" in system["content"]
    assert user["content"].endswith("I won the lottery!")
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema" and schema["properties"]["label"]["enum"] == LABELS


def test_cost_from_usage_prices(serve) -> None:
    srv = serve(lambda body, h: completion("anger", 1000, 500))
    [a] = backend(srv.url, cost_per_1k_prompt_tokens=0.5, cost_per_1k_completion_tokens=2.0).answer([EV])
    assert a.label == "anger" and a.cost == pytest.approx(0.5 + 1.0)


def test_missing_usage_means_zero_tokens_and_flat_cost(serve) -> None:
    srv = serve(lambda body, h: completion("sadness", usage=False))
    [a] = backend(srv.url, cost=3.0).answer([EV])
    assert (a.label, a.tokens_in, a.tokens_out, a.cost) == ("sadness", 0, 0, 3.0)


def test_custom_templates_and_structured_off(serve) -> None:
    srv = serve(lambda body, h: completion("JOY."))
    b = backend(srv.url, system_prompt="Task {task}: pick from {labels_json}. Keep {braces}.",
                user_prompt="<<{text}>>", structured_output="off")
    [a] = b.answer([EV])
    body = srv.requests[0][0]
    assert a.label == "joy" and "response_format" not in body
    assert body["messages"][0]["content"] == 'Task emo: pick from ["joy", "sadness", "anger"]. Keep {braces}.'
    assert body["messages"][1]["content"] == "<<I won the lottery!>>"


def test_response_format_rejection_falls_back_and_sticks(serve) -> None:
    def handler(body: dict, h: dict) -> Reply:
        fmt = (body.get("response_format") or {}).get("type")
        if fmt == "json_schema":
            return 422, {}, b'{"detail": "response_format.type: unexpected value json_schema"}'
        if fmt == "json_object":
            return 400, {}, b'{"error": "response_format unsupported"}'
        return completion("I think it is anger, not joy")

    srv = serve(handler)
    b = backend(srv.url)
    assert b.answer([EV])[0].label == "anger"  # first label mentioned
    assert [(r[0].get("response_format") or {}).get("type") for r in srv.requests] == ["json_schema", "json_object", None]
    assert b.structured_output == "off"
    b.answer([EV])
    assert len(srv.requests) == 4  # no more rejected attempts


def test_server_error_naming_the_format_falls_back(serve) -> None:
    # llama-cpp-python's answer to response_format json_schema: a 500 with the validation error.
    def handler(body: dict, h: dict) -> Reply:
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return 500, {}, b'{"error": {"message": "body.response_format.type: Input should be text or json_object"}}'
        return completion('{"label": "joy"}')

    srv = serve(handler)
    b = backend(srv.url)
    assert b.answer([EV])[0].label == "joy" and b.structured_output == "json_object"
    assert b.breaker.state == "closed" and b.breaker._failures == 0


def test_real_bad_request_is_not_retryable(serve) -> None:
    srv = serve(lambda body, h: (400, {}, b'{"error": "context length exceeded"}'))
    with pytest.raises(LLMError) as ei:
        backend(srv.url).answer([EV])
    assert ei.value.reason == "http_400" and not ei.value.retryable
    assert backend(srv.url).structured_output == "json_schema"


def test_429_retry_after_is_honoured(serve) -> None:
    replies = iter([(429, {"Retry-After": "2"}, b"slow down"), completion('{"label":"joy"}')])
    srv = serve(lambda body, h: next(replies))
    b = backend(srv.url)
    with pytest.raises(LLMError) as ei:
        b.answer([EV])
    assert ei.value.reason == "rate_limited" and ei.value.retryable and ei.value.retry_after_s == 2.0
    assert b.breaker.state == "closed"  # a rate limit is not an endpoint failure
    replies = iter([(429, {"Retry-After": "2"}, b"slow down"), completion('{"label":"joy"}')])
    sleeps: list[float] = []
    [a] = call_with_retries(lambda: b.answer([EV]), 3, 0.01, random.Random(0), sleep=sleeps.append)
    assert a.label == "joy" and sleeps == [2.0]


def test_retry_after_parsing() -> None:
    assert retry_after_seconds(None, 60) is None
    assert retry_after_seconds("5", 60) == 5.0
    assert retry_after_seconds("500", 60) == 60.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 60, now=1445412470.0) == pytest.approx(10.0)
    assert retry_after_seconds("soon", 60) is None


def test_5xx_retried_then_succeeds(serve) -> None:
    replies = iter([(500, {}, b"boom"), (503, {}, b"busy"), completion('{"label": "sadness"}')])
    srv = serve(lambda body, h: next(replies))
    b = backend(srv.url)
    errors: list[str] = []
    [a] = call_with_retries(lambda: b.answer([EV]), 5, 0.001, random.Random(0),
                            on_retry=lambda n, e: errors.append(e.reason))
    assert a.label == "sadness" and errors == ["http_500", "http_503"] and b.breaker.state == "closed"


def test_malformed_responses_are_retryable(serve) -> None:
    for payload in (b"not json", b'{"choices": []}', b'{"choices": [{"message": {"content": 5}}]}'):
        srv = serve(lambda body, h, p=payload: (200, {}, p))
        with pytest.raises(LLMError) as ei:
            backend(srv.url).answer([EV])
        assert ei.value.reason == "malformed_response" and ei.value.retryable


def test_unauthorized_not_retryable_and_key_sent(serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = serve(lambda body, h: completion("joy") if h.get("authorization") == "Bearer s3cret" else (401, {}, b"no"))
    with pytest.raises(LLMError) as ei:
        backend(srv.url).answer([EV])
    assert ei.value.reason == "http_401" and not ei.value.retryable
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert backend(srv.url, api_key_env="MY_KEY").answer([EV])[0].label == "joy"
    keyfile = tmp_path / "key"
    keyfile.write_text("s3cret\n")
    assert backend(srv.url, api_key_file=keyfile).answer([EV])[0].label == "joy"
    monkeypatch.setenv("CASCADE_LLM__API_KEY", "s3cret")
    monkeypatch.setenv("CASCADE_LLM__BACKEND", "openai")
    monkeypatch.setenv("CASCADE_LLM__BASE_URL", srv.url)
    config = load_config(None)
    assert "s3cret" not in repr(config) and "s3cret" not in config.model_dump_json()
    assert config.model_dump(mode="json")["llm"]["api_key"] is None
    task = Task(config.task)
    assert make_backend(task, config.llm).answer([Event(id="1", text="x")])[0].label == "joy"
    assert srv.requests[-1][1]["authorization"] == "Bearer s3cret"


def test_connection_refused_and_breaker(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    b = backend(url, circuit_failures=3, circuit_open_s=0.3)
    for _ in range(3):
        with pytest.raises(LLMError) as ei:
            b.answer([EV])
        assert ei.value.reason == "connection_error" and ei.value.retryable
    assert b.breaker.state == "open"
    t0 = time.perf_counter()
    with pytest.raises(LLMError) as ei:
        b.answer([EV])
    assert ei.value.reason == "circuit_open" and ei.value.retryable and 0 < ei.value.retry_after_s <= 0.3
    assert time.perf_counter() - t0 < 0.05
    time.sleep(0.35)
    with pytest.raises(LLMError) as ei:  # the half-open trial fails: open again
        b.answer([EV])
    assert ei.value.reason == "connection_error" and b.breaker.state == "open"


def test_breaker_half_open_success_closes(serve) -> None:
    healthy = threading.Event()
    srv = serve(lambda body, h: completion("joy") if healthy.is_set() else (502, {}, b"bad gateway"))
    b = backend(srv.url, circuit_failures=2, circuit_open_s=0.2)
    for _ in range(2):
        with pytest.raises(LLMError):
            b.answer([EV])
    n = len(srv.requests)
    with pytest.raises(LLMError, match="circuit_open"):
        b.answer([EV])
    assert len(srv.requests) == n  # refused without a request
    healthy.set()
    time.sleep(0.25)
    assert b.answer([EV])[0].label == "joy" and b.breaker.state == "closed"


def test_timeout(serve) -> None:
    srv = serve(lambda body, h: (time.sleep(1.0), completion("joy"))[1])
    t0 = time.perf_counter()
    with pytest.raises(LLMError) as ei:
        backend(srv.url, timeout_s=0.2).answer([EV])
    assert ei.value.reason == "timeout" and ei.value.retryable and time.perf_counter() - t0 < 0.9


def test_unmappable_answer_is_none_never_guessed(serve) -> None:
    srv = serve(lambda body, h: completion('{"label": "bliss"}'))
    [a] = backend(srv.url).answer([EV])
    assert a.raw == '{"label": "bliss"}' and a.label is None


def test_many_events_concurrent_and_partial_failure_kept(serve) -> None:
    lock = threading.Lock()
    state = {"now": 0, "max": 0, "fail_once": {"e3"}}

    def handler(body: dict, h: dict) -> Reply:
        text = body["messages"][1]["content"]
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
            if text.endswith("e3") and "e3" in state["fail_once"]:
                state["fail_once"].clear()
                return 500, {}, b"once"
        return completion('{"label": "anger"}')

    srv = serve(handler)
    b = backend(srv.url, concurrency=3)
    events = [Event(id=f"e{i}", text=f"text e{i}") for i in range(9)]
    with pytest.raises(LLMError):
        b.answer(events)
    assert state["max"] == 3 and len(srv.requests) == 9
    answers = b.answer(events)  # only the failed one is asked again
    assert len(srv.requests) == 10 and [a.label for a in answers] == ["anger"] * 9


@pytest.mark.parametrize(
    ("content", "label"),
    [
        ('{"label": "anger"}', "anger"),
        ('```json\n{"label": "Sadness"}\n```', "sadness"),
        ('Sure! {"label": "joy"} is my answer', "joy"),
        ("Anger.", "anger"),
        ("happy", "joy"),  # alias
        ("The text expresses sadness.", "sadness"),
        ("I feel joyful", None),  # no word-boundary mention
        ('{"label": "bliss"}', None),
        ('"anger"', "anger"),
        ("", None),
        (None, None),
        ("no idea", None),
    ],
)
def test_parser(content: str | None, label: str | None) -> None:
    task = Task(TaskConfig(name="emo", labels=LABELS, label_aliases={"happy": "joy"}))
    assert AnswerParser(task).parse(content) == label


def test_render_only_known_placeholders() -> None:
    assert render('{"label": x} {text} {labels}', text="{labels}", labels="a, b") == '{"label": x} {labels} a, b'


def test_circuit_breaker_states() -> None:
    now = [0.0]
    cb = CircuitBreaker(2, 10.0, clock=lambda: now[0])
    cb.before_call(); cb.record_failure()
    assert cb.state == "closed"
    cb.before_call(); assert cb.record_failure() is True
    with pytest.raises(CircuitOpen) as ei:
        cb.before_call()
    assert ei.value.retry_in_s == 10.0
    now[0] = 10.0
    assert cb.state == "half_open"
    cb.before_call()  # trials go through
    cb.before_call()
    assert cb.record_failure() is True  # a failed trial opens it again
    assert cb.state == "open" and cb.opened_count == 2
    now[0] = 15.0
    cb.record_failure()  # a straggler's failure while open does not extend it
    now[0] = 20.0
    cb.before_call()
    cb.record_success()
    assert cb.state == "closed"
    cb.record_failure()
    assert cb.state == "closed"  # the count starts afresh after a success
