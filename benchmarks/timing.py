"""The time a rank spends blocked on tensor-parallel communication, measured from outside the library.

`blocked_time()` wraps the current transport (`ladder.comm.transport()`) in a `TimedTransport` for
as long as it is entered, and puts the original back afterwards. The wrapper counts the seconds the
caller is blocked: in `Pending.wait` of every all-reduce (which includes the blocking
`comm.all_reduce`), and in the blocking `all_gather` (e.g. choosing the next token) and `broadcast`.
Compute that overlaps a reduction in flight is not counted, so a schedule that hides communication
shows less blocked time. Without a process group there is no transport and nothing to count.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch

from ladder import comm

T = TypeVar("T")


@dataclass
class BlockedClock:
    """Seconds blocked on communication since the clock was made."""

    seconds: float = 0.0

    def timed(self, blocking: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return blocking()
        finally:
            self.seconds += time.perf_counter() - started


class TimedTransport:
    """A transport that forwards every collective to `inner` and adds its blocking time to `clock`."""

    def __init__(self, inner: comm.Transport, clock: BlockedClock) -> None:
        self.inner, self.clock = inner, clock
        self.name = getattr(inner, "name", type(inner).__name__)

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> comm.Pending:
        pending = self.inner.all_reduce_start(tensor, op)
        return comm.Pending(tensor, lambda: self.clock.timed(pending.wait))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.clock.timed(lambda: self.inner.all_gather(tensor))

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.clock.timed(lambda: self.inner.broadcast(tensor, src))

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()


@contextmanager
def blocked_time() -> Iterator[BlockedClock]:
    """A clock of the time blocked on communication while the block runs (see the module docstring)."""
    clock = BlockedClock()
    inner = comm.transport()
    if inner is None:  # no process group: every collective is the identity
        yield clock
        return
    comm.set_transport(TimedTransport(inner, clock))
    try:
        yield clock
    finally:
        comm.set_transport(inner)
