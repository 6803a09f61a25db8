"""The pieces of a Llama decoder, each holding only its own rank's shard.

Column-parallel projections (q, k, v, gate, up, the LM head) hold a range of output features;
row-parallel ones (o, down) a range of input features and return partial sums, which the residual
schedule reduces. Module names follow Hugging Face so state dicts share its tensor names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ladder import comm
from ladder.config import LadderConfig, Schedule
from ladder.sharding import ShardPlan


def rope_inverse_frequencies(config: LadderConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with Llama 3's long-context rescaling when configured."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept; the band between is interpolated.
    smooth = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def input_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] weight with its memory laid out [in, out] (works on the meta device too).

    `F.linear(x, w)` multiplies x by `w.t()`; with this layout that is a contiguous matrix, and MKL's
    one-row product (batch-1 decode) streams it faster than the [out, in] layout (measured by
    `benchmarks/test_decode.py::test_matvec_bandwidth` and `ladder bench`; figures in the README).
    """
    return weight.t().contiguous().t()


@dataclass
class StepContext:
    """What every attention layer needs for one forward, computed once per forward.

    `cos`/`signed_sin` are the rotary tables at each token's own position ([batch, 1, tokens,
    head_dim]), the sine with its first half negated, the sign that "rotate half" needs (`rotate`);
    `mask` is a boolean [batch, 1, tokens, keys] mask, or None for plain causal attention over the
    tokens themselves (or, in a one-token decode step, over the whole cache); `slot` is where the
    tokens go in the KV cache, None when there is no cache.
    """

    cos: torch.Tensor
    signed_sin: torch.Tensor
    mask: torch.Tensor | None
    slot: int | None


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in Hugging Face's "rotate half" layout: x * cos + cat(-x2, x1) * sin.

    Rolling x by half its width gives cat(x2, x1); the sign lives in `signed_sin` = cat(-sin, sin),
    which saves the split, the negation and the concatenation on every call.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class KVCache(nn.Module):
    """Preallocated keys and values of the local kv heads, written in place at each step."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, end = k.shape[0], slot + k.shape[2]
        self.keys[:batch, :, slot:end] = k
        self.values[:batch, :, slot:end] = v
        return self.keys[:batch, :, :end], self.values[:batch, :, :end]


class Attention(nn.Module):
    """Grouped-query attention over this rank's query heads and the kv heads they use."""

    def __init__(self, config: LadderConfig, plan: ShardPlan) -> None:
        super().__init__()
        hd, hidden, bias = config.head_dim, config.hidden_size, config.attention_bias
        self.n_heads, self.n_kv_heads, self.head_dim = len(plan.heads), len(plan.kv_heads), hd
        self.q_proj = nn.Linear(hidden, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, hidden, bias=bias and plan.holds_row_parallel_bias)
        # Low-bit models compute q, k and v as one product (`sharding.FUSED_PROJECTIONS`).
        self.qkv_proj: nn.Module | None = None
        self.qkv_widths = [self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd]
        kv_of_head = plan.kv_head_of_local_head
        group = self.n_heads // self.n_kv_heads
        self.uniform_groups = kv_of_head == [h // group for h in range(self.n_heads)]
        # When TP splits a kv group unevenly, each query head picks its kv head explicitly.
        self.kv_of_head = torch.tensor(kv_of_head, device="cpu")
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = (batch, tokens, -1, self.head_dim)
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split(self.qkv_widths, dim=-1)
        q, k, v = (t.view(heads).transpose(1, 2) for t in (q, k, v))  # [b, h, t, d]
        q, k = rotate(q, step.cos, step.signed_sin), rotate(k, step.cos, step.signed_sin)
        if self.cache is not None and step.slot is not None:
            k, v = self.cache.update(step.slot, k, v)
        if not self.uniform_groups:
            k, v = k.index_select(1, self.kv_of_head), v.index_select(1, self.kv_of_head)
        causal = step.mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=causal,
                                             enable_gqa=self.uniform_groups and self.n_kv_heads < self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class MLP(nn.Module):
    """SwiGLU over this rank's columns of the intermediate layer."""

    def __init__(self, config: LadderConfig, plan: ShardPlan) -> None:
        super().__init__()
        width, hidden, bias = len(plan.mlp_columns), config.hidden_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, width, bias=bias)
        self.up_proj = nn.Linear(hidden, width, bias=bias)
        self.down_proj = nn.Linear(width, hidden, bias=bias and plan.holds_row_parallel_bias)
        self.gate_up_proj: nn.Module | None = None  # low-bit models: gate and up as one product
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Two pre-normed sub-blocks; each returns this rank's partial sum, to be all-reduced."""

    def __init__(self, config: LadderConfig, plan: ShardPlan, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, plan)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config, plan)

    def attention(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        return self.self_attn(comm.copy_to_parallel(self.input_layernorm(x)), step)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(comm.copy_to_parallel(self.post_attention_layernorm(x)))

    def parallel(self, x: torch.Tensor, step: StepContext) -> torch.Tensor:
        """GPT-J style: both sub-blocks read one normed input, their sum is reduced once."""
        normed = comm.copy_to_parallel(self.input_layernorm(x))
        return self.self_attn(normed, step) + self.mlp(normed)
