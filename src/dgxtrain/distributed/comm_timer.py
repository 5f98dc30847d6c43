"""How long the backward's end waited for the gradient all-reduce, timed on the device.

DDP's own runtime logging takes host timestamps. On CPU ranks that is the collective's time,
but on GPUs it is when the work was enqueued, not when NCCL ran it. On GPUs, then, the comm
hook is wrapped: an event on the compute stream when a bucket is handed over (its gradients
are computed), and one when its all-reduce has finished. The second is recorded in the
future's callback, which runs on a stream that waits for NCCL's kernels (torch.futures:
"the callback will be invoked with some dedicated streams set as current ... synchronized
with those kernels"). Events cost no sync; they are read on log steps, after the
PhaseClock's sync.

The wait is from the last bucket's hand-over, the end of the backward's compute, to the end
of the last all-reduce. NCCL runs the buckets in order on one stream, so that one ends last.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch


class HostEvent:
    """torch.cuda.Event's timing interface on the host clock (CPU ranks, tests)."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: HostEvent) -> float:
        return (end.t - self.t) * 1e3  # ms, as CUDA events give it


class CommTimer:
    """A DDP comm hook around another one, `inner(inner_state, bucket)`, that times each
    backward's last all-reduce. Register it as `ddp.register_comm_hook(timer, CommTimer.hook)`."""

    def __init__(self, inner: Callable[[Any, Any], torch.futures.Future], inner_state: Any,
                 event: Callable[..., Any] = torch.cuda.Event):
        self.inner, self.inner_state, self.event = inner, inner_state, event
        # Two pairs of events, used in turn: a backward records into one while the other
        # holds the last finished one's times. Made once: nothing is allocated per step.
        self._pairs: list[tuple[Any, Any]] = []
        self._turn = 0
        self._last: tuple[Any, Any] | None = None  # the last finished backward's

    @staticmethod
    def hook(timer, bucket):  # noqa: ANN001, ANN205 (DDP checks a hook's annotations, if any)
        if not bucket.is_last():  # only the last bucket's hand-over and end are timed
            return timer.inner(timer.inner_state, bucket)
        if not timer._pairs:
            timer._pairs = [(timer.event(enable_timing=True), timer.event(enable_timing=True))
                            for _ in range(2)]
        pair = timer._pairs[timer._turn]
        timer._turn ^= 1
        pair[0].record()

        def finished(fut):  # noqa: ANN001, ANN202
            pair[1].record()
            timer._last = pair
            return fut.value()

        return timer.inner(timer.inner_state, bucket).then(finished)

    def last_wait_s(self) -> float:
        """The last timed backward's wait for its all-reduces (0 before one has finished).
        On GPUs, read it only once the device has caught up (a log step's sync)."""
        if self._last is None:
            return 0.0
        start, end = self._last
        return max(0.0, start.elapsed_time(end) / 1e3)
