"""What one all-reduce costs at TP=2, per transport: its latency and the CPU time it takes from a rank.

One launch per transport (`measure_collectives`); inside it every rank runs `collective_cost` over
the same sizes in the same order. The latency is the median per call with both ranks calling back
to back in lockstep; the CPU time of that loop per call is recorded too (it includes any spinning
on the peer). The main CPU figure is measured with the calling thread asleep while the reduction
is in flight (`time.process_time`, every thread of the process), minus the same loop of naps
without a reduction: for gloo that is its worker and TCP-loop threads handing the message along,
for shared memory the copy in `start` and the summing in `wait`, run after the nap as they run
after a sub-block's compute rather than on a hot path. On cores that are all busy computing that time
cannot overlap with anything, so it bounds the share of communication any schedule can hide.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from ladder import comm
from ladder.launcher import Placement, launch

from .text import per_rank, table
from .workload import ModelSource

SIZES = (576, 4096, 65536, 1_048_576)  # fp32 floats: SmolLM2's hidden vector up to a 4 MB tensor
QUICK_SIZES = (576, 4096)
_LARGE = 65536  # above this, fewer calls per size keep a transport's launch to seconds
_MIN_NAP_S = 0.001


def calls_per_size(floats: int, quick: bool) -> int:
    """The same count on every rank (the ranks must make the same collectives)."""
    calls = 50 if quick else 500
    return calls if floats <= _LARGE else calls // 5


@dataclass
class BackToBack:
    """`calls` blocking all-reduces in a row: the seconds of each, and the process's CPU seconds in all."""

    seconds: list[float]
    cpu_s: float


def all_reduce_seconds(floats: int, calls: int, warmup: int = 10) -> BackToBack:
    """`calls` blocking all-reduces of `floats` fp32 values back to back, the ranks in lockstep."""
    tensor = torch.zeros(1, floats)  # zeros: repeated in-place sums never overflow
    for _ in range(warmup):
        comm.all_reduce(tensor)
    comm.barrier()
    seconds = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        comm.all_reduce_start(tensor).wait()
        seconds.append(time.perf_counter() - started)
    return BackToBack(seconds, time.process_time() - cpu_started)


def _cpu_seconds_per_call(tensor: torch.Tensor, calls: int, nap: float) -> float:
    """CPU time of one all-reduce with the caller asleep in between: the loop with reductions
    minus the same loop of naps without, so the naps' own cost cancels."""
    comm.barrier()
    started = time.process_time()
    for _ in range(calls):
        time.sleep(nap)
    idle = time.process_time() - started
    comm.barrier()
    started = time.process_time()
    for _ in range(calls):
        pending = comm.all_reduce_start(tensor)
        time.sleep(nap)
        pending.wait()
    busy = time.process_time() - started
    return (busy - idle) / calls


def collective_cost(sizes: tuple[int, ...], quick: bool = False) -> dict[str, Any]:
    """This rank's latency and CPU time per all-reduce at each size (run on every rank)."""
    transport = comm.transport()
    rows = []
    for floats in sizes:
        calls = calls_per_size(floats, quick)
        back_to_back = all_reduce_seconds(floats, calls)
        latency = statistics.median(back_to_back.seconds)
        nap = max(_MIN_NAP_S, 1.5 * latency)  # asleep for the whole reduction, unless the caller must move it
        cpu = _cpu_seconds_per_call(torch.zeros(1, floats), calls, nap)
        rows.append({"floats": floats, "calls": calls, "latency_us": round(1e6 * latency, 1),
                     "cpu_us": round(1e6 * cpu, 1), "back_to_back_cpu_us": round(1e6 * back_to_back.cpu_s / calls, 1)})
    return {"transport": getattr(transport, "name", None), "sizes": rows}


def measure_collectives(source: ModelSource, transports: tuple[str, ...], sizes: tuple[int, ...],
                        quick: bool) -> dict[str, Any]:
    """Both ranks of a TP=2 job per transport; rows of (transport, floats) with a figure per rank."""
    config = source.config()
    rows = []
    for transport in transports:
        print(f"--- collective cost: {transport} ---", flush=True)
        ranks = launch(collective_cost, 2, sizes, quick=quick, placement=Placement(transport=transport))
        for i, floats in enumerate(sizes):
            per_rank = [r["sizes"][i] for r in ranks]
            rows.append({"transport": ranks[0]["transport"], "floats": floats, "calls": per_rank[0]["calls"],
                         "latency_us": [r["latency_us"] for r in per_rank],
                         "cpu_us": [r["cpu_us"] for r in per_rank],
                         "back_to_back_cpu_us": [r["back_to_back_cpu_us"] for r in per_rank]})
    return {"shape": source.shape, "layers": config.num_hidden_layers, "hidden": config.hidden_size, "rows": rows}


def collectives_per_token(layers: int) -> int:
    """Collectives of one standard or ladder decode step: two sub-blocks per layer, the embedding,
    and the gather that chooses the next token."""
    return 2 * layers + 2


def cpu_us(cost: dict[str, Any], transport: str, floats: int, key: str = "cpu_us") -> list[float] | None:
    """Per-rank CPU microseconds per call of `transport` at `floats` (caller asleep, or `key`), if measured."""
    return next((row.get(key) for row in cost.get("rows", [])
                 if row["transport"] == transport and row["floats"] == floats), None)


def upgrade(cost: dict[str, Any]) -> dict[str, Any]:
    """A results.json from before the transports measured gloo only, one size, as `ranks`."""
    if "ranks" not in cost:
        return cost
    ranks = cost["ranks"]
    floats = ranks[0]["floats"]
    row = {"transport": "gloo", "floats": floats, "calls": None, "latency_us": [r["latency_us"] for r in ranks],
           "cpu_us": [r["cpu_us"] for r in ranks]}
    return {"shape": cost["shape"], "layers": cost["layers"], "hidden": floats, "rows": [row]}


def collective_table(cost: dict[str, Any]) -> list[str]:
    """Markdown: latency and CPU time per call per transport and size, and what the hidden-vector
    size adds up to per decode step."""
    if not cost.get("rows"):
        return []
    calls = collectives_per_token(cost["layers"])
    header = ["transport", "floats", "latency us (rank 0 / 1)", "CPU us per call (rank 0 / 1, caller asleep)",
              "CPU us per call back to back", f"CPU ms per decode step if all {calls} collectives were this size"]
    rows = [[row["transport"], f"{row['floats']:,}", per_rank(row["latency_us"]), per_rank(row["cpu_us"]),
             per_rank(row["back_to_back_cpu_us"]) if row.get("back_to_back_cpu_us") else "-",
             per_rank([c * calls / 1e3 for c in row["cpu_us"]], 2) if row["floats"] == cost["hidden"] else ""]
            for row in cost["rows"]]
    return [f"## What one collective costs at TP=2 (fp32 all-reduce; {cost['shape']}'s hidden vector is "
            f"{cost['hidden']} floats)", "", *table(header, rows), "",
            "Latency: median per call, both ranks calling back to back in lockstep. CPU (caller asleep): "
            "`time.process_time` of the whole process over a loop of start / sleep / wait, minus the same loop "
            "without the reduction; start and wait then run after the nap, as they run after a sub-block's "
            "compute, not on a hot path. CPU back to back: the process's CPU time over the latency loop, per "
            "call (spinning on the peer included). gloo hands each message between the calling thread, its "
            "worker threads and its TCP loop; shm copies into the segment in `start` and sums in `wait`. That CPU time lands on cores "
            "that are busy computing, so no schedule can hide it; only the rest of the latency (waiting for "
            "the peer) is there for the ladder to hide.", ""]
