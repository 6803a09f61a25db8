"""Prefill, decode and distributed sampling.

No rank ever holds the full logits. Greedy decoding exchanges one (value, index) candidate per rank;
top-k exchanges each rank's local top-k values to find the global threshold; top-p finds the nucleus
from each rank's local top candidates plus two reductions for the normaliser; sampling itself is
Gumbel-max with noise drawn for the whole vocabulary from a generator that every rank advances
identically, so every rank picks the same token, and TP=N picks what TP=1 picks for the same seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ladder import comm
from ladder.model import CacheError, LadderForCausalLM
from ladder.sharding import ShardPlan


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k / top_p filter before sampling, as in Hugging Face."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (leave it unset for no top-k filter), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _global_argmax(scores: torch.Tensor, first: int) -> torch.Tensor:
    """Index of the largest score over every rank's vocabulary slice; ties go to the lowest index."""
    values, index = scores.max(dim=-1)
    candidates = comm.all_gather(torch.stack((values.double(), (index + first).double()), dim=-1))
    best_rank = candidates[..., 0].argmax(dim=0)
    return candidates[best_rank, torch.arange(scores.shape[0]), 1].long()


def _kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The global k-th largest score of each row, from every rank's local top-k."""
    local = scores.topk(min(k, scores.shape[-1]), dim=-1).values
    pooled = comm.all_gather(local).permute(1, 0, 2).flatten(1)
    return pooled.topk(min(k, pooled.shape[-1]), dim=-1).values[:, -1:]


def _nucleus_floor(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """The lowest score that top-p keeps: the top tokens whose higher-ranked mass is below p.

    Pools each rank's top `count` scores, growing `count` until the first token left out is known
    to be the global one (its score lies above every score that was not pooled).
    """
    peak = comm.all_reduce(scores.max(dim=-1, keepdim=True).values.clone(), op="max")
    total = comm.all_reduce((scores - peak).exp().sum(dim=-1, keepdim=True))
    width, count = scores.shape[-1], min(64, scores.shape[-1])
    while True:
        pooled = comm.all_gather(scores.topk(count, dim=-1).values)       # [world, batch, count]
        unpooled_below = pooled[:, :, -1].max(dim=0).values if count < width else torch.full_like(peak[:, 0], -torch.inf)
        ranked = pooled.permute(1, 0, 2).flatten(1).sort(dim=-1, descending=True).values
        probs = (ranked - peak).exp() / total
        dropped = (probs.cumsum(dim=-1) - probs) >= top_p                 # mass ranked above >= p
        first_dropped = dropped.int().argmax(dim=-1, keepdim=True)        # >= 1: the top is always kept
        known = dropped.any(dim=-1) & (ranked.gather(-1, first_dropped)[:, 0] > unpooled_below)
        if count == width or bool(known.all()):
            last_kept = ranked.gather(-1, first_dropped - 1)
            return torch.where(dropped.any(dim=-1, keepdim=True), last_kept, ranked[:, -1:])
        count = min(count * 4, width)


def choose_next(local_logits: torch.Tensor, plan: ShardPlan, sampling: Sampling,
                generator: torch.Generator) -> torch.Tensor:
    """The next token of each row, the same on every rank, from this rank's logits slice."""
    first = plan.vocab.start
    if sampling.temperature == 0:
        return _global_argmax(local_logits, first)
    scores = local_logits / sampling.temperature
    # Equal widths on every rank for the collectives; the padding is never chosen.
    padded = F.pad(scores, (0, plan.widest_vocab - scores.shape[-1]), value=-torch.inf)
    if sampling.top_k is not None:
        padded = padded.masked_fill(padded < _kth_largest(padded, sampling.top_k), -torch.inf)
    if sampling.top_p is not None and sampling.top_p < 1:
        padded = padded.masked_fill(padded < _nucleus_floor(padded, sampling.top_p), -torch.inf)
    scores = padded[:, :scores.shape[-1]]
    uniform = torch.rand(scores.shape[0], plan.config.vocab_size, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform[:, plan.vocab.start:plan.vocab.stop].clamp_min(1e-300)))
    return _global_argmax(scores.double() + gumbel, first)


@dataclass
class Generation:
    """New tokens of each prompt (stop token included when one was hit) and how long it took."""

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    stopped: list[bool] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second per sequence in the decode phase (after the first token)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else float("nan")


@torch.inference_mode()
def generate(model: LadderForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             sampling: Sampling | None = None, stop_tokens: Sequence[int] | None = None,
             max_seq_len: int | None = None,
             on_tokens: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Generate up to `max_new_tokens` for each prompt (token ids) under any TP size.

    Rank 0's prompts are broadcast, so other ranks may pass anything. Prompts of different lengths
    are left-padded; each sequence still sees its own positions from 0, so results equal running
    it alone. `on_tokens` gets each step's new tokens ([batch]) as soon as they are chosen.
    """
    sampling = sampling or Sampling()
    prompts = comm.broadcast_json([list(map(int, p)) for p in prompts])
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    config = model.config
    bad = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {config.vocab_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch, longest = len(prompts), max(len(p) for p in prompts)
    if max_new_tokens == 0:
        return Generation([[] for _ in prompts], sum(map(len, prompts)), 0.0, 0.0, 0, [False] * batch)
    length = max_seq_len or min(longest + max_new_tokens, config.max_position_embeddings)
    if longest + max_new_tokens - 1 > length:
        raise CacheError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens does not fit the "
                         f"KV cache of {length} positions")
    model.eval()
    model.setup_cache(batch, length)
    pads = torch.tensor([longest - len(p) for p in prompts])
    padding = pads if bool(pads.any()) else None
    ids = torch.tensor([[0] * int(pad) + p for pad, p in zip(pads, prompts, strict=True)])
    generator = torch.Generator().manual_seed(sampling.seed)
    stops = torch.tensor(sorted(set(stop_tokens or [])), dtype=torch.long)

    started = time.perf_counter()
    token = choose_next(model(ids, slot=0, padding=padding)[:, -1], model.plan, sampling, generator)
    prefill_seconds = time.perf_counter() - started
    out = [token]
    finished = torch.isin(token, stops)
    if on_tokens:
        on_tokens(token)
    started = time.perf_counter()
    for step in range(1, max_new_tokens):
        if bool(finished.all()):
            break
        logits = model(token[:, None], slot=longest + step - 1, padding=padding)[:, -1]
        token = choose_next(logits, model.plan, sampling, generator)
        out.append(token)
        finished |= torch.isin(token, stops)
        if on_tokens:
            on_tokens(token)
    decode_seconds = time.perf_counter() - started
    model.clear_cache()

    rows = torch.stack(out, dim=1).tolist()
    stopped = []
    for i, row in enumerate(rows):
        hit = next((j for j, t in enumerate(row) if t in set(stops.tolist())), None)
        rows[i] = row if hit is None else row[:hit + 1]
        stopped.append(hit is not None)
    return Generation(rows, sum(len(p) for p in prompts), prefill_seconds, decode_seconds, len(out) - 1, stopped)
