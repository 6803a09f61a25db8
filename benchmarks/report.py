"""`ladder bench`: Standard vs Ladder vs Parallel vs upper bound, side by side, with the baselines.

One launch per (shape, TP size) keeps its ranks alive while every variant of the same weights is
measured interleaved (`session.py`). Around them, in the same run: the memory-bandwidth
roofline, the pinning/thread alternatives at TP=2, and the slow-interconnect mode. Writes
`results.json`, `results.md` and PNG plots to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ladder import comm
from ladder.launcher import Placement, launch
from ladder.layers import input_major

from . import netns
from .render import write_markdown, write_plots
from .session import SessionSpec, run_session
from .workload import SHAPES, ModelSource, Run, Samples, Workload

HELP = "benchmark Standard vs Ladder vs Parallel vs upper bound, with baselines"

PLACEMENTS = {
    "unpinned, 1 thread/rank, real-time gloo threads (default)": Placement(),
    "unpinned, 1 thread/rank, normal-priority gloo threads": Placement(realtime_communication=False),
    "pinned, 1 core/rank, real-time gloo threads": Placement(pin=True),
    "unpinned, 2 threads/rank, real-time gloo threads": Placement(threads=2),
}


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for JSON, markdown, PNGs")
    parser.add_argument("--shapes", default="smollm2-135m,llama-2048x4",
                        help=f"comma-separated, from: {', '.join(SHAPES)}")
    parser.add_argument("--checkpoint", help="converted SmolLM2 checkpoint for the smollm2-135m shape "
                        "(default: random weights of that shape)")
    parser.add_argument("--tp", type=_int_list, default=[1, 2, 3, 4], help="TP sizes, e.g. 1,2,4")
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per batch size")
    parser.add_argument("--new-tokens", type=int, default=17, help="tokens per timed generation")
    parser.add_argument("--no-baselines", action="store_true", help="skip transformers and PyTorch TP")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown at TP=2")
    parser.add_argument("--no-placements", action="store_true", help="skip the pinning/threads comparison")
    parser.add_argument("--slow-link-rate", default="20mbit",
                        help="tc rate of the veth link between the two namespaces; 'off' skips the mode")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, TP 1 and 2, a few tokens: checks the machinery in seconds")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: redraw the markdown and plots of an earlier results.json into --out")


def run(args: argparse.Namespace) -> int:
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.render.read_text()), args.out)
        return 0
    if args.quick:
        shapes, tps, workload = ["tiny"], [t for t in args.tp if t <= 2], Workload.quick()
    else:
        shapes = [s for s in args.shapes.split(",") if s]
        tps = args.tp
        workload = Workload(batches=tuple(args.batches), repeats=args.repeats, new_tokens=args.new_tokens)
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ladder-bench-weights-") as weights:
        report = measure_all(args, shapes, tps, workload, Path(weights))
    text = json.dumps(report, indent=1)
    (args.out / "results.json").write_text(text)
    write_outputs(json.loads(text), args.out)
    return 0


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """Markdown and plots, always drawn from the JSON form (so `--render` gives the same result)."""
    report = _int_keys(report)
    if "plan" in report:  # a results.json written before "plan" was renamed "workload"
        report["workload"] = report.pop("plan")
    write_markdown(report, out / "results.md")
    plots = write_plots(report, out)
    print(f"wrote {out / 'results.md'}, {', '.join(str(p) for p in plots)}")


def _int_keys(value: Any) -> Any:
    """JSON turns the batch sizes and thread counts used as keys into strings; turn them back."""
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_int_keys(v) for v in value]
    return value


def measure_all(args: argparse.Namespace, shapes: list[str], tps: list[int], workload: Workload,
                weights: Path) -> dict[str, Any]:
    """Everything, in one run; random weights are written once to `weights` as checkpoints."""
    started = time.time()
    command = {name: value for name, value in vars(args).items() if not callable(value)}  # not the `run` hook
    report: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(),
                              "workload": dataclasses.asdict(workload), "command": command | {"out": str(args.out)}}
    report["bandwidth_gb_s"] = measure_bandwidth(quick=args.quick)
    print(f"matrix-vector bandwidth (GB/s by threads): {report['bandwidth_gb_s']}", flush=True)

    sources = {shape: ModelSource(shape, args.checkpoint if shape == "smollm2-135m" else None).materialized(weights)
               for shape in shapes}
    report["sessions"] = []
    for shape, source in sources.items():
        heads = source.config().num_attention_heads
        for tp in tps:
            if tp > heads:
                print(f"{shape}: TP={tp} skipped (only {heads} heads)")
                continue
            print(f"--- {shape} TP={tp} ---", flush=True)
            oversubscribed = tp > len(os.sched_getaffinity(0))
            session_workload = (dataclasses.replace(workload, repeats=min(workload.repeats, 3), prefill_repeats=1)
                                if oversubscribed else workload)  # slower per token when oversubscribed: fewer rounds
            spec = SessionSpec(source, session_workload, baselines=not args.no_baselines,
                               profile=tp == 2 and not args.no_profile)
            ranks = launch(run_session, tp, spec, timeout_s=600)
            report["sessions"].append(summarize(shape, source, ranks, report["bandwidth_gb_s"]))

    placement_shape = shapes[0]
    report["placements"] = []
    if not args.no_placements and 2 in tps:
        short = dataclasses.replace(workload, batches=(1,), prefill_repeats=0)
        spec = SessionSpec(sources[placement_shape], short, schedules=("standard", "ladder", "upper-bound"),
                           baselines=False)
        for label, placement in PLACEMENTS.items():
            print(f"--- placement: {label} ---", flush=True)
            ranks = launch(run_session, 2, spec, placement=placement, timeout_s=600)
            summary = summarize(placement_shape, spec.source, ranks, report["bandwidth_gb_s"])
            report["placements"].append({"placement": label} | summary)

    config = sources[placement_shape].config()
    report["collective_cost"] = ({"shape": placement_shape, "layers": config.num_hidden_layers,
                                  "ranks": launch(collective_cost, 2, config.hidden_size, quick=args.quick)}
                                 if 2 in tps else {})
    report["slow_link"] = (slow_link(args, placement_shape, sources[placement_shape], workload) if 2 in tps
                           else {"skipped": "TP=2 not requested"})
    report["load_after"] = os.getloadavg()
    report["wall_seconds"] = time.time() - started
    return report


def slow_link(args: argparse.Namespace, shape: str, source: ModelSource, workload: Workload) -> dict[str, Any]:
    """TP=2 with one rank per network namespace, first over the bare veth pair, then rate-limited."""
    if args.slow_link_rate == "off":
        return {"skipped": "--slow-link-rate off"}
    reason = netns.availability()
    if reason:
        print(f"slow-interconnect mode skipped: {reason}")
        return {"skipped": reason}
    link_workload = dataclasses.replace(workload, batches=tuple(b for b in workload.batches if b <= 4),
                                        prefill_repeats=0)
    spec = SessionSpec(source, link_workload, baselines=False)
    runs = []
    for rate in (None, args.slow_link_rate):
        link = netns.SlowLink(rate=rate)
        print(f"--- slow link: {link.describe()['rate']} ---", flush=True)
        with link:
            ranks = link.run_session(spec)
        runs.append({"link": link.describe()} | summarize(shape, source, ranks, {}))
    return {"runs": runs}


def collective_cost(hidden: int, quick: bool = False) -> dict[str, float]:
    """What one all-reduce of a batch-1 hidden vector costs this rank: latency, and CPU time.

    The CPU time is measured with the calling thread asleep while the reduction runs, so all of it
    is gloo's (its worker and TCP-loop threads handing the message along) plus the launch and wait.
    On cores that are all busy computing, that time cannot overlap with anything: it bounds the
    share of communication any schedule can hide.
    """
    calls, nap = (50 if quick else 500), 0.001
    tensor = torch.randn(1, hidden)

    def cpu_seconds() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        comm.all_reduce_start(tensor).wait()
        latencies.append(time.perf_counter() - started)
    comm.barrier()
    idle_started = cpu_seconds()
    for _ in range(calls):
        time.sleep(nap)
    idle = cpu_seconds() - idle_started
    comm.barrier()
    busy_started = cpu_seconds()
    for _ in range(calls):
        pending = comm.all_reduce_start(tensor)
        time.sleep(nap)
        pending.wait()
    busy = cpu_seconds() - busy_started
    return {"latency_us": round(1e6 * statistics.median(latencies), 1),
            "cpu_us": round(1e6 * (busy - idle) / calls, 1), "floats": hidden}


# --- measurements made in this process --------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "kernel": platform.release(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def measure_bandwidth(quick: bool = False) -> dict[int, dict[str, float]]:
    """fp32 matrix-vector streaming bandwidth (GB/s, median) for 1..cores threads, per weight layout.

    The matrix (256 MB) is larger than the last-level cache, so every product streams it from memory,
    exactly like a batch-1 decode step streams the weights. Both memory layouts of a weight are
    measured (`out-major` is PyTorch's default [out, in], `in-major` what the model uses, see
    `ladder.layers.input_major`); the roofline takes the faster, so the model is held to the best
    this machine can stream, not to its own layout.
    """
    rows = 1024 if quick else 16384
    vector = torch.randn(1, 4096)
    layouts = {"out-major": torch.randn(rows, 4096)}
    layouts["in-major"] = input_major(layouts["out-major"])
    before = torch.get_num_threads()
    result: dict[int, dict[str, float]] = {}
    for threads in range(1, len(os.sched_getaffinity(0)) + 1):
        torch.set_num_threads(threads)
        result[threads] = {}
        for layout, matrix in layouts.items():
            times = []
            for _ in range(3 if quick else 15):
                started = time.perf_counter()
                torch.nn.functional.linear(vector, matrix)
                times.append(time.perf_counter() - started)
            result[threads][layout] = round(matrix.numel() * 4 / statistics.median(times[1:]) / 1e9, 2)
    torch.set_num_threads(before)
    return result


def best_bandwidth(bandwidth: dict[int, dict[str, float]], threads: int) -> float:
    """The faster layout's GB/s with `threads` threads (capped at the most threads measured)."""
    return max(bandwidth[min(threads, max(bandwidth))].values())


# --- summaries ----------------------------------------------------------------------------------


def _median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3) if values else float("nan")


def summarize(shape: str, source: ModelSource, ranks: list[dict[str, Any]],
              bandwidth: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Medians per variant (rank 0's clock; the ranks ran in lockstep), ratios, efficiency, roofline."""
    lead = ranks[0]
    world = lead["world"]
    cores = len(os.sched_getaffinity(0))
    threads_total = sum(r["threads"] for r in ranks)
    samples: dict[str, Samples] = lead["samples"]
    variants: dict[str, Any] = {}
    for name, sample in samples.items():
        variants[name] = {
            "decode_ms": {b: _median_ms([r.decode_s_per_token for r in runs]) for b, runs in sample.decode.items()},
            "decode_ms_runs": {b: [round(1e3 * r.decode_s_per_token, 3) for r in runs]
                               for b, runs in sample.decode.items()},
            "e2e_tokens_per_s": {b: round(statistics.median(b * (1 + len(r.steps_s)) / r.total_s for r in runs), 2)
                                 for b, runs in sample.decode.items()},
            "prefill_ms": _median_ms([r.prefill_s for r in sample.prefill]),
            "blocked_ms_per_token": {b: [_median_ms(_blocked(rank["samples"][name].decode[b])) for rank in ranks]
                                     for b in sample.decode},
        }
    standard = variants.get("standard")
    speedup = {name: {b: round(standard["decode_ms"][b] / v["decode_ms"][b], 3) for b in v["decode_ms"]}
               for name, v in variants.items()} if standard else {}
    summary: dict[str, Any] = {
        "shape": shape, "checkpoint": None if source.random_weights else source.checkpoint, "tp": world,
        "oversubscribed": threads_total > cores, "threads_per_rank": [r["threads"] for r in ranks],
        "cores_per_rank": [r["cores"] for r in ranks],
        "resident_mb_after_load": [round(r["resident_bytes_after_load"] / 2**20) for r in ranks],
        "peak_rss_mb": [round(r["peak_rss_bytes"] / 2**20) for r in ranks],
        "streamed_mb_per_rank": [round(r["streamed_bytes"] / 2**20, 1) for r in ranks],
        "variants": variants, "speedup_vs_standard": speedup,
        "overlap_efficiency": overlap_efficiency(variants) if world > 1 else {},
        "hidden_wait_share": hidden_wait_share(variants) if world > 1 else {},
        "unavailable": lead["unavailable"], "profile": [r["profile"] for r in ranks if r["profile"]],
    }
    if bandwidth:
        usable = best_bandwidth(bandwidth, threads_total)
        roofline = usable * 1e9 / sum(r["streamed_bytes"] for r in ranks)
        summary["roofline_tokens_per_s"] = round(roofline, 2)
        summary["roofline_fraction_batch1"] = {name: round(1e3 / v["decode_ms"][1] / roofline, 3)
                                               for name, v in variants.items() if 1 in v["decode_ms"]}
    return summary


def _blocked(runs: list[Run]) -> list[float]:
    return [r.blocked_s_per_token for r in runs]


def hidden_wait_share(variants: dict[str, Any]) -> dict[int, float | None]:
    """1 - blocked(ladder) / blocked(standard) per batch (means over ranks): the share of the time a
    standard model spends waiting on communication that the ladder takes off the critical path.
    Unlike the overlap efficiency it leaves out the CPU time communication costs (`collective_cost`)."""
    if not all(n in variants for n in ("standard", "ladder")):
        return {}
    std, lad = (variants[n]["blocked_ms_per_token"] for n in ("standard", "ladder"))
    return {b: round(1 - statistics.mean(lad[b]) / statistics.mean(std[b]), 3) if statistics.mean(std[b]) > 0
            else None for b in std}


def overlap_efficiency(variants: dict[str, Any]) -> dict[int, float | None]:
    """(T_standard - T_ladder) / (T_standard - T_upper_bound) per batch: the share of the exposed
    communication that the ladder hides (the paper's overlap efficiency). None when there is nothing to hide."""
    needed = ("standard", "ladder", "upper-bound")
    if not all(n in variants for n in needed):
        return {}
    std, lad, ub = (variants[n]["decode_ms"] for n in needed)
    return {b: round((std[b] - lad[b]) / (std[b] - ub[b]), 3) if std[b] - ub[b] > 0 else None for b in std}
