"""Atomic writing of a Hugging Face layout checkpoint: sharded safetensors, index, JSON and tokenizer files.

Everything goes to a temporary directory beside the destination and is renamed into place only when
complete, so a failure (bad input, a full disk, an interrupt) leaves no half-written output behind.
Tensors are buffered only up to one shard's size, so memory stays bounded whatever the model's size.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

DEFAULT_SHARD_BYTES = 256 * 2**20


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
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
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
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous()
        self._pending_bytes += size
        self.tensor_count += 1
        self.total_bytes += size

    def add_json(self, name: str, obj: Any) -> None:
        self.add_file(name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    def add_file(self, name: str, content: str | bytes) -> None:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        data = content.encode() if isinstance(content, str) else content
        (self.tmp / name).write_bytes(data)

    def _flush(self) -> None:
        assert self.tmp is not None, "use CheckpointWriter as a context manager"
        index = len(self._shards)
        save_file(self._pending, self.tmp / f"shard-{index}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _finish(self) -> None:
        assert self.tmp is not None
        if self._pending or not self._shards:
            self._flush()
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
