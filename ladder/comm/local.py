"""Shared memory between the ranks of one host, gloo between hosts.

`make_transport` runs once per group, on every rank of it. Ranks tell each other which host they
are on by exchanging a digest of the host's identity over the gloo group (the boot id and this
process's network, IPC and mount namespaces: ranks share memory only where all of those agree, so
two network-namespace "hosts" on one machine count as two). Then:

- one host: every collective goes through one shared-memory segment (`SharedMemoryTransport`);
- several hosts, some with several ranks: each host reduces through its own segment, the hosts'
  first ranks ("leaders") all-reduce those sums over gloo, and each leader hands the result back
  through its segment (`HostsTransport`);
- otherwise (one rank per host, or `--comm gloo`): plain gloo.

A segment's name is random and made by one rank, sent to the others over gloo as bytes, and
unlinked as soon as every rank has mapped it: a killed job leaves nothing in /dev/shm, and two jobs
never meet in one segment whatever their ports.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ladder.comm.shm import REDUCIBLE, SharedMemoryGroup, ShmError, create_segment
from ladder.comm.transport import CommunicationError, GlooTransport, Reduction, Transport, failed

_PATH_BYTES = 256


def host_identity() -> bytes:
    """A digest that equals another process's exactly when the two can share memory and see each
    other's pids: same boot of the same machine, same network, IPC, mount and pid namespaces."""
    parts = [Path("/proc/sys/kernel/random/boot_id").read_text().strip()]
    for namespace in ("net", "ipc", "mnt", "pid"):
        try:
            parts.append(os.readlink(f"/proc/self/ns/{namespace}"))
        except OSError:
            parts.append("?")
    return hashlib.sha256("|".join(parts).encode()).digest()


def hosts_of_group(group: Any) -> list[int]:
    """For each rank of `group`, the index of its host (in order of first appearance)."""
    mine = torch.frombuffer(bytearray(host_identity()), dtype=torch.uint8)
    everyone = GlooTransport(group).all_gather(mine)
    seen: dict[bytes, int] = {}
    return [seen.setdefault(bytes(row.tolist()), len(seen)) for row in everyone]


def make_transport(group: Any, choice: str, timeout_s: float) -> Transport:
    """The transport `choice` (auto, shm or gloo) asks for, given where the ranks of `group` are."""
    gloo = GlooTransport(group)
    if choice == "gloo":
        return gloo
    hosts = hosts_of_group(group)
    me = dist.get_rank(group)
    neighbours = [r for r, h in enumerate(hosts) if h == hosts[me]]
    if len(set(hosts)) == 1:
        return SharedMemoryTransport(gloo, _attach(gloo, neighbours, me, timeout_s))
    if all(hosts.count(h) == 1 for h in hosts):  # nobody to share memory with
        return gloo
    leaders = [hosts.index(h) for h in sorted(set(hosts))]
    return HostsTransport(gloo, _attach(gloo, neighbours, me, timeout_s), group, leaders, me)


def _attach(gloo: GlooTransport, members: list[int], me: int, timeout_s: float) -> SharedMemoryGroup:
    """Map one segment shared by `members` (this rank's host's ranks) and unlink its name.

    Each host's first rank makes its host's segment and broadcasts the name over the whole group, one
    host after another, so every rank takes part in the same collectives in the same order.
    """
    firsts = gloo.all_gather(torch.tensor([members[0]], dtype=torch.int64)).flatten().unique().tolist()
    local: SharedMemoryGroup | None = None
    for first in firsts:
        name = torch.zeros(_PATH_BYTES, dtype=torch.uint8)
        if first == me:
            path = create_segment(len(members)).encode()
            name[:len(path)] = torch.frombuffer(bytearray(path), dtype=torch.uint8)
        gloo.broadcast(name, first)
        if first == members[0]:
            path = bytes(name.tolist()).rstrip(b"\0").decode()
            local = SharedMemoryGroup(path, members.index(me), len(members), timeout_s)
    assert local is not None
    # The name goes as soon as every rank holds a mapping (this reduction is the barrier saying so).
    gloo.all_reduce_start(torch.zeros(1), "sum").wait()
    if me == members[0]:
        local.unlink()
    return local


class SharedMemoryTransport:
    """Every rank of the group on one host: all collectives through one segment (reductions of
    float64 or integers, rare and off the decode path, over gloo)."""

    name = "shm"

    def __init__(self, gloo: GlooTransport, local: SharedMemoryGroup) -> None:
        self.gloo, self.local = gloo, local

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> Reduction:
        if tensor.dtype not in REDUCIBLE:
            return self.gloo.all_reduce_start(tensor, op)
        return self.local.all_reduce_start(tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.local.all_gather(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.local.broadcast(tensor, src)

    def abort(self) -> None:
        self.local.abort()

    def close(self) -> None:
        self.local.close()


class _HostsReduction:
    """Reduce on this host, across the hosts' leaders over gloo, then back out through the segment."""

    __slots__ = ("_local", "_op", "_tensor", "_transport")

    def __init__(self, transport: HostsTransport, tensor: torch.Tensor, op: str) -> None:
        self._transport, self._tensor, self._op = transport, tensor, op
        self._local = transport.local.all_reduce_start(tensor, op)

    def wait(self) -> torch.Tensor:
        self._local.wait()
        transport = self._transport
        if transport.is_leader:
            reduce_op = dist.ReduceOp.MAX if self._op == "max" else dist.ReduceOp.SUM
            try:
                dist.all_reduce(self._tensor, op=reduce_op, group=transport.leaders)
            except Exception as exc:
                transport.local.abort()
                raise failed(f"all_reduce({self._op}) between hosts", exc) from exc
        transport.local.broadcast(self._tensor, 0)
        return self._tensor


class HostsTransport(SharedMemoryTransport):
    """Ranks on several hosts: all-reduce within each host through shared memory, between hosts over
    gloo by one leader per host. Gathers and broadcasts, rare and small, go over gloo whole."""

    name = "shm+gloo"

    def __init__(self, gloo: GlooTransport, local: SharedMemoryGroup, group: Any, leaders: list[int],
                 me: int) -> None:
        super().__init__(gloo, local)
        self.is_leader = me in leaders
        global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in leaders]
        # Only the leaders take part in creating their group.
        self.leaders = (dist.new_group(global_ranks, use_local_synchronization=True)
                        if self.is_leader else None)

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> Reduction:
        if tensor.dtype not in REDUCIBLE:
            return self.gloo.all_reduce_start(tensor, op)
        return _HostsReduction(self, tensor, op)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.gloo.all_gather(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        self.gloo.broadcast(tensor, src)


__all__ = ["CommunicationError", "HostsTransport", "SharedMemoryTransport", "ShmError", "make_transport"]
