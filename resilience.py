"""Long runs on shared clusters: stop requests every rank agrees on, and the policy for non-finite steps.

``StopRequest`` turns SIGTERM/SIGUSR1, the first Ctrl-C (SIGINT) and a wall-time limit into one answer that
every rank reads at the same iteration (the loop then saves and exits: 0, or 130 after Ctrl-C);
``SkipWatch`` decides when skipped steps mean the run is diverging.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

import mpu
from errors import NonFiniteError
from initialize import print_rank_0

CTRL_C = "received SIGINT"  # the reason() of a first Ctrl-C


class StopRequest:
    """SIGTERM / SIGUSR1 and ``--exit-duration-in-mins``, agreed by every rank at the end of an iteration.

    The handlers only record the signal; ``reason()`` (one tiny all-reduce over the job, MAX) tells
    every rank the same answer at the same iteration, so all of them save and exit together. The
    wall-time limit is judged on rank 0 alone. A second signal of the same kind acts as it did before
    (SIGTERM then terminates at once, a second Ctrl-C raises ``KeyboardInterrupt``).
    """

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self, exit_duration_in_mins: float | None = None) -> None:
        self.received: int | None = None
        minutes = exit_duration_in_mins
        self.deadline = None if minutes is None else time.monotonic() + 60.0 * minutes
        self.minutes = minutes
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for name in self.SIGNALS:
                signum = getattr(signal, name, None)
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def restore(self) -> None:
        """Put the handlers that were there before back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def reason(self) -> str | None:
        """Why every rank should stop now (the same on all of them), or None."""
        rank0 = mpu.is_rank_0()
        flags = torch.tensor([
            float(self.received or 0),
            1.0 if rank0 and self.deadline is not None and time.monotonic() >= self.deadline else 0.0,
        ])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = flags.to(mpu.collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, timed_out = int(flags[0].item()), bool(flags[1].item() > 0)
        if signum:
            return f"received {signal.Signals(signum).name}"
        if timed_out:
            return f"--exit-duration-in-mins {self.minutes:g} reached"
        return None


class SkipWatch:
    """Counts skipped steps: stops a run that skips more than ``max_fraction`` of the last ``window``
    steps, or (``abort``, ``--abort-on-nonfinite``) any skip that is not an expected fp16 overflow.

    Under fp16 with a dynamic loss scale (``overflow_expected``) an overflow is how the scale finds its
    level, not a divergence: it is counted but neither printed nor fatal on its own.
    """

    def __init__(self, window: int, max_fraction: float, abort: bool = False, overflow_expected: bool = False) -> None:
        self.recent: deque[bool] = deque(maxlen=window)
        self.max_fraction = max_fraction
        self.abort = abort
        self.overflow_expected = overflow_expected

    def add(self, iteration: int, skipped: bool, loss_scale: float) -> None:
        """Record one iteration; raise ``NonFiniteError`` (on every rank alike) when the run must stop."""
        self.recent.append(skipped)
        if skipped and not self.overflow_expected:
            if self.abort:
                raise NonFiniteError(f"iteration {iteration}: the loss or gradient norm is not finite; stopping "
                                     "without saving (--abort-on-nonfinite); resume from the last checkpoint, "
                                     "perhaps with a lower --lr")
            print_rank_0(f"iteration {iteration}: the loss or gradient norm is not finite; the step was skipped "
                         "on every rank")
        window = self.recent.maxlen
        if len(self.recent) == window and sum(self.recent) > self.max_fraction * window:
            raise NonFiniteError(
                f"iteration {iteration}: {sum(self.recent)} of the last {window} steps were skipped (more than "
                f"--max-skipped-fraction {self.max_fraction:g}; loss scale {loss_scale:g}): the run "
                "is diverging; resume from the last checkpoint with a lower --lr or more --warmup")
