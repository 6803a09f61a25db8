"""Starting ranks: where each runs (cores, threads) and running one function on N of them.

`run` is the one entry point every command uses. Under torchrun (WORLD_SIZE in the environment)
this process already is one rank: it joins the group and runs the function. For one rank it simply
calls the function. Otherwise it spawns N local ranks, each joining a gloo group over loopback.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from tqdm import tqdm

from ladder import comm
from ladder.outputs import LAUNCHER_PID_ENV

PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
FAILURE_GRACE_S = 5.0  # how long the other ranks have to stop on their own after one fails


class LaunchError(RuntimeError):
    """One or more ranks of a launched job failed; the message has each failing rank's error.

    `cause` is the exception that started it, when a rank could send it: the first failure that is
    not a rank noticing another's (`CommunicationError`), so a command can report the real problem.
    """

    def __init__(self, message: str, errors: dict[int, BaseException] | None = None) -> None:
        super().__init__(message)
        errors = errors or {}
        own = [e for e in errors.values() if not isinstance(e, comm.CommunicationError)]
        self.cause: BaseException | None = (own or list(errors.values()) or [None])[0]


@dataclass(frozen=True)
class Placement:
    """Which cores a rank may run on, how many torch threads it uses, and how it communicates.

    `pin=False` (the default) leaves every rank free to run on any core: pinning a rank to one core
    starves gloo's communication threads unless they run at real-time priority. `cores` lists each
    rank's core set explicitly and overrides the even split that `pin=True` makes.

    `realtime_communication` (the default) gives gloo's threads real-time priority, so a reduction
    moves as soon as its data arrives instead of waiting until a busy compute thread yields its
    core. It needs root or CAP_SYS_NICE and is skipped without them. `transport` (auto, shm or
    gloo) and `link` (an emulated interconnect) are `ladder.comm.init`'s.
    """

    pin: bool = False
    threads: int | None = None
    cores: Sequence[Sequence[int]] | None = None
    realtime_communication: bool = True
    transport: str | None = None
    link: str | None = None

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

    def apply(self, rank: int, world: int) -> None:
        """Pin and size this process (before joining the group, which starts gloo's threads)."""
        cores = self.cores_for(rank, world)
        if cores:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(self.threads_for(rank, world))

    def join(self, rank: int, world: int, timeout_s: float, loopback: bool = False) -> None:
        """Apply the placement, then join the process group described by the environment."""
        self.apply(rank, world)
        comm.init(timeout_s, realtime_threads=self.realtime_communication, transport=self.transport, link=self.link,
                  loopback=loopback)


def under_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job (its world is the environment's)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(fn: Callable[..., Any], world: int, *args: Any, placement: Placement | None = None,
        timeout_s: float = comm.DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
    """`fn(*args, **kwargs)` on `world` ranks; the results of the ranks this process ran.

    Under torchrun `world` is the environment's and the list holds this rank's result only; at one
    rank it holds the one result; otherwise `launch` spawns the ranks and returns every result.
    """
    placement = placement or Placement()
    if under_torchrun():
        placement.join(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), timeout_s)
        failing = True
        try:
            result = [fn(*args, **kwargs)]
            failing = False
            return result
        finally:
            comm.shutdown(failing)
    if world == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(placement.threads or previous)
        try:
            return [fn(*args, **kwargs)]
        finally:
            torch.set_num_threads(previous)
    return launch(fn, world, *args, placement=placement, timeout_s=timeout_s, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to kill this rank when its launcher dies, however it dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the launcher's own checks remain
        return
    if os.getppid() == 1:  # the launcher died before the request took effect
        os._exit(1)


def _rank_main(fn: Callable[..., Any], rank: int, world: int, port: int, placement: Placement,
               timeout_s: float, result: Connection, args: tuple, kwargs: dict) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops every rank
    tqdm.set_lock(threading.RLock())  # tqdm's default lock is a named semaphore, which a killed rank would leak
    # Every socket of the job listens on loopback only: the store (`loopback`) and gloo's pairs.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo",
                      **{LAUNCHER_PID_ENV: str(os.getppid())})
    try:
        placement.join(rank, world, timeout_s, loopback=True)
        # Plain pickle sends tensors by value: a shared-memory handle would die with this process.
        result.send((True, pickle.dumps(fn(*args, **kwargs))))
    except BaseException as exc:
        result.send((False, (traceback.format_exc(), _sendable(exc))))
        comm.shutdown(failing=True)
        raise SystemExit(1) from None
    comm.shutdown()


def _sendable(exc: BaseException) -> BaseException | None:
    """`exc` if it survives pickling (most exceptions do; one holding an open file does not)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def _collect(procs: list[Any], readers: list[Connection], grace: float) -> dict[int, tuple[bool, Any]]:
    """Each rank's (ok, result or error); ranks still running `grace` seconds after a failure are killed."""
    world = len(procs)
    outcomes: dict[int, tuple[bool, Any]] = {}
    first_failure: float | None = None
    while len(outcomes) < world:
        waiting = {readers[r]: r for r in range(world) if r not in outcomes}
        for ready in wait(list(waiting), timeout=0.05):
            r = waiting[ready]
            try:
                outcomes[r] = ready.recv()
            except EOFError:
                procs[r].join(timeout=1)
                outcomes[r] = (False, f"rank {r} exited with code {procs[r].exitcode} without a result")
            if not outcomes[r][0]:
                first_failure = first_failure or time.monotonic()
        if first_failure is not None and time.monotonic() - first_failure > grace:
            for r, p in enumerate(procs):
                if r not in outcomes:
                    p.kill()
                    outcomes[r] = (False, f"rank {r} was killed: still running {grace:.0f}s after a failure")
    return outcomes


def launch(fn: Callable[..., Any], world: int, *args: Any, placement: Placement | None = None,
           timeout_s: float = comm.DEFAULT_TIMEOUT_S, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world` spawned local gloo ranks and return each rank's result.

    `fn` must be importable (a module-level function). If a rank fails, the others get a few
    seconds (at most `timeout_s`) to notice on their own before they are killed, and `LaunchError`
    reports every rank's failure. Each rank reports through a pipe of its own (no named semaphores
    that a killed job could leave behind). Ranks ignore Ctrl-C: the launcher gets it, kills every rank
    and re-raises, as it does with any exception; if the launcher itself is killed, so are they.
    """
    placement = placement or Placement()
    ctx = mp.get_context("spawn")
    port = free_port()
    procs, readers = [], []
    for r in range(world):
        reader, writer = ctx.Pipe(duplex=False)
        procs.append(ctx.Process(target=_rank_main, daemon=True,
                                 args=(fn, r, world, port, placement, timeout_s, writer, args, kwargs)))
        procs[-1].start()
        writer.close()  # the rank holds the only write end: its death reads as end of file
        readers.append(reader)
    # The survivors of a failure are blocked in collectives that started with the failing rank's,
    # so they notice within about as long; a rank still running after that is hung and is killed.
    try:
        outcomes = _collect(procs, readers, min(timeout_s, FAILURE_GRACE_S))
    except BaseException:  # Ctrl-C, or SIGTERM turned into an exception: no rank outlives the launcher
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    failures = {r: msg if isinstance(msg, str) else msg[0] for r, (ok, msg) in sorted(outcomes.items()) if not ok}
    if failures:
        detail = "\n".join(f"--- rank {r} ---\n{msg}" for r, msg in failures.items())
        errors = {r: msg[1] for r, (ok, msg) in sorted(outcomes.items())
                  if not ok and not isinstance(msg, str) and msg[1] is not None}
        raise LaunchError(f"{len(failures)} of {world} ranks failed:\n{detail}", errors)
    return [pickle.loads(outcomes[r][1]) for r in range(world)]
