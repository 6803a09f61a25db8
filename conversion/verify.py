"""`--verify`: reload DST and compare its logits with SRC's on a few tokens.

A checkpoint with ladder layers computes a different function from its source (each sub-block reads
the residual stream before the previous sub-block's output is added, see `ladder/residual.py`), so
comparing it as written with SRC would only measure how much the ladder changes the model. What
checks the conversion is the same weights under the same schedule: SRC's tensors from its reader,
rounded to DST's dtype, run with every layer standard, against DST loaded by `from_pretrained` with
its schedules overridden to standard. Both run in fp32, so they agree to rounding noise unless a
tensor, a config field (rope, norm eps, head size, tied head) or the sharded index was lost on the
way. When DST has ladder layers, its logits as written are compared too, for information: the gap
is what fine-tuning has to recover.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ladder.checkpoint import from_pretrained
from ladder.config import Schedule
from ladder.model import LadderForCausalLM

from .convert import target_config
from .source import Source

TOLERANCE = 1e-4
VERIFY_TOKENS = 16
TOKENS_SEED = 0  # any fixed seed: SRC and DST only need to see the same token ids, run after run


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float          # SRC vs DST forced standard: the conversion check
    ladder_max_abs_diff: float | None = None  # SRC vs DST as written, when it has non-standard layers
    ladder_top1_agreement: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE

    def __str__(self) -> str:
        verdict = "OK" if self.passed else "FAILED"
        text = (f"verify {verdict}: max |logit difference| {self.max_abs_diff:.2e} between SRC and DST "
                f"(both run with standard schedules; tolerance {TOLERANCE:.0e})")
        if self.ladder_max_abs_diff is not None:
            text += (f"\nDST as written (ladder layers) vs SRC: max |logit difference| {self.ladder_max_abs_diff:.3f}, "
                     f"same top-1 token at {self.ladder_top1_agreement:.0%} of positions (expected to differ: "
                     "a ladder model is a different function until fine-tuned)")
        return text


def verify(source: Source, dst: str | Path, dtype: torch.dtype) -> Verification:
    """Compare DST with SRC on a few fixed token ids, as the module docstring explains."""
    standard = target_config(source, None).all_standard()
    reference = LadderForCausalLM(standard, rank=0, world=1)
    reference.load_full_state_dict({name: t.to(dtype).float() for name, t in source.tensors()})
    ids = torch.randint(standard.vocab_size, (1, VERIFY_TOKENS), generator=torch.Generator().manual_seed(TOKENS_SEED))
    converted = from_pretrained(dst, rank=0, world=1, schedules=standard.schedules)
    with torch.no_grad():
        expected = reference.eval()(ids)
        diff = (converted(ids) - expected).abs().max().item()
        as_written = from_pretrained(dst, rank=0, world=1)
        if all(s is Schedule.STANDARD for s in as_written.config.schedules):
            return Verification(diff)
        ladder = as_written(ids)
    agreement = (ladder.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return Verification(diff, (ladder - expected).abs().max().item(), agreement)
