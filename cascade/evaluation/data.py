"""Recorded streams in the format of ``../shared/data/``: one JSON object per line, gzip or not.

``{"id", "text", "label" (gold), "llm": {name: answer or null}}``. Gold labels are read for
evaluation only; they travel beside the event, never inside what the cascade learns from.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cascade.messages import Event


@dataclass(frozen=True)
class LabelledEvent:
    event: Event
    gold: str | None


def read_stream(path: str | Path, shuffle_seed: int | None = None, limit: int | None = None) -> list[LabelledEvent]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stream file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows: list[LabelledEvent] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            gold = row.pop("label", None)
            rows.append(LabelledEvent(Event(id=str(row["id"]), text=row["text"], payload=row), gold))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows[:limit] if limit is not None else rows


def labels_of(rows: list[LabelledEvent]) -> list[str]:
    """The label set of a stream, in order of first appearance of its gold labels."""
    seen: dict[str, None] = {}
    for r in rows:
        if r.gold is not None:
            seen.setdefault(r.gold, None)
    return list(seen)


def batches(rows: list[LabelledEvent], size: int) -> Iterator[list[LabelledEvent]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]
