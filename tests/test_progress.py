"""ProgressLog: one plain line per interval with count, rate and ETA; a closing line; no carriage returns."""

from __future__ import annotations

import logging

import pytest

from robustft.io.progress import INTERVAL_ENV, ProgressLog, format_duration, format_rate, progress_interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "robustft"]


def test_lines_come_at_the_interval_with_count_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="robustft")
    clock = FakeClock()
    with ProgressLog("encode photo_train", 100, "images", interval=10, clock=clock) as progress:
        for _ in range(10):
            clock.now += 2.0
            progress.update(5)
    lines = _lines(caplog)
    # the opening line, one line each 10 s (at 10 s and 20 s), the closing line
    assert lines[0] == "progress encode photo_train: 0/100 images (0.0%), ? images/s, ETA ?"
    assert lines[1] == "progress encode photo_train: 25/100 images (25.0%), 2.5 images/s, ETA 0:00:30"
    assert lines[2] == "progress encode photo_train: 50/100 images (50.0%), 2.5 images/s, ETA 0:00:20"
    assert lines[-1] == "done encode photo_train: 50 images in 0:00:20 (2.5 images/s)"
    assert len(lines) == 4
    assert not any("\r" in line for line in lines)


def test_resumed_work_counts_toward_done_but_not_toward_the_rate(caplog):
    caplog.set_level(logging.INFO, logger="robustft")
    clock = FakeClock()
    progress = ProgressLog("finetune full_ft", 400, "steps", interval=0, start=100, clock=clock)
    clock.now += 10.0
    progress.update(20, loss=0.123456)
    assert _lines(caplog) == ["progress finetune full_ft: 120/400 steps (30.0%), 2.0 steps/s, ETA 0:02:20 loss=0.1235"]


def test_slow_rates_keep_two_significant_digits(caplog):
    # a CPU fine-tuning step of 30 s once printed "0.0 steps/s"
    assert format_rate(1 / 32, "steps") == "0.031 steps/s"
    assert format_rate(0.0042, "steps") == "0.0042 steps/s"
    assert format_rate(0.25, "steps") == "0.2 steps/s" and format_rate(2.5, "images") == "2.5 images/s"
    assert format_rate(0.0, "steps") == "0.0 steps/s" and format_rate(float("nan"), "steps") == "? steps/s"
    caplog.set_level(logging.INFO, logger="robustft")
    clock = FakeClock()
    progress = ProgressLog("finetune full_ft", 10, "steps", interval=0, clock=clock)
    clock.now += 64.0
    progress.update(2)
    assert _lines(caplog)[-1] == "progress finetune full_ft: 2/10 steps (20.0%), 0.031 steps/s, ETA 0:04:16"


def test_unknown_total_has_no_eta(caplog):
    caplog.set_level(logging.INFO, logger="robustft")
    clock = FakeClock()
    progress = ProgressLog("scan", None, "files", interval=0, clock=clock)
    clock.now += 4.0
    progress.update(8)
    assert _lines(caplog) == ["progress scan: 8 files, 2.0 files/s"]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(INTERVAL_ENV, "0")
    assert progress_interval() == 0.0
    monkeypatch.setenv(INTERVAL_ENV, "-1")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        progress_interval()
    monkeypatch.delenv(INTERVAL_ENV)
    assert progress_interval(7.0) == 7.0


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(float("nan")) == "?"
