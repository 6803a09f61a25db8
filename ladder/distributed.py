"""Every collective, the gloo process group, and launching ranks pinned to their cores.

Nothing else in the library calls `torch.distributed`. Without a process group (an ordinary Python
session) every collective is the identity, so a TP=1 model runs in a notebook as it is.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class CommunicationError(RuntimeError):
    """A collective failed or timed out: another rank died, hung, or never arrived."""


class LaunchError(RuntimeError):
    """One or more ranks of a launched job failed; the message has each failing rank's error."""


# The model's collectives run over the tensor-parallel group, gradients are averaged over the
# data-parallel group. None means the whole world (the default: pure tensor parallelism).
_tensor_group: Any = None
_data_group: Any = None
# Whether `init` raises gloo's threads to real-time priority (set by `apply_placement`).
_realtime_communication = True


# --- the process group ------------------------------------------------------------------------


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the gloo group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    `timeout_s` bounds every collective: a rank that dies or never arrives makes the others raise
    `CommunicationError` within it instead of hanging.
    """
    if dist.is_initialized():
        return
    rank = int(os.environ.get("RANK", "0"))
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # the store raises various types on timeout or refused connection
        raise CommunicationError(
            f"rank {rank}: could not join the gloo process group within {timeout_s:.0f}s "
            f"(did every rank start? MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
            f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
        ) from exc
    if _realtime_communication:
        _raise_communication_priority()


def shutdown() -> None:
    global _tensor_group, _data_group
    _tensor_group = _data_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def init_layout(tensor_parallel: int) -> None:
    """Split the world into `world / tensor_parallel` data-parallel replicas of one model each.

    A replica is `tensor_parallel` consecutive ranks; ranks holding the same shard in different
    replicas form a data-parallel group. Afterwards `rank()`/`world_size()` and every collective
    refer to this rank's tensor-parallel group.
    """
    global _tensor_group, _data_group
    world = global_world_size()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(f"tensor-parallel size {tensor_parallel} does not divide the world of {world} ranks")
    if tensor_parallel == world:
        _tensor_group = _data_group = None
        return
    me = global_rank()
    # Every rank must create every group, in the same order.
    for first in range(0, world, tensor_parallel):
        group = dist.new_group(list(range(first, first + tensor_parallel)))
        if first <= me < first + tensor_parallel:
            _tensor_group = group
    for offset in range(tensor_parallel):
        group = dist.new_group(list(range(offset, world, tensor_parallel)))
        if me % tensor_parallel == offset:
            _data_group = group
    if _realtime_communication:
        _raise_communication_priority()  # the new groups brought threads of their own


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def global_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This rank's index in its tensor-parallel group (the whole world unless `init_layout` split it)."""
    return dist.get_rank(_tensor_group) if dist.is_initialized() else 0


def world_size() -> int:
    """The tensor-parallel size (the whole world unless `init_layout` split it)."""
    return dist.get_world_size(_tensor_group) if dist.is_initialized() else 1


def data_parallel_rank() -> int:
    return dist.get_rank(_data_group) if _data_group is not None else 0


def data_parallel_size() -> int:
    return dist.get_world_size(_data_group) if _data_group is not None else 1


def _failed(op: str, exc: Exception) -> CommunicationError:
    return CommunicationError(
        f"rank {global_rank()}: {op} failed (did another rank die, hang or disagree?): {str(exc).splitlines()[0]}"
    )


# --- collectives ------------------------------------------------------------------------------


class WaitClock:
    """Seconds this process spent blocked on communication, counted only while `enabled`: in
    `Pending.wait` and in the blocking `all_reduce` and `all_gather` (e.g. choosing the next token).

    Benchmarks switch it on to see how much communication a schedule leaves exposed; off (the
    default) it costs one attribute check per wait.
    """

    enabled = False
    seconds = 0.0

    @classmethod
    def start(cls) -> None:
        cls.enabled, cls.seconds = True, 0.0

    @classmethod
    def stop(cls) -> float:
        cls.enabled = False
        return cls.seconds


class Pending:
    """An all-reduce in flight; `wait()` returns the reduced tensor (exactly once)."""

    __slots__ = ("_tensor", "_work")

    def __init__(self, tensor: torch.Tensor, work: Any = None) -> None:
        self._tensor = tensor
        self._work = work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            started = time.perf_counter() if WaitClock.enabled else 0.0
            try:
                self._work.wait()
            except Exception as exc:
                raise _failed("all_reduce", exc) from exc
            if WaitClock.enabled:
                WaitClock.seconds += time.perf_counter() - started
            self._work = None
        return self._tensor


def all_reduce_start(tensor: torch.Tensor) -> Pending:
    """Launch a sum all-reduce of `tensor` in place on gloo's threads; compute goes on meanwhile."""
    if world_size() == 1:
        return Pending(tensor)
    try:
        return Pending(tensor, dist.all_reduce(tensor, group=_tensor_group, async_op=True))
    except Exception as exc:
        raise _failed("all_reduce", exc) from exc


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) across ranks, in place, blocking."""
    if world_size() > 1:
        started = time.perf_counter()
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM,
                            group=_tensor_group)
        except Exception as exc:
            raise _failed(f"all_reduce({op})", exc) from exc
        if WaitClock.enabled:
            WaitClock.seconds += time.perf_counter() - started
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Stack every rank's `tensor` (same shape on all ranks) along a new leading axis."""
    if world_size() == 1:
        return tensor.unsqueeze(0)
    flat = tensor.reshape(1, -1).contiguous()
    out = flat.new_empty((world_size(), flat.shape[1]))
    started = time.perf_counter()
    try:
        dist.all_gather_single(out, flat, group=_tensor_group)
    except Exception as exc:
        raise _failed("all_gather", exc) from exc
    if WaitClock.enabled:
        WaitClock.seconds += time.perf_counter() - started
    return out.view(world_size(), *tensor.shape)


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if world_size() > 1:
        try:
            dist.broadcast(tensor, group=_tensor_group, group_src=src)
        except Exception as exc:
            raise _failed("broadcast", exc) from exc
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a small picklable object (e.g. a list of prompts' token ids) from `src` to every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    try:
        dist.broadcast_object_list(box, group=_tensor_group, group_src=src)
    except Exception as exc:
        raise _failed("broadcast_object", exc) from exc
    return box[0]


def barrier() -> None:
    """Wait for every rank of the whole world (all replicas, not only this tensor-parallel group)."""
    if global_world_size() > 1:
        try:
            dist.barrier()
        except Exception as exc:
            raise _failed("barrier", exc) from exc


def gather_objects(obj: Any) -> list[Any] | None:
    """Every tensor-parallel rank's `obj` (e.g. its shard of a tensor), on that group's rank 0 only."""
    if world_size() == 1:
        return [obj]
    box: list[Any] | None = [None] * world_size() if rank() == 0 else None
    try:
        dist.gather_object(obj, box, group=_tensor_group, group_dst=0)
    except Exception as exc:
        raise _failed("gather_object", exc) from exc
    return box


def all_reduce_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel replicas, in place (e.g. evaluation losses); identity without them."""
    if _data_group is not None and data_parallel_size() > 1:
        try:
            dist.all_reduce(tensor, group=_data_group)
        except Exception as exc:
            raise _failed("all_reduce(data parallel)", exc) from exc
    return tensor


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """`module` wrapped in torch's DistributedDataParallel over the data-parallel group (if any).

    DDP averages the gradients of the replicas during backward; the tensor-parallel collectives
    inside the model keep running on their own group meanwhile.
    """
    if data_parallel_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, process_group=_data_group)


# --- autograd-aware collectives (Megatron's "f" and "g") ------------------------------------------


class _CopyToParallel(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward (before column-parallel inputs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce(grad.contiguous().clone())


class _ReduceFromParallel(torch.autograd.Function):
    """g: all-reduce forward (started asynchronously), identity backward (after row-parallel outputs)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, box: list) -> torch.Tensor:
        out = x.contiguous().clone()
        box.append(all_reduce_start(out))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_parallel(x: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and x.requires_grad) or world_size() == 1:
        return x
    return _CopyToParallel.apply(x)


def reduce_from_parallel_start(partial: torch.Tensor) -> Pending:
    """Start summing per-rank partial outputs; differentiable when autograd is recording."""
    if not (torch.is_grad_enabled() and partial.requires_grad) or world_size() == 1:
        return all_reduce_start(partial)
    box: list[Pending] = []
    _ReduceFromParallel.apply(partial, box)  # returns the very tensor that box[0] is reducing
    return box[0]


# --- launching ranks --------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Which cores a rank may run on and how many torch threads it uses.

    `pin=False` (the default) leaves every rank free to run on any core: measured here, pinning a
    rank to one core starves gloo's communication threads (DESIGN.md section 5). `cores` lists
    each rank's core set explicitly and overrides the even split that `pin=True` makes.

    `realtime_communication` (the default) gives gloo's threads real-time priority, so a reduction
    moves as soon as its data arrives instead of waiting until a busy compute thread yields its
    core: on 2 cores this made TP=2 decode of SmolLM2 about 1.9x faster (benchmarks/, `ladder
    bench`). It needs root or CAP_SYS_NICE and is skipped without them.
    """

    pin: bool = False
    threads: int | None = None
    cores: Sequence[Sequence[int]] | None = None
    realtime_communication: bool = True

    def cores_for(self, rank: int, world: int) -> list[int] | None:
        if self.cores is not None:
            return list(self.cores[rank % len(self.cores)])
        if not self.pin:
            return None
        available = sorted(os.sched_getaffinity(0))
        share = max(1, len(available) // world)
        start = (rank * share) % len(available)
        return available[start:start + share]

    def threads_for(self, rank: int, world: int) -> int:
        if self.threads is not None:
            return self.threads
        cores = self.cores_for(rank, world)
        return len(cores) if cores else max(1, len(os.sched_getaffinity(0)) // world)


def apply_placement(placement: Placement, rank: int, world: int) -> None:
    """Pin and size this process as `placement` says; call before `init` (which starts gloo's threads)."""
    global _realtime_communication
    cores = placement.cores_for(rank, world)
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(placement.threads_for(rank, world))
    _realtime_communication = placement.realtime_communication


def _raise_communication_priority() -> bool:
    """SCHED_FIFO for gloo's threads (after a barrier, so that they exist and carry their names).

    They sleep until data arrives and run briefly, so they cannot starve compute; the kernel's
    real-time throttling bounds them anyway. Returns False where the priority cannot be raised.
    """
    barrier()
    raised = False
    for task in Path("/proc/self/task").iterdir():
        try:
            if "gloo" in (task / "comm").read_text():
                os.sched_setscheduler(int(task.name), os.SCHED_FIFO, os.sched_param(1))
                raised = True
        except PermissionError:  # neither root nor CAP_SYS_NICE
            return False
        except OSError:  # the thread ended meanwhile
            continue
    return raised


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, placement: Placement,
               timeout_s: float, results: Any, args: tuple, kwargs: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        apply_placement(placement, rank, world)
        init(timeout_s)
        # Plain pickle sends tensors by value: a shared-memory handle would die with this process.
        results.put((rank, True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        shutdown()


def launch(fn: Callable[..., Any], world: int, *args: Any, placement: Placement | None = None,
           timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world` local gloo ranks and return each rank's result.

    `fn` must be importable (a module-level function). If a rank fails, the others get
    `timeout_s` (plus a margin) to notice on their own before they are killed, and `LaunchError`
    reports every rank's failure.
    """
    placement = placement or Placement()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, daemon=True,
                         args=(fn, r, world, port, placement, timeout_s, results, args, kwargs))
             for r in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    first_failure: float | None = None
    grace = timeout_s + 10.0
    while len(outcomes) < world:
        try:
            r, ok, value = results.get(timeout=0.05)
            outcomes[r] = (ok, value)
            if not ok and first_failure is None:
                first_failure = time.monotonic()
            continue
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in outcomes and not p.is_alive() and p.exitcode != 0:
                # Give a dead rank's last message a moment to arrive before recording a bare exit.
                time.sleep(0.2)
                while True:
                    try:
                        r2, ok, value = results.get_nowait()
                        outcomes[r2] = (ok, value)
                    except queue.Empty:
                        break
                if r not in outcomes:
                    outcomes[r] = (False, f"rank {r} exited with code {p.exitcode} without a result")
                first_failure = first_failure or time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > grace:
            for r, p in enumerate(procs):
                if r not in outcomes:
                    p.kill()
                    outcomes[r] = (False, f"rank {r} was killed: still running {grace:.0f}s after a failure")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    failures = {r: msg for r, (ok, msg) in sorted(outcomes.items()) if not ok}
    if failures:
        detail = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in failures.items())
        raise LaunchError(f"{len(failures)} of {world} ranks failed:\n{detail}")
    return [pickle.loads(outcomes[r][1]) for r in range(world)]
