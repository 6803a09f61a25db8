"""`ladder <command>`: each command lives in its own module with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "generate": ("ladder.generate_cli", "generate text under TP=N from a Ladder checkpoint"),
    "bench": ("benchmarks.report", "benchmark Standard vs Ladder vs Parallel vs upper bound, with baselines"),
    "convert": ("conversion.cli", "convert a Hugging Face, Meta or GGUF Llama checkpoint into a Ladder checkpoint"),
    "finetune": ("ladder.train", "fine-tune a Ladder checkpoint (full or LoRA) under TP x DP ranks"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder", description="Ladder-Residual transformers on CPU ranks")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        importlib.import_module(module).add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(args.module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
