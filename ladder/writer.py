"""Atomic writing of a Hugging Face layout checkpoint: sharded safetensors, index, JSON and tokenizer files.

Everything goes to a temporary directory beside the destination and is renamed into place only when
complete, so a failure (bad input, a full disk, an interrupt) leaves no half-written output behind.
Each tensor goes to disk as soon as it arrives (its bytes are appended to the shard's data file and
the safetensors header is put in front when the shard is closed), so memory holds one tensor at a
time whatever the model's or the shard's size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

DEFAULT_SHARD_BYTES = 256 * 2**20
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
COPY_CHUNK = 16 * 2**20


class OutputExistsError(FileExistsError):
    """The destination exists and overwriting was not asked for."""


class CheckpointWriter:
    """`with CheckpointWriter(dst) as w: w.add_tensor(...); w.add_json(...)` — all or nothing."""

    def __init__(self, dst: str | Path, force: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.dst = Path(dst)
        if self.dst.exists() and not force:
            raise OutputExistsError(f"{self.dst} already exists (use --force to overwrite it)")
        self.force, self.shard_bytes = force, shard_bytes
        self.tmp: Path | None = None
        self._header: dict[str, dict[str, Any]] = {}  # the open shard's tensors
        self._shard_bytes = 0
        self._shards: list[list[str]] = []
        self._written: set[str] = set()
        self.tensor_count = 0
        self.total_bytes = 0

    def __enter__(self) -> CheckpointWriter:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.partial-", dir=self.dst.parent))
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
        if self._header and self._shard_bytes + size > self.shard_bytes:
            self._close_shard()
        self._append(tensor.detach().contiguous())
        self._header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self._shard_bytes, self._shard_bytes + size]}
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

    def _data_file(self, index: int) -> Path:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        return self.tmp / f"shard-{index}.data"

    def _append(self, tensor: torch.Tensor) -> None:
        """Append the tensor's raw bytes (little-endian, as safetensors stores them) to the open shard."""
        with open(self._data_file(len(self._shards)), "ab") as f:
            f.write(tensor.view(-1).view(torch.uint8).numpy().data)

    def _close_shard(self) -> None:
        """Write the open shard as `shard-N.safetensors`: header first, then the data appended so far."""
        index = len(self._shards)
        data = self._data_file(index)
        data.touch()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data then starts 8-byte aligned, as safetensors pads it
        with open(self.tmp / f"shard-{index}.safetensors", "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, COPY_CHUNK)
        data.unlink()
        self._shards.append(list(self._header))
        self._header, self._shard_bytes = {}, 0

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
        old = None
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            self.dst.rename(old)
        self.tmp.rename(self.dst)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
