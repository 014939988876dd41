import json

import pytest

from cascade.config import TaskConfig
from cascade.task import InvalidEvent, Task


@pytest.fixture
def task():
    return Task(TaskConfig(labels=["hate", "noHate"], text_field="body.text", label_aliases={"not hate": "noHate"}))


def test_map_answer(task):
    assert task.map_answer("Hate.") == "hate"
    assert task.map_answer(" nohate ") == "noHate"
    assert task.map_answer("Not hate") == "noHate"
    assert task.map_answer("maybe") is None  # never guessed
    assert task.map_answer(None) is None


def test_parse_event(task):
    e = task.parse_event(json.dumps({"id": 5, "body": {"text": "hello"}}).encode())
    assert (e.id, e.text) == ("5", "hello")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"id": 1, "body": {}}', "missing_text"),
        (b'{"id": 1, "body": {"text": "  "}}', "missing_text"),
        (b'{"body": {"text": "x"}}', "missing_id"),
        (b'{"id": 1, "body": {"text": "' + b"x" * 200 + b'"}}', "too_large"),
    ],
)
def test_invalid_events_say_why(task, raw, reason):
    with pytest.raises(InvalidEvent) as err:
        task.parse_event(raw, max_bytes=150)
    assert err.value.reason == reason


@pytest.mark.parametrize("answer", [5, 5.5, -1, True, False, [], ["hate"], {"label": "hate"}, float("nan"), 10**40])
def test_map_answer_takes_any_json_value(task, answer):
    """A recorded answer may be any JSON value: none names a label here, and none raises."""
    assert task.map_answer(answer) is None


def test_map_answer_maps_a_number_by_its_json_text():
    stars = Task(TaskConfig(labels=["1", "5", "true"]))
    assert (stars.map_answer(5), stars.map_answer("5"), stars.map_answer(True), stars.map_answer(5.0)) == ("5", "5", "true", None)
