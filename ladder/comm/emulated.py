"""An emulated interconnect: every collective completes no earlier than latency + bytes / bandwidth
after it started, whatever the real transport underneath took.

It models the link the ladder was designed for (GPUs over NVLink or PCIe, nodes over a network)
on one CPU host, to plan for such links and to measure how much of a link's delay each residual
schedule hides. It moves no data and starts no thread: a wait looks at the deadline and sleeps
until it (spinning only through the last tens of microseconds, because a sleep wakes late), so the
waiting rank's core stays almost free, as it would behind a real link. Reports that use it say so.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch

from ladder.comm.transport import Reduction, Transport

_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}  # per second
_RATES = {"bit": 1.0, "kbit": 1e-3, "mbit": 1e-6, "gbit": 1e-9}  # per bit/s
# Sleeping wakes a little late; the last stretch before a deadline is spun instead.
_SPIN_TAIL_S = 60e-6


@dataclass(frozen=True)
class Link:
    """A link's one-way latency (seconds) and bandwidth (bits per second; 0 = unlimited)."""

    latency_s: float = 0.0
    bandwidth_bps: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Link:
        """`latency=200us,bandwidth=10gbit` (either part may be left out)."""
        fields: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, _, value = part.partition("=")
            match = re.fullmatch(r"([0-9.]+(?:e-?[0-9]+)?)\s*([a-z]+)", value.strip().lower())
            table = _UNITS if key == "latency" else _RATES if key == "bandwidth" else None
            if table is None or match is None or match[2] not in table:
                raise ValueError(f"link {spec!r}: expected latency=<number><{'|'.join(_UNITS)}> and/or "
                                 f"bandwidth=<number><{'|'.join(_RATES)}>, e.g. latency=200us,bandwidth=10gbit")
            fields[key] = float(match[1]) / table[match[2]]
        return cls(fields.get("latency", 0.0), fields.get("bandwidth", 0.0))

    def seconds(self, tensor: torch.Tensor) -> float:
        """How long `tensor` takes to cross the link."""
        wire = tensor.nbytes * 8 / self.bandwidth_bps if self.bandwidth_bps else 0.0
        return self.latency_s + wire

    def __str__(self) -> str:
        rate = f", {self.bandwidth_bps / 1e9:g} Gbit/s" if self.bandwidth_bps else ""
        return f"emulated link: {self.latency_s * 1e6:g} us latency{rate}"


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > _SPIN_TAIL_S:
        time.sleep(remaining - _SPIN_TAIL_S)
    while time.perf_counter() < deadline:
        pass


class _Delayed:
    __slots__ = ("_deadline", "_inner")

    def __init__(self, inner: Reduction, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def wait(self) -> torch.Tensor:
        result = self._inner.wait()
        _sleep_until(self._deadline)
        return result


class EmulatedLink:
    """`inner` (the real transport) behind a slower link."""

    def __init__(self, inner: Transport, link: Link) -> None:
        self.inner, self.link = inner, link
        self.name = f"{inner.name} + {link}"

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> Reduction:
        deadline = time.perf_counter() + self.link.seconds(tensor)
        return _Delayed(self.inner.all_reduce_start(tensor, op), deadline)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        deadline = time.perf_counter() + self.link.seconds(tensor)
        out = self.inner.all_gather(tensor)
        _sleep_until(deadline)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        deadline = time.perf_counter() + self.link.seconds(tensor)
        self.inner.broadcast(tensor, src)
        _sleep_until(deadline)

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()
