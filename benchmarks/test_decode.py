"""pytest-benchmark suite (opt-in: `pytest benchmarks --benchmark-only`).

TP=1 pieces are timed by pytest-benchmark itself: the matrix-vector bandwidth behind the roofline,
one decode step of every schedule at batch 1/4/16, a 512-token prefill, and end-to-end generation
against transformers on the same weights. TP>1 runs live in other processes, where pytest-benchmark's
timer cannot reach: those tests time a whole launch and put the figures measured inside the ranks
into `extra_info` (the same figures `ladder bench` reports): an interleaved session's per-variant
medians, and the per-call time of a batch-1 all-reduce over each transport.

pytest imports this file by its path, so it names its siblings by their installed package
(`ladder_benchmarks`), the names the spawned ranks import them by.
"""

from __future__ import annotations

import itertools
import os
import statistics
from typing import Any

import pytest
import torch

from ladder.generate import Sampling, choose_next
from ladder.launcher import Placement, launch
from ladder.layers import input_major
from ladder_benchmarks.baselines import hf_model, hf_runner
from ladder_benchmarks.collectives import all_reduce_seconds
from ladder_benchmarks.session import SessionSpec, run_session
from ladder_benchmarks.summary import overlap_efficiency, summarize
from ladder_benchmarks.workload import (
    SCHEDULES,
    ModelSource,
    Workload,
    ladder_runner,
    make_prompts,
    schedule_variants,
)

SHAPE = os.environ.get("LADDER_BENCH_SHAPE", "smollm2-135m")
CHECKPOINT = os.environ.get("LADDER_BENCH_CHECKPOINT")
BATCHES = (1, 4, 16)


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return ModelSource(SHAPE, CHECKPOINT)


@pytest.fixture(scope="module")
def variants(source: ModelSource) -> dict[str, Any]:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return schedule_variants(source.load(0, 1))


@pytest.mark.parametrize("layout", ["out-major", "in-major"])
@pytest.mark.parametrize("threads", range(1, len(os.sched_getaffinity(0)) + 1))
def test_matvec_bandwidth(benchmark: Any, threads: int, layout: str) -> None:
    """One row times a 256 MB weight, stored [out, in] (PyTorch's default) or [in, out] (the model's)."""
    matrix, vector = torch.randn(16384, 4096), torch.randn(1, 4096)
    if layout == "in-major":
        matrix = input_major(matrix)
    torch.set_num_threads(threads)
    try:
        benchmark.pedantic(torch.nn.functional.linear, (vector, matrix), rounds=15, warmup_rounds=2)
    finally:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    benchmark.extra_info["gb_per_s"] = matrix.numel() * 4 / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("schedule", [s.value for s in SCHEDULES])
def test_decode_step(benchmark: Any, variants: dict[str, Any], schedule: str, batch: int) -> None:
    """One greedy decode step (forward of one token per sequence + choosing the next) after a 32-token prompt."""
    model = variants[schedule]
    rounds, warmup, prompt = 30, 3, 32
    model.setup_cache(batch, prompt + rounds + warmup + 1)
    generator = torch.Generator()
    ids = torch.tensor(make_prompts(batch, prompt, model.config.vocab_size))
    with torch.inference_mode():
        token = choose_next(model(ids, slot=0)[:, -1], model.plan, Sampling(), generator)
        slots = itertools.count(prompt)

        def step() -> None:
            nonlocal token
            token = choose_next(model(token[:, None], slot=next(slots))[:, -1], model.plan, Sampling(), generator)

        benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
    model.clear_cache()
    benchmark.extra_info["tokens_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("schedule", [s.value for s in SCHEDULES])
def test_prefill_512(benchmark: Any, variants: dict[str, Any], schedule: str) -> None:
    model = variants[schedule]
    ids = torch.tensor(make_prompts(1, 512, model.config.vocab_size))
    model.setup_cache(1, 512)
    with torch.inference_mode():
        benchmark.pedantic(model, (ids,), {"slot": 0}, rounds=3, warmup_rounds=1)
    model.clear_cache()


@pytest.mark.parametrize("implementation", ["ladder-standard", "hf-transformers"])
def test_generate_32_tokens(benchmark: Any, variants: dict[str, Any], implementation: str) -> None:
    """End to end, as a user calls it: a 32-token prompt, 32 greedy tokens, the same weights."""
    standard = variants["standard"]
    runner = (ladder_runner(standard) if implementation == "ladder-standard"
              else hf_runner(hf_model(standard.config, standard.state_dict())))
    prompts = make_prompts(1, 32, standard.config.vocab_size)
    benchmark.pedantic(runner, (prompts, 32, lambda: None), rounds=5, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = 32 / benchmark.stats.stats.median


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_tensor_parallel_session(benchmark: Any, source: ModelSource, tp: int) -> None:
    """A whole interleaved session at TP=N (3 and 4 oversubscribe 2 cores); medians in extra_info."""
    spec = SessionSpec(source, Workload(batches=(1, 4), repeats=3, prefill_repeats=1), baselines=False)
    ranks = benchmark.pedantic(launch, (run_session, tp, spec), {"timeout_s": 600}, rounds=1)
    summary = summarize(SHAPE, source, ranks, {})
    benchmark.extra_info["decode_ms"] = {n: v["decode_ms"] for n, v in summary["variants"].items()}
    benchmark.extra_info["blocked_ms_per_token"] = {n: v["blocked_ms_per_token"] for n, v in summary["variants"].items()}
    benchmark.extra_info["overlap_efficiency"] = overlap_efficiency(summary["variants"])
    benchmark.extra_info["oversubscribed"] = summary["oversubscribed"]


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_all_reduce_576_floats(benchmark: Any, transport: str) -> None:
    """One batch-1 reduction of SmolLM2's hidden vector at TP=2, both ranks calling in lockstep."""
    calls = 2000
    ranks = benchmark.pedantic(launch, (all_reduce_seconds, 2, 576, calls),
                               {"placement": Placement(transport=transport), "timeout_s": 600}, rounds=1)
    for rank, back_to_back in enumerate(ranks):
        benchmark.extra_info[f"rank{rank}_median_us"] = 1e6 * statistics.median(back_to_back.seconds)
        benchmark.extra_info[f"rank{rank}_mean_us"] = 1e6 * statistics.fmean(back_to_back.seconds)
        benchmark.extra_info[f"rank{rank}_cpu_us"] = 1e6 * back_to_back.cpu_s / calls
