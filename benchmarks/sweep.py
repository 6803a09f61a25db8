"""Latency sweep on an emulated link: how much of a link's delay each residual schedule hides.

One TP=2 launch over shared memory (`run_sweep` on every rank). It first times the compute of one
attention and one MLP sub-block during batch-1 decode (the time a reduction in flight has to hide
behind), then, for each link latency, puts the real transport behind `EmulatedLink` with
`comm.set_transport`, measures every schedule interleaved as the sessions do, and puts the real
transport back. The sub-block time itself is added as a swept latency: it is where the ladder
should hide the whole link, the point the targets are read at. The emulated link moves no data
and starts no thread, so what it adds is waiting, not CPU: the conditions of a GPU link, not of
this host's own transports.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ladder import comm
from ladder.comm.emulated import EmulatedLink, Link
from ladder.launcher import Placement, launch
from ladder.model import LadderForCausalLM

from .summary import hidden_wait_share, overlap_efficiency, speedup_vs_standard, summarize_variants
from .text import fmt, save_figure, table
from .workload import ModelSource, Workload, interleaved, ladder_runner, make_prompts, schedule_variants

LATENCIES_US = (0, 50, 100, 200, 400, 800)
QUICK_LATENCIES_US = (0, 200)
SUBBLOCKS = ("attention", "feed_forward")
SCHEDULE_NAMES = ("standard", "ladder", "parallel", "upper-bound")
SUBBLOCK_METHOD = ("median time of one `layer.attention(x, step)` and of one `layer.feed_forward(x)` call, "
                   "timed in batch-1 decode of the upper-bound variant (no reduction to wait on) at TP=2; "
                   "the sub-block time is the mean of the two, averaged over the ranks")


@dataclass(frozen=True)
class SweepSpec:
    source: ModelSource
    latencies_us: tuple[float, ...] = LATENCIES_US
    workload: Workload = field(default_factory=lambda: Workload(batches=(1,), prefill_repeats=0))
    add_subblock_point: bool = True


def describe_link(latency_us: float | None = None) -> str:
    """How every table and plot of the sweep names its link."""
    latency = "swept latency" if latency_us is None else f"{latency_us:g} us latency"
    return f"emulated link: {latency}, unlimited bandwidth, over shm (TP=2)"


# --- on every rank ------------------------------------------------------------------------------


def _timed(method: Callable[..., torch.Tensor], into: list[float]) -> Callable[..., torch.Tensor]:
    """`method`, recording the seconds of each call on one token (decode; prefill is left out)."""

    def call(x: torch.Tensor, *args: Any) -> torch.Tensor:
        started = time.perf_counter()
        out = method(x, *args)
        if x.shape[1] == 1:
            into.append(time.perf_counter() - started)
        return out

    return call


def subblock_seconds(model: LadderForCausalLM, workload: Workload, vocab: int) -> dict[str, float]:
    """Median seconds of one attention and one MLP sub-block (`layer.attention(x, step)`,
    `layer.feed_forward(x)`) during batch-1 decode of `model`, the mean over the ranks.

    `model` should be the upper-bound variant: it computes what the others do without waiting on a
    reduction, so the calls time compute alone. Every rank runs the same generations.
    """
    times: dict[str, list[float]] = {name: [] for name in SUBBLOCKS}
    for layer in model.model.layers:
        for name in SUBBLOCKS:  # an instance attribute shadows the method; deleted below
            setattr(layer, name, _timed(getattr(layer, name), times[name]))
    prompts = make_prompts(1, workload.prompt_tokens, vocab)
    run = ladder_runner(model)
    try:
        run(prompts, workload.new_tokens, lambda: None)  # warm-up
        for kept in times.values():
            kept.clear()
        for _ in range(max(1, workload.repeats)):
            run(prompts, workload.new_tokens, lambda: None)
    finally:
        for layer in model.model.layers:
            for name in SUBBLOCKS:
                delattr(layer, name)
    medians = torch.tensor([statistics.median(times[name]) for name in SUBBLOCKS], dtype=torch.float32)
    agreed = comm.all_reduce(medians) / comm.tp_size()  # every rank sweeps the same latencies
    return {name: float(seconds) for name, seconds in zip(SUBBLOCKS, agreed, strict=True)}


def run_sweep(spec: SweepSpec) -> dict[str, Any]:
    """This rank's samples per swept latency (microseconds), every schedule interleaved at each."""
    rank, world = comm.tp_rank(), comm.tp_size()
    real = comm.transport()
    if real is None:
        raise ValueError("the latency sweep needs TP >= 2")
    log = print if rank == 0 else (lambda _: None)
    base = spec.source.load(rank, world)
    variants = schedule_variants(base)
    vocab = base.config.vocab_size
    subblock = subblock_seconds(variants["upper-bound"], spec.workload, vocab)
    subblock_us = round(1e6 * statistics.fmean(subblock.values()), 1)
    latencies = sorted(set(spec.latencies_us) | ({subblock_us} if spec.add_subblock_point else set()))
    runners = {name: ladder_runner(model) for name, model in variants.items()}
    samples = {}
    for latency in latencies:
        log(describe_link(latency))
        previous = comm.set_transport(EmulatedLink(real, Link(latency_s=latency * 1e-6)))
        try:
            samples[latency] = interleaved(runners, spec.workload, vocab, log)
        finally:
            comm.set_transport(previous)
    return {"rank": rank, "transport": real.name, "samples": samples, "subblock_us": subblock_us,
            "subblock_us_by_kind": {name: round(1e6 * s, 1) for name, s in subblock.items()}}


# --- in the launching process -------------------------------------------------------------------------


def measure_sweep(source: ModelSource, latencies_us: tuple[float, ...], workload: Workload) -> dict[str, Any]:
    """The sweep's launch (TP=2 over shm, batch 1, no prefill) and one summary point per latency."""
    spec = SweepSpec(source, latencies_us, dataclasses.replace(workload, batches=(1,), prefill_repeats=0))
    print(f"--- latency sweep: {describe_link()} ---", flush=True)
    ranks = launch(run_sweep, 2, spec, placement=Placement(transport="shm"), timeout_s=600)
    lead = ranks[0]
    points = [sweep_point(latency, [r["samples"][latency] for r in ranks], latency == lead["subblock_us"])
              for latency in lead["samples"]]
    return {"shape": source.shape, "checkpoint": None if source.random_weights else source.checkpoint,
            "transport": lead["transport"], "link": describe_link(), "batch": 1,
            "subblock_us": lead["subblock_us"], "subblock_us_by_kind": lead["subblock_us_by_kind"],
            "subblock_method": SUBBLOCK_METHOD, "points": points}


def sweep_point(latency_us: float, samples_by_rank: list[dict[str, Any]], is_subblock: bool) -> dict[str, Any]:
    variants = summarize_variants(samples_by_rank)
    return {"latency_us": latency_us, "is_subblock_time": is_subblock,
            "decode_ms": {name: v["decode_ms"][1] for name, v in variants.items()},
            "blocked_ms_per_token": {name: v["blocked_ms_per_token"][1] for name, v in variants.items()},
            "overlap_efficiency": overlap_efficiency(variants).get(1),
            "hidden_wait_share": hidden_wait_share(variants).get(1),
            "ladder_speedup": speedup_vs_standard(variants)["ladder"][1]}


def efficiency_up_to_subblock(sweep: dict[str, Any], from_us: float = 100.0) -> list[tuple[float, float | None]]:
    """(latency, overlap efficiency) of every swept point from `from_us` up to the sub-block time."""
    return [(p["latency_us"], p["overlap_efficiency"]) for p in sweep.get("points", [])
            if from_us <= p["latency_us"] <= sweep["subblock_us"]]


def at_subblock_time(sweep: dict[str, Any]) -> dict[str, Any] | None:
    return next((p for p in sweep.get("points", []) if p["is_subblock_time"]), None)


# --- rendering ------------------------------------------------------------------------------------------


def sweep_table(sweep: dict[str, Any]) -> list[str]:
    if not sweep.get("points"):
        return []
    by_kind = ", ".join(f"{kind} {us:g} us" for kind, us in sweep["subblock_us_by_kind"].items())
    header = (["latency us"] + [f"{name} ms/token" for name in SCHEDULE_NAMES]
              + ["overlap efficiency", "ladder vs standard", "blocked time hidden", "blocked ms/token standard (per rank)"])
    rows = []
    for p in sweep["points"]:
        mark = " (= sub-block time)" if p["is_subblock_time"] else ""
        rows.append([f"{p['latency_us']:g}{mark}"] + [fmt(p["decode_ms"].get(n)) for n in SCHEDULE_NAMES]
                    + [fmt(p["overlap_efficiency"], 2), f"{fmt(p['ladder_speedup'], 2)}x",
                       fmt(p["hidden_wait_share"], 2),
                       " / ".join(fmt(x, 2) for x in p["blocked_ms_per_token"]["standard"])])
    checkpoint = sweep["checkpoint"] or "random weights"
    return [f"## Latency sweep ({sweep['link']}; {sweep['shape']}, {checkpoint}, batch 1)", "",
            f"Every collective completes no earlier than start + latency on the {sweep['link']}; the real "
            "transport underneath still runs. All latencies in one launch, schedules interleaved at each.", "",
            *table(header, rows), "",
            f"Sub-block compute time: {sweep['subblock_us']:g} us ({by_kind}); {sweep['subblock_method']}.", ""]


def sweep_plot(sweep: dict[str, Any], out: Path) -> Path | None:
    """ms/token of each schedule (left) and overlap efficiency (right) against the link's latency."""
    if not sweep.get("points"):
        return None
    import matplotlib.pyplot as plt

    points = sweep["points"]
    xs = [p["latency_us"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in SCHEDULE_NAMES:
        left.plot(xs, [p["decode_ms"].get(name) for p in points], marker="o", label=name)
    left.set_ylabel("decode ms/token, batch 1")
    efficiency = [(p["latency_us"], p["overlap_efficiency"]) for p in points if p["overlap_efficiency"] is not None]
    right.plot([x for x, _ in efficiency], [e for _, e in efficiency], marker="o", color="black",
               label="ladder overlap efficiency")
    right.axhline(0.9, color="gray", linestyle="dotted", label="target 0.9")
    right.set_ylabel("(T_std - T_ladder) / (T_std - T_ub)")
    for ax in (left, right):
        ax.axvline(sweep["subblock_us"], color="red", linestyle="dashed",
                   label=f"sub-block compute {sweep['subblock_us']:g} us")
        ax.set_xlabel("link latency, us")
        ax.legend(fontsize=7)
    fig.suptitle(f"{sweep['shape']}: {sweep['link']}", fontsize=10)
    return save_figure(fig, out / "latency_sweep.png")
