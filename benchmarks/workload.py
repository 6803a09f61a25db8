"""What the benchmarks run: model shapes, the schedule variants of one set of weights, timed generation.

Every variant is timed through its real generation loop (`ladder.generate` or transformers'
`generate`), with a timestamp after each new token, so prefill, every decode step and the time
blocked on all-reduces come from the same runs. Variants are measured interleaved (A B C D A B C D)
after a warm-up, and summarised by medians, because this machine is shared and noisy.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ladder.checkpoint import from_pretrained, load_config, save_pretrained
from ladder.config import LadderConfig, Schedule
from ladder.generate import generate
from ladder.model import LadderForCausalLM, random_full_state_dict
from ladder.quant import DEFAULT_GROUP_SIZE

from .timing import blocked_time

SHAPES: dict[str, dict[str, Any]] = {
    # SmolLM2-135M's shape: used with random weights when no checkpoint is given.
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=1e5,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192),
    # TinyLlama-1.1B's layer shape, 4 layers: 4x fewer all-reduces per byte of weights than SmolLM2.
    "llama-2048x4": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=4, head_dim=64, rope_theta=1e4,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=4096),
    # For the smoke test only: runs in milliseconds.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True,
                 max_position_embeddings=1024),
}

SCHEDULES = (Schedule.STANDARD, Schedule.LADDER, Schedule.PARALLEL, Schedule.UPPER_BOUND)
REFERENCE_WEIGHTS = "fp32"


def variant_name(schedule: str, weights: str = REFERENCE_WEIGHTS) -> str:
    """'standard' for fp32 weights (the names of every report before weight formats), else 'standard:int4'."""
    return schedule if weights == REFERENCE_WEIGHTS else f"{schedule}:{weights}"


def variant_weights(name: str) -> str:
    """The weight format of a variant named by `variant_name` (a baseline's own, e.g. 'llama.cpp:Q4_1')."""
    return name.partition(":")[2] or REFERENCE_WEIGHTS


@dataclass(frozen=True)
class ModelSource:
    """A named shape with random weights, or a converted checkpoint directory (then `shape` is its name).

    `random_weights` marks a checkpoint that `materialized` wrote from random weights.
    """

    shape: str
    checkpoint: str | None = None
    random_weights: bool = False

    def config(self) -> LadderConfig:
        if self.checkpoint:
            return load_config(self.checkpoint)
        return LadderConfig(**SHAPES[self.shape])

    def load(self, rank: int, world: int, weights: str = REFERENCE_WEIGHTS,
             group_size: int = DEFAULT_GROUP_SIZE) -> LadderForCausalLM:
        """This rank's shard, every layer standard (the variants reuse its tensors), its projections
        in the weight format `weights` (`ladder.quant.WEIGHT_FORMATS`; int4 in groups of `group_size`)."""
        if self.checkpoint:
            return from_pretrained(self.checkpoint, rank, world, schedules=self.config().all_standard().schedules,
                                   weights=weights, group_size=group_size)
        if weights != REFERENCE_WEIGHTS:
            raise ValueError(f"{self.shape}: weights {weights!r} are converted while a checkpoint loads; "
                             "random weights are fp32 until `materialized` writes them as one")
        model = LadderForCausalLM(self.config(), rank, world)
        model.load_full_state_dict(random_full_state_dict(model.config))
        return model.eval()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights in Hugging Face naming (for the external baselines)."""
        return self.load(0, 1).state_dict()

    def materialized(self, directory: Path) -> ModelSource:
        """The same random weights written once as a checkpoint under `directory`, so that each rank
        reads only its shard (as with real weights) instead of generating the whole model."""
        if self.checkpoint:
            return self
        path = directory / self.shape
        save_pretrained(self.load(0, 1), path, force=True)
        return ModelSource(self.shape, str(path), random_weights=True)


def _share_children(target: torch.nn.Module, source: torch.nn.Module, keep: tuple[str, ...] = ()) -> None:
    """Make `source`'s submodules (except those named in `keep`) `target`'s too: the same objects."""
    for name, child in source.named_children():
        if name not in keep:
            target.register_module(name, child)


def schedule_variants(base: LadderForCausalLM, schedules: tuple[Schedule | str, ...] = SCHEDULES
                      ) -> dict[str, LadderForCausalLM]:
    """One model per schedule, every one holding `base`'s very modules and tensors (no copies).

    Only the decoder layers, which carry the schedule, are new; what they and the model hold (norms,
    projections in whatever weight format, the embedding and the head) is `base`'s.
    """
    layers = base.config.num_hidden_layers
    variants = {}
    for schedule in map(Schedule, schedules):
        model = LadderForCausalLM.empty(base.config.with_schedules([schedule] * layers), base.plan.rank, base.plan.world)
        _share_children(model, base, keep=("model",))
        _share_children(model.model, base.model, keep=("layers",))
        for layer, base_layer in zip(model.model.layers, base.model.layers, strict=True):
            _share_children(layer, base_layer)
        left_on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
        if left_on_meta:
            raise RuntimeError(f"schedule variant {schedule.value}: {left_on_meta[:3]} not taken from the base model")
        variants[schedule.value] = model.eval()
    return variants


def streamed_bytes(model: LadderForCausalLM) -> int:
    """Bytes of weights one decode step reads: every parameter and weight buffer once (a low-bit
    projection's integers and scales are buffers), except an embedding table that is not also the
    LM head (a step reads only one row of it)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in tensors}
    embedding = model.model.embed_tokens.weight
    if getattr(model.lm_head, "weight", None) is not embedding:
        sizes.pop(embedding.data_ptr())
    return sum(sizes.values())


# --- timing -----------------------------------------------------------------------------------


class Runner(Protocol):
    """Generates `new_tokens` greedily for a batch of prompts, calling `on_token` after each token.

    A runner that decodes only up to some number of sequences at once says so in `max_batch`.
    """

    def __call__(self, prompts: list[list[int]], new_tokens: int, on_token: Callable[[], None]) -> None: ...


def takes_batch(runner: Runner, batch: int) -> bool:
    """Whether `runner` decodes `batch` sequences at once (an external baseline may take one only)."""
    return batch <= getattr(runner, "max_batch", batch)


def ladder_runner(model: LadderForCausalLM) -> Runner:
    def run(prompts: list[list[int]], new_tokens: int, on_token: Callable[[], None]) -> None:
        generate(model, prompts, max_new_tokens=new_tokens, on_tokens=lambda _: on_token())
    return run


@dataclass
class Run:
    """One generation: time to the first token, each decode step, and the time blocked on all-reduces."""

    prefill_s: float
    steps_s: list[float]
    prefill_blocked_s: float
    steps_blocked_s: list[float]

    @property
    def decode_s_per_token(self) -> float:
        return statistics.fmean(self.steps_s) if self.steps_s else float("nan")

    @property
    def blocked_s_per_token(self) -> float:
        return statistics.fmean(self.steps_blocked_s) if self.steps_blocked_s else float("nan")

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.steps_s)


def timed_run(runner: Runner, prompts: list[list[int]], new_tokens: int) -> Run:
    """Run once with a timestamp and a reading of the blocked-time clock after every new token."""
    marks: list[tuple[float, float]] = []
    with blocked_time() as blocked_clock:

        def on_token() -> None:
            marks.append((time.perf_counter(), blocked_clock.seconds))

        started = time.perf_counter()
        runner(prompts, new_tokens, on_token)
    if len(marks) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} tokens, the runner reported {len(marks)}")
    times = [started] + [t for t, _ in marks]
    blocked = [0.0] + [b for _, b in marks]
    return Run(prefill_s=times[1] - times[0],
               steps_s=[b - a for a, b in itertools.pairwise(times[1:])],
               prefill_blocked_s=blocked[1],
               steps_blocked_s=[b - a for a, b in itertools.pairwise(blocked[1:])])


# Fixed seeds so that every variant, rank and run sees the same prompts; prefill gets a seed of its own
# only so that its long prompt does not start with the decode prompts' tokens.
DECODE_PROMPTS_SEED, PREFILL_PROMPT_SEED = 0, 1


def make_prompts(batch: int, length: int, vocab: int, seed: int = DECODE_PROMPTS_SEED) -> list[list[int]]:
    """Random prompts, identical for every variant and rank (rank 0's are broadcast anyway)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator).tolist()


@dataclass
class Workload:
    """How much to measure; the defaults are the report's, `quick()` is the smoke test's."""

    batches: tuple[int, ...] = (1, 4, 16)
    repeats: int = 5
    prompt_tokens: int = 32
    new_tokens: int = 17
    prefill_tokens: int = 512
    prefill_repeats: int = 3

    @classmethod
    def quick(cls) -> Workload:
        return cls(batches=(1, 2), repeats=2, prompt_tokens=8, new_tokens=4, prefill_tokens=32, prefill_repeats=1)


@dataclass
class Samples:
    """Every run of one variant, per batch size, plus its prefill runs."""

    decode: dict[int, list[Run]] = field(default_factory=dict)
    prefill: list[Run] = field(default_factory=list)


def interleaved(runners: dict[str, Runner], workload: Workload, vocab: int,
                log: Callable[[str], None] = lambda _: None) -> dict[str, Samples]:
    """Measure every runner at every batch size, and prefill, in rounds of A B C D after a warm-up."""
    samples = {name: Samples() for name in runners}
    for batch in workload.batches:
        prompts = make_prompts(batch, workload.prompt_tokens, vocab)
        taking = {name: runner for name, runner in runners.items() if takes_batch(runner, batch)}
        for runner in taking.values():
            timed_run(runner, prompts, workload.new_tokens)  # warm-up
        for _ in range(workload.repeats):
            for name, runner in taking.items():
                samples[name].decode.setdefault(batch, []).append(timed_run(runner, prompts, workload.new_tokens))
        log(f"batch {batch}: " + ", ".join(
            f"{n} {1e3 * median_decode(samples[n].decode[batch]):.1f}" for n in taking) + " ms/token")
    if not workload.prefill_repeats:
        return samples
    prompts = make_prompts(1, workload.prefill_tokens, vocab, seed=PREFILL_PROMPT_SEED)
    for runner in runners.values():
        timed_run(runner, prompts, 1)
    for _ in range(workload.prefill_repeats):
        for name, runner in runners.items():
            samples[name].prefill.append(timed_run(runner, prompts, 1))
    return samples


def median_decode(runs: list[Run]) -> float:
    return statistics.median(r.decode_s_per_token for r in runs)


def _status_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(f"{field}:"))) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: a spawned rank inherits
    its parent's peak through exec there, so it would report the launcher's memory, not its own."""
    return _status_bytes("VmHWM")


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS)."""
    return _status_bytes("VmRSS")
