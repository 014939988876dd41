"""The `openai` LLM backend: any OpenAI-compatible chat-completions server over plain HTTP.

OpenAI, vLLM, TGI, Ollama and llama.cpp all serve ``POST {base_url}/chat/completions``. This
backend speaks it with the standard library's ``http.client`` (one keep-alive connection per
thread, so it is safe under the LLM worker's thread pool) — no SDK, no extra dependency.

* Prompt: a system and a user template (``LLMConfig.system_prompt`` / ``user_prompt``) filled
  with the task's instructions, its labels and the event's text.
* Structured output: ``response_format`` asks for ``{"label": <one of the labels>}`` — as an
  OpenAI ``json_schema``, or as llama-cpp-python's ``json_object`` with a schema. A server that
  rejects the format (400/422, or an error that names response_format: llama-cpp-python answers
  ``json_schema`` with a 500) is asked again with the next one down (json_schema → json_object →
  none) and, once that works, keeps being asked that way.
* Parsing: a JSON ``{"label": ...}``, else the whole answer, else the first label mentioned,
  mapped with ``Task.map_answer``; an answer that names no label is ``label=None``, never guessed.
* Failures: 429, 5xx, 408, timeouts, connection errors and malformed responses raise
  ``LLMError(retryable=True)`` (with the server's Retry-After) for ``call_with_retries``; other
  4xx are not retryable. 5xx, timeouts, connection errors and malformed responses count towards
  the circuit breaker (``cascade/tiers/circuit.py``), which then refuses calls for a while.
* Usage: tokens from the response's ``usage``; the cost from the per-1k token prices when set,
  else the flat ``LLMConfig.cost`` per call.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from cascade.config import LLMConfig
from cascade.logging import get_logger
from cascade.messages import Event, LLMAnswer
from cascade.task import Task
from cascade.tiers.circuit import CircuitBreaker, CircuitOpen
from cascade.tiers.llm import CIRCUIT_OPEN, LLMBackend, LLMError

log = get_logger("cascade.llm.openai")

DEFAULT_SYSTEM_PROMPT = (
    "{instructions}\n"
    "The labels are: {labels}.\n"
    'Answer with a JSON object {"label": "<label>"} where <label> is exactly one of the labels, and nothing else.'
)
DEFAULT_USER_PROMPT = "Text:\n{text}"
FORMATS = ("json_schema", "json_object", "off")  # the order a rejected format falls back in
_PLACEHOLDER = re.compile(r"\{(instructions|labels|labels_json|task|text)\}")
_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$", re.IGNORECASE)
_JSON_OBJECT = re.compile(r"\{[^{}]*\}")
_LABEL_KEYS = ("label", "answer", "class", "category", "emotion")


def resolve_api_key(config: LLMConfig) -> str | None:
    """The key from the config (env CASCADE_LLM__API_KEY), the named env variable, or the file."""
    if config.api_key is not None and config.api_key.get_secret_value():
        return config.api_key.get_secret_value()
    if config.api_key_env:
        value = os.environ.get(config.api_key_env, "").strip()
        if value:
            return value
    if config.api_key_file is not None:
        try:
            lines = config.api_key_file.read_text().strip().splitlines()
        except OSError as e:
            raise LLMError("api_key_file", f"cannot read {config.api_key_file}: {e.strerror}", retryable=False) from e
        if lines and lines[0].strip():
            return lines[0].strip()
    return None


def render(template: str, **values: str) -> str:
    """Replace the known ``{name}`` placeholders in one pass (other braces, e.g. JSON, stay)."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def retry_after_seconds(value: str | None, cap: float, now: float | None = None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) as seconds in [0, cap]; None when absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), cap)


def _rejects_format(status: int, payload: bytes) -> bool:
    """A 400/422, or any error naming the response format: llama-cpp-python answers an unknown
    ``response_format.type`` with a 500 carrying the validation error."""
    if status in (400, 422):
        return True
    return status >= 400 and status != 429 and b"response_format" in payload


class AnswerParser:
    """Maps a model's text onto the task's labels: JSON label, whole answer, first label mentioned."""

    def __init__(self, task: Task) -> None:
        self.task = task
        names = {label: label for label in task.labels}
        names.update(task.config.label_aliases)
        # Longest names first, so "very sad" wins over "sad" at the same position.
        alternatives = sorted(names, key=len, reverse=True)
        self._names = {n.casefold(): label for n, label in names.items()}
        self._mention = re.compile(
            r"(?<!\w)(" + "|".join(re.escape(n) for n in alternatives) + r")(?!\w)", re.IGNORECASE
        )

    def first_mentioned(self, text: str) -> str | None:
        m = self._mention.search(text)
        return self._names.get(m.group(1).casefold()) if m else None

    def _from_value(self, value: str) -> str | None:
        return self.task.map_answer(value) or self.first_mentioned(value)

    def parse(self, content: str | None) -> str | None:
        if content is None:
            return None
        text = _FENCE.sub("", content.strip())
        if not text:
            return None
        for candidate in (text, *_JSON_OBJECT.findall(text)):
            try:
                obj = json.loads(candidate)
            except ValueError:
                continue
            if isinstance(obj, str):
                return self._from_value(obj)
            if isinstance(obj, dict):
                for key, value in obj.items():
                    if isinstance(key, str) and key.casefold() in _LABEL_KEYS and isinstance(value, str):
                        # The model answered in the asked-for shape: its label decides, even when
                        # it names no label (then None), rather than the rest of the text.
                        return self._from_value(value)
        return self._from_value(text)


class OpenAIBackend(LLMBackend):
    def __init__(self, task: Task, config: LLMConfig) -> None:
        super().__init__(task, config)
        url = urlsplit(config.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"llm.base_url must be an http(s) URL, got {config.base_url!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._path = url.path.rstrip("/") + "/chat/completions"
        self._key = resolve_api_key(config)
        self._local = threading.local()
        self._conns: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()
        self._format: str = config.structured_output
        self.breaker = CircuitBreaker(config.circuit_failures, config.circuit_open_s)
        self.parser = AnswerParser(task)
        labels = task.labels
        values = {
            "instructions": task.config.instructions,
            "labels": ", ".join(labels),
            "labels_json": json.dumps(labels),
            "task": task.name,
        }
        self._system = config.system_prompt or DEFAULT_SYSTEM_PROMPT
        self._user = config.user_prompt or DEFAULT_USER_PROMPT
        self._values = values
        self._schema = {
            "type": "object",
            "properties": {"label": {"type": "string", "enum": labels}},
            "required": ["label"],
            "additionalProperties": False,
        }
        self._pool: ThreadPoolExecutor | None = None
        self._carry: dict[str, LLMAnswer] = {}  # answers of a partly failed multi-event call

    # ------------------------------------------------------------------ the request

    def messages(self, event: Event) -> list[dict[str, str]]:
        system = render(self._system, text=event.text, **self._values)
        user = render(self._user, text=event.text, **self._values)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _body(self, event: Event, fmt: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": self.messages(event),
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "n": 1,
        }
        if fmt == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "label", "strict": True, "schema": self._schema},
            }
        elif fmt == "json_object":
            body["response_format"] = {"type": "json_object", "schema": self._schema}
        return body

    @property
    def structured_output(self) -> str:
        """The response_format in use now (lower than configured after a server rejected it)."""
        return self._format

    # ------------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.config.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                self._conns.discard(conn)

    def _post(self, body: dict[str, Any]) -> tuple[int, http.client.HTTPMessage, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode()
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=data, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server closed meanwhile: one fresh try.
                self._drop_connection()
                if attempt:
                    raise
                continue
            except BaseException:
                self._drop_connection()
                raise
            if resp.will_close:
                self._drop_connection()
            return resp.status, resp.headers, payload
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            conn.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ one call

    def _fail(self, reason: str, detail: str, *, retryable: bool, endpoint_failure: bool,
              retry_after_s: float | None = None) -> LLMError:
        if endpoint_failure:
            if self.breaker.record_failure():
                log.warning("llm_circuit_opened", endpoint=self.config.base_url, reason=reason,
                            open_s=self.config.circuit_open_s)
        else:
            self.breaker.release()
        return LLMError(reason, detail, retryable=retryable, retry_after_s=retry_after_s)

    def answer_one(self, event: Event) -> LLMAnswer:
        try:
            self.breaker.before_call()
        except CircuitOpen as e:
            raise LLMError(CIRCUIT_OPEN, self.config.base_url, retryable=True, retry_after_s=e.retry_in_s) from None
        start = time.perf_counter()
        fmt: str = self._format
        while True:
            try:
                status, headers, payload = self._post(self._body(event, fmt))
            except TimeoutError as e:
                raise self._fail("timeout", str(e), retryable=True, endpoint_failure=True) from None
            except (OSError, http.client.HTTPException) as e:
                raise self._fail("connection_error", f"{type(e).__name__}: {e}", retryable=True,
                                 endpoint_failure=True) from None
            if fmt != "off" and _rejects_format(status, payload):
                # The server does not support this response_format (or maybe it does not): ask with the next one.
                lower = FORMATS[FORMATS.index(fmt) + 1]
                log.info("llm_response_format_rejected", response_format=fmt, status=status, trying=lower,
                         detail=payload[:200].decode(errors="replace"))
                fmt = lower
                continue
            break
        detail = payload[:300].decode(errors="replace")
        retry_after = retry_after_seconds(headers.get("Retry-After"), self.config.max_retry_after_s)
        if status == 429:
            raise self._fail("rate_limited", detail, retryable=True, endpoint_failure=False, retry_after_s=retry_after)
        if status >= 500 or status == 408:
            raise self._fail(f"http_{status}", detail, retryable=True, endpoint_failure=True, retry_after_s=retry_after)
        if status != 200:
            raise self._fail(f"http_{status}", detail, retryable=False, endpoint_failure=False)
        try:
            response = json.loads(payload)
            content = response["choices"][0]["message"].get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("content is not a string")
            usage = response.get("usage") or {}
            tokens_in = int(usage.get("prompt_tokens") or 0)
            tokens_out = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise self._fail("malformed_response", f"{type(e).__name__}: {e}; body {detail!r}", retryable=True,
                             endpoint_failure=True) from None
        self.breaker.record_success()
        if fmt != self._format:
            log.warning("llm_response_format_fallback", configured=self.config.structured_output, now=fmt)
            self._format = fmt
        return LLMAnswer(raw=content, label=self.parser.parse(content), tokens_in=tokens_in, tokens_out=tokens_out,
                         cost=self._cost(tokens_in, tokens_out), latency_s=time.perf_counter() - start)

    def _cost(self, tokens_in: int, tokens_out: int) -> float:
        c = self.config
        if c.cost_per_1k_prompt_tokens or c.cost_per_1k_completion_tokens:
            return tokens_in / 1000 * c.cost_per_1k_prompt_tokens + tokens_out / 1000 * c.cost_per_1k_completion_tokens
        return c.cost

    # ------------------------------------------------------------------ the backend interface

    def answer(self, events: Sequence[Event]) -> list[LLMAnswer]:
        """One request per event; several events go out concurrently (at most ``llm.concurrency``).

        When some of several events fail, the call raises and the answers already had are kept
        for the retry, so a retried batch does not pay for them twice.
        """
        if len(events) == 1:
            return [self.answer_one(events[0])]
        with self._lock:
            done = {e.id: self._carry.pop(e.id) for e in events if e.id in self._carry}
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="llm-http")
            pool = self._pool
        todo = [e for e in events if e.id not in done]
        futures = [pool.submit(self.answer_one, e) for e in todo]
        first_error: LLMError | None = None
        for e, fut in zip(todo, futures):
            try:
                done[e.id] = fut.result()
            except LLMError as err:
                first_error = first_error or err
        if first_error is not None:
            with self._lock:
                if len(self._carry) < 10_000:
                    self._carry.update(done)
            raise first_error
        return [done[e.id] for e in events]
