"""The decisions topic's records, in either output mode (``output.mode``), and reading them back.

- ``decision``: the :class:`Decision` as JSON, keyed by the event id.
- ``enriched``: the original JSON event with the decision under ``output.field``, under the
  event's own key and with its own headers, so consumers need not join decisions back to events.

Every worker that produces decisions builds them here, and every reader of the decisions topic
(``cascade run``'s report, replay, tests) reads them with :func:`read_decision`/:func:`read_output`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import pydantic_core
from kafka.consumer.fetcher import ConsumerRecord

from cascade.config import OutputConfig
from cascade.logging import get_logger
from cascade.messages import Decision, Deferred, Origin
from workers.kafka_io import OutRecord
from workers.loop import dead_letter
from workers.topics import Topics

log = get_logger("cascade.worker.output")

# Dead-letter reasons of events that cannot be emitted enriched.
COLLISION = "output_field_collision"
NOT_AN_OBJECT = "output_not_an_object"


class OutputRefused(Exception):
    """An event that cannot be emitted in the configured output mode; dead-lettered with ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def origin_of(rec: ConsumerRecord) -> Origin:
    """What an enriched output keeps of the record an event came in as: its key and headers."""
    key = rec.key if isinstance(rec.key, bytes) else None
    return Origin(key=key, headers=list(rec.headers or []))


def refusal(output: OutputConfig, payload: Any) -> OutputRefused | None:
    """Why an event could not be emitted in ``output``'s mode, if it could not.

    The first tier asks when an event comes in, so an event that would be refused at the end is
    dead-lettered before any tier or LLM call is spent on it.
    """
    if output.mode != "enriched":
        return None
    if not isinstance(payload, dict):
        return OutputRefused(NOT_AN_OBJECT, f"an enriched output needs a JSON object, not a {type(payload).__name__}")
    if output.on_collision == "dead_letter" and output.field in payload:
        return OutputRefused(COLLISION, f"the event already has a field {output.field!r} (output.on_collision: "
                                        "dead_letter; set overwrite, or another output.field)")
    return None


def output_record(output: OutputConfig, topic: str, decision: Decision, item: Deferred) -> OutRecord:
    """The record of ``decision`` on ``topic`` in ``output``'s mode; raises :class:`OutputRefused`."""
    if output.mode == "decision":
        return OutRecord(topic, decision.event_id.encode(), decision.model_dump_json().encode())
    refused = refusal(output, item.event.payload)
    if refused is not None:
        raise refused
    # The parsed event, not its bytes: the payload travels with a deferral anyway, and parsing
    # keeps every field and value (only insignificant whitespace is not reproduced).
    value = pydantic_core.to_json({**item.event.payload, output.field: decision})
    origin = item.origin
    if origin is None:  # deferred before the output became enriched: no key or headers to keep
        return OutRecord(topic, decision.event_id.encode(), value)
    # kafka-python writes a null header value as an empty one anyway.
    headers = [(k, v if v is not None else b"") for k, v in origin.headers]
    return OutRecord(topic, origin.key, value, headers or None)


def decision_records(output: OutputConfig, topics: Topics, role: str,
                     decided: Iterable[tuple[Decision, Deferred, ConsumerRecord]]) -> tuple[list[OutRecord], Counter[str]]:
    """The decisions topic's records of a batch's decisions (each with its event in flight and the
    record it was consumed from), and the dead-letter reasons counted of those refused.

    A refused decision is replaced by a dead letter of the consumed record; its id stays decided
    (what was spent on it is spent).
    """
    out: list[OutRecord] = []
    refused: Counter[str] = Counter()
    if output.mode == "decision":  # the hot path of the default mode: nothing can be refused
        return [output_record(output, topics.decisions, d, item) for d, item, _ in decided], refused
    for decision, item, rec in decided:
        try:
            out.append(output_record(output, topics.decisions, decision, item))
        except OutputRefused as e:
            out.append(dead_letter(topics, role, rec, e.reason, e.detail))
            refused[e.reason] += 1
            log.warning("dead_lettered", reason=e.reason, event_id=decision.event_id, topic=rec.topic,
                        partition=rec.partition, offset=rec.offset)
    return out, refused


class ReadBack(NamedTuple):
    """A decisions-topic record read back: the decision, and in enriched mode the event it was
    emitted with (without the decision's field)."""

    decision: Decision
    event: dict[str, Any] | None


def read_output(value: bytes, output: OutputConfig) -> ReadBack:
    """A decisions-topic record in ``output``'s mode; raises ValueError (pydantic's ValidationError
    is one) for a record that is not one."""
    if output.mode == "decision":
        return ReadBack(Decision.model_validate_json(value), None)
    obj = pydantic_core.from_json(value)
    if not isinstance(obj, dict) or not isinstance(obj.get(output.field), dict):
        raise ValueError(f"not an enriched decision: no object under {output.field!r}")
    decision = Decision.model_validate(obj.pop(output.field))
    return ReadBack(decision, obj)


def read_decision(value: bytes, output: OutputConfig) -> Decision:
    """The decision of a decisions-topic record in ``output``'s mode (see :func:`read_output`)."""
    return read_output(value, output).decision
