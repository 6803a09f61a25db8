"""Who holds what under tensor parallelism (Megatron style, DESIGN.md section 2).

Query heads, MLP columns and vocabulary rows are split into contiguous, as-even-as-possible ranges,
so any world size up to the number of query heads works. A rank holds every key/value head that its
query heads use, so a kv head is replicated on several ranks when the ranges straddle it.

`ShardPlan.slice_of(name)` says which part of a full Hugging Face tensor a rank holds: loaders use it
to read only that part from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ladder.config import LadderConfig


class ShardingError(ValueError):
    """The model cannot be split over this many ranks."""


def even_range(total: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous ranges covering `total` items, sizes differing by <= 1."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class Slice:
    """Rows (dim 0) or columns (dim 1) `start:stop` of a full tensor."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    config: LadderConfig
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        heads = self.config.num_attention_heads
        if not 1 <= self.world <= heads:
            raise ShardingError(
                f"tensor-parallel size {self.world} is larger than the model's {heads} attention heads; "
                f"use at most {heads} ranks"
            )
        if not 0 <= self.rank < self.world:
            raise ShardingError(f"rank {self.rank} is outside 0..{self.world - 1}")

    @cached_property
    def heads(self) -> range:
        return even_range(self.config.num_attention_heads, self.world, self.rank)

    @cached_property
    def kv_heads(self) -> range:
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        return range(self.heads.start // group, (self.heads.stop - 1) // group + 1)

    @cached_property
    def kv_head_of_local_head(self) -> list[int]:
        """For each local query head, the index of its kv head among the local kv heads."""
        group = self.config.num_attention_heads // self.config.num_key_value_heads
        return [h // group - self.kv_heads.start for h in self.heads]

    @cached_property
    def mlp_columns(self) -> range:
        return even_range(self.config.intermediate_size, self.world, self.rank)

    @cached_property
    def vocab(self) -> range:
        return even_range(self.config.vocab_size, self.world, self.rank)

    @property
    def holds_row_parallel_bias(self) -> bool:
        """Row-parallel biases are added once, on rank 0, before the partial sums are reduced."""
        return self.rank == 0

    def slice_of(self, name: str) -> Slice | None:
        """The part of full tensor `name` (Hugging Face naming) that this rank holds; None = all of it."""
        hd = self.config.head_dim
        leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name
        is_bias = name.endswith(".bias")
        if leaf == "q_proj":
            return Slice(0, self.heads.start * hd, self.heads.stop * hd)
        if leaf in ("k_proj", "v_proj"):
            return Slice(0, self.kv_heads.start * hd, self.kv_heads.stop * hd)
        if leaf in ("gate_proj", "up_proj"):
            return Slice(0, self.mlp_columns.start, self.mlp_columns.stop)
        if leaf == "o_proj" and not is_bias:
            return Slice(1, self.heads.start * hd, self.heads.stop * hd)
        if leaf == "down_proj" and not is_bias:
            return Slice(1, self.mlp_columns.start, self.mlp_columns.stop)
        if leaf in ("embed_tokens", "lm_head"):
            return Slice(0, self.vocab.start, self.vocab.stop)
        return None

    def holds(self, name: str) -> bool:
        """Row-parallel biases live on rank 0 only; everything else is held (whole or in part) by all."""
        if name.endswith(("o_proj.bias", "down_proj.bias")):
            return self.holds_row_parallel_bias
        return True

