"""Hugging Face Llama directories (and Ladder checkpoints, which share their layout).

`config.json` in any of its rope spellings, `model.safetensors` or shards listed by
`model.safetensors.index.json`, tied or untied head. Tensors are read one at a time from the
memory-mapped files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ladder.checkpoint import INDEX_FILE, CheckpointError, weight_map
from ladder.config import read_json_object
from ladder.outputs import read_side_files
from ladder.tokenizer import TOKENIZER_FILES

from .source import ConversionError, Source

LLAMA_MODEL_TYPES = ("llama", "llamaLadder")
# Buffers some older checkpoints saved with the weights; recomputed from the config, never needed.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_json(file: Path, what: str) -> dict[str, Any]:
    return read_json_object(file, what, ConversionError)


class HuggingFaceSource(Source):
    format = "Hugging Face"

    def __init__(self, path: Path) -> None:
        config = read_json(path / "config.json", "the model's configuration")
        model_type = config.get("model_type", "llama")
        if model_type not in LLAMA_MODEL_TYPES:
            raise ConversionError(f"{path / 'config.json'}: model_type {model_type!r} is not a Llama model "
                                  f"(expected one of {', '.join(LLAMA_MODEL_TYPES)})")
        try:
            self.files_of = {name: file for name, file in weight_map(path).items()
                             if not name.endswith(IGNORED_SUFFIXES)}
        except CheckpointError as exc:
            raise ConversionError(str(exc)) from None
        shapes = {}
        for file, names in self._by_file().items():
            with self._open(file) as f:
                stored = set(f.keys())
                for name in names:
                    if name not in stored:
                        raise ConversionError(f"{path / INDEX_FILE} places tensor {name} in {file}, "
                                              "which does not hold it")
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        origins = {name: f"{file}: tensor {name}" for name, file in self.files_of.items()}
        super().__init__(path, path / "config.json", config, shapes, origins)

    def _by_file(self) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name, file in self.files_of.items():
            by_file.setdefault(file, []).append(name)
        return by_file

    def _open(self, file: Path) -> Any:
        try:
            return safe_open(file, "pt")
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"{file}: corrupt or truncated safetensors file ({exc})") from None

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # safetensors returns views of the memory-mapped file: one mapping per tensor, closed once the
        # tensor is written, keeps the pages it touched from piling up in memory over a whole shard.
        for file, names in self._by_file().items():
            for name in names:
                with self._open(file) as f:
                    try:
                        tensor = f.get_tensor(name)
                    except SafetensorError as exc:
                        raise ConversionError(f"{file}: tensor {name} cannot be read ({exc})") from None
                    yield name, tensor

    def files(self) -> dict[str, bytes]:
        """The tokenizer and generation files present beside the weights, copied as they are (regular files
        inside the directory only: see `ladder.outputs.side_file`)."""
        return read_side_files(self.path, TOKENIZER_FILES)
