"""What every reader hands the converter: a checkpoint seen as Hugging Face Llama tensors and config.

A reader opens its files lazily, names every tensor and its shape up front (so bad input is refused
before anything is written), then yields the tensors one at a time in Hugging Face naming, so
conversion holds only a few tensors in memory whatever the model's size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file, tensor or field."""


class Source(ABC):
    """A checkpoint in some format. `config` is a Hugging Face Llama `config.json` as a dict."""

    format: str = ""

    def __init__(self, path: Path, config_file: Path, config: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 origins: dict[str, str]) -> None:
        self.path = path
        self.config_file = config_file  # where `config` was read from, for error messages
        self.config = config
        self.shapes = shapes    # Hugging Face name -> full shape, in the order tensors() yields them
        self.origins = origins  # Hugging Face name -> "FILE: tensor STORED_NAME", for error messages

    @abstractmethod
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of `shapes`, in that order, in Hugging Face naming and rotary layout."""

    def files(self) -> dict[str, bytes]:
        """Tokenizer and generation files to write beside the weights (name -> content)."""
        return {}


def half_rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k rows from interleaved-pair rotary order (Meta, llama.cpp) to Hugging Face's rotate-half order.

    Within each head, rows (x0, y0, x1, y1, ...) become (x0, x1, ..., y0, y1, ...).
    """
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape).contiguous())

