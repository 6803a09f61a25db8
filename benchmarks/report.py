"""`ladder bench`: Standard vs Ladder vs Parallel vs upper bound, side by side, with the baselines.

One launch per (shape, TP size, transport) keeps its ranks alive while every variant of the same
weights is measured interleaved (`session.py`); TP=1 has no transport, TP>1 runs once over each of
`--transports`; each weight format of `--weights` is loaded in the same launch and measured in the
same interleaved rounds, and at TP=1 on SmolLM2's shape so is llama.cpp on the same GGUF
(`llamacpp.py`). Around them, in the same run: the memory-bandwidth roofline, the pinning/thread
alternatives at TP=2, what one collective costs per transport (`collectives.py`), the latency sweep
on an emulated link (`sweep.py`), the slow-interconnect mode (`netns.py`) and the accuracy of each
weight format (`accuracy.py`). Writes `results.json`, `results.md` and PNG plots to `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ladder.generate_cli import at_least
from ladder.launcher import Placement, launch
from ladder.layers import input_major
from ladder.quant import DEFAULT_GROUP_SIZE, WEIGHT_FORMATS

from . import collectives, netns
from .accuracy import measure_accuracy
from .adaptation import shipped_smollm2_gguf
from .llamacpp import LlamaCppSpec, default_cache_dir
from .render import write_markdown, write_plots
from .session import SessionSpec, run_session
from .summary import summarize
from .sweep import LATENCIES_US, QUICK_LATENCIES_US, measure_sweep
from .workload import REFERENCE_WEIGHTS, SHAPES, ModelSource, Workload

HELP = "benchmark Standard vs Ladder vs Parallel vs upper bound, with baselines"

# About gloo's threads, so measured over gloo whatever the default transport.
PLACEMENTS = {
    "unpinned, 1 thread/rank, real-time gloo threads (default)": Placement(transport="gloo"),
    "unpinned, 1 thread/rank, normal-priority gloo threads": Placement(transport="gloo",
                                                                       realtime_communication=False),
    "pinned, 1 core/rank, real-time gloo threads": Placement(transport="gloo", pin=True),
    "unpinned, 2 threads/rank, real-time gloo threads": Placement(transport="gloo", threads=2),
}
TRANSPORTS = ("shm", "gloo")
LLAMA_CPP_SHAPE = "smollm2-135m"  # the shape of the GGUF that llama.cpp runs


def _int_list(text: str) -> list[int]:
    """Positive integers (TP sizes, batch sizes), refused before any measurement starts."""
    return [at_least(1)(part) for part in text.split(",") if part]


def _float_list(text: str) -> list[float]:
    """Finite non-negative numbers (latencies in us)."""
    values = [float(part) for part in text.split(",") if part]
    if not all(0 <= v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers >= 0, got {text}")
    return values


def _transports(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    unknown = [n for n in names if n not in (*TRANSPORTS, "auto")]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"transports are shm, gloo or auto, got {text!r}")
    return names


def _weights(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    unknown = [n for n in names if n not in WEIGHT_FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(f"weight formats are {', '.join(WEIGHT_FORMATS)}, got {', '.join(unknown)}")
    return list(dict.fromkeys([REFERENCE_WEIGHTS, *names]))  # fp32 first, each once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for JSON, markdown, PNGs")
    parser.add_argument("--shapes", default="smollm2-135m,llama-2048x4",
                        help=f"comma-separated, from: {', '.join(SHAPES)}; the first is also the shape of the "
                        "placements, collective-cost, latency-sweep, slow-link sections and of the targets")
    parser.add_argument("--checkpoint", help="converted SmolLM2 checkpoint for the smollm2-135m shape "
                        "(default: random weights of that shape)")
    parser.add_argument("--tp", type=_int_list, default=[1, 2, 3, 4], help="TP sizes, e.g. 1,2,4")
    parser.add_argument("--transports", type=_transports, default=list(TRANSPORTS),
                        help="transports of every TP>1 session, e.g. shm,gloo (the collective cost always "
                        "measures both)")
    parser.add_argument("--weights", type=_weights, default=[REFERENCE_WEIGHTS],
                        help=f"weight formats measured side by side, from {', '.join(WEIGHT_FORMATS)} (fp32 "
                        "included: it runs every schedule, the others standard, and ladder at TP>1)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, help="int4 group size")
    parser.add_argument("--llama-cpp-cache", type=Path, default=default_cache_dir(),
                        help="where llama.cpp's requantized GGUF files are kept between runs")
    parser.add_argument("--batches", type=_int_list, default=[1, 4, 16])
    parser.add_argument("--repeats", type=at_least(1), default=5, help="interleaved rounds per batch size")
    parser.add_argument("--new-tokens", type=at_least(1), default=17, help="tokens per timed generation")
    parser.add_argument("--latencies", type=_float_list, default=None,
                        help="emulated-link latencies (us) of the TP=2 latency sweep, e.g. 0,100,400; the "
                        f"sub-block compute time is added (default {','.join(map(str, LATENCIES_US))}; "
                        "an empty string skips the sweep)")
    parser.add_argument("--no-baselines", action="store_true", help="skip transformers, PyTorch TP and llama.cpp")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown at TP=1 and 2")
    parser.add_argument("--no-accuracy", action="store_true",
                        help="skip the perplexity and chat answer of each weight format")
    parser.add_argument("--no-placements", action="store_true", help="skip the pinning/threads comparison")
    parser.add_argument("--slow-link-rate", default="20mbit",
                        help="tc rate of the veth link between the two namespaces; 'off' skips the mode")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, TP 1 and 2, a few tokens, two latencies: checks the machinery quickly")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: redraw the markdown and plots of an earlier results.json into --out")


def run(args: argparse.Namespace) -> int:
    if args.render:
        args.out.mkdir(parents=True, exist_ok=True)
        write_outputs(json.loads(args.render.read_text()), args.out)
        return 0
    if args.quick:
        shapes, tps, workload = ["tiny"], [t for t in args.tp if t <= 2], Workload.quick()
        args.latencies = list(QUICK_LATENCIES_US)
    else:
        shapes = [s for s in args.shapes.split(",") if s]
        tps = args.tp
        workload = Workload(batches=tuple(args.batches), repeats=args.repeats, new_tokens=args.new_tokens)
        args.latencies = list(LATENCIES_US) if args.latencies is None else args.latencies
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ladder-bench-weights-") as weights:
        report = measure_all(args, shapes, tps, workload, Path(weights))
    text = json.dumps(report, indent=1)
    (args.out / "results.json").write_text(text)
    write_outputs(json.loads(text), args.out)
    return 0


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """Markdown and plots, always drawn from the JSON form (so `--render` gives the same result)."""
    report = _upgrade(_int_keys(report))
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


def _upgrade(report: dict[str, Any]) -> dict[str, Any]:
    """A results.json of an earlier version in today's form: every TP>1 launch then ran over gloo."""
    if "plan" in report:  # before "plan" was renamed "workload"
        report["workload"] = report.pop("plan")
    for session in report["sessions"] + report.get("placements", []):
        session.setdefault("transport", "gloo" if session["tp"] > 1 else None)
    report["collective_cost"] = collectives.upgrade(report.get("collective_cost", {}))
    return report


@contextmanager
def _section(report: dict[str, Any], name: str) -> Iterator[None]:
    """Record the section's wall time in the report (to plan how long a run takes)."""
    started = time.time()
    try:
        yield
    finally:
        report.setdefault("section_seconds", {})[name] = round(time.time() - started, 1)


def measure_all(args: argparse.Namespace, shapes: list[str], tps: list[int], workload: Workload,
                weights: Path) -> dict[str, Any]:
    """Everything, in one run; random weights are written once to `weights` as checkpoints."""
    started = time.time()
    command = {name: str(value) if isinstance(value, Path) else value
               for name, value in vars(args).items() if not callable(value)}  # not the `run` hook
    report: dict[str, Any] = {"machine": machine(), "load_before": os.getloadavg(),
                              "workload": dataclasses.asdict(workload), "command": command}
    with _section(report, "bandwidth"):
        report["bandwidth_gb_s"] = measure_bandwidth(quick=args.quick)
    print(f"matrix-vector bandwidth (GB/s by threads): {report['bandwidth_gb_s']}", flush=True)
    sources = {shape: ModelSource(shape, args.checkpoint if shape == "smollm2-135m" else None).materialized(weights)
               for shape in shapes}
    with _section(report, "sessions"):
        report["sessions"] = measure_sessions(args, sources, tps, workload, report["bandwidth_gb_s"])
    lead = sources[shapes[0]]
    with _section(report, "placements"):
        report["placements"] = (measure_placements(lead, workload) if not args.no_placements and 2 in tps else [])
    with _section(report, "collective cost"):
        sizes = tuple(sorted({*(collectives.QUICK_SIZES if args.quick else collectives.SIZES),
                              lead.config().hidden_size}))
        report["collective_cost"] = (collectives.measure_collectives(lead, TRANSPORTS, sizes, args.quick)
                                     if 2 in tps else {})
    with _section(report, "latency sweep"):
        report["latency_sweep"] = (measure_sweep(lead, tuple(args.latencies), workload)
                                   if 2 in tps and args.latencies else {"skipped": "TP=2 or --latencies not given"})
    with _section(report, "slow link"):
        report["slow_link"] = (slow_link(args, lead, workload) if 2 in tps else {"skipped": "TP=2 not requested"})
    with _section(report, "accuracy"):
        report["accuracy"] = accuracy(args, lead)
    report["load_after"] = os.getloadavg()
    report["wall_seconds"] = time.time() - started
    return report


def measure_sessions(args: argparse.Namespace, sources: dict[str, ModelSource], tps: list[int],
                     workload: Workload, bandwidth: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One launch per (shape, TP, transport). The external baselines run in the first transport's
    launch only: they bring their own communication, so a second transport would measure them twice."""
    sessions = []
    for shape, source in sources.items():
        heads = source.config().num_attention_heads
        for tp in tps:
            if tp > heads:
                print(f"{shape}: TP={tp} skipped (only {heads} heads)")
                continue
            oversubscribed = tp > len(os.sched_getaffinity(0))
            session_workload = (dataclasses.replace(workload, repeats=min(workload.repeats, 3), prefill_repeats=1)
                                if oversubscribed else workload)  # slower per token when oversubscribed: fewer rounds
            for transport in (args.transports if tp > 1 else [None]):
                print(f"--- {shape} TP={tp}{' over ' + transport if transport else ''} ---", flush=True)
                baselines = not args.no_baselines and transport in (None, args.transports[0])
                spec = SessionSpec(source, session_workload, baselines=baselines, profile=tp <= 2 and not args.no_profile,
                                   weights=tuple(args.weights), group_size=args.group_size,
                                   llama_cpp=llama_cpp_spec(args) if baselines and tp == 1 and shape == LLAMA_CPP_SHAPE
                                   else None)
                started = time.time()
                ranks = launch(run_session, tp, spec, placement=Placement(transport=transport), timeout_s=600)
                sessions.append(summarize(shape, source, ranks, bandwidth)
                                | {"wall_seconds": round(time.time() - started, 1)})
    return sessions


def llama_cpp_spec(args: argparse.Namespace) -> LlamaCppSpec:
    gguf = shipped_smollm2_gguf()
    return LlamaCppSpec(str(gguf) if gguf else None, str(args.llama_cpp_cache))


def accuracy(args: argparse.Namespace, source: ModelSource) -> dict[str, Any]:
    """Every weight format's perplexity and chat answer, on a real checkpoint only (random weights
    have neither a tokenizer nor an answer)."""
    if args.no_accuracy:
        return {"skipped": "--no-accuracy"}
    if source.random_weights or not source.checkpoint:
        return {"skipped": f"{source.shape} has random weights (give --checkpoint for SmolLM2's)"}
    return measure_accuracy(source.checkpoint, tuple(args.weights), args.group_size)


def measure_placements(source: ModelSource, workload: Workload) -> list[dict[str, Any]]:
    """TP=2 under each of `PLACEMENTS`, batch 1, three schedules."""
    short = dataclasses.replace(workload, batches=(1,), prefill_repeats=0)
    spec = SessionSpec(source, short, schedules=("standard", "ladder", "upper-bound"), baselines=False)
    placements = []
    for label, placement in PLACEMENTS.items():
        print(f"--- placement: {label} ---", flush=True)
        ranks = launch(run_session, 2, spec, placement=placement, timeout_s=600)
        placements.append({"placement": label} | summarize(source.shape, source, ranks, {}))
    return placements


def slow_link(args: argparse.Namespace, source: ModelSource, workload: Workload) -> dict[str, Any]:
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
        runs.append({"link": link.describe()} | summarize(source.shape, source, ranks, {}))
    return {"runs": runs}


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
