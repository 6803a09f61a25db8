"""`ladder convert SRC DST --ladder-layers upper-half [--dtype ...] [--force] [--verify]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ladder.config import DTYPES

from .convert import convert, open_source
from .verify import verify

HELP = "convert a Hugging Face, Meta or GGUF Llama checkpoint into a Ladder checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="a Hugging Face or Ladder directory (config.json), a Meta original "
                        "directory (params.json + consolidated.NN.pth), a GGUF file, or a directory holding one GGUF file")
    parser.add_argument("dst", type=Path, help="the Ladder checkpoint directory to write")
    parser.add_argument("--ladder-layers", metavar="LAYERS",
                        help="layers to make ladder layers: none, all, upper-half (the paper's recipe), a range "
                        "like 16-31 or a list like 1,5,7 (default: keep SRC's, i.e. none for foreign formats)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="dtype of the written weights")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true",
                        help="reload DST and compare its logits with SRC's on a few tokens (both under the "
                        "standard schedule; a ladder DST as written is compared too, for information)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Bad input raises (a ValueError, `ladder.cli.BAD_INPUT`): `ladder`
    prints it as one line with exit code 2."""
    dtype = DTYPES[args.dtype]
    print(convert(args.src, args.dst, args.ladder_layers, dtype, force=args.force, progress=not args.quiet))
    if args.verify:
        result = verify(open_source(args.src), args.dst, dtype)
        print(result)
        return 0 if result.passed else 1
    return 0
