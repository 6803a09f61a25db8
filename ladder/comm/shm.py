"""Collectives between the ranks of one host through shared memory, split into `start` and `wait`.

gloo hands every message between the caller, its worker threads and a TCP loop, which costs CPU on
the very cores that compute (the README has the figures). Here `start` copies this rank's partial into its slot of a
segment every rank has mapped and publishes it by storing a sequence number; `wait` waits until
every peer has published that number, sums the partials in rank order (so every rank gets bitwise
the same result) and stores that it has consumed them. Nothing is woken and no system call is made
when the peers are on time. The hot paths are C (`_shm.c`, which explains the memory ordering).

The segment, created by one rank (`create_segment`) and attached by every rank (`SharedMemoryGroup`):

    header   64 bytes: magic, version, world, slots, slot_bytes
    control  one 128-byte block per rank: published, consumed, pid, pid namespace, aborted
    data     per rank, `slots` slots of `slot_bytes`: rank r's slot s at data + (r * slots + s) * slot_bytes

Every collective is an op numbered 1, 2, ... in issue order; as with any collective library, every
rank issues the same collectives in the same order with the same shapes. Op n uses slot n % slots,
and a tensor larger than a slot is split into consecutive ops, one per chunk. A rank publishes its
ops strictly in order and only into a slot every rank has finished reading, which bounds the ops in
flight to `slots` and keeps every rank's sequence of steps the same: no rank can wait on a step its
peers are not bound to take, so there is no deadlock.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import secrets
import struct
import tempfile
from collections import deque

import torch

from ladder.comm import _shm
from ladder.comm.transport import CommunicationError

DEFAULT_SLOTS = 8
DEFAULT_SLOT_BYTES = 256 * 1024
# How long a waiting rank spins before it starts yielding its core. A peer that publishes within the
# spin wakes the waiter at once even with other processes runnable, while one that comes later, in
# the yield phase, can cost a whole time slice once the core was handed to them; 50 us covers the
# usual skew between ranks. Ranks that share a core do not spin at all: it would only delay the peer.
DEFAULT_SPIN_US = 50.0

_MAGIC = b"ladrshm\0"
_VERSION = 1
_HEADER = struct.Struct("<8sQQQQ")  # magic, version, world, slots, slot_bytes
_HEADER_BYTES = 64
_ALIGN = 64  # cache line: slots never share a line, and vector loads stay aligned

_REDUCE_OPS = {"sum": _shm.SUM, "max": _shm.MAX}
_REDUCE_DTYPES = {torch.float32: _shm.FLOAT32, torch.bfloat16: _shm.BFLOAT16, torch.float16: _shm.FLOAT16}
REDUCIBLE = frozenset(_REDUCE_DTYPES)  # the dtypes all_reduce takes
_REDUCE, _GATHER, _BROADCAST = range(3)


class ShmError(CommunicationError):
    """A shared-memory collective failed: a peer timed out, aborted or died, or the group is unusable."""


def _segment_bytes(world: int, slots: int, slot_bytes: int) -> int:
    return _HEADER_BYTES + world * _shm.CONTROL_BYTES + world * slots * slot_bytes


def create_segment(world: int, slots: int = DEFAULT_SLOTS, slot_bytes: int = DEFAULT_SLOT_BYTES) -> str:
    """Create a zeroed segment for `world` ranks and return its path (one rank calls this).

    The name is random and created exclusively with mode 0600, so no other user can guess, pre-create
    or read it. `slot_bytes` is rounded up to a cache line. /dev/shm keeps it in memory; without one
    (not Linux) the temp directory stands in.
    """
    if world < 1 or slots < 1 or slot_bytes < 1:
        raise ValueError(f"world, slots and slot_bytes must be positive, got {world}, {slots}, {slot_bytes}")
    slot_bytes = -(-slot_bytes // _ALIGN) * _ALIGN
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"ladder-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, _segment_bytes(world, slots, slot_bytes))
        os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, world, slots, slot_bytes), 0)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)
    return path


def _pid_namespace() -> int:
    """This process's pid namespace: a peer's pid is only checkable from the same one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class ShmPending:
    """An outstanding collective. `wait()` completes it, after every op issued before it, and returns
    its result; it may be called once. Until then the input tensor must not change: a chunk that
    could not be published at start (no free slot yet) is copied in during the wait."""

    __slots__ = ("_chunks", "_dst", "_dtype", "_first", "_group", "_itemsize", "_kind", "_nbytes", "_op",
                 "_received", "_result", "_root", "_sent", "_src", "_waited")

    def __init__(self, group: SharedMemoryGroup, kind: int, tensor: torch.Tensor, result: torch.Tensor,
                 op: int = 0, dtype: int = 0, root: int = -1) -> None:
        if not (tensor.is_cpu and tensor.is_contiguous()):
            raise ValueError(f"rank {group.rank}: shared-memory collectives need a contiguous CPU tensor")
        self._group, self._kind, self._op, self._dtype, self._root = group, kind, op, dtype, root
        self._src = tensor.data_ptr()
        self._dst, self._result = self._src if result is tensor else result.data_ptr(), result
        self._nbytes, self._itemsize = tensor.nbytes, tensor.element_size()
        self._chunks = -(-self._nbytes // group._slot_bytes)
        self._first = group._next_op
        self._sent = self._received = 0
        self._waited = False

    def wait(self) -> torch.Tensor:
        if self._waited:
            raise ShmError(f"rank {self._group.rank}: wait() called twice on {self._name()} (op {self._first})")
        self._waited = True
        self._group._complete(self)
        return self._result

    def _name(self) -> str:
        if self._kind == _REDUCE:
            return f"all_reduce({'sum' if self._op == _shm.SUM else 'max'})"
        return "all_gather" if self._kind == _GATHER else f"broadcast(src={self._root})"


class SharedMemoryGroup:
    """This rank's view of a segment made by `create_segment`: collectives with the other ranks on it.

    Every wait on a peer fails after `timeout_s`, or as soon as the peer aborts or its process is
    gone. `spin_us` is how long a wait spins before yielding the core (by default `DEFAULT_SPIN_US`,
    or 0 when the ranks outnumber the machine's cores). Not thread-safe: one thread per rank issues
    the collectives, as with a process group.
    """

    def __init__(self, path: str, rank: int, world: int, timeout_s: float = 60.0, *,
                 spin_us: float | None = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside 0..{world - 1}")
        self.path, self.rank, self.world, self.timeout_s = path, rank, world, timeout_s
        fd = os.open(path, os.O_RDWR)
        try:
            header = os.pread(fd, _HEADER.size, 0).ljust(_HEADER.size, b"\0")
            magic, version, seg_world, slots, slot_bytes = _HEADER.unpack(header)
            if magic != _MAGIC or version != _VERSION:
                raise ShmError(f"rank {rank}: {path} is not a version-{_VERSION} ladder segment")
            if seg_world != world:
                raise ShmError(f"rank {rank}: {path} was made for {seg_world} ranks, this group has {world}")
            size = _segment_bytes(world, slots, slot_bytes)
            if os.fstat(fd).st_size != size:
                raise ShmError(f"rank {rank}: {path} is {os.fstat(fd).st_size} bytes, its header says {size}")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._mm))  # the temporary export ends here
        self._slots, self._slot_bytes = slots, slot_bytes
        self._controls = base + _HEADER_BYTES
        data = self._controls + world * _shm.CONTROL_BYTES
        self._rank_stride = slots * slot_bytes  # from a rank's slot s to the next rank's slot s
        self._slot_addresses = [data + s * slot_bytes for s in range(slots)]  # rank 0's; op n uses n % slots
        self._own_slots = [address + rank * self._rank_stride for address in self._slot_addresses]
        if spin_us is None:  # spinning only pays if every rank can have a core of its own
            spin_us = DEFAULT_SPIN_US if (len(os.sched_getaffinity(0)) or 1) >= world else 0.0
        self._timeout_ns, self._spin_ns = int(timeout_s * 1e9), int(spin_us * 1e3)
        self._next_op = 1  # the number of this group's next op
        self._published = self._consumed = 0  # the last op this rank published / finished reading
        self._queue: deque[ShmPending] = deque()  # ops started and not yet complete, in order
        self._failure: str | None = None  # set once the group is unusable
        holder = _shm.attach(self._controls, rank, os.getpid(), _pid_namespace())
        if holder:
            self.close()
            raise ShmError(f"rank {rank} of {path} is already attached by pid {holder}")

    # --- collectives ---------------------------------------------------------------------------------

    def all_reduce_start(self, tensor: torch.Tensor, op: str = "sum") -> ShmPending:
        """Publish this rank's `tensor` (float32/bfloat16/float16); `.wait()` writes the reduction
        into it (in place, like gloo) and returns it."""
        dtype = _REDUCE_DTYPES.get(tensor.dtype)
        if dtype is None or op not in _REDUCE_OPS:
            raise ValueError(f"all_reduce supports sum/max over {list(_REDUCE_DTYPES)}, got {op} over {tensor.dtype}")
        return self._start(ShmPending(self, _REDUCE, tensor, tensor, _REDUCE_OPS[op], dtype))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` (any dtype, same shape everywhere), stacked in rank order: [world, *shape]."""
        out = torch.empty((self.world, *tensor.shape), dtype=tensor.dtype)
        return self._start(ShmPending(self, _GATHER, tensor, out)).wait()

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s `tensor` copied into `tensor` on every rank (in place; any dtype)."""
        if not 0 <= src < self.world:
            raise ValueError(f"broadcast source {src} is outside 0..{self.world - 1}")
        return self._start(ShmPending(self, _BROADCAST, tensor, tensor, root=src)).wait()

    def abort(self) -> None:
        """Tell the peers this rank is giving up (call it when dying with an exception): their waits on
        it fail at once instead of after the timeout."""
        if self._mm.closed:
            return
        _shm.abort(self._controls, self.rank)
        self._failure = self._failure or f"rank {self.rank}: the shared-memory group was aborted"

    def unlink(self) -> None:
        """Remove the segment's name; the mapping lives on. Call it once every rank has attached, so a
        killed job leaves nothing in /dev/shm."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmap the segment; any later use of the group, or wait on one of its ops, raises."""
        self._failure = f"rank {self.rank}: the shared-memory group is closed"
        self._queue.clear()
        self._mm.close()

    # --- the protocol ----------------------------------------------------------------------------------

    def _start(self, pending: ShmPending) -> ShmPending:
        if self._failure:
            raise ShmError(self._failure)
        self._next_op += pending._chunks
        if pending._chunks:
            self._queue.append(pending)
            self._send_ready(pending)
        return pending

    def _send_ready(self, pending: ShmPending) -> None:
        """Publish the chunks of `pending` that may go now: the next op in order (a counter means "every
        op up to n"), into a slot this rank has finished reading. A chunk that may not waits for this
        rank's wait() to get there; the wait for the peers to have read the slot is in C."""
        while pending._sent < pending._chunks:
            seq = pending._first + pending._sent
            if seq != self._published + 1 or seq > self._consumed + self._slots:
                return
            offset = pending._sent * self._slot_bytes
            nbytes = pending._nbytes - offset if pending._kind != _BROADCAST or pending._root == self.rank else 0
            if nbytes > self._slot_bytes:
                nbytes = self._slot_bytes
            failed = _shm.send(self._controls, self.world, self.rank, self._timeout_ns, self._spin_ns, seq,
                               self._slots, self._own_slots[seq % self._slots], pending._src + offset, nbytes)
            if failed:
                raise self._fail(failed, pending, seq)
            self._published = seq
            pending._sent += 1

    def _complete(self, pending: ShmPending) -> None:
        """Finish every op up to `pending`, oldest first, each chunk by chunk."""
        if self._failure:
            raise ShmError(self._failure)
        while pending._received < pending._chunks:
            head = self._queue[0]
            while head._received < head._chunks:
                if head._sent == head._received:
                    self._send_ready(head)  # every earlier op is done: at least this chunk can go
                self._receive(head)
            self._queue.popleft()

    def _receive(self, pending: ShmPending) -> None:
        seq = pending._first + pending._received
        offset = pending._received * self._slot_bytes
        nbytes = pending._nbytes - offset
        if nbytes > self._slot_bytes:
            nbytes = self._slot_bytes
        slot = self._slot_addresses[seq % self._slots]
        if pending._kind == _REDUCE:
            failed = _shm.reduce(self._controls, self.world, self.rank, self._timeout_ns, self._spin_ns, seq,
                                 pending._op, pending._dtype, pending._dst + offset, slot, self._rank_stride,
                                 self.world, nbytes // pending._itemsize)
        elif pending._kind == _GATHER:  # rank r's chunk goes to out[r]: the stride is one rank's tensor
            failed = _shm.gather(self._controls, self.world, self.rank, self._timeout_ns, self._spin_ns, seq,
                                 pending._dst + offset, pending._nbytes, slot, self._rank_stride, self.world, nbytes)
        else:  # broadcast: the source already holds the data, the others copy its slot
            failed = _shm.gather(self._controls, self.world, self.rank, self._timeout_ns, self._spin_ns, seq,
                                 pending._dst + offset, 0, slot + pending._root * self._rank_stride, 0,
                                 int(self.rank != pending._root), nbytes)
        if failed:
            raise self._fail(failed, pending, seq)
        self._consumed = seq
        pending._received += 1

    def _fail(self, failed: tuple[int, int], pending: ShmPending, seq: int) -> ShmError:
        """The error for a failed wait; the group is unusable after it (the ranks' counters disagree)."""
        code, peer = failed
        what = {_shm.TIMED_OUT: f"timed out after {self.timeout_s:g}s waiting for rank {peer}",
                _shm.ABORTED: f"rank {peer} aborted",
                _shm.DIED: f"rank {peer}'s process died"}[code]
        self._failure = f"rank {self.rank}: shared-memory {pending._name()} (op {seq}) failed: {what}"
        return ShmError(self._failure)
