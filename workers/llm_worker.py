"""`cascade worker --tier llm`: takes budget, calls the LLM with bounded concurrency, produces the
decision and the demonstration. Failures are retried with backoff, then dead-lettered.

With the quality contract on, it also answers the tier workers' audits (a demonstration, no
decision) and runs the contract's estimator and controller: it sees every LLM answer and audit,
and the audits carry the tier workers' tallies. The thresholds go into the live parameters that
the tier workers follow."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.contract.runtime import Audit, Contract
from cascade.logging import get_logger
from cascade.messages import Decision, Deferred, Demonstration, LLMAnswer
from cascade.routing.build import initial_params
from cascade.routing.steps import LLMStep, price_deferral
from cascade.state import cacheable
from cascade.state.keys import cache_keys
from cascade.task import Task
from cascade.tiers.llm import CIRCUIT_OPEN, LLMError, call_with_retries, make_backend
from workers.kafka_io import OutRecord
from workers.loop import BatchResult, Worker, dead_letter
from workers.observability import UnmappedWatch
from workers.output import decision_records
from workers.topics import Topics

log = get_logger("cascade.worker.llm")


class LLMWorker(Worker):
    role = "llm"

    def __init__(self, config: CascadeConfig, metrics_port: int | None = None, tenant: str = "default") -> None:
        topics = Topics(config)
        super().__init__(config, [topics.llm], topics.group("llm"), metrics_port)
        self.task = Task(config.task)
        self.backend = make_backend(self.task, config.llm)
        self.step = LLMStep(self.task, self.backend.name, self.state, tenant)
        self.pool = ThreadPoolExecutor(config.llm.concurrency, thread_name_prefix="llm")
        self.rng = random.Random()
        for limit in self.state.limits:
            self.metrics.budget_limit.labels(self.role, limit.name).set(limit.limit)
        self.hold_until = 0.0
        self.unmapped = UnmappedWatch()
        self.contract = Contract(config, [t.name for t in config.tiers]) if config.contract_on else None

    def _window_left(self, window: str | None) -> float:
        """Seconds until the named budget window rolls over (windows align to the epoch); at most 5 s
        so a budget raised by an operator is noticed soon."""
        seconds = next((lim.seconds for lim in self.state.limits if lim.name == window), 1)
        return min(5.0, max(0.2, seconds - time.time() % seconds))

    def paused(self) -> bool:
        return time.time() < self.hold_until or self._held_for_loss()

    def _held_for_loss(self, force: bool = False) -> bool:
        """on_redis_loss fail_closed: no LLM call between a detected loss of the state store (budget
        counters and idempotency records gone) and the operator's confirmation."""
        return self._check_loss(force) and self.loss is not None and self.loss.holding

    def _call(self, d: Deferred) -> LLMAnswer | LLMError:
        def retry(attempt: int, err: LLMError) -> None:
            self.metrics.llm_retries.labels(self.role).inc()
            log.warning("llm_retry", event_id=d.event.id, attempt=attempt + 1, reason=err.reason)

        try:
            [answer] = call_with_retries(
                lambda: self.backend.answer([d.event]), self.config.llm.max_retries,
                self.config.llm.retry_backoff_s, self.rng, on_retry=retry,
                # An open circuit is not waited out here (a batch could outlast the poll interval):
                # the event is held on the LLM topic instead, see process().
                retry_if=lambda e: e.retryable and e.reason != CIRCUIT_OPEN,
            )
            return answer
        except LLMError as e:
            return e

    def _watch_mapping(self, ans: LLMAnswer) -> None:
        """Loud when many answers map to no label: a wrong label set, prompt or alias table."""
        if self.unmapped.add(ans.raw, ans.label is not None):
            log.warning("llm_answers_unmapped", ratio=round(self.unmapped.ratio, 3), examples=list(self.unmapped.examples),
                        labels=self.task.labels, llm=self.config.llm.name,
                        hint="check task.labels and task.label_aliases against what the LLM answers")
        self.metrics.llm_unmapped_ratio.labels(self.role).set(self.unmapped.ratio)

    def _audit(self, received: Iterable[Deferred], allowed: list[Deferred]) -> list[Demonstration]:
        """Ask the LLM about the audits the budget allowed; their answers are demonstrations and
        measurements of the tier that answered, never decisions."""
        if self.contract is None:
            return []
        for d in received:  # the tallies count whether or not the audit itself is made
            if d.tally is not None:
                self.contract.record_tally(d.tally)
        demos = []
        for d, ans in zip(allowed, self.pool.map(self._call, allowed), strict=True):
            if isinstance(ans, LLMError):
                self.step.refund()  # a lost measurement; the event's decision stands
                log.warning("audit_failed", event_id=d.event.id, reason=ans.reason)
                continue
            self.metrics.llm_calls.labels(self.role).inc()
            self.metrics.audit_calls.labels(self.role).inc()
            self.metrics.llm_spend.labels(self.role).inc(ans.cost)
            _, demo = self.step.settle(d, ans)
            if demo is None:
                continue
            demos.append(demo)
            out = d.outputs[-1]
            if out.p_agree is not None:
                self.contract.record_audit(Audit(out.tier, out.label(self.task.labels), out.p_agree), demo.llm_label)
        return demos

    def _control(self) -> None:
        """The controller's new thresholds into the live parameters, and the contract's gauges."""
        assert self.contract is not None
        tiers = [(t.name, t.cost) for t in self.config.tiers]
        costs = price_deferral(tiers, self.state.get_routing(), self.config.llm.cost)
        params = self.state.get_live_params() or initial_params(self.config)
        updated = self.contract.control(params, {t: c.cost for t, c in costs.items()})
        if updated is None:
            return
        self.state.set_live_params(updated)
        e, m = self.contract.estimate(), self.metrics
        for scope, estimate, bound in (("stream", e.estimated_agreement, e.agreement_lower_bound),
                                       ("window", e.window_estimated_agreement, e.window_lower_bound)):
            m.agreement_estimate.labels(self.role, scope).set(estimate)
            m.agreement_lower_bound.labels(self.role, scope).set(bound)
        m.budget_binding.labels(self.role).set(float(bool(self.contract.last and self.contract.last.budget_binding)))

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        res = BatchResult()
        if self._held_for_loss(force=True):
            # Back onto the LLM topic (committed with the batch, so never lost); paused() holds
            # the fetching until the loss is confirmed.
            res.records.extend(OutRecord(self.topics.llm, rec.key, rec.value) for rec in records)
            log.debug("llm_held_redis_loss", records=len(records))
            return res
        items: dict[str, tuple[ConsumerRecord, Deferred]] = {}
        audits: dict[str, Deferred] = {}  # decided by their tier already: not subject to idempotency
        for rec in records:
            try:
                d = Deferred.model_validate_json(rec.value)
            except ValidationError as e:
                res.records.append(dead_letter(self.topics, self.role, rec, "invalid_deferral", str(e)))
                self.metrics.dead_letters.labels(self.role, "invalid_deferral").inc()
                continue
            if d.audit:
                # Audits from tier workers of a contract since switched off: nothing to measure.
                if self.contract is not None:
                    audits.setdefault(d.event.id, d)
            else:
                items.setdefault(d.event.id, (rec, d))
        ids = list(items)
        keys = dict(zip(ids, cache_keys(self.task.name, self.task.labels, [items[i][1].event.text for i in ids])))
        fresh = self.undecided_with_cache(ids, list(keys.values()))
        self.metrics.duplicates.labels(self.role).inc(len(records) - len(audits) - len(fresh))
        decided: list[Decision] = []
        demos: list[Demonstration] = []
        to_call: list[str] = []
        for i, hit in fresh:
            if hit is not None:
                decided.append(hit)
                self.metrics.cache_hits.labels(self.role).inc()
            else:
                to_call.append(i)
        # Audits take budget after the events that need an answer; a refused audit is skipped.
        takes = self.step.take_budget(len(to_call) + len(audits))
        audit_takes = takes[len(to_call):]
        takes = takes[: len(to_call)]
        for window, left in (takes[-1].remaining if takes else {}).items():
            self.metrics.budget_remaining.labels(self.role, window).set(left)
        allowed = []
        for i, take in zip(to_call, takes):
            if take.allowed:
                allowed.append(i)
                continue
            rec, d = items[i]
            self.metrics.budget_exhausted.labels(self.role).inc()
            if self.config.budget.on_exhausted == "hold":
                # Back onto the LLM topic (committed with the batch, so never lost), and stop
                # fetching until the exhausted window has rolled over.
                res.records.append(OutRecord(self.topics.llm, rec.key, rec.value))
                self.hold_until = max(self.hold_until, time.time() + self._window_left(take.reason))
            else:
                decided.append(self.step.exhausted(d))
        audited = [d for d, take in zip(audits.values(), audit_takes, strict=True) if take.allowed]
        answers = list(self.pool.map(lambda i: self._call(items[i][1]), allowed))
        demos.extend(self._audit(audits.values(), audited))
        for i, ans in zip(allowed, answers):
            rec, d = items[i]
            if isinstance(ans, LLMError):
                self.step.refund()  # the call never succeeded
                if ans.reason == CIRCUIT_OPEN and d.llm_holds < self.config.llm.max_retries:
                    # Held: back onto the LLM topic with its count, and no fetching until the
                    # circuit half-opens. After max_retries holds it is dead-lettered below.
                    held = d.model_copy(update={"llm_holds": d.llm_holds + 1})
                    res.records.append(OutRecord(self.topics.llm, rec.key, held.model_dump_json().encode()))
                    self.hold_until = max(self.hold_until, time.time() + (ans.retry_after_s or 1.0))
                    self.metrics.llm_retries.labels(self.role).inc()
                    continue
                res.records.append(dead_letter(self.topics, self.role, rec, f"llm_{ans.reason}", str(ans)))
                self.metrics.dead_letters.labels(self.role, f"llm_{ans.reason}").inc()
                log.error("llm_failed", event_id=i, reason=ans.reason)
                continue
            self.metrics.llm_calls.labels(self.role).inc()
            self.metrics.llm_spend.labels(self.role).inc(ans.cost)
            self._watch_mapping(ans)
            decision, demo = self.step.settle(d, ans)
            decided.append(decision)
            if demo is not None:
                demos.append(demo)
        if self.contract is not None:
            for dec in decided:
                self.contract.record(dec)
            self._control()
        out, refused = decision_records(self.config.output, self.topics, self.role,
                                        ((dec, items[dec.event_id][1], items[dec.event_id][0]) for dec in decided))
        res.records.extend(out)
        for why, n in refused.items():
            self.metrics.dead_letters.labels(self.role, why).inc(n)
        for dec in decided:
            self.metrics.answered.labels(self.role, dec.tier, dec.reason).inc()
            if dec.event_id in items:
                self.metrics.event_latency.labels(self.role).observe(time.time() - items[dec.event_id][1].first_seen)
        for demo in demos:
            res.records.append(OutRecord(self.topics.demonstrations, demo.event_id.encode(), demo.model_dump_json().encode()))
        self.record_decided(res, [d.event_id for d in decided],
                            [items[d.event_id][1].event.text if d.event_id in items else "" for d in decided])
        if decided:
            res.on_ack.append(lambda: self.state.put_decisions(
                (keys[d.event_id], d) for d in decided if d.event_id in keys and cacheable(d, False)
            ))
        return res
