"""Who holds what under tensor parallelism (Megatron style): the one owner of how a tensor is split.

Query heads, MLP columns and vocabulary rows are split into contiguous, as-even-as-possible ranges,
so any world size up to the number of query heads works. A rank holds every key/value head that its
query heads use, so a kv head is replicated on several ranks when the ranges straddle it.

`ShardPlan.tensors` is one table with a row per checkpoint tensor (Hugging Face names): which axis
is split, this rank's range of it, the whole tensor's shape, and how its gradient combines. The
loader, LoRA, the gradient fix-ups of fine-tuning and saving all read that table through `shard`
(whole tensor -> this rank's part) and `unshard` (every rank's part -> whole tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ladder.config import LadderConfig

# Projections that low-bit models compute as one product each (they read the same input): the fused
# module holds this rank's rows of every part, concatenated in this order (`projection_sources`).
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class ShardingError(ValueError):
    """The model cannot be split over this many ranks."""


def even_range(total: int, parts: int, index: int) -> range:
    """The `index`-th of `parts` contiguous ranges covering `total` items, sizes differing by <= 1."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


@dataclass(frozen=True)
class TensorShard:
    """How one rank's part of a tensor relates to the whole (TP=1) tensor.

    `dim` is the split axis (None: the rank holds the whole tensor) and `start:stop` its range
    there. `owned_from` is the first local index along `dim` that no lower rank also holds, so that
    a norm over all ranks counts replicated kv rows once. `partial_grad`: the rank computes only
    its share of the gradient (replicated kv rows, whole LoRA factors), to be summed over the group.
    """

    full_shape: tuple[int, ...]
    dim: int | None = None
    start: int = 0
    stop: int = 0
    owned_from: int = 0
    partial_grad: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        """This rank's part's shape."""
        if self.dim is None:
            return self.full_shape
        shape = list(self.full_shape)
        shape[self.dim] = self.stop - self.start
        return tuple(shape)

    def take(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of `whole` (a view)."""
        return whole if self.dim is None else whole.narrow(self.dim, self.start, self.stop - self.start)

    def placed(self, part: torch.Tensor) -> torch.Tensor:
        """A whole-shaped tensor of zeros with `part` in this rank's place."""
        if self.dim is None:
            return part.clone()
        whole = part.new_zeros(self.full_shape)
        self.take(whole).copy_(part)
        return whole


@dataclass(frozen=True)
class ShardPlan:
    config: LadderConfig
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        heads = self.config.num_attention_heads
        if self.world < 1:
            raise ShardingError(f"tensor-parallel size must be at least 1, got {self.world}")
        if self.world > heads:
            raise ShardingError(
                f"tensor-parallel size {self.world} is larger than the model's {heads} attention heads; "
                f"use at most {heads} ranks"
            )
        if not 0 <= self.rank < self.world:
            raise ShardingError(f"rank {self.rank} is outside 0..{self.world - 1}")

    def of_rank(self, rank: int) -> ShardPlan:
        return self if rank == self.rank else ShardPlan(self.config, rank, self.world)

    # --- ranges ---------------------------------------------------------------------------------

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

    @cached_property
    def widest_vocab(self) -> int:
        """The largest rank's vocabulary slice: collectives pad every slice to it."""
        return len(even_range(self.config.vocab_size, self.world, 0))

    @property
    def holds_row_parallel_bias(self) -> bool:
        """Row-parallel biases are added once, on rank 0, before the partial sums are reduced."""
        return self.rank == 0

    # --- the table ------------------------------------------------------------------------------

    @cached_property
    def tensors(self) -> dict[str, TensorShard]:
        """Every tensor this rank holds, by Hugging Face name (a tied LM head is the embedding's)."""
        c, hd, hidden = self.config, self.config.head_dim, self.config.hidden_size
        q_rows, kv_rows = _times(self.heads, hd), _times(self.kv_heads, hd)
        # Replicated kv rows: each holder computes only its own query heads' share of their gradient.
        kv_below = _times(self.of_rank(self.rank - 1).kv_heads, hd) if self.rank else range(0)
        kv_owned_from = max(0, kv_below.stop - kv_rows.start)

        def split(full: tuple[int, ...], dim: int, part: range, owned_from: int = 0,
                  partial: bool = False) -> TensorShard:
            if self.world == 1:
                return TensorShard(full)
            return TensorShard(full, dim, part.start, part.stop, owned_from, partial)

        def column_parallel(name: str, rows: range, out: int, bias: bool, owned: int = 0, partial: bool = False) -> None:
            """Output rows split, and the bias with them."""
            table[name + ".weight"] = split((out, hidden), 0, rows, owned, partial)
            if bias:
                table[name + ".bias"] = split((out,), 0, rows, owned, partial)

        def row_parallel(name: str, columns: range, width: int, bias: bool) -> None:
            """Input columns split; the bias is added once, on rank 0."""
            table[name + ".weight"] = split((hidden, width), 1, columns)
            if bias and self.holds_row_parallel_bias:
                table[name + ".bias"] = TensorShard((hidden,))

        # In the order of the model's state dict (so seeded random weights come out the same).
        q_out, kv_out, attn_bias = c.num_attention_heads * hd, c.num_key_value_heads * hd, c.attention_bias
        table = {"model.embed_tokens.weight": split((c.vocab_size, hidden), 0, self.vocab)}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            table[p + "input_layernorm.weight"] = TensorShard((hidden,))
            column_parallel(p + "self_attn.q_proj", q_rows, q_out, attn_bias)
            column_parallel(p + "self_attn.k_proj", kv_rows, kv_out, attn_bias, kv_owned_from, partial=True)
            column_parallel(p + "self_attn.v_proj", kv_rows, kv_out, attn_bias, kv_owned_from, partial=True)
            row_parallel(p + "self_attn.o_proj", q_rows, q_out, attn_bias)
            table[p + "post_attention_layernorm.weight"] = TensorShard((hidden,))
            column_parallel(p + "mlp.gate_proj", self.mlp_columns, c.intermediate_size, c.mlp_bias)
            column_parallel(p + "mlp.up_proj", self.mlp_columns, c.intermediate_size, c.mlp_bias)
            row_parallel(p + "mlp.down_proj", self.mlp_columns, c.intermediate_size, c.mlp_bias)
        table["model.norm.weight"] = TensorShard((hidden,))
        if not c.tie_word_embeddings:
            table["lm_head.weight"] = split((c.vocab_size, hidden), 0, self.vocab)
        return table

    def projection_sources(self) -> dict[str, list[str]]:
        """Every projection module, fused ones (`FUSED_PROJECTIONS`) under their fused name, and the
        LM head -> the tensors its weight and bias are made of: each tensor's rows on this rank,
        weights concatenated in this order and biases likewise (a tied head is the embedding)."""
        sources: dict[str, list[str]] = {}
        fused_of = {part: fused for fused, parts in FUSED_PROJECTIONS.items() for part in parts}
        for name in self.tensors:
            module, _, leaf = name.rpartition(".")
            if leaf in ("weight", "bias") and module.endswith("_proj"):
                parent, _, projection = module.rpartition(".")
                fused = fused_of.get(projection)
                sources.setdefault(f"{parent}.{fused}" if fused else module, []).append(name)
        sources["lm_head"] = ["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]
        return sources

    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a checkpoint of this config stores and its whole shape (rank 0 holds them all)."""
        return {name: shard.full_shape for name, shard in self.of_rank(0).tensors.items()}

    def shard(self, name: str, whole: torch.Tensor) -> torch.Tensor:
        """This rank's part of whole tensor `name` (a view)."""
        return self._row(name).take(whole)

    def unshard(self, name: str, parts: list[torch.Tensor | None]) -> torch.Tensor:
        """The whole tensor `name` from every rank's part (in rank order; None where a rank holds none)."""
        rows = [self.of_rank(r).tensors.get(name) for r in range(self.world)]
        if not any(rows):
            raise ShardingError(f"tensor {name} is not part of this model")
        return join(rows, parts)

    def _row(self, name: str) -> TensorShard:
        try:
            return self.tensors[name]
        except KeyError:
            raise ShardingError(f"tensor {name} is not part of this model's rank {self.rank} shard") from None



def join(shards: list[TensorShard | None], parts: list[torch.Tensor | None]) -> torch.Tensor:
    """A whole tensor from the parts that `shards` describe (None: that rank holds no part)."""
    held = [(shard, part) for shard, part in zip(shards, parts, strict=True) if shard is not None and part is not None]
    first_shard, first = held[0]
    if first_shard.dim is None:
        return first.clone()
    whole = first.new_empty(first_shard.full_shape)
    for shard, part in held:
        shard.take(whole).copy_(part)
    return whole


def _times(r: range, k: int) -> range:
    """Head range -> row range, `k` rows per head."""
    return range(r.start * k, r.stop * k)
