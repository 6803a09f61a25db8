"""Reading, tokenizing, splitting and packing training text; the seeded order of sequences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ladder.data import DataError, PackedSequences, SampleOrder, read_documents, split_stream, token_stream


def test_text_files_are_documents_and_jsonl_records_too(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes("\ufeffFirst file.\n\nStill the first.".encode())
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert docs == ["First file.\n\nStill the first.", "one", "two"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "three"}) + "\n")
    assert read_documents([tmp_path / "c.jsonl"], text_field="body") == ["three"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.txt", b"", "empty.txt: empty"),
    ("blank.jsonl", b"\n  \n", "blank.jsonl: empty"),
    ("latin1.txt", b"na\xefve", r"latin1.txt: not UTF-8 text \(byte 0xef at offset 2\)"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": \n', r"broken.jsonl:2: not valid JSON"),
    ("list.jsonl", b'["text"]\n', r"list.jsonl:1: no string field 'text'"),
])
def test_unusable_files_are_named(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_documents([tmp_path / name])


def test_missing_paths_and_no_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.txt: no such file"):
        read_documents([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="is a directory"):
        read_documents([tmp_path])
    with pytest.raises(DataError, match="no data files"):
        read_documents([])


def test_documents_end_with_the_separator() -> None:
    stream = token_stream(["ab", "c"], lambda text: [ord(ch) for ch in text], separator=0)
    assert stream.tolist() == [97, 98, 0, 99, 0]


def test_packing_makes_every_token_after_the_first_a_target_once() -> None:
    stream = torch.arange(23)
    packed = PackedSequences(stream, seq_len=5)
    assert len(packed) == 4 and packed.targets == 20
    inputs, targets = packed.batch([0, 3])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [15, 16, 17, 18, 19]]
    assert targets.tolist() == [[1, 2, 3, 4, 5], [16, 17, 18, 19, 20]]
    with_tail = PackedSequences(stream, seq_len=5, keep_tail=True)
    assert len(with_tail) == 5 and with_tail.targets == 22
    assert with_tail.window(4).tolist() == [20, 21, 22]
    seen = torch.cat([with_tail.window(i)[1:] for i in range(len(with_tail))])
    assert seen.tolist() == list(range(1, 23))


def test_validation_is_the_tail_of_the_stream() -> None:
    split = split_stream(torch.arange(100), seq_len=8, val_fraction=0.1)
    assert split.train.tolist() == list(range(90)) and split.val.tolist() == list(range(90, 100))
    assert len(split_stream(torch.arange(9), seq_len=8, val_fraction=0.0).val) == 0


@pytest.mark.parametrize(("tokens", "fraction", "message"), [
    (8, 0.0, "fewer than one sequence of 8"),
    (12, 0.5, "6 for training, fewer than one sequence"),
    (20, 0.04, r"validation split \(4%\) holds 1 token"),
    (20, 1.0, r"val_fraction must be in \[0, 1\)"),
])
def test_too_little_data_is_refused(tokens: int, fraction: float, message: str) -> None:
    with pytest.raises(DataError, match=message):
        split_stream(torch.arange(tokens), seq_len=8, val_fraction=fraction, source="tiny.txt")


def test_sample_order_is_a_seeded_permutation_per_epoch() -> None:
    order = SampleOrder(7, seed=3)
    first_two_epochs = order.indices(0, 14)
    assert sorted(first_two_epochs[:7]) == list(range(7)) and sorted(first_two_epochs[7:]) == list(range(7))
    assert first_two_epochs[:7] != first_two_epochs[7:]
    # Reading from any position (a resumed run) gives what reading straight through gave.
    assert SampleOrder(7, seed=3).indices(5, 6) == first_two_epochs[5:11]
    assert SampleOrder(7, seed=4).indices(0, 7) != first_two_epochs[:7]
