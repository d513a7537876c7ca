"""Progress lines for log files: count, rate and ETA at a fixed interval, readable with ``tail -f`` and ``grep``.

A long job (manifest, pixel cache, feature extraction, fine-tuning, sweep, PCV) logs one line per interval instead of
a carriage-return bar, which becomes one endless line in a log file::

    progress encode photo_train: 1536/6000 images (25.6%), 212.4 images/s, ETA 0:00:21
    progress finetune full_ft: 120/400 steps (30.0%), 3.1 steps/s, ETA 0:01:30 loss=0.4123

``grep '^.*progress '`` lists them; the finishing line starts with ``done``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable

#: Seconds between two progress lines of one job; ``ROBUSTFT_PROGRESS_INTERVAL`` overrides it (0: every update).
DEFAULT_INTERVAL_S = 30.0
INTERVAL_ENV = "ROBUSTFT_PROGRESS_INTERVAL"


def progress_interval(default: float = DEFAULT_INTERVAL_S) -> float:
    """The interval in seconds: ``$ROBUSTFT_PROGRESS_INTERVAL`` when set to a number >= 0, else ``default``."""
    value = os.environ.get(INTERVAL_ENV, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{INTERVAL_ENV}: expected a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{INTERVAL_ENV}: expected a number of seconds >= 0, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _format_extra(extra: dict[str, Any]) -> str:
    parts = []
    for key, value in extra.items():
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return (" " + " ".join(parts)) if parts else ""


def format_rate(rate: float, unit: str) -> str:
    """``2.5 images/s``; below 0.1 a second two significant digits (``0.031 steps/s``, not ``0.0``); ``?`` if unknown."""
    if not math.isfinite(rate):
        return f"? {unit}/s"
    return f"{rate:.1f} {unit}/s" if abs(rate) >= 0.1 or rate == 0 else f"{rate:.2g} {unit}/s"


class ProgressLog:
    """Counts work done and logs ``progress <what>: done/total unit (pct), rate, ETA`` every ``interval`` seconds.

    ``start`` is work already done before this process (a resumed run): it counts toward ``done`` but not toward the
    rate. :meth:`finish` logs the closing ``done <what>`` line with the total time; as a context manager it is called
    on a normal exit. ``clock`` is for tests.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "images",
        *,
        logger: logging.Logger | None = None,
        interval: float | None = None,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self.total = None if total is None else int(total)
        self.unit = unit
        self.logger = logger or logging.getLogger("robustft")
        self.interval = progress_interval() if interval is None else float(interval)
        self.clock = clock
        self.start = int(start)
        self.done = int(start)
        self.started = clock()
        self.last_line = self.started
        self.finished = False

    @property
    def rate(self) -> float:
        """Units per second since this process started counting (work before ``start`` excluded)."""
        elapsed = self.clock() - self.started
        return (self.done - self.start) / elapsed if elapsed > 0 else float("nan")

    def line(self, **extra: Any) -> str:
        rate = self.rate
        if self.total:
            left = (self.total - self.done) / rate if rate and rate > 0 and math.isfinite(rate) else float("nan")
            head = f"{self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.1f}%)"
            tail = f", ETA {format_duration(left)}"
        else:
            head, tail = f"{self.done} {self.unit}", ""
        speed = format_rate(rate, self.unit)
        return f"progress {self.what}: {head}, {speed}{tail}{_format_extra(extra)}"

    def update(self, n: int = 1, **extra: Any) -> None:
        """Count ``n`` more units; log a line when ``interval`` seconds have passed since the last one."""
        self.done += int(n)
        now = self.clock()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self.logger.info(self.line(**extra))

    def note(self, message: str, *args: Any) -> None:
        """Log a one-off line about this job (``resumed at step N``, an epoch's validation accuracy)."""
        self.logger.info(f"{self.what}: {message}", *args)

    def finish(self, **extra: Any) -> None:
        """Log ``done <what>: N unit in H:MM:SS (rate)`` once."""
        if self.finished:
            return
        self.finished = True
        elapsed = self.clock() - self.started
        rate = self.rate
        speed = format_rate(rate, self.unit)
        self.logger.info(f"done {self.what}: {self.done} {self.unit} in {format_duration(elapsed)} ({speed})"
                         f"{_format_extra(extra)}")

    def __enter__(self) -> "ProgressLog":
        self.logger.info(self.line())
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.finish()


__all__ = ["DEFAULT_INTERVAL_S", "INTERVAL_ENV", "ProgressLog", "format_duration", "format_rate", "progress_interval"]
