"""What each weight format costs in accuracy, against fp32 on the same checkpoint: perplexity on the
held-out tail of Botchan, and the greedy answer to a chat question.

The perplexity is the fine-tuning validation's (`ladder.finetune`): the book without Project
Gutenberg's header and licence (`adaptation.book_text`), tokenized and split as fine-tuning splits it
(the last 10% held out), scored in sequences of 256 tokens. One rank, the checkpoint's own schedules.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ladder.checkpoint import from_pretrained, load_config
from ladder.data import PackedSequences
from ladder.finetune import Settings
from ladder.finetune.run import load_data
from ladder.finetune.trainer import evaluate
from ladder.generate import generate
from ladder.tokenizer import Tokenizer

from .adaptation import BOTCHAN, book_text
from .workload import DEFAULT_GROUP_SIZE, REFERENCE_WEIGHTS

QUESTION = "What is the capital of France?"
EXPECTED = "Paris"
SEQ_LEN, BATCH, VAL_FRACTION, ANSWER_TOKENS = 256, 4, 0.1, 24


def held_out(checkpoint: Path, data: Path) -> PackedSequences:
    """The validation sequences of fine-tuning `checkpoint` on the book `data` (as `adaptation` scores)."""
    with tempfile.TemporaryDirectory(prefix="ladder-accuracy-") as work:
        settings = Settings(checkpoint, [book_text(data, Path(work))], Path(work) / "unused", seq_len=SEQ_LEN,
                            batch_size=BATCH, val_fraction=VAL_FRACTION)
        split = load_data(settings, load_config(checkpoint))
    return PackedSequences(split.val, SEQ_LEN, keep_tail=True)


def chat_prompt(tokenizer: Tokenizer, question: str) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))


def measure_accuracy(checkpoint: str | Path, formats: tuple[str, ...], group_size: int = DEFAULT_GROUP_SIZE,
                     data: Path = BOTCHAN) -> dict[str, Any]:
    """Per weight format: held-out loss and perplexity, and the greedy chat answer to `QUESTION`."""
    checkpoint = Path(checkpoint)
    sequences = held_out(checkpoint, data)
    tokenizer = Tokenizer(checkpoint)
    config = load_config(checkpoint)
    stops = tokenizer.stop_tokens(config.eos_token_ids)
    prompt = chat_prompt(tokenizer, QUESTION)
    rows: dict[str, dict[str, Any]] = {}
    for weights in formats:
        started = time.perf_counter()
        model = from_pretrained(checkpoint, 0, 1, weights=weights, group_size=group_size)
        with torch.inference_mode():
            loss = evaluate(model, sequences, BATCH)
        answer = generate(model, [prompt], max_new_tokens=ANSWER_TOKENS, stop_tokens=stops).tokens[0]
        text = tokenizer.decode(answer)
        rows[weights] = {"loss": loss, "perplexity": math.exp(loss), "answer": text, "expected_in_answer": EXPECTED in text,
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"accuracy {weights}: perplexity {rows[weights]['perplexity']:.4f}, answer {text!r}", flush=True)
    reference = rows.get(REFERENCE_WEIGHTS)
    for row in rows.values():
        row["perplexity_vs_fp32"] = row["perplexity"] / reference["perplexity"] - 1 if reference else None
    return {"checkpoint": str(checkpoint), "data": str(data), "held_out_tokens": sequences.targets,
            "seq_len": SEQ_LEN, "question": QUESTION, "expected": EXPECTED, "group_size": group_size, "rows": rows}
