"""Synthetic streams for unit tests: events whose recorded LLM answer is known by construction."""

from __future__ import annotations

import random

from cascade.messages import Event

LLM = "test-llm"
WORDS = {"joy": ["happy", "glad", "delighted"], "fear": ["afraid", "scared", "terrified"]}
FILLER = ["the", "a", "day", "when", "my", "friend", "went", "home", "city", "we", "it", "was"]


def event(i: int, text: str, answer: str | None) -> Event:
    return Event(id=str(i), text=text, payload={"id": i, "text": text, "llm": {LLM: answer}})


def easy_and_hard(n: int, seed: int) -> list[tuple[Event, str]]:
    """Easy events name their class with a telling word, and the LLM agrees with it; hard events
    carry no telling word and the LLM answers at random, so no cheap tier can imitate it there."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        filler = " ".join(rng.choice(FILLER) for _ in range(6))
        if rng.random() < 0.5:
            label = rng.choice(sorted(WORDS))
            text = f"{filler} {rng.choice(WORDS[label])} {rng.choice(FILLER)}"
            out.append((event(i, text, label), "easy"))
        else:
            out.append((event(i, f"{filler} {rng.choice(FILLER)} hmm", rng.choice(sorted(WORDS))), "hard"))
    return out
