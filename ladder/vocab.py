"""The vocabulary split across ranks: the embedding, and the cross-entropy over split logits.

Each rank holds rows `plan.vocab` of the embedding (and of the LM head), so neither the table nor
the logits are ever whole on one rank: the embedding sums every rank's rows with one all-reduce,
and the loss needs only three reductions of one number per token (max, sum of exp, target logit).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ladder import comm
from ladder.config import LadderConfig
from ladder.sharding import ShardPlan


class VocabParallelEmbedding(nn.Embedding):
    """Rows `plan.vocab` of the embedding; ids outside them contribute zeros to the all-reduce."""

    def __init__(self, config: LadderConfig, plan: ShardPlan) -> None:
        weight = torch.empty(len(plan.vocab), config.hidden_size)
        if not weight.is_meta:  # random init on the meta device costs seconds (it imports torch._dynamo)
            nn.init.normal_(weight)
        super().__init__(len(plan.vocab), config.hidden_size, _weight=weight)
        self.first, self.world, self.vocab_size = plan.vocab.start, plan.world, config.vocab_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Checked here because under TP an id outside the vocabulary would silently embed as zeros.
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"token ids {ids[bad].unique()[:5].tolist()} are outside the vocabulary "
                             f"of {self.vocab_size}")
        if self.world == 1:
            return super().forward(ids)
        local = ids - self.first
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = super().forward(local.masked_fill(outside, 0)).masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_parallel_start(rows).wait()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over logits split by vocabulary: max, sum of exp and target logit reduced."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
        local = targets - first
        inside = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~inside, 0)
        peak = comm.all_reduce(logits.amax(dim=-1), op="max")
        shifted = logits - peak.unsqueeze(-1)
        target = comm.all_reduce(shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0))
        exp = shifted.exp_()
        total = comm.all_reduce(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, inside)
        return total.log() - target

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, local, inside = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the rank holding the target.
        grad_logits = probs.scatter_add(-1, local.unsqueeze(-1), -inside.unsqueeze(-1).to(probs.dtype))
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token losses from this rank's vocabulary slice `[first, first + V_local)` of the logits."""
    return _VocabParallelCrossEntropy.apply(local_logits.float(), targets, first)
