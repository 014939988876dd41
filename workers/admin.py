"""`cascade registry`: what the model registry holds, and an operator's rollback.

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


def _store(config: CascadeConfig) -> StateStore | None:
    if config.state.backend != "redis":
        # The in-process registry lives and dies with the process that publishes to it.
        print("error: the registry commands need the shared registry (state.backend: redis)", file=sys.stderr)
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
