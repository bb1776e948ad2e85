"""lego.progress: without a terminal, one log line per interval with step/total, stats and time left."""

import logging

import pytest
import torch

from lego.progress import format_duration, progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "lego.progress"]


def test_line_only_once_the_interval_has_passed(caplog):
    caplog.set_level(logging.INFO, logger="lego.progress")
    clock = FakeClock()
    bar = progress(range(10), desc="phase1 epoch 2", total=10, interval_s=30.0, clock=clock, tty=False)
    it = iter(bar)
    for step_s in (10.0, 10.0, 9.0):  # steps 1-3 take 29 s in all
        next(it)
        clock.t += step_s
    next(it)  # step 3 done at +29 s: under the interval, nothing logged
    assert _lines(caplog) == []
    bar.update_stats(loss=torch.tensor(3.14159), tokens_per_s=12345.6)
    clock.t += 1.0
    next(it)  # step 4 done at +30 s: the first line
    assert _lines(caplog) == ["phase1 epoch 2: 4/10 batch (40%), loss 3.142, tokens/s 12,346, 0.133 batch/s, 45s left"]
    clock.t += 29.0
    next(it)  # 29 s after the last line: still quiet
    assert len(_lines(caplog)) == 1
    clock.t += 31.0
    next(it)
    assert len(_lines(caplog)) == 2 and _lines(caplog)[1].startswith("phase1 epoch 2: 6/10 batch (60%)")
    assert list(it) == [7, 8, 9]  # every item still comes through


def test_no_total_means_no_eta(caplog):
    caplog.set_level(logging.INFO, logger="lego.progress")
    clock = FakeClock()

    def gen():
        for i in range(3):
            clock.t += 20.0
            yield i

    assert list(progress(gen(), desc="mine", interval_s=30.0, unit="seq", clock=clock, tty=False)) == [0, 1, 2]
    assert _lines(caplog) == ["mine: 2 seq, 0.05 seq/s"]


def test_disabled_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="lego.progress")
    clock = FakeClock()
    bar = progress(range(5), desc="x", total=5, interval_s=1.0, clock=clock, enabled=False, tty=False)
    for _ in bar:
        clock.t += 100.0
        bar.set_postfix(loss=1.0)
    assert _lines(caplog) == []


def test_terminal_draws_a_bar_not_lines(caplog, capsys):
    caplog.set_level(logging.INFO, logger="lego.progress")
    clock = FakeClock()
    bar = progress(range(4), desc="eval", interval_s=1.0, clock=clock, tty=True)
    for _ in bar:
        clock.t += 10.0
        bar.update_stats(loss=2.5)
    assert _lines(caplog) == []
    assert "eval" in capsys.readouterr().err  # tqdm writes to stderr
    assert bar.n == 4 and bar._bar is None  # closed (leave=False)


def test_bad_interval_and_durations():
    with pytest.raises(ValueError, match="interval_s=0"):
        progress([], desc="x", interval_s=0)
    assert [format_duration(s) for s in (0, 42.4, 310, 7380)] == ["0s", "42s", "5m10s", "2h03m"]
