"""The residual schedules, in one loop.

`attn` and `mlp` are all-reductions still in flight (sub-block outputs not yet in the stream `x`).
A ladder layer adds each one only right before the stream is read again, so every reduction runs
while the next sub-block computes:

    ladder:    x += wait(attn); attn = AR(A(x))        r_i = h_i(r_{i-2}) + r_{i-1}
               x += wait(mlp);  mlp  = AR(M(x))
    standard:  x += wait(attn) + wait(mlp)             r_i = h_i(r_{i-1}) + r_{i-1}
               x += wait(AR(A(x)));  mlp = AR(M(x))
    parallel:  x += wait(attn) + wait(mlp);  mlp = AR(A(x) + M(x))

A standard layer leaves its MLP reduction pending too: a following standard layer settles it at
once, while a following ladder layer lets it overlap with its attention, which is the boundary
the reference implementation's hybrid checkpoints are trained with. Upper-bound layers compute like
standard ones but skip communication (not a valid model: only a speed ceiling). After the last
layer every reduction is settled, each waited on exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ladder import comm
from ladder.config import Schedule
from ladder.layers import DecoderLayer, StepContext


def _settle(x: torch.Tensor, *pending: comm.Reduction | None) -> torch.Tensor:
    """x plus the reduced outputs; in place when autograd is off (decode), saving an allocation per add."""
    for reduction in pending:
        if reduction is not None:
            x = x + reduction.wait() if torch.is_grad_enabled() else x.add_(reduction.wait())
    return x


def residual_stream(x: torch.Tensor, layers: Iterable[DecoderLayer], step: StepContext) -> torch.Tensor:
    attn: comm.Reduction | None = None
    mlp: comm.Reduction | None = None
    for layer in layers:
        reduce = comm.Pending if layer.schedule is Schedule.UPPER_BOUND else comm.reduce_from_parallel_start
        if layer.schedule is Schedule.LADDER:
            x = _settle(x, attn)
            attn = reduce(layer.attention(x, step))
            x = _settle(x, mlp)
            mlp = reduce(layer.feed_forward(x))
        elif layer.schedule is Schedule.PARALLEL:
            x = _settle(x, attn, mlp)
            attn, mlp = None, reduce(layer.parallel(x, step))
        else:
            x = _settle(x, attn, mlp)
            x = _settle(x, reduce(layer.attention(x, step)))
            attn, mlp = None, reduce(layer.feed_forward(x))
    return _settle(x, attn, mlp)
