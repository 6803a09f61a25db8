"""Atomic writing of a Hugging Face layout checkpoint: sharded safetensors, index, JSON and tokenizer files.

Everything goes to a temporary directory beside the destination and is renamed into place only when
complete (`ladder.outputs`: the rule every output follows), so a failure (bad input, a full disk, an
interrupt) leaves no half-written output behind. Each tensor goes to disk as soon as it arrives, at
its final place in its shard: a shard's data starts after `HEADER_ROOM` bytes kept for the
safetensors header, which is written there (padded with spaces, as the format allows) when the
shard is closed. So memory holds one tensor at a time and disk holds each byte once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

from ladder.outputs import check_output, commit_output, start_output

DEFAULT_SHARD_BYTES = 256 * 2**20
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# Bytes kept at the front of each shard for its header (a multiple of 8: the data stays aligned);
# about 500 tensors' entries, and a shard is closed early rather than overflow it.
HEADER_ROOM = 64 * 2**10


class CheckpointWriter:
    """`with CheckpointWriter(dst) as w: w.add_tensor(...); w.add_json(...)` — all or nothing."""

    def __init__(self, dst: str | Path, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.dst = Path(dst)
        check_output(self.dst, (), force)
        self.force, self.shard_bytes = force, shard_bytes
        self.tmp: Path | None = None
        self._header: dict[str, dict[str, Any]] = {}  # the open shard's tensors
        self._header_bytes = 0  # an upper bound of the open shard's header, serialized
        self._shard_bytes = 0
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self.tensor_count = 0
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self.tmp = start_output(self.dst)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            if self.tmp is not None and self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._written:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        size = tensor.numel() * tensor.element_size()
        entry = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, size]}
        entry_bytes = len(json.dumps({name: entry}, separators=(",", ":"))) + 40  # 40: room for larger offsets
        if entry_bytes > HEADER_ROOM // 2:
            raise ValueError(f"tensor {name}: its name and shape are too long for a safetensors header")
        if self._header and (self._shard_bytes + size > self.shard_bytes
                             or self._header_bytes + entry_bytes > HEADER_ROOM - 64):
            self._close_shard()
        self._append(tensor.detach().contiguous())
        entry["data_offsets"] = [self._shard_bytes, self._shard_bytes + size]
        self._header[name] = entry
        self._header_bytes += entry_bytes
        self._written.add(name)
        self._shard_bytes += size
        self.tensor_count += 1
        self.total_bytes += size

    def add_json(self, name: str, obj: Any) -> None:
        self.add_file(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def add_file(self, name: str, content: str | bytes) -> None:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        data = content.encode() if isinstance(content, str) else content
        (self.tmp / name).write_bytes(data)

    def _shard_file(self, index: int) -> Path:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        return self.tmp / f"shard-{index}.safetensors"

    def _append(self, tensor: torch.Tensor) -> None:
        """Append the tensor's raw bytes (little-endian, as safetensors stores them) to the open shard."""
        with open(self._shard_file(len(self._shards)), "ab") as f:
            if f.tell() == 0:
                f.truncate(8 + HEADER_ROOM)  # the header's room, filled in when the shard is closed
                f.seek(0, os.SEEK_END)
            f.write(tensor.view(-1).view(torch.uint8).numpy().data)

    def _close_shard(self) -> None:
        """Write the open shard's header into the room kept for it at the front of its file."""
        index = len(self._shards)
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        assert len(header) <= HEADER_ROOM, "add_tensor closes a shard before its header outgrows its room"
        file = self._shard_file(index)
        with open(file, "r+b" if file.exists() else "wb") as f:
            f.write(struct.pack("<Q", HEADER_ROOM))
            f.write(header.ljust(HEADER_ROOM))
        self._shards.append(list(self._header))
        self._header, self._shard_bytes, self._header_bytes = {}, 0, 0

    def _finish(self) -> None:
        assert self.tmp is not None
        if self._header or not self._shards:
            self._close_shard()
        count = len(self._shards)
        if count == 1:
            (self.tmp / "shard-0.safetensors").rename(self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, names in enumerate(self._shards):
                file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                (self.tmp / f"shard-{i}.safetensors").rename(self.tmp / file)
                weight_map.update(dict.fromkeys(names, file))
            self.add_json("model.safetensors.index.json",
                          {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        for file in self.tmp.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        commit_output(self.tmp, self.dst, self.force)
        self.tmp = None
