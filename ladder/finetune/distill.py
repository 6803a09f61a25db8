"""Distillation from the standard schedule: the converted model learns to compute what it computed before.

Making layers ladder layers changes the function the same weights compute. The function they must
recover is at hand: the same checkpoint with every layer standard. The teacher is that model,
frozen, run on the same ranks under the same tensor-parallel split as the student, so its logits
arrive already split by vocabulary and the KL reduces like the cross-entropy (`ladder.vocab`).

The teacher shares every tensor the student does not train (LoRA's base weights, or the layers
that `--only-ladder-layers` leaves alone) and keeps a frozen copy of only those it does train, so
that it stays the original function while the student's copies move.
"""

from __future__ import annotations

import torch
from torch import nn

from ladder.model import LadderForCausalLM


class Teacher:
    """The student's original weights under the all-standard schedule, for next-token distributions."""

    def __init__(self, student: LadderForCausalLM) -> None:
        current = dict(student.named_parameters(remove_duplicate=False))
        copies: dict[int, torch.Tensor] = {}  # one copy per tensor, however many names it has

        def original(param: nn.Parameter) -> torch.Tensor:
            if not param.requires_grad:
                return param.detach()
            return copies.setdefault(id(param), param.detach().clone())

        shard = {name: original(current[name]) for name in student.plan.tensors}
        self.model = LadderForCausalLM.empty(student.config.all_standard(), student.plan.rank, student.plan.world)
        self.model.adopt(shard).requires_grad_(False)
        self.copied_bytes = sum(t.numel() * t.element_size() for t in copies.values())

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary slice of the teacher's logits (whatever autocast is active)."""
        return self.model(inputs)
