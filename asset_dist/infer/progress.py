"""Progress of the editing commands on stderr: edits done, hole tokens sampled / total, rate and ETA.

On a terminal one line is redrawn at most every `interval` seconds; otherwise (logs, SLURM output files) a
line is printed each time another `every` of the work is done, and at the end, so logs stay short.

The token total grows as edits are read (a run does not decode every mask up front): until every edit is
queued the total is extrapolated from the edits queued so far, and the ETA from the token rate.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _clock(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    def __init__(self, label: str, edits: int, *, unit: str = "tokens", stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None, every: float = 0.1, interval: float = 0.5):
        self.label, self.edits, self.unit = label, edits, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every, self.interval = every, interval
        self.queued_edits = self.done_edits = 0
        self.total = self.done = 0
        self.t0 = time.monotonic()
        self._shown = 0.0  # last redraw (tty)
        self._mark = 0  # last printed multiple of `every` (not a tty)
        self._closed = False

    # ---------------------------------------------------------------------------------------------- events

    def queued(self, tokens: int, edits: int = 1) -> None:
        """`edits` more edits read, with `tokens` hole tokens to sample among them."""
        self.queued_edits += edits
        self.total += tokens

    def sampled(self, tokens: int) -> None:
        self.done += tokens
        self._maybe_show()

    def edit_done(self, n: int = 1) -> None:
        self.done_edits += n
        self._maybe_show()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._show(final=True)

    # ---------------------------------------------------------------------------------------------- display

    def fraction(self) -> float:
        est = self.estimated_total()
        if est > 0:
            return min(1.0, self.done / est)
        return self.done_edits / self.edits if self.edits else 1.0

    def estimated_total(self) -> float:
        if self.queued_edits and self.queued_edits < self.edits:
            return self.total * self.edits / self.queued_edits
        return float(self.total)

    def line(self) -> str:
        dt = time.monotonic() - self.t0
        rate = self.done / dt if dt > 0 else 0.0
        est = self.estimated_total()
        eta = (est - self.done) / rate if rate > 0 else float("nan")
        approx = "~" if self.queued_edits < self.edits else ""
        return (f"{self.label}: {self.done_edits}/{self.edits} edits, {self.unit} {self.done}/{approx}{int(est)} "
                f"({100 * self.fraction():.0f}%), {rate:.1f} {self.unit}/s, elapsed {_clock(dt)}, ETA {_clock(eta)}")

    def _maybe_show(self) -> None:
        if self.tty:
            now = time.monotonic()
            if now - self._shown >= self.interval:
                self._shown = now
                self._show()
        else:
            mark = int(self.fraction() / self.every + 1e-9)
            if mark > self._mark:
                self._mark = mark
                self._show()

    def _show(self, final: bool = False) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line() + ("\n" if final else ""))
        else:
            state = (self.done, self.done_edits)
            if state == getattr(self, "_printed", None):  # the end, already printed at 100 %
                return
            self._printed = state
            self.stream.write(self.line() + "\n")
        self.stream.flush()
