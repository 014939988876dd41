"""A progress line on stderr for long-running commands (rewritten in place on a terminal)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, every_s: float = 1.0, enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.every_s = every_s
        self.enabled = enabled
        self.start = time.perf_counter()
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last < self.every_s and done < self.total):
            return
        self._last = now
        rate = done / max(now - self.start, 1e-9)
        pct = 100.0 * done / max(self.total, 1)
        line = f"{self.label}: {done}/{self.total} ({pct:5.1f}%) {rate:,.0f}/s {extra}"
        if self._tty:
            sys.stderr.write("\r" + line + ("\n" if done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
