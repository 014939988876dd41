"""`cascade run`: the whole pipeline on one machine — every tier worker, the LLM worker and the
learner as processes — optionally fed from a recorded file, with a report when all is answered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from kafka import KafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from cascade.config import CascadeConfig
from cascade.contract.runtime import ContractStatus
from cascade.evaluation.data import LabelledEvent
from cascade.evaluation.progress import Progress
from cascade.evaluation.report import Report, Scorer
from cascade.logging import get_logger
from cascade.messages import Decision
from cascade.security import kafka_client_kwargs, secret_environment
from cascade.state import make_state
from cascade.task import Task
from workers.kafka_io import OutRecord, ensure_topics, make_producer, produce_and_flush
from workers.output import read_decision
from workers.topics import Topics

log = get_logger("cascade.run")


def worker_commands(config_path: Path, tiers: list[str], base_port: int) -> list[tuple[str, list[str]]]:
    cli = [sys.executable, "-m", "workers.cli", "--config", str(config_path)]
    roles = [(f"tier-{t}", [*cli, "worker", "--tier", t]) for t in tiers]
    roles += [("llm", [*cli, "worker", "--tier", "llm"]), ("learner", [*cli, "learner"])]
    return [(role, [*cmd, "--metrics-port", str(base_port + i)]) for i, (role, cmd) in enumerate(roles)]


def write_worker_config(config: CascadeConfig, run_dir: Path) -> tuple[Path, dict[str, str]]:
    """The config file the workers read, and the environment they get their secrets from.

    Secrets (the password in the Redis URL, the LLM API key) never go into the file: they travel
    as ``CASCADE_*`` environment variables, which ``load_config`` reads over the file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    dumped = config.model_dump(mode="json")
    secrets = secret_environment(config)  # the dump omits them (the config's serializers)
    url = urlsplit(config.redis.url)
    if url.password is not None or url.username is not None:
        secrets["CASCADE_REDIS__URL"] = config.redis.url
        host = url.netloc.rpartition("@")[2]
        dumped["redis"]["url"] = urlunsplit(url._replace(netloc=host))
    dumped["llm"].pop("api_key", None)
    config_path = run_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(dumped))
    return config_path, secrets


def start_workers(config: CascadeConfig, run_dir: Path, base_port: int) -> list[subprocess.Popen]:
    config_path, secrets = write_worker_config(config, run_dir)
    env = {**os.environ, **secrets, "CASCADE_CONFIG": str(config_path)}
    procs = []
    for role, cmd in worker_commands(config_path, [t.name for t in config.tiers], base_port):
        logf = (run_dir / f"{role}.log").open("ab")
        procs.append(subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env))
        log.info("worker_started", role=role, pid=procs[-1].pid, log=str(run_dir / f"{role}.log"))
    return procs


def stop_workers(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


def produce_events(config: CascadeConfig, rows: list[LabelledEvent], rate: float | None = None) -> None:
    """The user's side: events onto the input topic, keyed by id (gold labels stay behind).

    ``rate`` (events per second) paces the stream like live traffic, so the learner's snapshots
    reach the tier workers while the stream is still flowing; None sends as fast as possible.
    """
    topics = Topics(config)
    producer = make_producer(config.kafka, client_id="cascade-run-feeder")
    batch = 500 if rate is None else max(1, int(rate / 10))
    start = time.monotonic()
    try:
        for i in range(0, len(rows), batch):
            if rate is not None:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            produce_and_flush(producer, [
                OutRecord(topics.events, r.event.id.encode(), json.dumps(r.event.payload).encode()) for r in rows[i : i + batch]
            ])
    finally:
        producer.close()


def collect_decisions(config: CascadeConfig, ids: set[str], timeout_s: float, progress: bool = True) -> dict[str, list[Decision]]:
    """Read the decisions topic from the start until every id has one (or the timeout)."""
    topics = Topics(config)
    consumer = KafkaConsumer(
        topics.decisions, **kafka_client_kwargs(config.kafka), group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=1000,
    )
    found: dict[str, list[Decision]] = {}
    bar = Progress(len(ids), "decisions", enabled=progress)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not ids.issubset(found):
            for tp_records in consumer.poll(timeout_ms=500).values():
                for rec in tp_records:
                    d = read_decision(rec.value, config.output)
                    found.setdefault(d.event_id, []).append(d)
            bar.update(len(ids & found.keys()))
    finally:
        consumer.close()
    return found


def llm_worker_metrics(port: int) -> dict[tuple[str, str], float]:
    """The LLM worker's metrics by (sample name, scope label); empty when it cannot be reached."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {(s.name, s.labels.get("scope", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def contract_status(config: CascadeConfig, metrics: dict[tuple[str, str], float]) -> ContractStatus | None:
    """The contract as the LLM worker, which runs it, exports it (None before its first update)."""
    if not config.contract_on or ("cascade_agreement_lower_bound", "stream") not in metrics:
        return None
    c, live = config.contract, make_state(config).get_live_params()
    binding = metrics.get(("cascade_contract_budget_binding", ""), 0.0) > 0
    return ContractStatus(
        min_agreement=c.min_agreement, max_llm_fraction=c.max_llm_fraction, alpha=c.alpha, audit_rate=c.audit_rate,
        audits_measured=int(metrics.get(("cascade_audit_calls_total", ""), 0)),
        estimated_agreement=metrics[("cascade_agreement_estimate", "stream")],
        agreement_lower_bound=metrics[("cascade_agreement_lower_bound", "stream")],
        window_estimated_agreement=metrics[("cascade_agreement_estimate", "window")],
        window_agreement_lower_bound=metrics[("cascade_agreement_lower_bound", "window")],
        contract_met=None,  # the worker exports the bound, not the controller's verdict
        budget_binding=binding, budget_binding_updates=int(binding), budget_binding_reason=None,
        thresholds=live.thresholds if live else {}, exploration_scale=live.exploration_scale if live else 1.0,
    )


def score(config: CascadeConfig, rows: list[LabelledEvent], decisions: dict[str, list[Decision]], seconds: float,
          llm_metrics: dict[tuple[str, str], float] | None = None) -> Report:
    task = Task(config.task)
    scorer = Scorer(task.labels)
    for r in rows:
        ds = decisions.get(r.event.id)
        recorded = (r.event.payload.get(config.llm.recorded_field) or {}).get(config.llm.name)
        scorer.add_decision(r.gold, ds[0] if ds else None, task.map_answer(recorded), None)
    metrics = llm_metrics or {}
    scorer.audit_calls = int(metrics.get(("cascade_audit_calls_total", ""), 0))
    report = scorer.report(seconds, {"mu": config.deferral.mu, "llm": config.llm.name}, contract_status(config, metrics))
    report.llm_unmapped_ratio = metrics.get(("cascade_llm_unmapped_ratio", ""))
    return report


def run_pipeline(config: CascadeConfig, rows: list[LabelledEvent] | None, run_dir: Path, base_port: int,
                 timeout_s: float, progress: bool = True, rate: float | None = None,
                 ) -> tuple[Report | None, dict[str, list[Decision]]]:
    kcfg = config.kafka
    ensure_topics(kcfg, Topics(config).all(), kcfg.partitions, kcfg.replication_factor)
    procs = start_workers(config, run_dir, base_port)
    try:
        if rows is None:  # serve until interrupted
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return None, {}
        start = time.perf_counter()
        feeder = threading.Thread(target=produce_events, args=(config, rows, rate), name="feeder", daemon=True)
        feeder.start()
        decisions = collect_decisions(config, {r.event.id for r in rows}, timeout_s, progress)
        feeder.join()
        seconds = time.perf_counter() - start
        llm_port = base_port + len(config.tiers)  # the worker order of worker_commands
        return score(config, rows, decisions, seconds, llm_worker_metrics(llm_port)), decisions
    finally:
        stop_workers(procs)
