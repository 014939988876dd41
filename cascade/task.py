"""The task: a label set, where the text and id live in an event, and how LLM answers map onto labels."""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

import pydantic_core

from cascade.config import TaskConfig
from cascade.messages import Event


def answer_text(answer: object) -> str | None:
    """A raw answer as text: a string as is, None as None, any other value as its JSON."""
    if answer is None or isinstance(answer, str):
        return answer
    try:
        return json.dumps(answer, ensure_ascii=False, default=repr)
    except (ValueError, TypeError):
        return repr(answer)


class InvalidEvent(ValueError):
    """An event that cannot be answered; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_PUNCT_EDGES = re.compile(r"^[\W_]+|[\W_]+$")
# Answers mapped so far, by their raw text: an LLM answers in a small vocabulary (mostly the
# labels themselves), and normalising one (NFKC, casefold, a regex) costs more than the rest of
# mapping it. Bounded, for a free-form LLM whose answers rarely repeat.
_MAPPED_MAX = 4096


def _get_path(payload: Any, path: tuple[str, ...]) -> Any:
    node = payload
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class Task:
    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.name = config.name
        self.labels: list[str] = list(config.labels)
        self.index: dict[str, int] = {label: i for i, label in enumerate(self.labels)}
        self._lookup: dict[str, str] = {self._norm(label): label for label in self.labels}
        self._lookup.update({self._norm(k): v for k, v in config.label_aliases.items()})
        self._text_path = tuple(config.text_field.split("."))
        self._id_path = tuple(config.id_field.split("."))
        self._mapped: dict[str, str | None] = {}

    @staticmethod
    def _norm(s: str) -> str:
        return _PUNCT_EDGES.sub("", unicodedata.normalize("NFKC", s).strip().casefold())

    def map_answer(self, answer: object) -> str | None:
        """Map a raw LLM answer onto the label set; None when it names no label (never guessed).

        Any value is accepted (a recorded answer is whatever JSON was recorded): a number or a
        boolean maps by its JSON text (``5`` names a label ``"5"``, ``true`` a label ``"true"``),
        anything else that is not a string (null, a list, an object) maps to None.
        """
        if isinstance(answer, str):
            if answer in self._mapped:
                return self._mapped[answer]
            label = self._lookup.get(self._norm(answer))
            if len(self._mapped) < _MAPPED_MAX:
                self._mapped[answer] = label
            return label
        if isinstance(answer, (bool, int, float)):
            return self._lookup.get(self._norm(json.dumps(answer)))
        return None

    def parse_event(self, raw: bytes | str | dict[str, Any], max_bytes: int | None = None) -> Event:
        """Validate one raw event; raises InvalidEvent with the reason."""
        if isinstance(raw, (bytes, str)):
            size = len(raw)
            if max_bytes is not None and size > max_bytes:
                raise InvalidEvent("too_large", f"{size} bytes > limit {max_bytes}")
            try:
                # pydantic's Rust parser: a quarter of json.loads' time. Stricter, too: UTF-8 only,
                # and no lone surrogates, which could not be written out again.
                payload = pydantic_core.from_json(raw)
            except ValueError as e:
                raise InvalidEvent("invalid_json", str(e)) from e
        else:
            payload = raw
        if not isinstance(payload, dict):
            raise InvalidEvent("not_an_object", f"event JSON is a {type(payload).__name__}")
        text = _get_path(payload, self._text_path)
        if not isinstance(text, str) or not text.strip():
            raise InvalidEvent("missing_text", f"no non-empty string at '{self.config.text_field}'")
        if len(text) > self.config.max_text_chars:
            raise InvalidEvent("too_large", f"text of {len(text)} chars > {self.config.max_text_chars}")
        event_id = _get_path(payload, self._id_path)
        if event_id is None or isinstance(event_id, (dict, list)) or str(event_id) == "":
            raise InvalidEvent("missing_id", f"no scalar id at '{self.config.id_field}'")
        return Event(id=str(event_id), text=text, payload=payload)
