"""A small progress bar with ETA on stderr (no dependency).

On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints a
plain line at most every ``interval`` seconds.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def fmt_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
    """Counts finished trials; the ETA weighs remaining trials by their step budgets."""

    def __init__(self, total_units: float, total_trials: int, enabled: bool = True,
                 stream: TextIO | None = None, interval: float = 10.0, width: int = 24):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.total_units = max(total_units, 1e-9)
        self.total_trials = total_trials
        self.units = 0.0
        self.trials = 0
        self.start = time.monotonic()
        self.session_units = 0.0
        self.interval = interval
        self.width = width
        self._last_print = 0.0
        self._last_len = 0

    def skip(self, units: float, trials: int = 1) -> None:
        """Trials already in the store (resumed): progress without time."""
        self.units += units
        self.trials += trials

    def advance(self, units: float, label: str = "") -> None:
        self.units += units
        self.session_units += units
        self.trials += 1
        self.draw(label)

    def eta(self) -> float:
        elapsed = time.monotonic() - self.start
        if self.session_units <= 0:
            return float("nan")
        return elapsed / self.session_units * max(self.total_units - self.units, 0.0)

    def line(self, label: str = "") -> str:
        frac = min(self.units / self.total_units, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.monotonic() - self.start
        text = (f"[{bar}] {100 * frac:3.0f}% {self.trials}/{self.total_trials} trials "
                f"elapsed {fmt_seconds(elapsed)} ETA {fmt_seconds(self.eta())}")
        return text + (f"  {label}" if label else "")

    def draw(self, label: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            text = self.line(label)[:160]
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._last_len = len(text)
        elif now - self._last_print >= self.interval or self.trials >= self.total_trials:
            self.stream.write(self.line(label) + "\n")
            self.stream.flush()
            self._last_print = now

    def note(self, message: str) -> None:
        """A message on its own line (keeps the bar intact on a terminal)."""
        if not self.enabled:
            return
        if self.tty and self._last_len:
            self.stream.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
