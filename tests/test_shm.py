"""ladder.comm.shm between real processes: every rank gets bitwise the rank-order reference, and a peer that
is killed, stalls or aborts ends in a clear error within the timeout, never a hang.

The ranks are a pool of spawned workers shared by the whole module (starting a process that imports
torch costs seconds on 2 cores); each test gives them a fresh segment. Workers check their results
against the reference themselves and return digests, so the test also sees that every rank agrees.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import multiprocessing
import os
import random
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import pytest
import torch

from ladder.comm.shm import SharedMemoryGroup, ShmError, create_segment

SLOTS = 4
SLOT_BYTES = 16 * 1024  # small: 4096 float32 fill a slot, 10007 and 65536 take several chunks
SIZES = [1, 576, 4096, 10007, 65536]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
PATIENT_S = 20.0  # healthy runs: only a broken test waits this long
TIMEOUT_S = 2.0  # the failure tests' timeout
NOTICE_MARGIN_S = 1.0  # scheduling slack on a loaded 2-core machine


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    with multiprocessing.get_context("spawn").Pool(4, initializer=torch.set_num_threads, initargs=(1,)) as workers:
        yield workers


def run(pool: Pool, fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """`fn(path, rank, world, *args)` on `world` workers at once, attached to a fresh segment.

    If ranks fail, the error raised is a root cause, not a peer's "rank r aborted" that followed it."""
    path = create_segment(world, SLOTS, SLOT_BYTES)
    try:
        pending = [pool.apply_async(fn, (path, rank, world, *args)) for rank in range(world)]
        outcomes: list[Any] = []
        for result in pending:
            try:
                outcomes.append(result.get(timeout=PATIENT_S))
            except Exception as error:
                outcomes.append(error)
    finally:
        os.unlink(path)
    failures = [outcome for outcome in outcomes if isinstance(outcome, Exception)]
    if failures:
        raise next((f for f in failures if not isinstance(f, ShmError)), failures[0])
    return outcomes


@contextlib.contextmanager
def attached(path: str, rank: int, world: int, timeout_s: float = PATIENT_S) -> Iterator[SharedMemoryGroup]:
    """The group, aborted if the rank fails (its peers then fail at once instead of waiting) and closed."""
    group = SharedMemoryGroup(path, rank, world, timeout_s)
    try:
        yield group
    except BaseException:
        group.abort()
        raise
    finally:
        group.close()


# --- what every rank computes and checks -----------------------------------------------------------------


def partial(seed: int, rank: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank `rank`'s input: magnitudes from 2^-16 to 2^12 (fp16 denormals, fp16 overflow once summed),
    and an inf, a -inf and a NaN at rank-dependent places."""
    generator = torch.Generator().manual_seed(seed * 1000 + rank)
    values = torch.randn(size, generator=generator) * torch.exp2(torch.randint(-16, 13, (size,), generator=generator))
    if size > 100:
        values[rank], values[rank + 10], values[rank + 20] = float("inf"), float("-inf"), float("nan")
    return values.to(dtype)


def reference(seed: int, world: int, size: int, dtype: torch.dtype, op: str) -> torch.Tensor:
    """The partials combined in rank order in float32, rounded once."""
    parts = [partial(seed, rank, size, dtype).float() for rank in range(world)]
    result = parts[0]
    for part in parts[1:]:
        result = result + part if op == "sum" else torch.maximum(result, part)
    return result.to(dtype)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaNs differ"
    bits = {2: torch.int16, 4: torch.int32}[expected.element_size()]
    mismatch = (actual[~nan].view(bits) != expected[~nan].view(bits)).nonzero()
    assert len(mismatch) == 0, f"{what}: {len(mismatch)} elements differ, first at {mismatch[0].item()}"


def digest(tensors: list[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors)).hexdigest()


def reduce_everything(path: str, rank: int, world: int, seed: int) -> str:
    with attached(path, rank, world) as group:
        results = []
        for dtype in FLOATS:
            for op in ("sum", "max"):
                for size in SIZES:
                    tensor = partial(seed, rank, size, dtype)
                    assert group.all_reduce_start(tensor, op).wait() is tensor  # in place
                    assert_bitwise(tensor, reference(seed, world, size, dtype, op), f"rank {rank} {op} {dtype} {size}")
                    results.append(tensor)
    return digest(results)


def reduce_in_flight(path: str, rank: int, world: int) -> str:
    """More reductions started than there are slots, some chunked, waited for in a shuffled order."""
    with attached(path, rank, world) as group:
        sizes = [576, 65536, 1, 10007, 576, 4096] * 2
        tensors = [partial(i, rank, size, torch.float32) for i, size in enumerate(sizes)]
        pending = [group.all_reduce_start(tensor) for tensor in tensors]
        order = list(range(len(sizes)))
        random.Random(7).shuffle(order)  # the same order on every rank
        for i in order:
            assert pending[i].wait() is tensors[i]
            assert_bitwise(tensors[i], reference(i, world, sizes[i], torch.float32, "sum"), f"rank {rank} op {i}")
        with pytest.raises(ShmError, match=f"rank {rank}: wait\\(\\) called twice on all_reduce\\(sum\\)"):
            pending[0].wait()
    return digest(tensors)


def gather_and_broadcast(path: str, rank: int, world: int) -> str:
    with attached(path, rank, world) as group:
        results = []
        for dtype in (torch.int64, torch.float64, torch.bool, torch.uint8, torch.bfloat16):
            for shape in [(1,), (3, 5), (65536,)]:
                def own(r: int, dtype: torch.dtype = dtype, shape: tuple[int, ...] = shape) -> torch.Tensor:
                    return (torch.arange(math.prod(shape)) * (r + 1) % 251).to(dtype).reshape(shape)

                gathered = group.all_gather(own(rank))
                assert torch.equal(gathered, torch.stack([own(r) for r in range(world)])), f"gather {dtype} {shape}"
                for src in range(world):
                    tensor = own(rank)
                    assert group.broadcast(tensor, src) is tensor and torch.equal(tensor, own(src)), f"{dtype} {src}"
                results.append(gathered)
    return digest(results)


# --- correctness ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3, 4])
def test_all_reduce_is_the_rank_order_reference_on_every_rank(pool: Pool, world: int) -> None:
    digests = run(pool, reduce_everything, world, world)
    assert len(set(digests)) == 1


def test_reductions_in_flight_waited_out_of_order(pool: Pool) -> None:
    assert len(set(run(pool, reduce_in_flight, 3))) == 1


def test_all_gather_and_broadcast(pool: Pool) -> None:
    assert len(set(run(pool, gather_and_broadcast, 3))) == 1


def test_two_groups_on_one_host_do_not_interfere(pool: Pool) -> None:
    paths = [create_segment(2, SLOTS, SLOT_BYTES) for _ in range(2)]
    try:
        pending = [pool.apply_async(reduce_everything, (path, rank, 2, seed))
                   for seed, path in enumerate(paths) for rank in range(2)]
        digests = [result.get(timeout=PATIENT_S) for result in pending]
    finally:
        for path in paths:
            os.unlink(path)
    assert digests[0] == digests[1] != digests[2] == digests[3]


# --- the segment ----------------------------------------------------------------------------------------


def test_segment_is_private_and_unlinks() -> None:
    path = create_segment(1, slots=2, slot_bytes=100)
    assert path.startswith("/dev/shm/ladder-") and len(path) == len("/dev/shm/ladder-") + 16
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    group = SharedMemoryGroup(path, 0, 1, TIMEOUT_S)
    group.unlink()
    group.unlink()  # every rank may call it
    assert not os.path.exists(path)
    tensor = torch.arange(100.0)  # 400 bytes: four chunks of the 128-byte slot (100 rounded up)
    assert torch.equal(group.all_reduce_start(tensor, "max").wait(), torch.arange(100.0))  # still mapped
    group.close()
    with pytest.raises(ShmError, match="rank 0: the shared-memory group is closed"):
        group.all_reduce_start(tensor)


def test_mismatched_attach_is_refused(tmp_path: Path) -> None:
    path = create_segment(2)
    try:
        with pytest.raises(ShmError, match=r"was made for 2 ranks, this group has 3"):
            SharedMemoryGroup(path, 0, 3)
        first = SharedMemoryGroup(path, 1, 2)
        with pytest.raises(ShmError, match=f"rank 1 of {path} is already attached by pid {os.getpid()}"):
            SharedMemoryGroup(path, 1, 2)
        first.close()
        with open(path, "r+b") as segment:
            segment.truncate(4096)
        with pytest.raises(ShmError, match="is 4096 bytes, its header says"):
            SharedMemoryGroup(path, 0, 2)
    finally:
        os.unlink(path)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a segment")
    with pytest.raises(ShmError, match="is not a version-1 ladder segment"):
        SharedMemoryGroup(str(garbage), 0, 2)


def test_bad_inputs_are_refused_before_any_op() -> None:
    path = create_segment(1)
    group = SharedMemoryGroup(path, 0, 1, TIMEOUT_S)
    group.unlink()
    with pytest.raises(ValueError, match="sum/max over"):
        group.all_reduce_start(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="sum/max over"):
        group.all_reduce_start(torch.ones(3), "mean")
    with pytest.raises(ValueError, match="rank 0: shared-memory collectives need a contiguous CPU tensor"):
        group.all_reduce_start(torch.ones(3, 2).t())
    with pytest.raises(ValueError, match=r"broadcast source 1 is outside 0\.\.0"):
        group.broadcast(torch.ones(3), 1)
    assert torch.equal(group.all_reduce_start(torch.ones(3)).wait(), torch.ones(3))  # still usable
    group.close()


def test_a_signal_interrupts_a_wait() -> None:
    """A wait on a missing peer still runs Python's signal handlers (Ctrl-C need not wait for the timeout)."""

    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    path = create_segment(2)
    group = SharedMemoryGroup(path, 0, 2, PATIENT_S)
    group.unlink()
    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        start = time.monotonic()
        timer.start()
        with pytest.raises(Interrupted):
            group.all_reduce_start(torch.ones(4)).wait()  # rank 1 never comes
        assert time.monotonic() - start < NOTICE_MARGIN_S
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
        group.close()


# --- broken peers ---------------------------------------------------------------------------------------


def expect_failure(group: SharedMemoryGroup) -> tuple[str, float]:
    """The error one more all-reduce ends in, and how long that took."""
    start = time.monotonic()
    try:
        group.all_reduce_start(torch.ones(576)).wait()
    except ShmError as error:
        return str(error), time.monotonic() - start
    return "no error", time.monotonic() - start


def stall(path: str, rank: int, world: int) -> tuple[str, float] | None:
    with attached(path, rank, world, TIMEOUT_S) as group:
        if rank == 1:
            time.sleep(TIMEOUT_S + NOTICE_MARGIN_S)  # alive, but never publishes
            return None
        return expect_failure(group)


def abort_after_one_op(path: str, rank: int, world: int) -> tuple[str, float] | None:
    with attached(path, rank, world) as group:
        group.all_reduce_start(torch.ones(4)).wait()
        if rank == 1:
            time.sleep(0.2)
            group.abort()
            return None
        failure = expect_failure(group)
        with pytest.raises(ShmError, match="rank 1 aborted"):  # the group stays unusable
            group.all_gather(torch.ones(1))
        return failure


def die_after_one_op(path: str, rank: int, world: int) -> tuple[str, float]:
    with attached(path, rank, world, TIMEOUT_S) as group:
        group.all_reduce_start(torch.ones(4)).wait()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the pool reaps the worker and starts a new one
        return expect_failure(group)


def test_stalled_peer_times_out(pool: Pool) -> None:
    (message, elapsed), _ = run(pool, stall, 2)
    assert message == f"rank 0: shared-memory all_reduce(sum) (op 1) failed: timed out after {TIMEOUT_S:g}s waiting for rank 1"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + NOTICE_MARGIN_S


def test_aborting_peer_fails_the_others_fast(pool: Pool) -> None:
    outcomes = run(pool, abort_after_one_op, 3)
    for rank in (0, 2):
        message, elapsed = outcomes[rank]
        assert message == f"rank {rank}: shared-memory all_reduce(sum) (op 2) failed: rank 1 aborted"
        assert elapsed < NOTICE_MARGIN_S


def test_killed_peer_is_noticed_before_the_timeout(pool: Pool) -> None:
    path = create_segment(2, SLOTS, SLOT_BYTES)
    try:
        survivor = pool.apply_async(die_after_one_op, (path, 0, 2))
        pool.apply_async(die_after_one_op, (path, 1, 2))  # never returns
        message, elapsed = survivor.get(timeout=PATIENT_S)
    finally:
        os.unlink(path)
    assert message == "rank 0: shared-memory all_reduce(sum) (op 2) failed: rank 1's process died"
    assert elapsed < TIMEOUT_S
