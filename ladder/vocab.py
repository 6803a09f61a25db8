"""The vocabulary split across ranks: the embedding, and the cross-entropy over split logits.

Each rank holds rows `plan.vocab` of the embedding (and of the LM head), so neither the table nor
the logits are ever whole on one rank: the embedding sums every rank's rows with one all-reduce,
the cross-entropy needs only three reductions of one number per token (max, sum of exp, target
logit), and the distillation KL four (the same max and sum of exp for each of the two models, and
the teacher-weighted logit difference).
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


def _parallel_softmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max logit, this slice of the softmax, log of the sum of exp(logit - max)) over the vocabulary
    split across the tensor-parallel group: one max and one sum reduced per token. The exponentials
    are taken in place, so only one logits-sized temporary is made."""
    peak = comm.all_reduce(logits.amax(dim=-1), op="max")
    probs = (logits - peak.unsqueeze(-1)).exp_()
    total = comm.all_reduce(probs.sum(dim=-1))
    return peak, probs.div_(total.unsqueeze(-1)), total.log()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over logits split by vocabulary: max, sum of exp and target logit reduced."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
        local = targets - first
        inside = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~inside, 0)
        peak, probs, log_total = _parallel_softmax(logits)
        target = comm.all_reduce(logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0))
        ctx.save_for_backward(probs, local, inside)
        return log_total - (target - peak)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, local, inside = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the rank holding the target.
        grad_logits = probs.scatter_add(-1, local.unsqueeze(-1), -inside.unsqueeze(-1).to(probs.dtype))
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token losses from this rank's vocabulary slice `[first, first + V_local)` of the logits."""
    return _VocabParallelCrossEntropy.apply(local_logits.float(), targets, first)


class _VocabParallelKLDivergence(torch.autograd.Function):
    """Per-token KL(teacher || student) of the temperature-`t` softmaxes, over logits split by vocabulary.

    KL = sum_v p_T (log p_T - log p_S) = sum_v p_T (t_v - s_v) - (M_T - M_S) - (log Z_T - log Z_S), with
    t, s the scaled logits, M their maxima and Z the sums of exp(logit - M): a sum over the vocabulary
    reduces like the softmax's, one number per token.
    Scaled by t^2, as Hinton et al. do, so that the gradient's size does not depend on t.
    """

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        if temperature != 1:
            student, teacher = student / temperature, teacher / temperature
        peak_s, probs_s, log_total_s = _parallel_softmax(student)
        peak_t, probs_t, log_total_t = _parallel_softmax(teacher)
        cross = comm.all_reduce((probs_t * (teacher - student)).sum(dim=-1)) - (peak_t - peak_s)
        ctx.temperature = temperature
        ctx.save_for_backward(probs_s.sub_(probs_t))
        return (cross - log_total_t + log_total_s) * temperature**2

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (difference,) = ctx.saved_tensors
        # d (t^2 KL) / d student logit = t (p_S - p_T); the teacher is a constant.
        return difference * (grad.unsqueeze(-1) * ctx.temperature), None, None


def vocab_parallel_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                                 temperature: float = 1.0) -> torch.Tensor:
    """Per-token t^2 KL(teacher || student) from this rank's vocabulary slice of both models' logits;
    the gradient flows to the student's logits only."""
    return _VocabParallelKLDivergence.apply(student_logits.float(), teacher_logits.detach().float(), temperature)
