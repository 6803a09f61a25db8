"""One benchmark session on one rank: load the weights once, build every variant, measure them interleaved.

Run by `ladder.launcher.launch` (local ranks), or by torchrun as
`python -m ladder_benchmarks.session SPEC OUT_DIR` (the slow-interconnect mode: one host per namespace).
Every rank runs the same sequence of generations, so their collectives stay in lockstep.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ladder import comm
from ladder.launcher import run
from ladder.model import LadderForCausalLM

from .baselines import (
    BaselineUnavailable,
    agree_everywhere,
    hf_model,
    hf_runner,
    pytorch_tp_model,
    pytorch_tp_obstacle,
)
from .timing import blocked_time
from .workload import (
    ModelSource,
    Runner,
    Workload,
    interleaved,
    ladder_runner,
    make_prompts,
    peak_rss_bytes,
    resident_bytes,
    schedule_variants,
    streamed_bytes,
)

HF_BASELINE = "hf-transformers"
TORCH_TP_BASELINE = "pytorch-tp"


@dataclass(frozen=True)
class SessionSpec:
    source: ModelSource
    workload: Workload = field(default_factory=Workload)
    schedules: tuple[str, ...] = ("standard", "ladder", "parallel", "upper-bound")
    baselines: bool = True
    profile: bool = False


def run_session(spec: SessionSpec) -> dict[str, Any]:
    """This rank's measurements (every rank returns its own; they ran in lockstep)."""
    rank, world = comm.tp_rank(), comm.tp_size()
    log = print if rank == 0 else (lambda _: None)
    base = spec.source.load(rank, world)
    resident = resident_bytes()
    variants = {name: model for name, model in schedule_variants(base).items() if name in spec.schedules}
    runners: dict[str, Runner] = {name: ladder_runner(model) for name, model in variants.items()}
    unavailable: dict[str, str] = {}
    if spec.baselines:
        name, build = (HF_BASELINE, hf_model) if world == 1 else (TORCH_TP_BASELINE, pytorch_tp_model)
        try:
            if world > 1 and (obstacle := pytorch_tp_obstacle(base.config, world)):
                raise BaselineUnavailable(obstacle)  # before loading a whole copy of the weights
            weights = base.state_dict() if world == 1 else spec.source.full_state_dict()
            runner = _checked(hf_runner(build(base.config, weights)), base.config.vocab_size)
            error = None
        except (BaselineUnavailable, RuntimeError, ValueError) as exc:
            runner, error = None, f"{type(exc).__name__}: {exc}"
        if agree_everywhere(runner is not None):
            runners[name] = runner
        else:
            unavailable[name] = error or "failed on another rank"
            log(f"{name} unavailable: {unavailable[name]}")
    samples = interleaved(runners, spec.workload, base.config.vocab_size, log)
    profile = ({name: profile_decode(variants[name], spec.workload, base.config.vocab_size)
                for name in ("standard", "ladder") if name in variants} if spec.profile else None)
    return {
        "rank": rank, "world": world, "transport": getattr(comm.transport(), "name", None),
        "threads": torch.get_num_threads(),
        "cores": sorted(os.sched_getaffinity(0)), "pid": os.getpid(), "gloo_threads": gloo_thread_policies(),
        "streamed_bytes": streamed_bytes(base), "resident_bytes_after_load": resident,
        "peak_rss_bytes": peak_rss_bytes(),
        "samples": samples, "unavailable": unavailable, "profile": profile,
    }


def gloo_thread_policies() -> dict[str, str]:
    """Scheduling policy of each gloo thread of this process (to record whether they ran real-time)."""
    names = {os.SCHED_OTHER: "normal", os.SCHED_FIFO: "fifo", os.SCHED_RR: "rr"}
    policies = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            if "gloo" in name:
                policies[f"{name}:{task.name}"] = names.get(os.sched_getscheduler(int(task.name)), "other")
        except OSError:
            continue
    return policies


def _checked(runner: Runner, vocab: int) -> Runner:
    """Run the baseline once so that a failure shows now, on every rank alike, not mid-measurement."""
    runner(make_prompts(1, 4, vocab), 2, lambda: None)
    return runner


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}


def profile_decode(model: LadderForCausalLM, workload: Workload, vocab: int) -> dict[str, float]:
    """Where a batch-1 decode step's time goes, per token, from torch.profiler (ms; the profiler's own
    overhead lands in `python_and_dispatch`)."""
    from torch.profiler import ProfilerActivity, profile

    steps = max(workload.new_tokens, 8)
    prompts = make_prompts(1, workload.prompt_tokens, vocab)
    profiler = profile(activities=[ProfilerActivity.CPU])
    marks: list[tuple[float, float]] = []
    with blocked_time() as blocked_clock:

        def on_token() -> None:
            marks.append((time.perf_counter(), blocked_clock.seconds))
            if len(marks) == 1:
                profiler.start()

        try:
            ladder_runner(model)(prompts, steps, on_token)
        finally:
            profiler.stop()
    decode_steps = len(marks) - 1
    wall = marks[-1][0] - marks[0][0]
    blocked = marks[-1][1] - marks[0][1]
    by_kind = {"matmul": 0.0, "attention": 0.0, "other_ops": 0.0, "collective_calls": 0.0}
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        if event.key in MATMUL_OPS:
            by_kind["matmul"] += seconds
        elif "scaled_dot_product" in event.key:
            by_kind["attention"] += seconds
        elif event.key.startswith("c10d::") or event.key.startswith("gloo:"):
            by_kind["collective_calls"] += seconds
        elif event.key.startswith("aten::"):
            by_kind["other_ops"] += seconds
    by_kind["blocked_in_wait"] = blocked
    by_kind["python_and_dispatch"] = max(0.0, wall - sum(by_kind.values()))
    by_kind["wall"] = wall
    return {kind: 1e3 * seconds / decode_steps for kind, seconds in by_kind.items()}


def main(argv: list[str]) -> int:
    """torchrun entry point: `python -m ladder_benchmarks.session SPEC.pkl OUT_DIR` on every node."""
    spec_file, out_dir = Path(argv[0]), Path(argv[1])
    spec: SessionSpec = pickle.loads(spec_file.read_bytes())
    rank = int(os.environ["RANK"])
    [result] = run(run_session, int(os.environ["WORLD_SIZE"]), spec)  # joins torchrun's group
    partial = out_dir / f".rank{rank}.pkl.tmp"
    partial.write_bytes(pickle.dumps(result))
    partial.rename(out_dir / f"rank{rank}.pkl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
