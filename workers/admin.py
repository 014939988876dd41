"""Operator commands on the shared state: ``cascade registry`` (what the model registry holds,
and a rollback) and ``cascade state`` (the pipeline marker that detects an emptied Redis).

``list`` shows the epoch, the current set and every kept set with the demonstrations and the
per-partition offsets it includes. ``rollback`` makes a kept set current again (by default the
one before the current) and bumps the epoch: the tier workers swap down to it, and the running
learner, whose next publish is then stale, reloads it and continues from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any

from cascade.config import CascadeConfig
from cascade.state import RegistrySet, StateStore, StateUnavailable, make_state
from cascade.state.loss import confirm_loss

Configure = Callable[[argparse.Namespace], CascadeConfig]


def add_registry_commands(sub: Any, configure: Configure) -> None:
    """Register ``cascade registry list|rollback`` on the command line's subparsers."""
    reg = sub.add_parser("registry", help="the model registry: list the kept sets, roll back")
    cmds = reg.add_subparsers(dest="registry_command", required=True)
    ls = cmds.add_parser("list", help="epoch, current set and the kept sets (versions, demonstrations, offsets)")
    ls.add_argument("--json", action="store_true", help="one JSON object on stdout")
    ls.set_defaults(func=lambda args: cmd_list(args, configure(args)))
    rb = cmds.add_parser("rollback", help="make a kept set current again; watchers and the learner follow")
    rb.add_argument("--to", type=int, default=None, metavar="VERSION",
                    help="the set version to make current (default: the kept set before the current one)")
    rb.set_defaults(func=lambda args: cmd_rollback(args, configure(args)))


def add_state_commands(sub: Any, configure: Configure) -> None:
    """Register ``cascade state status|confirm-loss``."""
    st = sub.add_parser("state", help="the shared state: whether Redis was found emptied, and the operator's confirmation")
    cmds = st.add_subparsers(dest="state_command", required=True)
    cmds.add_parser("status", help="the pipeline marker (absent: a new pipeline, or Redis lost its data)").set_defaults(
        func=lambda args: cmd_state_status(args, configure(args)))
    cmds.add_parser("confirm-loss", help="acknowledge a Redis that lost its data: workers stop warning, "
                                         "LLM calls resume (on_redis_loss: fail_closed)").set_defaults(
        func=lambda args: cmd_confirm_loss(args, configure(args)))


def cmd_state_status(args: argparse.Namespace, config: CascadeConfig) -> int:
    store = _store(config, "state")
    if store is None:
        return 2
    try:
        marker = store.pipeline_marker()
    except StateUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"pipeline {config.pipeline}: marker {marker!r}" if marker is not None else
          f"pipeline {config.pipeline}: no marker (a new pipeline, or the state was lost; see docs/deploy.md)")
    return 0


def cmd_confirm_loss(args: argparse.Namespace, config: CascadeConfig) -> int:
    store = _store(config, "state")
    if store is None:
        return 2
    try:
        value = confirm_loss(store)
    except StateUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"pipeline {config.pipeline}: loss confirmed, marker rewritten ({value})")
    return 0


def _store(config: CascadeConfig, what: str = "registry") -> StateStore | None:
    if config.state.backend != "redis":
        # The in-process state lives and dies with the process that uses it.
        print(f"error: the {what} commands need the shared state (state.backend: redis)", file=sys.stderr)
        return None
    return make_state(config)


def _describe(s: RegistrySet) -> dict[str, Any]:
    return {
        "version": s.version, "epoch": s.epoch, "models": s.names,
        "published_at": dt.datetime.fromtimestamp(s.published_at, dt.UTC).isoformat(timespec="seconds"),
        "demonstrations": None if s.step is None else s.step.demonstrations,
        "offsets": None if s.step is None else {str(p): o for p, o in sorted(s.step.offsets.items())},
    }  # fmt: skip


def cmd_list(args: argparse.Namespace, config: CascadeConfig) -> int:
    store = _store(config)
    if store is None:
        return 2
    try:
        loaded = store.load_set([])
        sets = store.registry_sets()
    except StateUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        out = {"pipeline": config.pipeline, "epoch": loaded.epoch, "current": loaded.version,
               "sets": [_describe(s) for s in sets]}
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    print(f"pipeline {config.pipeline}: epoch {loaded.epoch}, current set {loaded.version or 'none'}")
    for s in sets:
        d = _describe(s)
        offsets = ",".join(f"{p}:{o}" for p, o in (d["offsets"] or {}).items()) or "-"
        mark = "*" if s.version == loaded.version else " "
        print(f"{mark} {s.version:>8}  epoch {s.epoch:<3} {d['published_at']}  demonstrations "
              f"{d['demonstrations'] if d['demonstrations'] is not None else '-':>8}  offsets {offsets}  "
              f"{' '.join(s.names)}")
    return 0


def cmd_rollback(args: argparse.Namespace, config: CascadeConfig) -> int:
    store = _store(config)
    if store is None:
        return 2
    try:
        epoch, target = store.rollback_set(args.to)
    except KeyError as e:
        print(f"error: cannot roll back: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    except StateUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"rolled back to set {target.version} (epoch {epoch}): {' '.join(target.names)}")
    return 0
