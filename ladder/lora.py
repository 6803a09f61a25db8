"""Low-rank adapters (LoRA) on one rank's shard of a projection, merged into the weights for saving.

    y = W x + b + (alpha / r) * B A dropout(x)

Under tensor parallelism an adapter splits with its projection, so that the merged update `B A` of
every rank is exactly its slice of the TP=1 update:
- column-parallel (q, k, v, gate, up: W's rows split): B's rows split the same way, A is whole;
- row-parallel (o, down: W's columns split): A's columns split the same way, B is whole.
The whole factor then receives only this rank's share of its gradient (training sums it over the
tensor-parallel group). A starts from a seeded draw of the *full* matrix, sliced, so every TP size
starts from the same adapter; B starts at zero, so the adapted model starts as the base model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ladder.sharding import ShardPlan, TensorShard

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA target modules {unknown or '(none)'} not among {', '.join(PROJECTIONS)}")


class LoRALinear(nn.Module):
    """A linear layer (same `weight`/`bias` parameter names) plus a trainable low-rank update.

    `shard` is how the base weight is split (its row in `ShardPlan.tensors`): rows split
    (column-parallel) split B alike; columns split (row-parallel) split A alike.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig, shard: TensorShard, seed: int) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.shard = shard
        self.scaling = config.alpha / config.rank
        self.dropout = nn.Dropout(config.dropout)
        full_in = shard.full_shape[1]
        first_column = shard.start if shard.dim == 1 else 0
        generator = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(full_in)
        full_a = torch.empty(config.rank, full_in).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(full_a[:, first_column:first_column + self.in_features].clone())
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank))

    def factor_shard(self, factor: nn.Parameter) -> TensorShard:
        """How `lora_A` or `lora_B` is split: with the base weight, or whole on every rank, where each
        rank computes only its share of the gradient (the factor that the split does not cut)."""
        split, whole = (self.lora_B, self.lora_A) if self.shard.dim == 0 else (self.lora_A, self.lora_B)
        if self.shard.dim is None:
            return TensorShard(tuple(factor.shape))
        if factor is whole:
            return TensorShard(tuple(factor.shape), partial_grad=True)
        full = list(split.shape)
        full[self.shard.dim] = self.shard.full_shape[self.shard.dim]
        return TensorShard(tuple(full), self.shard.dim, self.shard.start, self.shard.stop, self.shard.owned_from,
                           self.shard.partial_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain linear layer computing the same function (in eval mode), for saving."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.copy_(self.weight + self.scaling * (self.lora_B @ self.lora_A))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out.to(self.weight.dtype)


def adapter_seed(seed: int, name: str) -> int:
    """One seed per projection, stable across runs and TP sizes: the run's seed and the projection's
    name mixed (a large prime keeps runs with neighbouring seeds from sharing any projection's seed)."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def add_adapters(model: nn.Module, plan: ShardPlan, lora: LoRAConfig, layers: Sequence[int], seed: int) -> None:
    """LoRA on the target projections of `layers` of a Ladder model, each split like its projection."""
    for index in layers:
        layer = model.model.layers[index]
        for name, module in [(n, m) for n, m in layer.named_modules() if n.rpartition(".")[2] in lora.targets]:
            full_name = f"model.layers.{index}.{name}"
            shard = plan.tensors[full_name + ".weight"]
            replace_module(layer, name, LoRALinear(module, lora, shard, adapter_seed(seed, full_name)))


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its projection's weight, leaving a plain model with the original names."""
    for name, module in adapters(model).items():
        replace_module(model, name, module.merged())
