"""Every collective the library makes, the process groups they run over, and the autograd f/g pair.

Nothing else in the library calls `torch.distributed`. Without a process group (an ordinary Python
session) every collective is the identity, so a TP=1 model runs in a notebook as it is.

The tensor-parallel collectives go through a `Transport` (`ladder.comm.transport`): shared memory
when every rank of the group shares a host, gloo between hosts, optionally behind an emulated link.
Callers never see which.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ladder.comm.emulated import EmulatedLink, Link
from ladder.comm.local import make_transport
from ladder.comm.transport import CommunicationError, Pending, Reduction, Transport, failed

__all__ = ["CommunicationError", "Pending", "Reduction", "Transport"]

DEFAULT_TIMEOUT_S = 60.0
MAX_JSON_BYTES = 64 * 2**20  # a peer's JSON message (prompts, a verdict) larger than this is refused


@dataclass
class _Groups:
    """The process groups of this rank. `tensor`/`data` None mean the whole world / no data parallelism."""

    tensor: Any = None
    data: Any = None
    transport: Transport | None = None
    realtime_threads: bool = True
    transport_choice: str = "auto"
    link: Link | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S


_groups = _Groups()

TRANSPORTS = ("auto", "shm", "gloo")
TRANSPORT_ENV = "LADDER_COMM"  # how torchrun users choose the transport
LINK_ENV = "LADDER_LINK"  # and an emulated link, e.g. latency=200us,bandwidth=10gbit


# --- the process groups -----------------------------------------------------------------------


def init(timeout_s: float = DEFAULT_TIMEOUT_S, realtime_threads: bool = True, transport: str | None = None,
         link: str | None = None, loopback: bool = False) -> None:
    """Join the gloo group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    `timeout_s` bounds every collective: a rank that dies or never arrives makes the others raise
    `CommunicationError` within it instead of hanging. `realtime_threads` gives gloo's threads
    real-time priority (see `_raise_gloo_priority`). `transport` is auto, shm or gloo (default: the
    LADDER_COMM environment variable, else auto): auto and shm use shared memory among the ranks of
    each host and gloo between hosts; auto uses plain gloo where no two ranks share a host. `link`
    (default: LADDER_LINK) puts the tensor-parallel collectives behind an emulated link
    (`ladder.comm.emulated`), e.g. "latency=200us,bandwidth=10gbit". `loopback` (a job on one host)
    makes the rendezvous store listen on 127.0.0.1 only, where torch's own listens on every interface.
    """
    global _groups
    if dist.is_initialized():
        return
    choice = transport or os.environ.get(TRANSPORT_ENV, "auto")
    if choice not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {choice!r}")
    link = link or os.environ.get(LINK_ENV)
    emulated = Link.parse(link) if link else None
    rank = int(os.environ.get("RANK", "0"))
    try:
        if loopback:
            world = int(os.environ["WORLD_SIZE"])
            store = _loopback_store(rank, world, int(os.environ["MASTER_PORT"]), timeout_s)
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s), store=store, rank=rank,
                                    world_size=world)
        else:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # the store raises various types on timeout or refused connection
        raise CommunicationError(
            f"rank {rank}: could not join the gloo process group within {timeout_s:.0f}s "
            f"(did every rank start? MASTER_ADDR={os.environ.get('MASTER_ADDR')} "
            f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
        ) from exc
    _groups = _Groups(realtime_threads=realtime_threads, transport_choice=choice, link=emulated, timeout_s=timeout_s)
    _groups.transport = _make_transport(None)
    if realtime_threads:
        _raise_gloo_priority()


def _loopback_store(rank: int, world: int, port: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous store of a one-host job: rank 0 serves it from a socket bound to 127.0.0.1."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore("127.0.0.1", port, world, False, timeout)
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen()
    return dist.TCPStore("127.0.0.1", port, world, True, timeout, master_listen_fd=listener.detach())


def shutdown(failing: bool = False) -> None:
    """Leave the process group. `failing`: this rank is dying of an error, so the peers' waits on it
    fail at once rather than at their timeout."""
    global _groups
    if _groups.transport is not None:
        if failing:
            _groups.transport.abort()
        _groups.transport.close()
    _groups = _Groups()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_layout(tensor_parallel: int) -> None:
    """Split the world into `world / tensor_parallel` data-parallel replicas of one model each.

    A replica is `tensor_parallel` consecutive ranks; ranks holding the same shard in different
    replicas form a data-parallel group. Afterwards `tp_rank()`/`tp_size()` and every collective
    refer to this rank's tensor-parallel group.
    """
    world = global_world_size()
    if tensor_parallel < 1 or world % tensor_parallel:
        raise ValueError(f"tensor-parallel size {tensor_parallel} does not divide the world of {world} ranks")
    if tensor_parallel == world:
        return
    me = global_rank()
    # Every rank must create every group, in the same order.
    for first in range(0, world, tensor_parallel):
        group = dist.new_group(list(range(first, first + tensor_parallel)))
        if first <= me < first + tensor_parallel:
            _groups.tensor = group
    for offset in range(tensor_parallel):
        group = dist.new_group(list(range(offset, world, tensor_parallel)))
        if me % tensor_parallel == offset:
            _groups.data = group
    if _groups.transport is not None:
        _groups.transport.close()
    _groups.transport = _make_transport(_groups.tensor)
    if _groups.realtime_threads:
        _raise_gloo_priority()  # the new groups brought threads of their own


def _make_transport(group: Any) -> Transport | None:
    """The transport of `group`: None for a group of one, which has nothing to exchange."""
    if dist.get_world_size(group) == 1:
        return None
    try:
        inner = make_transport(group, _groups.transport_choice, _groups.timeout_s)
    except OSError as exc:  # no room or no permission for a segment
        raise CommunicationError(f"rank {global_rank()}: cannot set up shared memory ({exc}); "
                                 "pass --comm gloo to do without it") from exc
    return EmulatedLink(inner, _groups.link) if _groups.link else inner


def transport() -> Transport | None:
    """The tensor-parallel group's transport (None without a process group or at TP=1)."""
    return _groups.transport


def set_transport(new: Transport | None) -> Transport | None:
    """Route the tensor-parallel collectives through `new` (e.g. a timing wrapper); returns the old one."""
    old, _groups.transport = _groups.transport, new
    return old


def global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def global_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def tp_rank() -> int:
    """This rank's index in its tensor-parallel group (the whole world unless `init_layout` split it)."""
    return dist.get_rank(_groups.tensor) if dist.is_initialized() else 0


def tp_size() -> int:
    """The tensor-parallel size (the whole world unless `init_layout` split it)."""
    return dist.get_world_size(_groups.tensor) if dist.is_initialized() else 1


def data_parallel_rank() -> int:
    return dist.get_rank(_groups.data) if _groups.data is not None else 0


def data_parallel_size() -> int:
    return dist.get_world_size(_groups.data) if _groups.data is not None else 1


# --- collectives over the tensor-parallel group ------------------------------------------------


def all_reduce_start(tensor: torch.Tensor, op: str = "sum") -> Reduction:
    """Start a sum (or max) all-reduce of `tensor` in place; compute goes on until `wait()`."""
    if _groups.transport is None:
        return Pending(tensor)
    return _groups.transport.all_reduce_start(tensor, op)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) across ranks, in place, blocking."""
    return all_reduce_start(tensor, op).wait()


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Stack every rank's `tensor` (same shape on all ranks) along a new leading axis."""
    if _groups.transport is None:
        return tensor.unsqueeze(0)
    return _groups.transport.all_gather(tensor.contiguous())


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if _groups.transport is not None:
        _groups.transport.broadcast(tensor, src)
    return tensor


# Nothing a peer sends is unpickled: values travel as JSON text and tensors as their raw bytes, so a
# peer (or anyone who reaches the rendezvous port) can send wrong data but never run code.


def broadcast_json(value: Any, src: int = 0) -> Any:
    """Send a JSON value (e.g. prompts' token ids) from tensor-parallel rank `src` to every rank."""
    if tp_size() == 1:
        return value
    data = json.dumps(value).encode() if tp_rank() == src else b""
    try:
        length = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(length, group=_groups.tensor, group_src=src)
        _check_length(int(length))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(int(length),
                                                                                              dtype=torch.uint8)
        dist.broadcast(buffer, group=_groups.tensor, group_src=src)
    except Exception as exc:
        raise failed("broadcast_json", exc) from exc
    return json.loads(buffer.numpy().tobytes())


def gather_tensors(tensor: torch.Tensor | None) -> list[torch.Tensor | None] | None:
    """Every tensor-parallel rank's `tensor` (any shape and dtype, or None), on that group's rank 0 only."""
    if tp_size() == 1:
        return [tensor]
    described = None if tensor is None else {"shape": list(tensor.shape), "dtype": str(tensor.dtype)}
    try:
        if tp_rank() != 0:
            _send_bytes(json.dumps(described).encode())
            if tensor is not None:
                dist.send(_raw(tensor), group=_groups.tensor, group_dst=0)
            return None
        out: list[torch.Tensor | None] = [tensor]
        for peer in range(1, tp_size()):
            received = json.loads(_receive_bytes(peer))
            if received is None:
                out.append(None)
                continue
            dtype = _DTYPES_BY_NAME[received["dtype"]]
            shape = [int(n) for n in received["shape"]]
            raw = torch.empty(math.prod(shape) * dtype.itemsize, dtype=torch.uint8)
            dist.recv(raw, group=_groups.tensor, group_src=peer)
            out.append(raw.view(dtype).reshape(shape))
        return out
    except Exception as exc:
        raise failed("gather_tensors", exc) from exc


_DTYPES_BY_NAME = {str(d): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64,
                                        torch.int32, torch.int8, torch.uint8, torch.bool)}


def _check_length(length: int) -> None:
    if not 0 < length <= MAX_JSON_BYTES:
        raise ValueError(f"a peer announced a message of {length} bytes (at most {MAX_JSON_BYTES})")


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _send_bytes(data: bytes) -> None:
    dist.send(torch.tensor([len(data)], dtype=torch.int64), group=_groups.tensor, group_dst=0)
    dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), group=_groups.tensor, group_dst=0)


def _receive_bytes(peer: int) -> bytes:
    length = torch.empty(1, dtype=torch.int64)
    dist.recv(length, group=_groups.tensor, group_src=peer)
    _check_length(int(length))
    data = torch.empty(int(length), dtype=torch.uint8)
    dist.recv(data, group=_groups.tensor, group_src=peer)
    return data.numpy().tobytes()


# --- the whole world and the data-parallel group -----------------------------------------------


def barrier() -> None:
    """Wait for every rank of the whole world (all replicas, not only this tensor-parallel group)."""
    if global_world_size() > 1:
        try:
            dist.barrier()
        except Exception as exc:
            raise failed("barrier", exc) from exc


def all_reduce_data_parallel(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the data-parallel replicas, in place (e.g. evaluation losses); identity without them."""
    if data_parallel_size() > 1:
        try:
            dist.all_reduce(tensor, group=_groups.data)
        except Exception as exc:
            raise failed("all_reduce(data parallel)", exc) from exc
    return tensor


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """`module` wrapped in torch's DistributedDataParallel over the data-parallel group (if any).

    DDP averages the gradients of the replicas during backward; the tensor-parallel collectives
    inside the model keep running on their own group meanwhile.
    """
    if data_parallel_size() == 1:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, process_group=_groups.data)


def _raise_gloo_priority() -> None:
    """SCHED_FIFO for gloo's threads (after a barrier, so that they exist and carry their names).

    They sleep until data arrives and run briefly, so they cannot starve compute; the kernel's
    real-time throttling bounds them anyway. Without root or CAP_SYS_NICE this does nothing.
    """
    barrier()
    for task in Path("/proc/self/task").iterdir():
        try:
            if "gloo" in (task / "comm").read_text():
                os.sched_setscheduler(int(task.name), os.SCHED_FIFO, os.sched_param(1))
        except PermissionError:
            return
        except OSError:  # the thread ended meanwhile
            continue


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
    if not (torch.is_grad_enabled() and x.requires_grad) or _groups.transport is None:
        return x
    return _CopyToParallel.apply(x)


def reduce_from_parallel_start(partial: torch.Tensor) -> Reduction:
    """Start summing per-rank partial outputs; differentiable when autograd is recording."""
    if not (torch.is_grad_enabled() and partial.requires_grad) or _groups.transport is None:
        return all_reduce_start(partial)
    box: list[Reduction] = []
    _ReduceFromParallel.apply(partial, box)  # returns the very tensor that box[0] is reducing
    return box[0]
