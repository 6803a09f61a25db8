"""The collectives and the launcher, on real ranks, over each transport."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from ladder import comm, launcher


def _collectives() -> dict:
    me, world = comm.tp_rank(), comm.tp_size()
    torch.manual_seed(100 + me)
    x = torch.randn(4096)
    exact = comm.all_reduce(x.double().clone())
    out = {"rank": me, "world": world, "threads": torch.get_num_threads(),
           "affinity": sorted(os.sched_getaffinity(0))}
    # bf16 all-reduce on gloo has had bugs (pytorch issue 111131): it must agree with the exact sum
    # to the precision of the dtype, synchronous and asynchronous alike.
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        blocking = comm.all_reduce(x.to(dtype, copy=True))
        pending = comm.all_reduce_start(x.to(dtype, copy=True))
        scale = exact.abs().max().item()
        out[str(dtype)] = max((blocking.double() - exact).abs().max().item(),
                              (pending.wait().double() - exact).abs().max().item()) / scale
    out["max"] = comm.all_reduce(torch.tensor([float(me)]), op="max").item()
    out["gathered"] = comm.all_gather(torch.full((2, 3), float(me))).tolist()
    out["object"] = comm.broadcast_json({"from": me})
    out["broadcast"] = comm.broadcast(torch.tensor([me + 7])).item()
    out["transport"] = comm.transport().name
    out["listening"] = listening_addresses()
    return out


def listening_addresses() -> list[str]:
    """The local addresses of this process's listening TCP sockets (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        target = os.readlink(f"/proc/self/fd/{fd}") if os.path.islink(f"/proc/self/fd/{fd}") else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, width, 4))
                found.append(socket.inet_ntop(socket.AF_INET if width == 4 else socket.AF_INET6, packed))
    return found


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_collectives_on_three_ranks(transport: str) -> None:
    results = launcher.launch(_collectives, 3, placement=launcher.Placement(threads=1, transport=transport))
    assert {out["transport"] for out in results} == {transport}
    for r, out in enumerate(results):
        assert (out["rank"], out["world"], out["threads"]) == (r, 3, 1)
        assert out[str(torch.float32)] < 1e-6
        assert out[str(torch.bfloat16)] < 2 ** -6   # a few bf16 ulps
        assert out[str(torch.float16)] < 2 ** -9
        assert out["max"] == 2.0
        assert out["gathered"] == [[[float(k)] * 3] * 2 for k in range(3)]
        assert out["object"] == {"from": 0}
        assert out["broadcast"] == 7
        assert all(a in ("127.0.0.1", "::1") for a in out["listening"]), "a local job listens beyond loopback"
    assert results[0]["listening"], "rank 0 serves the rendezvous store"


def test_pinning_places_ranks_on_their_own_cores() -> None:
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    results = launcher.launch(_collectives, 2, placement=launcher.Placement(pin=True))
    assert [out["affinity"] for out in results] == [[cores[0]], [cores[1]]]
    assert [out["threads"] for out in results] == [1, 1]


def test_placement_split() -> None:
    placement = launcher.Placement(cores=[[0, 1], [2, 3]])
    assert placement.cores_for(1, 2) == [2, 3]
    assert placement.threads_for(1, 2) == 2
    assert launcher.Placement(threads=3).threads_for(0, 2) == 3
    assert launcher.Placement().cores_for(0, 2) is None


def test_without_process_group_collectives_are_identity() -> None:
    x = torch.arange(4.0)
    assert comm.tp_size() == 1 and comm.tp_rank() == 0
    assert comm.all_reduce(x.clone()).equal(x)
    assert comm.all_reduce_start(x.clone()).wait().equal(x)
    assert comm.all_gather(x).shape == (1, 4)
    assert comm.broadcast_json([3]) == [3]


def _fail_on_rank_one() -> int:
    if comm.tp_rank() == 1:
        raise ValueError("rank one refuses")
    return comm.tp_rank()


def test_launch_reports_the_failing_rank() -> None:
    with pytest.raises(launcher.LaunchError, match="rank 1") as info:
        launcher.launch(_fail_on_rank_one, 2, timeout_s=10)
    assert "rank one refuses" in str(info.value)
