"""`cascade worker --tier llm`: takes budget, calls the LLM with bounded concurrency, produces the
decision and the demonstration. Failures are retried with backoff, then dead-lettered.

With the quality contract on, it also answers the tier workers' audits (a demonstration, no
decision) and runs the contract's estimator and controller: it sees every LLM answer and audit,
and the audits carry the tier workers' tallies. The thresholds go into the live parameters that
the tier workers follow."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

from kafka.consumer.fetcher import ConsumerRecord
from pydantic import ValidationError

from cascade.config import CascadeConfig
from cascade.contract.runtime import Audit, Contract
from cascade.logging import get_logger
from cascade.messages import Decision, Deferred, LLMAnswer
from cascade.routing.build import initial_params
from cascade.routing.steps import LLMStep, price_deferral
from cascade.state import cacheable
from cascade.state.keys import cache_keys
from cascade.task import Task
from cascade.tiers.llm import CIRCUIT_OPEN, LLMError, call_with_retries, make_backend
from workers.dispatch import Admission, ContinuousDispatch, Job
from workers.kafka_io import OutRecord
from workers.loop import BatchResult, Driver, Pipeline, Worker, dead_letter
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
        self._calling: set[str] = set()  # event ids with a call admitted and not settled yet

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

    def call_once(self, job: Job) -> LLMAnswer | LLMError:
        """One attempt at a job's call (continuous dispatch retries on its timers)."""
        try:
            [answer] = self.backend.answer([job.item.event])
            return answer
        except LLMError as e:
            return e

    def _call(self, job: Job) -> LLMAnswer | LLMError:
        """A job's call with its retries, backoff slept in the calling thread (batch dispatch)."""
        def retry(attempt: int, err: LLMError) -> None:
            self.metrics.llm_retries.labels(self.role).inc()
            log.warning("llm_retry", event_id=job.item.event.id, attempt=attempt + 1, reason=err.reason)

        try:
            [answer] = call_with_retries(
                lambda: self.backend.answer([job.item.event]), self.config.llm.max_retries,
                self.config.llm.retry_backoff_s, self.rng, on_retry=retry,
                # An open circuit is not waited out here (a batch could outlast the poll interval):
                # the event is held on the LLM topic instead, see settle_call().
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

    def driver(self, flow: Pipeline) -> Driver | None:
        if self.config.llm.dispatch == "batch":
            return None
        return ContinuousDispatch(self, flow)

    def control(self) -> None:
        """Now and then (each batch, or each commit of continuous dispatch): the contract's control."""
        if self.contract is not None:
            self._control()

    def process_batch(self, records: list[ConsumerRecord]) -> BatchResult:
        """The batch barrier (``llm.dispatch: batch``): every call of the batch before it returns."""
        admission = self.admit(records)
        res = admission.result
        try:
            for job, outcome in zip(admission.calls, self.pool.map(self._call, admission.calls), strict=True):
                res.extend(self.settle_call(job, outcome))
        finally:  # settled, or failed with the batch (processed again record by record)
            self._calling.difference_update(job.item.event.id for job in admission.calls if not job.audit)
        self.control()
        return res

    def admit(self, records: list[ConsumerRecord]) -> Admission:
        """Parse, drop duplicates (decided, being decided or being called), answer from the cache,
        and take the budget: the calls to make, and the outputs of the records settled at once."""
        adm = Admission()
        res = adm.result
        if self._held_for_loss(force=True):
            # Back onto the LLM topic (committed with the batch, so never lost); paused() holds
            # the fetching until the loss is confirmed.
            res.records.extend(OutRecord(self.topics.llm, rec.key, rec.value) for rec in records)
            log.debug("llm_held_redis_loss", records=len(records))
            return adm
        items: dict[str, tuple[ConsumerRecord, Deferred]] = {}
        audits: dict[str, tuple[ConsumerRecord, Deferred]] = {}  # decided by their tier already: not subject to idempotency
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
                    audits.setdefault(d.event.id, (rec, d))
                    if d.tally is not None:  # the tallies count whether or not the audit itself is made
                        self.contract.record_tally(d.tally)
            elif d.event.id not in self._calling:
                items.setdefault(d.event.id, (rec, d))
        ids = list(items)
        keys = dict(zip(ids, cache_keys(self.task.name, self.task.labels, [items[i][1].event.text for i in ids])))
        fresh = self.undecided_with_cache(ids, list(keys.values()))
        self.metrics.duplicates.labels(self.role).inc(len(records) - len(audits) - len(fresh))
        decided: list[Decision] = []
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
        for i, take in zip(to_call, takes):
            rec, d = items[i]
            if take.allowed:
                adm.calls.append(Job(rec, d))
                continue
            self.metrics.budget_exhausted.labels(self.role).inc()
            if self.config.budget.on_exhausted == "hold":
                # Back onto the LLM topic (committed after it is acknowledged, so never lost), and
                # stop fetching until the exhausted window has rolled over.
                res.records.append(OutRecord(self.topics.llm, rec.key, rec.value))
                self.hold_until = max(self.hold_until, time.time() + self._window_left(take.reason))
            else:
                decided.append(self.step.exhausted(d))
        adm.calls.extend(Job(rec, d, audit=True) for (rec, d), take in zip(audits.values(), audit_takes, strict=True)
                         if take.allowed)
        self._emit(res, [(dec, *items[dec.event_id]) for dec in decided], keys)
        # Last, so an admission that raised (and is retried record by record) marked nothing.
        self._calling.update(job.item.event.id for job in adm.calls if not job.audit)
        return adm

    def drop_call(self, job: Job) -> None:
        """A call taken from the budget that will not be settled here (its partition moved on)."""
        self.step.refund()
        self._calling.discard(job.item.event.id)

    def settle_call(self, job: Job, outcome: LLMAnswer | LLMError) -> BatchResult:
        """A call's final outcome as outputs: the decision and demonstration, a hold back onto
        the LLM topic (open circuit), or a dead letter."""
        res = BatchResult()
        rec, d = job.record, job.item
        if not job.audit:
            self._calling.discard(d.event.id)  # after _emit below marks it deciding, if it is
        if isinstance(outcome, LLMError):
            self.step.refund()  # the call never succeeded
            if job.audit:
                log.warning("audit_failed", event_id=d.event.id, reason=outcome.reason)  # the decision stands
            elif outcome.reason == CIRCUIT_OPEN and d.llm_holds < self.config.llm.max_retries:
                # Held: back onto the LLM topic with its count, and no fetching until the
                # circuit half-opens. After max_retries holds it is dead-lettered below.
                held = d.model_copy(update={"llm_holds": d.llm_holds + 1})
                res.records.append(OutRecord(self.topics.llm, rec.key, held.model_dump_json().encode()))
                self.hold_until = max(self.hold_until, time.time() + (outcome.retry_after_s or 1.0))
                self.metrics.llm_retries.labels(self.role).inc()
            else:
                res.records.append(dead_letter(self.topics, self.role, rec, f"llm_{outcome.reason}", str(outcome)))
                self.metrics.dead_letters.labels(self.role, f"llm_{outcome.reason}").inc()
                log.error("llm_failed", event_id=d.event.id, reason=outcome.reason)
            return res
        self.metrics.llm_calls.labels(self.role).inc()
        self.metrics.llm_spend.labels(self.role).inc(outcome.cost)
        if job.audit:
            self.metrics.audit_calls.labels(self.role).inc()
        else:
            self._watch_mapping(outcome)
        decision, demo = self.step.settle(d, outcome)
        if demo is not None:
            res.records.append(OutRecord(self.topics.demonstrations, demo.event_id.encode(), demo.model_dump_json().encode()))
        if job.audit:
            out = d.outputs[-1]
            if demo is not None and self.contract is not None and out.p_agree is not None:
                self.contract.record_audit(Audit(out.tier, out.label(self.task.labels), out.p_agree), demo.llm_label)
            return res
        [key] = cache_keys(self.task.name, self.task.labels, [d.event.text])
        self._emit(res, [(decision, rec, d)], {d.event.id: key})
        return res

    def _emit(self, res: BatchResult, decided: list[tuple[Decision, ConsumerRecord, Deferred]],
              keys: dict[str, str]) -> None:
        """Decisions into ``res``: their records, metrics, the contract's count, the idempotency
        record and the cache entry (once acknowledged)."""
        if not decided:
            return
        if self.contract is not None:
            for dec, _, _ in decided:
                self.contract.record(dec)
        out, refused = decision_records(self.config.output, self.topics, self.role,
                                        ((dec, d, rec) for dec, rec, d in decided))
        res.records.extend(out)
        for why, n in refused.items():
            self.metrics.dead_letters.labels(self.role, why).inc(n)
        now = time.time()
        for dec, _, d in decided:
            self.metrics.answered.labels(self.role, dec.tier, dec.reason).inc()
            self.metrics.event_latency.labels(self.role).observe(now - d.first_seen)
        self.record_decided(res, [dec.event_id for dec, _, _ in decided], [d.event.text for _, _, d in decided])
        cached = [(keys[dec.event_id], dec) for dec, _, _ in decided if cacheable(dec, False)]
        if cached:
            res.on_ack.append(lambda: self.state.put_decisions(cached))

