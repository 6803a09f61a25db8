"""How a group's collectives move data: the `Transport` interface and the gloo transport.

A transport works in place on contiguous tensors and reports every failure as `CommunicationError`
naming this rank and the collective. Only all-reduce is split-phase (`start` now, `wait` later),
because only the residual stream has work to overlap with it; gathers and broadcasts block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist


class CommunicationError(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or never arrived."""


class Pending:
    """A reduction in flight; `wait()` runs `finish` (once) and returns the reduced tensor."""

    __slots__ = ("_finish", "_tensor")

    def __init__(self, tensor: torch.Tensor, finish: Callable[[], object] | None = None) -> None:
        self._tensor = tensor
        self._finish = finish

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()
        return self._tensor


class Reduction(Protocol):
    """An all-reduce in flight (a `Pending`, or a transport's own kind)."""

    def wait(self) -> torch.Tensor: ...


class Transport(Protocol):
    """How one group's collectives move data. All of them work in place on contiguous tensors."""

    name: str

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> Reduction: ...
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...  # [world, *tensor.shape]
    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...
    def abort(self) -> None: ...  # this rank is failing: let the peers know at once, where possible
    def close(self) -> None: ...


def failed(op: str, exc: BaseException) -> CommunicationError:
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    rank = dist.get_rank() if dist.is_initialized() else 0
    return CommunicationError(f"rank {rank}: {op} failed (did another rank die, hang or disagree?): {detail}")


class GlooTransport:
    """torch.distributed's gloo backend: each collective runs on gloo's own worker threads."""

    name = "gloo"

    def __init__(self, group: Any) -> None:
        self.group = group

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> Pending:
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        try:
            work = dist.all_reduce(tensor, op=reduce_op, group=self.group, async_op=True)
        except Exception as exc:
            raise failed(f"all_reduce({op})", exc) from exc

        def finish() -> None:
            try:
                work.wait()
            except Exception as exc:
                raise failed(f"all_reduce({op})", exc) from exc
        return Pending(tensor, finish)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.new_empty((dist.get_world_size(self.group), tensor.numel()))
        try:
            dist.all_gather_single(out, tensor.reshape(1, -1), group=self.group)
        except Exception as exc:
            raise failed("all_gather", exc) from exc
        return out.view(-1, *tensor.shape)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        try:
            dist.broadcast(tensor, group=self.group, group_src=src)
        except Exception as exc:
            raise failed("broadcast", exc) from exc

    def abort(self) -> None:
        pass  # gloo's peers notice a dead connection by themselves

    def close(self) -> None:
        pass
