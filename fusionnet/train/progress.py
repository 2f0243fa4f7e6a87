"""A training step's progress on the console: a tqdm bar on a terminal, a few plain lines in log files.

Mode from FUSIONNET_PROGRESS: "bar" (one tqdm bar per epoch: iterations, it/s, ETA, loss and lr),
"plain" (a line when both >= 10% of the epoch and >= 30 s have passed since the last one, i.e. the
rarer of the two), "off" (nothing), or "auto"/unset: bar when stderr is a terminal, else plain, so
DVC and Prefect log files get no carriage returns or ANSI codes. Either way one summary line per
epoch (epoch, mean loss, val SAD, seconds, it/s). Only rank 0 under DDP prints; others stay silent.
Everything goes to stderr; stdout keeps the step's result lines.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from tqdm import tqdm

ENV = "FUSIONNET_PROGRESS"
MODES = ("auto", "bar", "plain", "off")
# it/s always (tqdm's default turns into s/it below 1 it/s, which a CPU step often is)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
# size when the stream reports none (a file, a pty without a size: tqdm would hide the bar)
FALLBACK_COLUMNS, FALLBACK_ROWS = 120, 24


def resolve_mode(value: str | None, stream: TextIO) -> str:
    """FUSIONNET_PROGRESS's value (None/"" = auto) -> "bar" | "plain" | "off"; `stream` decides auto."""
    mode = (value or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV}={value!r}: choose one of {', '.join(MODES)}")
    if mode == "auto":
        isatty = getattr(stream, "isatty", None)
        return "bar" if isatty is not None and isatty() else "plain"
    return mode


class StepProgress:
    """Console progress of one step. is_main: rank 0 (every other rank prints nothing).

    mode: "auto" | "bar" | "plain" | "off" (None: read FUSIONNET_PROGRESS). stream: default sys.stderr
    at each call. every_s, every_fraction: a plain line needs both this many seconds and this share of
    the epoch since the last one. clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, step: str, is_main: bool = True, mode: str | None = None, stream: TextIO | None = None,
                 every_s: float = 30.0, every_fraction: float = 0.1, clock: Callable[[], float] = time.monotonic):
        self.step, self._stream = step, stream
        self.mode = resolve_mode(os.environ.get(ENV) if mode is None else mode, self.stream)
        if not is_main:
            self.mode = "off"
        self.every_s, self.every_fraction, self.clock = every_s, every_fraction, clock

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stderr

    @contextmanager
    def epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> Iterator["_EpochProgress"]:
        """Around one epoch's iterations. epoch: 1-based; total: its iterations; done: those already
        done before a resume. The bar closes on leaving, also on an error."""
        if self.mode == "bar":
            shown: _EpochProgress = _BarEpoch(self, epoch, epochs, total, done)
        elif self.mode == "plain":
            shown = _PlainEpoch(self, epoch, epochs, total, done)
        else:
            shown = _EpochProgress()
        try:
            yield shown
        finally:
            shown.close()

    def summary(self, epoch: int, epochs: int, mean_loss: float, val_sad: float | None,
                train_s: float, val_s: float | None, iterations: int) -> None:
        """The epoch's one line: mean loss, val SAD (None: not validated), seconds of training (and of
        validation), iterations per second of training."""
        if self.mode == "off":
            return
        rate = iterations / train_s if train_s > 0 else math.nan
        val = "" if val_sad is None else f", val SAD {val_sad:.4g}"
        val_time = "" if val_s is None else f" + val {val_s:.1f} s"
        self.write(f"[{self.step}] epoch {epoch}/{epochs} done: mean loss {mean_loss:.4g}{val}, "
                   f"{train_s:.1f} s{val_time}, {iterations} it, {rate:.2f} it/s")

    def write(self, text: str) -> None:
        """A line that leaves any bar intact (tqdm.write clears and redraws it)."""
        if self.mode != "off":
            tqdm.write(text, file=self.stream)
            self.stream.flush()


class _EpochProgress:
    """Nothing shown ("off", or a rank other than 0)."""

    def update(self, loss: float | None, lr: float) -> None:
        """One iteration done; loss: the mean total loss since the last update that had one (None: not
        reduced this iteration, see fusionnet.train.losslog), lr: its learning rate."""

    def close(self) -> None:
        pass


class _BarEpoch(_EpochProgress):
    def __init__(self, owner: StepProgress, epoch: int, epochs: int, total: int, done: int):
        sized = _has_size(owner.stream)
        self.bar = tqdm(total=total, initial=done, desc=f"{owner.step} epoch {epoch}/{epochs}", unit="it",
                        file=owner.stream, dynamic_ncols=sized, ncols=None if sized else FALLBACK_COLUMNS,
                        nrows=None if sized else FALLBACK_ROWS, leave=True, bar_format=BAR_FORMAT)
        self.loss: float | None = None

    def update(self, loss: float | None, lr: float) -> None:
        if loss is not None:
            self.loss = loss
        shown = {"loss": f"{self.loss:.4g}"} if self.loss is not None else {}
        self.bar.set_postfix(**shown, lr=f"{lr:.2e}", refresh=False)  # drawn by update's throttle
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _PlainEpoch(_EpochProgress):
    def __init__(self, owner: StepProgress, epoch: int, epochs: int, total: int, done: int):
        self.owner, self.epoch, self.epochs, self.total, self.done = owner, epoch, epochs, total, done
        self.start = self.last = owner.clock()
        self.start_done = self.last_done = done
        self.loss: float | None = None

    def update(self, loss: float | None, lr: float) -> None:
        self.done += 1
        if loss is not None:
            self.loss = loss
        now, owner = self.owner.clock(), self.owner
        if self.done >= self.total:  # the summary line follows
            return
        if now - self.last < owner.every_s or self.done - self.last_done < owner.every_fraction * self.total:
            return
        self.last, self.last_done = now, self.done
        rate = (self.done - self.start_done) / (now - self.start) if now > self.start else math.nan
        eta = (self.total - self.done) / rate if rate > 0 else math.nan
        owner.write(f"[{owner.step}] epoch {self.epoch}/{self.epochs}: {self.done}/{self.total} it "
                    f"({self.done / self.total:.0%}), {rate:.2f} it/s, ETA {_duration(eta)}, "
                    f"loss {'?' if self.loss is None else format(self.loss, '.4g')}, lr {lr:.2e}")


def _has_size(stream: TextIO) -> bool:
    """Whether `stream` is a terminal that reports its size (then the bar follows resizes)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return size.columns > 0 and size.lines > 0


def _duration(seconds: float) -> str:
    """12 -> "12s", 754 -> "12m34s", 7384 -> "2h03m"; NaN -> "?"."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
