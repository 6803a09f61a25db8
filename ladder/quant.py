"""Weight-only low-bit formats for the projection matrices, and the modules that multiply by them.

Batch-1 decode streams every weight once per token, so its speed is weight bytes over memory
bandwidth: storing the projections (q, k, v, o, gate, up, down and the LM head) in fewer bits is the
speed-up. The formats, each with torch's own CPU kernel:

- `fp32`: the projections stay `nn.Linear` in the model's dtype (nothing changes);
- `bf16`, `fp16`: the weight cast, `F.linear` with activations in the same dtype;
- `int8`: one scale per output channel, `aten._weight_int8pack_mm` with bf16 activations;
- `int4`: asymmetric groups of `group_size` input features (a scale and a zero per group),
  `aten._weight_int4pack_mm_for_cpu` with bf16 activations. A GGUF Q4_1 block (32 weights
  w = d q + m, q in 0..15) is exactly such a group with scale d and zero m + 8 d, and
  `quantize_int4` of its dequantized weights returns its very integers (tested on SmolLM2).

The int kernels are many times slower with fp32 activations, so each module casts its input to its
kernel's activation dtype and its output back to the input's dtype. Everything that is not a
projection (embedding table, norms, residual stream, KV cache) stays in the model's compute dtype.
Quantized projections are for inference: they hold no trainable weight and are not saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladder.sharding import ShardPlan

WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "int4")
DEFAULT_GROUP_SIZE = 32
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_ROW_MULTIPLE = 16  # torch's int4 packing takes a multiple of 16 output rows; others are padded
EMBEDDING = "model.embed_tokens.weight"


class WeightFormatError(ValueError):
    """A weight format that cannot be applied; the message names the tensor and rank."""


def head_format(weights: str) -> str:
    """The LM head's format under `weights`: the same, except that an int4 model keeps an int8 head.

    The head multiplies by the whole vocabulary, so its rounding errors reach every logit directly:
    in groups of 4 bits it cost SmolLM2 measurable perplexity and its answer to the README's chat
    question, in int8 nothing measurable (benchmarks' accuracy table), and its bytes still shrink 4x.
    """
    return "int8" if weights == "int4" else weights


def check_format(weights: str, group_size: int, plan: ShardPlan) -> None:
    """Refuse an unknown format, and an int4 group size that a tensor or a TP split would cut.

    Groups run along the input features, which the row-parallel o and down projections split
    between ranks; a group straddling two ranks could not be scaled by either, so it is refused.
    Every rank's split is checked, so all ranks fail alike before anything is read.
    """
    if weights not in WEIGHT_FORMATS:
        raise WeightFormatError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if weights != "int4":
        return
    if group_size not in INT4_GROUP_SIZES:
        raise WeightFormatError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                                f"(what torch's int4 kernel supports), got {group_size}")
    for rank in range(plan.world):
        for name, shard in plan.of_rank(rank).tensors.items():
            if not name.endswith("_proj.weight"):  # the head is int8 (`head_format`): no groups
                continue
            features = shard.full_shape[1]
            if features % group_size:
                raise WeightFormatError(f"tensor {name}: its {features} input features are not a multiple "
                                        f"of the int4 group size {group_size}")
            if shard.dim == 1 and (shard.start % group_size or shard.stop % group_size):
                raise WeightFormatError(
                    f"tensor {name}: rank {rank} of {plan.world} holds input features {shard.start}:{shard.stop}, "
                    f"so the split cuts an int4 group of {group_size}; use a group size dividing both ends, "
                    "another TP size, or int8")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (integers [out, in], scales [out]), weight ~ q * scale."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return (weight / scales[:, None]).round().clamp(-128, 127).to(torch.int8), scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 groups along the input: (integers 0..15 [out, in], scales, minima [out, in / group]).

    weight ~ q * scale + minimum, the scale spanning each group's range in 15 steps (GGUF Q4_1's rule).
    """
    out, features = weight.shape
    groups = weight.float().reshape(out, features // group_size, group_size)
    minima, maxima = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (maxima - minima) / 15
    steps = (groups - minima[..., None]) / scales.where(scales > 0, 1.0)[..., None]
    return steps.round().clamp(0, 15).to(torch.int32).reshape(out, features), scales, minima


class LowBitLinear(nn.Module):
    """A frozen projection stored in a low-bit format: subclasses hold the weight and its `product`.

    `weight` is [out, in] (this rank's part); the bias, if any, is added in the input's dtype.
    """

    activation_dtype: torch.dtype

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("bias", bias)

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.activation_dtype)
        out = self.product(rows).view(*x.shape[:-1], self.out_features).to(x.dtype)
        return out if self.bias is None else out.add_(self.bias)  # `out` is this call's own tensor


class CastLinear(LowBitLinear):
    """The weight in bf16 or fp16, laid out [out, in]: the half-precision products are several times
    slower over the [in, out] layout that suits fp32 (`benchmarks`' matmul layout check)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(weight, bias)
        self.activation_dtype = dtype
        self.register_buffer("weight", weight.to(dtype).contiguous())

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return F.linear(rows, self.weight)


class Int8Linear(LowBitLinear):
    activation_dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        integers, scales = quantize_int8(weight.float())
        self.register_buffer("integers", integers)
        self.register_buffer("scales", scales.to(self.activation_dtype))

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.integers, self.scales)


class Int4Linear(LowBitLinear):
    """torch's packed int4 layout; `scales_and_zeros` is [in / group, out, 2] with zero = minimum + 8 scale.

    Output rows are padded with zeros to a multiple of 16 (the kernel's), and the padding sliced off.
    """

    activation_dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> None:
        super().__init__(weight, bias)
        self.group_size = group_size
        padding = -self.out_features % INT4_ROW_MULTIPLE
        integers, scales, minima = quantize_int4(F.pad(weight.float(), (0, 0, 0, padding)), group_size)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(integers, 1))
        scales_and_zeros = torch.stack((scales.t(), (minima + 8 * scales).t()), dim=-1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(self.activation_dtype).contiguous())

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group_size, self.scales_and_zeros)
        return out if out.shape[-1] == self.out_features else out[:, :self.out_features]


def low_bit_linear(weight: torch.Tensor, bias: torch.Tensor | None, weights: str, group_size: int) -> LowBitLinear:
    """A projection by `weight` ([out, in], this rank's part) in format `weights`, plus `bias`."""
    if weights in ("bf16", "fp16"):
        return CastLinear(weight, bias, torch.bfloat16 if weights == "bf16" else torch.float16)
    if weights == "int8":
        return Int8Linear(weight, bias)
    if weights == "int4":
        return Int4Linear(weight, bias, group_size)
    raise WeightFormatError(f"weight format {weights!r} stores no low-bit projection")


def projection_bytes(model: nn.Module) -> int:
    """Bytes of every projection's weight as the model holds it (biases and the embedding excluded)."""
    total = 0
    for module in model.modules():
        if isinstance(module, LowBitLinear):
            total += sum(b.numel() * b.element_size() for n, b in module.named_buffers(recurse=False) if n != "bias")
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total
