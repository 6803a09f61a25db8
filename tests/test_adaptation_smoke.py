"""The adaptation experiment end to end on a tiny random checkpoint: six rows, two texts, answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from test_train import TEXT, text_file, tiny_checkpoint

from ladder_benchmarks import adaptation

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


def test_six_rows_scored_on_the_book_and_an_unseen_text(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                  "chat_template": CHAT_TEMPLATE}))
    book = text_file(tmp_path / "book.txt", "*** START OF THE BOOK ***\n" + TEXT + "\n*** END OF THE BOOK ***\n")
    unseen = text_file(tmp_path / "unseen.txt", "The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "result.json"
    adaptation.main(["--checkpoint", str(checkpoint), "--data", str(book), "--unseen", str(unseen),
                     "--work-dir", str(tmp_path / "work"), "--seq-len", "32", "--batch-size", "2", "--steps", "3",
                     "--warmup-steps", "1", "--lr", "1e-2", "--threads", "1", "--prompt", "Winston", "--json-out",
                     str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert list(rows) == list(adaptation.ROWS)
    assert result["unseen_text"] == str(unseen)
    assert sorted(result["comparisons"]) == sorted(adaptation.TARGETS)
    for row in rows.values():
        assert math.isfinite(row["ppl"]) and math.isfinite(row["unseen_ppl"])
    trained = [key for key, (_, _, changes) in adaptation.ROWS.items() if changes is not None]
    assert all(rows[key]["train_tokens"] == 3 * 2 * 32 for key in trained)
    # The untrained ladder layout is another function of the same weights; training moves every row.
    assert rows["ladder before"]["unseen_ppl"] != rows["original"]["unseen_ppl"]
    assert len({rows[key]["unseen_ppl"] for key in trained}) == len(trained)
    # Full distillation copies the teacher's weights; training only the ladder layers copies only those.
    full, cheap = (rows[key]["teacher_copied_bytes"] for key in ("ladder distilled", "ladder distilled, ladder layers only"))
    assert 0 < cheap < full
    assert rows["ladder lm"]["teacher_copied_bytes"] == 0
