"""How ranks pick and use a transport: shared memory on one host, shm+gloo across hosts, the emulated
link, and what is left in /dev/shm after a job, normal or killed."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from ladder import LadderForCausalLM, comm, launch, random_full_state_dict
from ladder.comm import local
from ladder.comm.emulated import EmulatedLink, Link
from ladder.launcher import Placement

pytestmark = pytest.mark.usefixtures("one_compute_thread")


def segments() -> set[str]:
    return set(glob.glob("/dev/shm/ladder-*"))


def _reduce_and_report(value: float) -> dict:
    """A few reductions; the transport's name and whether its segment's name is still on disk."""
    transport = comm.transport()
    total = comm.all_reduce(torch.full((1000,), value * (comm.tp_rank() + 1)))
    return {"name": transport.name, "segment_on_disk": os.path.exists(transport.local.path),
            "total": total[0].item()}


def test_one_host_uses_shared_memory_and_leaves_no_segment() -> None:
    before = segments()
    results = launch(_reduce_and_report, 2, 1.0)
    assert [r["name"] for r in results] == ["shm", "shm"]
    assert not any(r["segment_on_disk"] for r in results)  # unlinked once both ranks had mapped it
    assert [r["total"] for r in results] == [3.0, 3.0]
    assert segments() == before


def test_concurrent_jobs_do_not_interfere() -> None:
    """Two jobs at once on one host, each with its own segment: each gets its own sums."""
    results: dict[float, list[dict]] = {}
    jobs = [threading.Thread(target=lambda v=v: results.__setitem__(v, launch(_reduce_and_report, 2, v)))
            for v in (1.0, 10.0)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert [r["total"] for r in results[1.0]] == [3.0, 3.0]
    assert [r["total"] for r in results[10.0]] == [30.0, 30.0]


KILLED_JOB = textwrap.dedent("""
    import sys, time
    import torch
    from ladder import comm, launch

    def spin(ready):
        comm.all_reduce(torch.ones(8))
        open(ready + str(comm.tp_rank()), "w").close()
        while True:
            comm.all_reduce(torch.ones(576))

    if __name__ == "__main__":
        launch(spin, 2, sys.argv[1])
""")


def test_a_killed_job_leaves_no_segment(tmp_path: Path) -> None:
    before = segments()
    ready, script = str(tmp_path / "ready"), tmp_path / "job.py"
    script.write_text(KILLED_JOB)
    job = subprocess.Popen([sys.executable, str(script), ready], start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all(os.path.exists(ready + str(r)) for r in range(2)):
            assert time.monotonic() < deadline and job.poll() is None, "the job never got going"
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks, mid-reduction
        job.wait()
    assert segments() == before


# --- ranks on several hosts: shared memory within each, gloo between their leaders -----------------


def _as_two_hosts(config, weights: dict) -> dict:
    """Pretend ranks 0-1 and 2-3 are two hosts, rebuild the transport, and run the model."""
    local.host_identity = lambda: bytes([comm.global_rank() // 2]) * 32
    comm.transport().close()
    comm.set_transport(local.make_transport(None, "auto", 30.0))
    me = comm.tp_rank()
    out = {"name": comm.transport().name,
           "sum": comm.all_reduce(torch.arange(5.0) * (me + 1)).tolist(),
           "max": comm.all_reduce(torch.tensor([float(me), -float(me)]), op="max").tolist(),
           "gathered": comm.all_gather(torch.tensor([me])).flatten().tolist()}
    model = LadderForCausalLM(config).eval()
    model.load_full_state_dict(weights)
    with torch.inference_mode():
        out["logits"] = model.gather_vocab(model(torch.tensor([[1, 5, 9, 2, 7]])))
    return out


def test_two_hosts_reduce_within_and_between(make_tiny_config) -> None:
    config = make_tiny_config().with_ladder_layers("upper-half")
    weights = random_full_state_dict(config, seed=4, std=0.2)
    results = launch(_as_two_hosts, 4, config, weights, timeout_s=60)
    reference = LadderForCausalLM(config).eval()
    reference.load_full_state_dict(weights)
    with torch.inference_mode():
        expected = reference(torch.tensor([[1, 5, 9, 2, 7]]))
    for out in results:
        assert out["name"] == "shm+gloo"
        assert out["sum"] == [0.0, 10.0, 20.0, 30.0, 40.0]
        assert out["max"] == [3.0, 0.0]
        assert out["gathered"] == [0, 1, 2, 3]
        torch.testing.assert_close(out["logits"], expected, atol=1e-4, rtol=0)


# --- the emulated link -----------------------------------------------------------------------------


def test_link_specifications() -> None:
    assert Link.parse("latency=200us,bandwidth=10gbit") == Link(200e-6, 10e9)
    assert Link.parse("latency=1.5ms") == Link(1.5e-3, 0.0)
    assert Link(1e-3, 8e6).seconds(torch.zeros(250)) == pytest.approx(1e-3 + 1e-3)  # 1000 bytes at 1 MB/s
    for bad in ("latency=fast", "speed=1gbit", "latency=3parsecs"):
        with pytest.raises(ValueError, match="expected latency="):
            Link.parse(bad)


def _overlap_hides_the_link(latency_s: float) -> dict:
    """A reduction waited on at once costs the link's latency; one waited on after that much compute
    costs nothing more: what the ladder schedule relies on."""
    assert isinstance(comm.transport(), EmulatedLink)
    timings = {}
    for label, work_s in (("exposed", 0.0), ("hidden", 1.5 * latency_s)):
        comm.all_reduce(torch.ones(4))  # line the ranks up
        started = time.perf_counter()
        pending = comm.all_reduce_start(torch.ones(576))
        time.sleep(work_s)
        before_wait = time.perf_counter()
        pending.wait()
        timings[label] = (time.perf_counter() - before_wait, before_wait - started)
    return timings


def test_emulated_link_delays_each_reduction_by_its_latency() -> None:
    latency = 0.02
    results = launch(_overlap_hides_the_link, 2, latency, placement=Placement(link=f"latency={latency * 1e3:g}ms"))
    for timings in results:
        exposed_wait, _ = timings["exposed"]
        hidden_wait, _ = timings["hidden"]
        assert latency * 0.9 < exposed_wait < latency * 3
        assert hidden_wait < latency * 0.25


# --- two real "hosts": network namespaces, two ranks each, under torchrun (opt-in) ------------------

TWO_HOSTS_JOB = textwrap.dedent("""
    import json, os, sys
    import torch
    from ladder import comm
    from ladder.launcher import run

    def check():
        me = comm.global_rank()
        return {"name": comm.transport().name,
                "sum": comm.all_reduce(torch.arange(5.0) * (me + 1)).tolist(),
                "max": comm.all_reduce(torch.tensor([float(me), -float(me)]), op="max").tolist()}

    rank = os.environ["RANK"]
    result = run(check, 0)[0]
    open(f"{sys.argv[1]}/rank{rank}.json", "w").write(json.dumps(result))
""")


@pytest.mark.netns
def test_two_namespace_hosts_of_two_ranks_each(tmp_path: Path) -> None:
    from ladder_benchmarks.netns import ADDRESSES, DEVICES, NAMESPACES, SlowLink, availability

    if reason := availability():
        pytest.skip(reason)
    script = tmp_path / "job.py"
    script.write_text(TWO_HOSTS_JOB)
    with SlowLink(rate=None):
        jobs = [subprocess.Popen(
            ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}", sys.executable, "-m",
             "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2", "--node-rank", str(node),
             "--master-addr", ADDRESSES[0], "--master-port", "29531", str(script), str(tmp_path)])
            for node, (ns, dev) in enumerate(zip(NAMESPACES, DEVICES, strict=True))]
        assert [job.wait(timeout=180) for job in jobs] == [0, 0]
    for rank in range(4):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out == {"name": "shm+gloo", "sum": [0.0, 10.0, 20.0, 30.0, 40.0], "max": [3.0, 0.0]}
