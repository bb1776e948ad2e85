"""Progress of every long loop, for a person at a terminal and for a log file alike.

    with progress_logging():                       # log lines print above the bars, never through them
        bar = progress(loader, desc="phase1 epoch 3", total=len(loader))
        for inputs, targets in bar:
            ...
            bar.update_stats(loss=loss, tokens_per_s=rate)   # 0-d tensors are fine: read only when shown

At a terminal (stderr is a tty) this is a tqdm bar that vanishes when done (`leave=False`; nested
loops stack, or pass `position`). Under nohup, a cluster scheduler or CI nobody watches a bar and a
carriage-return bar garbles the log, so instead one line goes to the `lego.progress` logger at most
every `interval_s` seconds:

    phase1 epoch 3: 120/500 batch (24%), loss 3.214, tokens/s 12,345, 4.1 batch/s, 1m33s left
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("lego.progress")

BAR_REFRESH_S = 0.5  # how often a bar's stats are read (each read of a device tensor is a sync)


def format_duration(seconds: float) -> str:
    """42s, 5m10s, 2h03m."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_value(v: Any) -> str:
    v = float(v)  # a 0-d tensor is read here, and only here
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def _format_stats(stats: Dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_per_', '/')} {_format_value(v)}" for k, v in stats.items())


class Progress:
    """An iterator over `iterable` that shows its progress (see the module docstring).

    `update_stats(**kw)` (alias `set_postfix`) records the latest numbers to show; values may be
    Python numbers or 0-d tensors and are converted only when a bar refreshes or a line is logged.
    """

    def __init__(self, iterable: Iterable, *, desc: str, total: Optional[int] = None, enabled: bool = True,
                 interval_s: float = 30.0, unit: str = "batch", position: Optional[int] = None,
                 clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None):
        if interval_s <= 0:
            raise ValueError(f"progress interval_s={interval_s} is not allowed; it must be > 0")
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.enabled, self.interval_s, self.clock = enabled, float(interval_s), clock
        self.n = 0
        self.stats: Dict[str, Any] = {}
        self._tty = sys.stderr.isatty() if tty is None else tty
        self._bar: Optional[tqdm] = None
        if enabled and self._tty:
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, position=position, dynamic_ncols=True)
        self._start = self._last_line = self._last_bar = clock()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError(f"progress {self.desc!r} has no total")
        return self.total

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item  # the caller's step runs here; it counts once the caller asks for the next
                self.n += 1
                self._tick()
        finally:
            self.close()

    def update_stats(self, **stats: Any) -> None:
        """Record the latest values (e.g. loss=..., tokens_per_s=...) for the next bar refresh or line."""
        self.stats.update(stats)

    set_postfix = update_stats  # tqdm's spelling

    def _tick(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self._bar is not None:
            if self.stats and now - self._last_bar >= BAR_REFRESH_S:
                self._bar.set_postfix_str(_format_stats(self.stats), refresh=False)
                self._last_bar = now
            self._bar.update(1)
        elif now - self._last_line >= self.interval_s:
            self._last_line = now
            log.info("%s", self.line(now))

    def line(self, now: Optional[float] = None) -> str:
        """The log line for the current state: stage, step/total, stats, rate and time left."""
        now = self.clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        parts = [f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)" if self.total
                 else f"{self.n} {self.unit}"]
        if self.stats:
            parts.append(_format_stats(self.stats))
        parts.append(f"{self.n / elapsed:.3g} {self.unit}/s")
        if self.total and self.n:
            parts.append(f"{format_duration((self.total - self.n) * elapsed / self.n)} left")
        return f"{self.desc}: " + ", ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable, *, desc: str, total: Optional[int] = None, enabled: bool = True,
             interval_s: float = 30.0, unit: str = "batch", position: Optional[int] = None,
             clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None) -> Progress:
    """Wrap `iterable` with a bar at a terminal or a line every `interval_s` seconds in a log;
    `enabled=False` (ranks above 0, `progress=False` configs) shows nothing. `total` defaults to
    `len(iterable)` when it has one. `clock` and `tty` are for tests."""
    return Progress(iterable, desc=desc, total=total, enabled=enabled, interval_s=interval_s, unit=unit,
                    position=position, clock=clock, tty=tty)


@contextlib.contextmanager
def progress_logging():
    """Route the console log handlers through tqdm.write for the block, so a log line printed
    while a bar is drawn lands above it instead of tearing it. Harmless without a terminal."""
    with logging_redirect_tqdm():
        yield
