"""Training text: read, tokenize with the checkpoint's own tokenizer, split off validation, pack.

Documents (a whole text file, or one JSONL record's text field) are tokenized and concatenated in
order with the end-of-text token after each, so the model sees where one document stops. The
packed stream is cut into fixed-length sequences that may run across such a boundary and attend
across it (no block-diagonal mask), as in ordinary pretraining on concatenated text. Validation is
the *last* `val_fraction` of the token stream: with a single file, the end of that file.

Which sequence a training step reads depends only on the seed and the step number (a fresh seeded
permutation per epoch), so a resumed run reads exactly what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line) and the problem."""


def read_documents(paths: Sequence[str | Path], text_field: str = "text") -> list[str]:
    """The documents in `paths`: each plain-text file is one, each JSONL line's `text_field` is one."""
    if not paths:
        raise DataError("no data files given")
    documents: list[str] = []
    for path in map(Path, paths):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a directory, not a text or JSONL file") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
        found = _jsonl_documents(path, text, text_field) if path.suffix in JSONL_SUFFIXES else [text]
        found = [doc for doc in found if doc.strip()]
        if not found:
            raise DataError(f"{path}: empty (no text to train on)")
        documents.extend(found)
    return documents


def _jsonl_documents(path: Path, text: str, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: no string field {text_field!r} in this record")
        documents.append(value)
    return documents


def fingerprint(paths: Sequence[str | Path]) -> list[dict[str, str | int]]:
    """Name, size and SHA-256 of each data file: a resumed run must read the very same data."""
    out = []
    for path in map(Path, paths):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out.append({"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest})
    return out


def token_stream(documents: Sequence[str], encode: Callable[[str], list[int]], separator: int) -> torch.Tensor:
    """Every document's tokens followed by `separator` (the end-of-text token), as one 1-D tensor."""
    ids: list[int] = []
    for doc in documents:
        ids.extend(encode(doc))
        ids.append(separator)
    return torch.tensor(ids, dtype=torch.long)


class PackedSequences:
    """Windows of `seq_len + 1` tokens taken every `seq_len` tokens: inputs `[:-1]`, targets `[1:]`.

    So every token after the first is a target exactly once. With `keep_tail`, the remainder that
    does not fill a last window is one shorter sequence (validation scores every held-out token).
    """

    def __init__(self, stream: torch.Tensor, seq_len: int, keep_tail: bool = False) -> None:
        self.stream, self.seq_len = stream, seq_len
        self.full = (len(stream) - 1) // seq_len
        self.tail = keep_tail and (len(stream) - 1) % seq_len > 0

    def __len__(self) -> int:
        return self.full + self.tail

    @property
    def targets(self) -> int:
        """How many target tokens all the sequences hold together."""
        return self.full * self.seq_len + (len(self.stream) - 1 - self.full * self.seq_len) * self.tail

    def window(self, index: int) -> torch.Tensor:
        start = index * self.seq_len
        return self.stream[start:start + self.seq_len + 1]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the given sequences (all the same length), [len(indices), seq]."""
        windows = torch.stack([self.window(int(i)) for i in indices])
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class TokenSplit:
    train: torch.Tensor
    val: torch.Tensor


def split_stream(stream: torch.Tensor, seq_len: int, val_fraction: float, source: str = "data") -> TokenSplit:
    """The first `1 - val_fraction` of the tokens for training, the rest for validation."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seq_len < 1:
        raise DataError(f"sequence length must be positive, got {seq_len}")
    cut = len(stream) - round(len(stream) * val_fraction)
    train, val = stream[:cut], stream[cut:]
    if len(train) < seq_len + 1:
        raise DataError(
            f"{source}: {len(stream)} tokens give {len(train)} for training, fewer than one sequence of "
            f"{seq_len} (+1 target); use more text or a shorter --seq-len"
        )
    if val_fraction > 0 and len(val) < 2:
        raise DataError(f"{source}: the validation split ({val_fraction:.0%}) holds {len(val)} token(s), "
                        "too few to score; use more text or a larger --val-fraction")
    return TokenSplit(train, val)


class SampleOrder:
    """Which training sequence is the k-th one read: a fresh seeded permutation every epoch."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed = count, seed
        self._permutations: dict[int, list[int]] = {}

    def indices(self, start: int, number: int) -> list[int]:
        """Sequences number `start .. start + number - 1` of the endless, epoch-by-epoch order."""
        return [self._permutation(k // self.count)[k % self.count] for k in range(start, start + number)]

    def _permutation(self, epoch: int) -> list[int]:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutations = {epoch: torch.randperm(self.count, generator=generator).tolist()}
        return self._permutations[epoch]
