"""The ``cascade`` command line."""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from cascade.config import CascadeConfig, ConfigError, load_config
from cascade.logging import configure_logging, get_logger

log = get_logger("workers.cli")


def _config(args: argparse.Namespace, **overrides: Any) -> CascadeConfig:
    """Load the config (YAML, then environment, then command-line overrides) and set up logging."""
    config = load_config(args.config, **overrides)
    configure_logging(args.log_format or config.server.log_format, config.server.log_level)
    return config


def cmd_simulate(args: argparse.Namespace) -> int:
    from cascade.evaluation.data import labels_of, read_stream
    from cascade.evaluation.simulate import simulate

    rows = read_stream(args.data, shuffle_seed=args.shuffle_seed, limit=args.limit)
    overrides: dict[str, Any] = {"llm": {"name": args.llm, "backend": "recorded"}}
    overrides.update(_pricing(args))
    if args.seed is not None:
        overrides["seed"] = args.seed
    if not args.config:  # no task configured: the stream's own label set
        overrides["task"] = {"name": Path(args.data).name.split(".")[0], "labels": sorted(labels_of(rows))}
    if args.miss_cost:
        overrides.setdefault("task", {})["miss_costs"] = dict(_key_value(kv) for kv in args.miss_cost)
    config = _config(args, **overrides)
    report = simulate(config, rows, batch_size=args.batch_size, progress=not args.quiet)
    if args.json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        _print_report(report)
    return 0


def _preflight(config: CascadeConfig, fatal: bool) -> bool:
    """The connection part of ``cascade check``: logged; with ``fatal`` a failure stops the command.
    Workers only log it: an outage at start is waited out like any other."""
    from workers.check import check_connections

    failed = [c for c in check_connections(config) if not c.ok]
    for c in failed:
        (log.error if fatal else log.warning)("preflight_failed", check=c.name, detail=c.detail)
    return not failed


def cmd_check(args: argparse.Namespace) -> int:
    from workers.check import print_report, run_check

    config = _config(args)
    report = run_check(config, data=args.data, samples=args.samples, max_unmapped=args.max_unmapped,
                       llm=not args.no_llm)
    if args.json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        print_report(report)
    return 0 if report.ok else 1


def _run_worker(worker: Any) -> int:
    """Run a worker's loop; an outage it gave up waiting out exits with its own code."""
    from workers.outage import OUTAGE_EXIT_CODE, OutageTimeout

    try:
        worker.run()
    except OutageTimeout as e:  # logged already; the supervisor restarts the worker
        print(f"error: {e}", file=sys.stderr)
        return OUTAGE_EXIT_CODE
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    config = _config(args)
    _preflight(config, fatal=False)
    if args.tier == "llm":
        from workers.llm_worker import LLMWorker

        return _run_worker(LLMWorker(config, metrics_port=args.metrics_port))
    from workers.tier_worker import TierWorker

    return _run_worker(TierWorker(config, args.tier, metrics_port=args.metrics_port))


def cmd_learner(args: argparse.Namespace) -> int:
    from workers.learner_worker import LearnerWorker

    config = _config(args)
    _preflight(config, fatal=False)
    return _run_worker(LearnerWorker(config, metrics_port=args.metrics_port, publish_every=args.publish_every,
                                     publish_interval_s=args.publish_interval))


def cmd_run(args: argparse.Namespace) -> int:
    from cascade.evaluation.data import labels_of, read_stream
    from workers.run import run_pipeline

    rows = read_stream(args.data, shuffle_seed=args.shuffle_seed, limit=args.limit) if args.data else None
    overrides: dict[str, Any] = {"state": {"backend": "redis"}}
    if args.llm:
        overrides["llm"] = {"name": args.llm, "backend": "recorded"}
    if args.llm_server:  # a live OpenAI-compatible server instead of recorded answers
        llm: dict[str, Any] = {"backend": "openai", "base_url": args.llm_server}
        if args.llm:
            llm["name"] = args.llm
        overrides["llm"] = llm
    overrides.update(_pricing(args))
    if rows is not None and not args.config:
        overrides["task"] = {"name": Path(args.data).name.split(".")[0], "labels": sorted(labels_of(rows))}
    config = _config(args, **overrides)
    if rows is not None:
        # A run over a file gets topics and state of its own: ids repeat between runs of the same
        # file, and the idempotency record of an earlier run would skip them as already decided.
        run_id = args.run_id or uuid.uuid4().hex[:8]
        config = config.model_copy(update={
            # It feeds its own prefixed events topic, so the user's input topics are not read.
            "kafka": config.kafka.model_copy(update={"topic_prefix": f"{config.kafka.topic_prefix}{run_id}.",
                                                     "input_topics": [], "input_pattern": None,
                                                     "decisions_topic": None}),
            "redis": config.redis.model_copy(update={"key_prefix": f"{config.redis.key_prefix}{run_id}:"}),
        })
        log.info("run", run_id=run_id, topic_prefix=config.kafka.topic_prefix)
    if not _preflight(config, fatal=True):
        print("cascade run: Kafka or Redis is not reachable (see the log; `cascade check` tells more)", file=sys.stderr)
        return 1
    report, _ = run_pipeline(config, rows, args.run_dir, args.base_port, args.timeout, progress=not args.quiet,
                             rate=args.rate or None)
    if report is not None:
        if args.json:
            sys.stdout.write(report.model_dump_json() + "\n")
        else:
            _print_report(report)
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from cascade.evaluation.data import labels_of
    from cascade.replay.analysis import TargetError, parse_target
    from cascade.replay.command import load_file, print_report, replay
    from cascade.replay.sweep import DEFAULT_SWEEP, SweepError, parse_sweep

    overrides: dict[str, Any] = {}
    if args.llm:
        overrides["llm"] = {"name": args.llm}
    if args.data is not None and not args.config:  # no task configured: the stream's own label set
        from cascade.evaluation.data import read_stream

        rows = read_stream(args.data)
        labels = labels_of(rows) or [  # no gold labels: the labels the recorded LLM gave
            a for a in {(r.event.payload.get("llm") or {}).get(args.llm) for r in rows} if isinstance(a, str)]
        overrides["task"] = {"name": Path(args.data).name.split(".")[0], "labels": sorted(labels)}
    config = _config(args, **overrides)
    try:
        settings = parse_sweep(args.sweep or [DEFAULT_SWEEP], [t.name for t in config.tiers])
        target = parse_target(args.target) if args.target else None
    except (SweepError, TargetError) as e:
        raise ConfigError(f"replay: {e}") from None
    if args.apply and target is None:
        raise ConfigError("replay: --apply needs --target (which setting to apply)")
    progress = not args.quiet
    demonstrations = None
    if args.data is not None:
        try:
            frm = None if args.from_ is None else int(args.from_)
            to = None if args.to is None else int(args.to)
        except ValueError:
            raise ConfigError("replay: with --data, --from/--to are row indices") from None
        loaded = load_file(args.data, frm, to, args.shuffle_seed)
    else:
        from workers.replay_source import events_topic, load_demonstrations, load_topic_range
        from workers.topics import Topics

        topics = Topics(config)
        topic = {"events": events_topic, "decisions": lambda t: t.decisions}.get(args.topic, lambda _: args.topic)(topics)
        loaded = load_topic_range(config, topic, args.from_, args.to, args.gold_field or None, progress)
        demonstrations = lambda ids: load_demonstrations(config, ids, config.llm.name, progress)  # noqa: E731
    report = replay(
        config, loaded, settings, target=target, apply=args.apply, plot=None if args.no_plot else args.plot,
        batch_size=args.batch_size, processes=args.processes, events_per_hour=args.events_per_hour,
        progress=progress, live_sources=args.data is None, exploration_scale=args.exploration_scale,
        warm_start=args.warm_start, demonstrations=demonstrations,
    )
    if args.json:
        sys.stdout.write(report.model_dump_json() + "\n")
    else:
        print_report(report)
    return 0 if target is None or (report.recommendation and report.recommendation.index is not None) else 3


def _pricing(args: argparse.Namespace) -> dict[str, Any]:
    """--mu fixes the price of an LLM call; --min-agreement/--max-llm-fraction set the contract's
    targets instead (either alone replaces the configured pair: the other is then off)."""
    contract = args.min_agreement is not None or args.max_llm_fraction is not None
    if args.mu is not None and contract:
        raise ConfigError("--mu fixes the price of an LLM call; it cannot be combined with a contract target "
                          "(--min-agreement, --max-llm-fraction)")
    if args.mu is not None:
        return {"deferral": {"mu": args.mu}}
    if contract:
        return {"contract": {"min_agreement": args.min_agreement, "max_llm_fraction": args.max_llm_fraction}}
    return {}


def _key_value(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise ConfigError(f"expected LABEL=NUMBER, got {text!r}") from None


def _print_report(report: Any) -> None:
    print(f"events            {report.events}")
    print(f"LLM calls         {report.llm_calls} ({report.llm_call_fraction:.1%})")
    alone = "no recorded answers" if report.llm_accuracy is None else f"{report.llm_accuracy:.4f}"
    print(f"accuracy          {report.accuracy:.4f}   (LLM alone {alone})")
    if report.agreement_with_llm is not None:
        print(f"agreement w/ LLM  {report.agreement_with_llm:.4f}")
    print(f"cache hits        {report.cache_hits}   budget exhausted {report.budget_exhausted}   "
          f"LLM unusable {report.llm_unusable}   explored {report.explored}")
    unmapped = getattr(report, "llm_unmapped_ratio", None)  # the LLM worker's, from `cascade run`
    if unmapped is not None:
        from workers.observability import UNMAPPED_THRESHOLD

        hint = "   <- check task.labels and task.label_aliases" if unmapped > UNMAPPED_THRESHOLD else ""
        print(f"LLM unmapped      {unmapped:.0%} of the last 100 answers named no label{hint}")
    print(f"macro-F1          {report.macro_f1:.4f}")
    print(f"events/second     {report.events_per_second:,.0f}")
    if report.contract is not None:
        c = report.contract
        print(f"contract          agreement with the LLM ≥ {c.agreement_lower_bound:.3f} "
              f"({1 - c.alpha:.0%} confidence; estimate {c.estimated_agreement:.3f}; windowed ≥ "
              f"{c.window_agreement_lower_bound:.3f}), LLM calls {report.llm_call_fraction:.0%} "
              f"(audits {report.audit_calls})")
        if c.budget_binding_updates:
            print(f"budget binding    at {c.budget_binding_updates} controller updates: {c.budget_binding_reason}")
    print("per tier:")
    for name, t in report.per_tier.items():
        acc = "-" if t.accuracy is None else f"{t.accuracy:.4f}"
        print(f"  {name:<12} answered {t.answered:>7} ({t.fraction:6.1%})  accuracy {acc}")
    print("per class (precision / recall):")
    for name, c in report.per_class.items():
        print(f"  {name:<12} {c.precision:.3f} / {c.recall:.3f}  (support {c.support})")


def _contract_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--min-agreement", type=float, default=None, metavar="A",
                   help="hold agreement with the LLM >= A (lower confidence bound; the default contract is 0.95)")
    p.add_argument("--max-llm-fraction", type=float, default=None, metavar="F",
                   help="at most F LLM calls (answers and audits) per event; wins over --min-agreement")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade", description="Streaming cascade inference")
    p.add_argument("--config", help="YAML config file (default: $CASCADE_CONFIG); env CASCADE_* overrides it")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default=None)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="stream a recorded file through the in-process cascade")
    s.add_argument("--data", required=True, type=Path, help="file in the ../shared/data format (.jsonl or .jsonl.gz)")
    s.add_argument("--llm", required=True, help="whose recorded answers play the LLM, e.g. gpt-3.5-turbo-1106")
    s.add_argument("--shuffle-seed", type=int, default=None, help="shuffle the rows with this seed (default: file order)")
    _contract_flags(s)
    s.add_argument("--mu", type=float, default=None, help="cost weight of an LLM call (overrides the config)")
    s.add_argument("--miss-cost", action="append", metavar="LABEL=COST",
                   help="cost of a cheap answer missing LABEL, relative to 1 (repeatable)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--limit", type=int, default=None, help="only the first N events")
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=cmd_simulate)

    w = sub.add_parser("worker", help="run one tier (or the LLM) as a Kafka consumer group")
    w.add_argument("--tier", required=True, help="a configured tier name, or 'llm'")
    w.add_argument("--metrics-port", type=int, default=None, help="port of /metrics, /healthz, /readyz")
    w.set_defaults(func=cmd_worker)

    lw = sub.add_parser("learner", help="learn from demonstrations and publish model snapshots")
    lw.add_argument("--metrics-port", type=int, default=None)
    lw.add_argument("--publish-every", type=int, default=200, help="demonstrations between snapshots")
    lw.add_argument("--publish-interval", type=float, default=5.0, help="seconds between snapshots")
    lw.set_defaults(func=cmd_learner)

    c = sub.add_parser("check", help="preflight: Kafka, Redis and the LLM's answers on sample events, before paying")
    c.add_argument("--data", type=Path, default=None, help="sample events from this file (default: the input topics)")
    c.add_argument("--samples", type=int, default=20, help="sample events asked of the LLM")
    c.add_argument("--max-unmapped", type=float, default=0.2, help="fail above this share of answers naming no label")
    c.add_argument("--no-llm", action="store_true", help="connections only")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("run", help="the whole pipeline on one machine (all workers as processes)")
    r.add_argument("--data", type=Path, default=None, help="feed this recorded file and report when all is answered")
    r.add_argument("--llm", default=None, help="whose recorded answers play the LLM")
    r.add_argument("--llm-server", default=None, metavar="URL",
                   help="ask a live OpenAI-compatible server at URL (…/v1) instead of recorded answers")
    r.add_argument("--shuffle-seed", type=int, default=None)
    r.add_argument("--limit", type=int, default=None)
    _contract_flags(r)
    r.add_argument("--mu", type=float, default=None)
    r.add_argument("--run-dir", type=Path, default=Path(".run"))
    r.add_argument("--base-port", type=int, default=9100, help="metrics ports: base, base+1, ...")
    r.add_argument("--timeout", type=float, default=900.0)
    r.add_argument("--run-id", default=None, help="names this run's topics and state (default: random)")
    r.add_argument("--rate", type=float, default=300.0,
                   help="events per second fed from --data, like live traffic (0: as fast as possible)")
    r.add_argument("--json", action="store_true")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="re-run a recorded range offline with recorded LLM answers; sweep mu; apply")
    src = rp.add_mutually_exclusive_group(required=True)
    src.add_argument("--topic", help="topic to replay: 'events', 'decisions' (under the configured prefix) or a full name")
    src.add_argument("--data", type=Path, help="a file in the ../shared/data format instead of a topic")
    rp.add_argument("--from", dest="from_", default=None,
                    help="start, inclusive: offset per partition (negative: from the end) or ISO time; rows for --data")
    rp.add_argument("--to", default=None, help="end, exclusive: offset per partition or ISO time; rows for --data")
    rp.add_argument("--llm", default=None, help="whose recorded answers to join (default: llm.name of the config)")
    rp.add_argument("--sweep", action="append", metavar="NAME=SPEC",
                    help="mu or threshold.TIER = lo:hi:linN | lo:hi:logN | a,b,c (repeatable: grid); "
                         "default mu=0.02:1:log10")
    rp.add_argument("--target", default=None, metavar="NAME=X",
                    help="budget_per_hour, llm_calls_per_hour, max_llm_fraction (best setting within it), "
                         "max_disagreement, min_accuracy (cheapest setting meeting it)")
    rp.add_argument("--apply", action="store_true", help="write the recommended setting to the live parameters (Redis)")
    rp.add_argument("--plot", type=Path, default=Path("replay.png"), help="PNG to write (default replay.png)")
    rp.add_argument("--no-plot", action="store_true")
    rp.add_argument("--events-per-hour", type=float, default=None, help="event rate for budgets (default: from timestamps)")
    rp.add_argument("--gold-field", default="label", help="event field with a gold label, if any ('' for none)")
    rp.add_argument("--shuffle-seed", type=int, default=None, help="--data only: shuffle the rows first")
    rp.add_argument("--batch-size", type=int, default=1, help="events per cascade step (as in simulate)")
    rp.add_argument("--processes", type=int, default=None, help="settings replayed in parallel (default: CPUs)")
    rp.add_argument("--exploration-scale", type=float, default=0.0,
                    help="exploration during the replay (default 0: off, deterministic and monotone curves)")
    rp.add_argument("--warm-start", action="store_true",
                    help="start every setting from the registry's current tier and policy snapshots (default: untrained)")
    rp.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    rp.add_argument("--quiet", action="store_true", help="no progress on stderr")
    rp.set_defaults(func=cmd_replay)

    from workers.admin import add_registry_commands, add_state_commands

    add_registry_commands(sub, _config)
    add_state_commands(sub, _config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
