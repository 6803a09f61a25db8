"""`ladder finetune CKPT --data FILE... --out DIR`: the command line of `finetune`."""

from __future__ import annotations

import argparse

from ladder.finetune.run import finetune
from ladder.finetune.settings import add_arguments, settings_from_args

HELP = "fine-tune a Ladder checkpoint (full or LoRA) under TP x DP ranks"

__all__ = ["HELP", "add_arguments", "run"]


def run(args: argparse.Namespace) -> int:
    summary = finetune(settings_from_args(args))  # a FinetuneError is printed by `ladder` as one line
    if summary is None:
        return 0
    if summary["val_loss"] is not None:
        print(f"validation loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.3f}")
    print(f"{summary['steps'] - summary['resumed_from_step']} steps, {summary['train_tokens']} tokens in "
          f"{summary['train_seconds']:.1f} s; wrote {summary['out']}")
    return 0
