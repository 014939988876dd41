"""Poison events among normal ones, through the pipeline as processes on a real Tansu and Redis:
the workers stay up, every normal event is decided exactly once, each poison one is decided or
dead-lettered with its reason."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from cascade.messages import DeadLetter, Decision
from devtools.services import free_port
from tests.e2e.test_pipeline import LLM, events, pipeline_config, produce, read_all  # noqa: F401 (a fixture)
from workers.run import collect_decisions, start_workers, stop_workers
from workers.topics import Topics

pytestmark = pytest.mark.e2e


def test_poison_events_leave_the_workers_up_and_the_rest_decided(pipeline_config, tmp_path):  # noqa: F811
    config = pipeline_config
    rows = events(400, seed=7)
    huge = json.dumps({"id": "huge", "text": "y " * 499_000, "llm": {LLM: "joy"}}).encode()  # ~1 MB
    poison = [
        # Handled: decided like any event.
        {"id": "nul", "text": "we felt happy\x00 about \x00 it", "llm": {LLM: "joy"}},
        {"id": "number", "text": "event number we felt scared about it", "llm": {LLM: 5}},
        {"id": "listy", "text": "event listy we felt angry about it", "llm": {LLM: ["anger"]}},
    ]
    # In the middle of the stream: batches of 32 or more are featurised as one (NUL-joined) batch.
    first = rows[:100] + poison + rows[100:200]
    payloads = [json.dumps(r).encode() for r in first[:100]] + [huge] + [json.dumps(r).encode() for r in first[100:]]
    keys = [r["id"].encode() for r in first[:100]] + [b"huge"] + [r["id"].encode() for r in first[100:]]
    procs = start_workers(config, tmp_path, free_port())
    try:
        produce(config, payloads, keys)
        found = collect_decisions(config, {r["id"] for r in first}, timeout_s=150, progress=False)
        assert set(found) == {r["id"] for r in first}
        time.sleep(2)  # the idempotency records are written once the decisions are acknowledged
        # e5 again with another text (a conflict), e6 again as it was (a redelivery), then the rest.
        e5, e6 = rows[5], rows[6]
        conflict = {**e5, "text": "a wholly different text we felt glad"}
        nul2 = {"id": "nul2", "text": "\x00we felt afraid\x00", "llm": {LLM: "fear"}}
        poison.append(nul2)
        again = [*rows[200:300], conflict, e6, nul2, *rows[300:]]
        produce(config, [json.dumps(r).encode() for r in again], [r["id"].encode() for r in again])
        found = collect_decisions(config, {r["id"] for r in rows + poison}, timeout_s=150, progress=False)
        time.sleep(2)
        alive = [p.poll() is None for p in procs]
    finally:
        stop_workers(procs)
    assert all(alive), [(p.args[-3:], p.returncode) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    decisions = [Decision.model_validate_json(v) for v in read_all(config, Topics(config).decisions)]
    ids = [d.event_id for d in decisions]
    assert sorted(ids) == sorted(r["id"] for r in rows + poison)  # exactly once each
    by_id = {d.event_id: d for d in decisions}
    for pid in ("number", "listy"):  # an answer that is no string names no label
        assert by_id[pid].reason != "llm" or by_id[pid].label is None
    letters = [DeadLetter.model_validate_json(v) for v in read_all(config, Topics(config).deadletter)]
    reasons = sorted((d.reason, d.key) for d in letters)
    assert reasons == [("id_conflict", "e5"), ("too_large", "huge")], reasons
    # Handled by each step, not by the fallback that isolates an unexpected failure (which would
    # also decide the NUL texts, one at a time, if the batch featurizer broke on them again).
    for log in tmp_path.glob("*.log"):
        assert "batch_failed_isolating" not in log.read_text(errors="replace"), log.name
    [big] = [d for d in letters if d.reason == "too_large"]
    assert big.truncated and big.original_size == len(huge) and big.original_sha256 == hashlib.sha256(huge).hexdigest()
