"""The cascade engine on synthetic streams: policy learning, warm-up, determinism, fallbacks."""

from __future__ import annotations

import itertools
import random
from typing import NamedTuple

import numpy as np
import pytest

from cascade.config import CascadeConfig, load_config
from cascade.features import HashedNgrams
from cascade.messages import Decision, Demonstration, Event, LiveParams, TierOutput
from cascade.routing.cascade import Cascade
from cascade.tiers.llm import LLMError, call_with_retries
from tests.unit.streams import LLM, easy_and_hard, event


def make_config(**deferral) -> CascadeConfig:
    return load_config(
        None,
        task={"labels": ["fear", "joy"]},
        llm={"name": LLM},
        features={"n_features": 2**16},
        deferral={"warmup": 50, "mu": 0.2, **deferral},
    )


class Outcome(NamedTuple):
    decision: Decision
    demonstration: Demonstration | None
    outputs: list[TierOutput]


def outcomes_of(cascade: Cascade, events: list[Event]) -> list[Outcome]:
    step = cascade.step(events)
    return [Outcome(*o) for o in zip(step.decisions, step.demonstrations, step.outputs)]


def run(cascade: Cascade, stream, batch: int = 1) -> list[Outcome]:
    out = []
    for i in range(0, len(stream), batch):
        out.extend(outcomes_of(cascade, [e for e, _ in stream[i : i + batch]]))
    return out


def test_policy_learns_to_defer_what_the_tier_gets_wrong():
    cascade = Cascade(make_config(mu=0.1))
    run(cascade, easy_and_hard(3000, seed=1))
    # Judge the trained policy with exploration off, on events it has not seen.
    cascade.set_params(LiveParams(mu=0.1, exploration_scale=0.0))
    test = easy_and_hard(400, seed=2)
    outcomes = run(cascade, test)
    answered = {"easy": [], "hard": []}
    for (_, kind), o in zip(test, outcomes):
        answered[kind].append(o.decision.tier == "logistic")
    assert np.mean(answered["easy"]) > 0.8
    assert np.mean(answered["hard"]) < 0.1
    # What the tier answered agrees with the LLM's recorded answer.
    agree = [o.decision.label == e.payload["llm"][LLM] for (e, _), o in zip(test, outcomes) if o.decision.tier != "llm"]
    assert np.mean(agree) > 0.95


def test_warmup_sends_everything_to_the_llm():
    cascade = Cascade(make_config(warmup=100))
    outcomes = run(cascade, easy_and_hard(100, seed=3))
    assert all(o.decision.tier == "llm" for o in outcomes)
    assert cascade.stages[0].tier.version == 100  # it learned from every demonstration


def test_higher_mu_answers_more_cheaply():
    fractions = []
    for mu in (0.02, 0.3):
        cascade = Cascade(make_config(mu=mu))
        outcomes = run(cascade, easy_and_hard(800, seed=4))
        fractions.append(np.mean([o.decision.tier == "llm" for o in outcomes]))
    assert fractions[0] > fractions[1]


def test_same_seed_same_decisions_and_batching_is_deterministic():
    stream = easy_and_hard(600, seed=5)
    runs = []
    for _ in range(2):
        outcomes = run(Cascade(make_config()), stream, batch=16)
        runs.append([(o.decision.label, o.decision.tier, o.decision.explored, round(o.decision.confidence, 12)) for o in outcomes])
    assert runs[0] == runs[1]


def test_decisions_record_tier_versions_and_cost():
    cascade = Cascade(make_config(warmup=10))
    outcomes = run(cascade, easy_and_hard(300, seed=6))
    llm_cost = cascade.config.llm.cost
    for o in outcomes:
        d = o.decision
        assert set(d.model_versions) == {"logistic"}
        assert d.cost == pytest.approx(1.0 + (llm_cost if d.tier == "llm" else 0.0))
        if d.tier == "llm":
            assert o.demonstration is not None and o.demonstration.llm_label == d.label
        else:
            assert o.demonstration is None and d.reason == "tier"


def test_unusable_llm_answer_is_not_learned_and_falls_back():
    cascade = Cascade(make_config(warmup=20))
    run(cascade, easy_and_hard(60, seed=7))
    version = cascade.stages[0].tier.version
    [out] = outcomes_of(cascade, [event(999, "a day when we were glad", None)])
    assert out.decision.reason == "llm_unusable"
    assert out.decision.label in {"joy", "fear"}  # the warm cheap tier's answer, marked as such
    assert out.demonstration is None
    assert cascade.stages[0].tier.version == version


def test_missing_recorded_answer_is_an_error_not_a_guess():
    cascade = Cascade(make_config())
    with pytest.raises(LLMError, match="no_recorded_answer"):
        cascade.process([Event(id="x", text="hello there", payload={})])


def test_miss_costs_make_a_tier_defer_when_the_costly_class_is_plausible():
    config = make_config()
    cheap = Cascade(config).stages[0]
    probs = np.array([[0.3, 0.7], [0.7, 0.3]])  # labels: fear, joy
    costly = Cascade(config.model_copy(update={"task": config.task.model_copy(update={"miss_costs": {"fear": 3.0}})})).stages[0]
    best = probs.argmax(axis=1)
    assert cheap.miss_weight(probs, best).tolist() == [1.0, 1.0]
    assert costly.miss_weight(probs, best).tolist() == [3.0, 1.0]  # answering joy risks missing fear


@pytest.mark.parametrize("lowercase", [True, False])
def test_ascii_tokens_equal_the_unicode_pattern(lowercase):
    from cascade.features import _TOKEN

    featurizer = HashedNgrams(make_config().features.model_copy(update={"lowercase": lowercase}))
    rng = random.Random(7)
    alphabet = "aZ09_'!?.,- \t\n\"x"  # letters, digits, underscore, apostrophes and separators
    texts = ["Don't stop!! It's 4pm, 'quoted' rock'n'roll x_y a1b2?", "''a'b'c'' _under_score_ 12'34"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    for text in texts:
        assert text.isascii()
        assert featurizer.tokens(text) == _TOKEN.findall(text.lower() if lowercase else text), text


def test_hashed_features_are_stable_across_instances():
    config = make_config().features
    a, b = HashedNgrams(config), HashedNgrams(config)
    text = "When I was involved in a traffic accident!"
    assert a.transform(text) == b.transform(text)
    assert sum(v * v for v in a.transform(text).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("features", [
    {}, {"ngram_max": 1}, {"ngram_max": 4, "n_features": 1000}, {"ngram_max": 3, "char_ngrams": (2, 4)},
])
def test_batch_features_equal_one_text_at_a_time(features):
    """The numpy batch path of a tier worker and the plain-Python path of in-process learning must
    give the same buckets and weights, or a model learned by one would be served by the other wrongly."""
    config = make_config().features.model_copy(update=features)
    rng = random.Random(5)
    texts = [e.text for e, _ in easy_and_hard(200, seed=4)]
    texts += ["", "!!", "one", "two words", "x " * 7, "it's", "'s", "9"]
    # Non-ASCII, with capital sigmas, whose lowercase depends on what follows: a batch is
    # lowercased joined, so a text's end must read as the end of a word there too.
    unicode = ["Ünïcödé WÖRDS, 123 and it's ok?", "ΟΔΟΣ", "ΣΑΣ", "Σ", "ὈΔΥΣΣΕΎΣ σοφός", "ǅemal ﬁnd"]
    # NUL inside a text (the batch's separator): a gap between words, never the end of a text.
    unicode += ["a\x00b", "\x00", "ΟΔΟΣ\x00x", "two\x00\x00words here\x00"]
    rng.shuffle(texts)  # empty and one-word texts between others: no n-gram may span two texts
    mixed = [t for pair in itertools.zip_longest(texts, unicode) for t in pair if t is not None]
    featurizer = HashedNgrams(config)
    for batch_texts in (texts, mixed):  # ASCII only: the ASCII pattern; else the Unicode one
        batch = featurizer.transform_batch(batch_texts)
        assert len(batch) == len(batch_texts)
        assert [batch[i] for i in range(len(batch_texts))] == [featurizer.transform(t) for t in batch_texts]
    assert list(featurizer.transform_batch(["", "..."])) == [{}, {}] and len(featurizer.transform_batch([])) == 0


def test_retries_back_off_then_give_up():
    calls, sleeps = [], []

    def failing():
        calls.append(1)
        raise LLMError("http_503")

    with pytest.raises(LLMError):
        call_with_retries(failing, max_retries=3, backoff_s=0.1, rng=random.Random(0), sleep=sleeps.append)
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0 <= s <= 0.1 * 2**i for i, s in enumerate(sleeps))

    calls.clear()

    def fatal():
        calls.append(1)
        raise LLMError("bad_request", retryable=False)

    with pytest.raises(LLMError):
        call_with_retries(fatal, max_retries=3, backoff_s=0.1, rng=random.Random(0), sleep=sleeps.append)
    assert len(calls) == 1


def test_repeated_input_is_answered_from_the_cache_before_any_tier():
    cascade = Cascade(make_config(warmup=1000))
    first, again = event(1, "We were  GLAD that day", "joy"), event(2, "we were glad that day", "fear")
    [a] = outcomes_of(cascade, [first])
    [b] = outcomes_of(cascade, [again])  # same text after normalisation: the LLM's answer stands
    assert a.decision.reason == "llm" and b.decision.reason == "cache"
    assert b.decision.label == "joy" and b.decision.event_id == "2" and b.decision.cost == 0.0
    assert b.outputs == [] and b.demonstration is None
    assert cascade.stages[0].tier.version == 1


def test_exhausted_budget_keeps_the_cheap_answer_and_says_so():
    config = make_config(warmup=20).model_copy(
        update={"budget": make_config().budget.model_copy(update={"calls_per_minute": 30, "pace": False})}
    )
    cascade = Cascade(config)
    outcomes = run(cascade, easy_and_hard(100, seed=8))
    reasons = [o.decision.reason for o in outcomes]
    assert reasons.count("llm") + reasons.count("llm_unusable") == 30  # never over the limit
    exhausted = [o.decision for o in outcomes if o.decision.reason == "budget_exhausted"]
    assert exhausted and all(d.label in {"joy", "fear", None} for d in exhausted)


def test_deferral_costs_work_down_from_the_top():
    from cascade.messages import RoutingSnapshot
    from cascade.routing.steps import deferral_costs

    chain = [
        RoutingSnapshot(tier="logistic", cost=1.0, answer_rate=0.5, answered_disagreement=0.1),
        RoutingSnapshot(tier="onnx", cost=10.0, answer_rate=0.6, answered_disagreement=0.2),
    ]
    low, high = deferral_costs(chain, llm_cost=100.0)
    assert (high.cost, high.disagreement) == (1.0, 0.0)  # above the last cheap tier: the LLM
    # Deferring from the logistic tier: the onnx call, plus the LLM for the 40% onnx defers.
    assert low.cost == pytest.approx(0.1 + 0.4 * 1.0)
    assert low.disagreement == pytest.approx(0.6 * 0.2)


def test_tier_instances_and_routing_separate_from_learning():
    """A data team's own tier instance, routed now and taught labels that arrive later."""
    from cascade.config import NblrTierConfig
    from cascade.messages import Deferred
    from cascade.tiers.registry import build_tier

    config = make_config(warmup=30)
    tier = build_tier(NblrTierConfig(name="mine"), config.task.labels, config.features)
    stream = easy_and_hard(400, seed=31)
    with Cascade(config, tiers=[tier]) as cascade:
        assert cascade.stages[0].tier is tier
        first = cascade.route([e for e, _ in stream[:50]])
        assert all(isinstance(r, Deferred) for r in first)  # cold: everything needs a label
        for i in range(0, 300, 50):  # labels arrive later, in batches
            batch = [e for e, _ in stream[i : i + 50]]
            cascade.learn(batch, [e.payload["llm"][LLM] for e in batch])
        assert tier.version == 300
        later = cascade.route([e for e, _ in stream[300:]])
        answered = [r for r in later if isinstance(r, Decision)]
        assert answered and all(d.tier == "mine" and d.reason == "tier" for d in answered)
    with pytest.raises(ValueError, match="labels"):
        Cascade(config, tiers=[build_tier(NblrTierConfig(name="x"), ["a", "b"], config.features)])
