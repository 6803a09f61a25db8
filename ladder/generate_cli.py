"""`ladder generate CKPT --prompt ... --tp N`: spawns N local ranks, or joins torchrun's."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ladder import comm
from ladder.checkpoint import from_pretrained, load_config
from ladder.config import DTYPES, Schedule
from ladder.generate import Sampling, generate
from ladder.launcher import Placement, under_torchrun
from ladder.launcher import run as run_ranks
from ladder.outputs import refuse_overlaps, write_report
from ladder.quant import DEFAULT_GROUP_SIZE, WEIGHT_FORMATS, check_format
from ladder.sharding import ShardPlan
from ladder.tokenizer import StreamDecoder, Tokenizer

HELP = "generate text under TP=N from a Ladder checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="Ladder or Hugging Face Llama checkpoint directory")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--max-new-tokens", type=at_least(0), default=64, help="0 generates nothing")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to spawn (ignored under torchrun)")
    parser.add_argument("--schedule", choices=[s.value for s in Schedule],
                        help="run every layer with this schedule instead of the checkpoint's")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the embedding, norms, residual stream and KV cache")
    parser.add_argument("--weights", choices=WEIGHT_FORMATS, default="fp32",
                        help="format of the projection and LM head weights (int8/int4: weight-only, bf16 activations)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="input features per int4 scale and zero")
    add_placement_arguments(parser)
    parser.add_argument("--json-out", type=Path, help="also write the answers and timings here")


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that starts ranks: placement, transport and timeout."""
    parser.add_argument("--pin", action="store_true", help="pin each rank to its own cores")
    parser.add_argument("--threads", type=at_least(1), help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--comm", choices=comm.TRANSPORTS, default=None,
                        help="how ranks exchange data: shared memory within a host, gloo, or auto (default: "
                        f"${comm.TRANSPORT_ENV}, else auto)")
    parser.add_argument("--link", help="put the collectives behind an emulated interconnect, e.g. "
                        f"latency=200us,bandwidth=10gbit (default: ${comm.LINK_ENV})")
    parser.add_argument("--timeout", type=positive_seconds, default=comm.DEFAULT_TIMEOUT_S,
                        help="seconds before a dead or missing rank makes the others fail")


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `least`, refused by argparse with the flag's name otherwise."""
    def integer(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {value}")
        return value
    integer.__name__ = "integer"  # argparse names the type in "invalid integer value: 'x'"
    return integer


def positive_seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def placement_from_args(args: argparse.Namespace) -> Placement:
    return Placement(pin=args.pin, threads=args.threads, transport=args.comm, link=args.link)


def run(args: argparse.Namespace) -> int:
    """Everything that can be refused is, before any rank starts: the config, the TP size, the
    sampling settings, the tokenizer and chat template; the ranks get the prompts as token ids."""
    config = load_config(args.checkpoint)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    if not under_torchrun():
        # Refuse an impossible TP size or weight format before any rank starts.
        check_format(args.weights, args.group_size, ShardPlan(config, 0, args.tp))
    if args.json_out:
        refuse_overlaps(args.json_out, [args.checkpoint], "--json-out")
    tokenizer = Tokenizer(args.checkpoint)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) if args.chat else p
             for p in args.prompt]
    prompts = [tokenizer.encode(t) for t in texts]
    if not all(prompts):
        raise ValueError("--prompt: every prompt needs at least one token")
    run_ranks(generate_on_rank, args.tp, args, prompts, sampling, placement=placement_from_args(args),
              timeout_s=args.timeout)
    return 0


def generate_on_rank(args: argparse.Namespace, prompts: list[list[int]], sampling: Sampling) -> None:
    leader = comm.tp_rank() == 0
    tokenizer = Tokenizer(args.checkpoint)
    schedules = None if args.schedule is None else [args.schedule] * load_config(args.checkpoint).num_hidden_layers
    model = from_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], schedules=schedules,
                            weights=args.weights, group_size=args.group_size)
    stops = tokenizer.stop_tokens(model.config.eos_token_ids)
    stream = StreamDecoder(tokenizer) if leader and len(prompts) == 1 else None

    def show(tokens: torch.Tensor) -> None:
        if stream and int(tokens[0]) not in stops:
            print(stream.push(int(tokens[0])), end="", flush=True)

    result = generate(model, prompts, max_new_tokens=args.max_new_tokens,
                      sampling=sampling,
                      stop_tokens=stops, on_tokens=show)
    if not leader:
        return
    answers = [tokenizer.decode(row) for row in result.tokens]
    if stream:
        print()
    else:
        for text, answer in zip(args.prompt, answers, strict=True):
            print(f"### {text}\n{answer}\n")
    transport = getattr(comm.transport(), "name", "none")
    print(f"[{comm.tp_size()} rank(s) over {transport}, prompt {result.prompt_tokens} tokens, prefill "
          f"{result.prefill_seconds * 1e3:.0f} ms, decode {result.decode_tokens_per_second:.1f} tokens/s]",
          file=sys.stderr)
    if args.json_out:
        write_report(args.json_out, json.dumps({
            "checkpoint": str(args.checkpoint), "weights": args.weights, "world_size": comm.tp_size(), "transport": transport,
            "answers": answers, "tokens": result.tokens, "prefill_seconds": result.prefill_seconds,
            "decode_tokens_per_second": result.decode_tokens_per_second}, indent=2))
