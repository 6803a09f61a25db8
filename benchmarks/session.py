"""One benchmark session on one rank: load the weights once, build every variant, measure them interleaved.

Run by `ladder.launcher.launch` (local ranks), or by torchrun as
`python -m ladder_benchmarks.session SPEC OUT_DIR` (the slow-interconnect mode: one host per namespace).
Every rank runs the same sequence of generations, so their collectives stay in lockstep.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable
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
from .llamacpp import LlamaCppSpec, llama_cpp_runners
from .profiling import profile_decode
from .workload import (
    DEFAULT_GROUP_SIZE,
    REFERENCE_WEIGHTS,
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
    variant_name,
)

HF_BASELINE = "hf-transformers"
TORCH_TP_BASELINE = "pytorch-tp"


@dataclass(frozen=True)
class SessionSpec:
    """One launch's measurements. fp32 weights run every schedule of `schedules`; each other format of
    `weights` runs the standard schedule, and the ladder too when there is communication to hide."""

    source: ModelSource
    workload: Workload = field(default_factory=Workload)
    schedules: tuple[str, ...] = ("standard", "ladder", "parallel", "upper-bound")
    baselines: bool = True
    profile: bool = False
    weights: tuple[str, ...] = (REFERENCE_WEIGHTS,)
    group_size: int = DEFAULT_GROUP_SIZE
    llama_cpp: LlamaCppSpec | None = None

    def low_bit_schedules(self, world: int) -> tuple[str, ...]:
        wanted = ("standard", "ladder") if world > 1 else ("standard",)
        return tuple(s for s in wanted if s in self.schedules)


def run_session(spec: SessionSpec) -> dict[str, Any]:
    """This rank's measurements (every rank returns its own; they ran in lockstep)."""
    rank, world = comm.tp_rank(), comm.tp_size()
    log = print if rank == 0 else (lambda _: None)
    base = spec.source.load(rank, world)
    resident = resident_bytes()
    variants = {variant_name(name): model for name, model in schedule_variants(base, spec.schedules).items()}
    streamed = {REFERENCE_WEIGHTS: streamed_bytes(base)}
    unavailable: dict[str, str] = {}
    for weights in spec.weights:
        if weights != REFERENCE_WEIGHTS:
            low_bit = _load_low_bit(spec, rank, world, weights, unavailable, log)
            if low_bit is not None:
                streamed[weights] = streamed_bytes(low_bit)
                variants |= {variant_name(name, weights): model for name, model
                             in schedule_variants(low_bit, spec.low_bit_schedules(world)).items()}
    runners: dict[str, Runner] = {name: ladder_runner(model) for name, model in variants.items()}
    if spec.baselines:
        runners |= _transformers_baseline(spec, base, world, unavailable, log)
    if spec.llama_cpp is not None:
        context = max(spec.workload.prompt_tokens, spec.workload.prefill_tokens) + spec.workload.new_tokens + 1
        llama, missing = llama_cpp_runners(spec.llama_cpp, torch.get_num_threads(), context, log)
        runners |= llama
        unavailable |= missing
    samples = interleaved(runners, spec.workload, base.config.vocab_size, log)
    # Every format's standard variant, and at TP>1 the fp32 ladder: what the ladder changes in a step.
    profiled = [name for name in variants if name.partition(":")[0] == "standard" or (name == "ladder" and world > 1)]
    profile = ({name: profile_decode(variants[name], spec.workload, base.config.vocab_size) for name in profiled}
               if spec.profile else None)
    return {
        "rank": rank, "world": world, "transport": getattr(comm.transport(), "name", None),
        "threads": torch.get_num_threads(),
        "cores": sorted(os.sched_getaffinity(0)), "pid": os.getpid(), "gloo_threads": gloo_thread_policies(),
        "streamed_bytes": streamed[REFERENCE_WEIGHTS], "streamed_bytes_by_weights": streamed,
        "resident_bytes_after_load": resident, "peak_rss_bytes": peak_rss_bytes(),
        "samples": samples, "unavailable": unavailable, "profile": profile,
    }


def _load_low_bit(spec: SessionSpec, rank: int, world: int, weights: str, unavailable: dict[str, str],
                  log: Callable[[str], None]) -> LadderForCausalLM | None:
    """This rank's shard in `weights`, or None (the reason in `unavailable`) if any rank refused it, e.g.
    an int4 group that this TP size's split would cut (every rank checks every rank's split)."""
    try:
        model, error = spec.source.load(rank, world, weights, spec.group_size), None
    except ValueError as exc:
        model, error = None, f"{type(exc).__name__}: {exc}"
    if agree_everywhere(model is not None):
        return model
    unavailable[f"weights {weights}"] = error or "refused on another rank"
    log(f"weights {weights} unavailable: {unavailable[f'weights {weights}']}")
    return None


def _transformers_baseline(spec: SessionSpec, base: LadderForCausalLM, world: int, unavailable: dict[str, str],
                           log: Callable[[str], None]) -> dict[str, Runner]:
    """transformers at TP=1, PyTorch's own tensor parallelism above, on `base`'s fp32 weights."""
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
        return {name: runner}
    unavailable[name] = error or "failed on another rank"
    log(f"{name} unavailable: {unavailable[name]}")
    return {}


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
