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


@pytest.mark.slow
def test_a_run_logged_to_a_file_shows_progress_lines(tmp_path):
    """`python -m lego ... > log 2>&1`: progress lines with stage, step/total and time left, and
    run.json records the command as typed (the flat alias not yet rewritten)."""
    import json
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY

    # Whole-split epochs (about 75 steps) and a short interval, so that even a fast machine logs lines.
    args = [*TINY, "progress_interval_s=0.05", "phase1.epoch_steps=null", "phase1_lr=0.002",
            "phase1.max_epochs=1", "stages=[phase1]", "hydra.run.dir=run"]  # phase 1's lines are what is checked
    env = dict(os.environ, LEGO_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    with open(tmp_path / "out.log", "w") as out:
        rc = subprocess.run([sys.executable, "-m", "lego", *args], cwd=tmp_path, env=env, stdout=out,
                            stderr=subprocess.STDOUT, timeout=600).returncode
    log = (tmp_path / "out.log").read_text()
    assert rc == 0, log[-2000:]
    lines = re.findall(r"phase1 epoch \d: \d+/\d+ batch \(\d+%\), loss [\d.]+, tokens/s [\d,]+, .* left", log)
    assert lines, log[-2000:]
    assert "\r" not in log  # no carriage-return bar in a file
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["provenance"]["argv"][1:] == args
    # progress=false: neither bars nor lines (lego-run's main in this process, output not a terminal either);
    # phase1.cache=false, so that the phases train again instead of coming from the first run's cache
    from conftest import lego_run

    quiet = lego_run([*args[:-1], "progress=false", "phase1.cache=false", "hydra.run.dir=quiet"], cwd=tmp_path,
                     env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert "phase1 epoch 1" in (tmp_path / "quiet" / "lego.log").read_text()  # it trained
    assert quiet.returncode == 0 and "batch (" not in quiet.stdout + quiet.stderr
