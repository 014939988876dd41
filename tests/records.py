"""Consumer records for tests that hand batches to a worker's ``process`` directly (no broker)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Rec:
    """The ConsumerRecord fields a worker reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] | None = None
