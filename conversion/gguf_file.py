"""GGUF files from llama.cpp, read with the `gguf` package.

The file is memory-mapped; each tensor is dequantized on its own (`gguf.quants.dequantize`, every
type the package supports) and attn_q / attn_k are put back from llama.cpp's interleaved rotary
order into Hugging Face's. The config and a tokenizer come from the metadata, so the converted
checkpoint needs no other file.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .gguf_tokenizer import build_tokenizer
from .source import ConversionError, Source, half_rotary_order

ARCHITECTURES = ("llama",)
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
DEQUANTIZE_ROWS = 4096
ROPE_FREQS = "rope_freqs.weight"  # per-frequency divisors of the rotary frequencies (Llama 3.1 scaling)


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a llama.cpp tensor name, None if a Llama has no such tensor."""
    stem, _, kind = name.rpartition(".")
    if stem in MODEL_TENSORS and kind == "weight":
        return f"{MODEL_TENSORS[stem]}.weight"
    match = LAYER_NAME.fullmatch(name)
    if match and match[2] in LAYER_TENSORS:
        return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}.{match[3]}"
    return None


def dequantize(data: np.ndarray, kind: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values of a stored tensor, a block of rows at a time so temporaries stay small."""
    out = torch.empty(shape, dtype=torch.float32)
    rows = out.numpy().reshape(-1, shape[-1])
    stored_rows = data.reshape(len(rows), -1)
    for start in range(0, len(rows), DEQUANTIZE_ROWS):
        block = stored_rows[start:start + DEQUANTIZE_ROWS]
        rows[start:start + len(block)] = gguf.quants.dequantize(block, kind).reshape(len(block), -1)
    return out


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, origin: str) -> dict[str, Any] | None:
    """Hugging Face's "llama3" `rope_scaling` that divides the rotary frequencies by `factors`.

    llama.cpp stores Llama 3.1's rescaling as one divisor per frequency: 1 for short wavelengths,
    `factor` for long ones, and between them 1 / ((1 - s) / factor + s) with s linear in the
    frequency, s = C / (2 pi (high - low)) * freq - low / (high - low). Fitting that line recovers the
    parameters up to a common scale of (C, low, high), which the formula does not see; low = 1 fixes
    it (Llama 3.1's own values come back exactly). None when every divisor is 1.
    """
    factor = float(factors.max())
    if np.allclose(factors, 1.0):
        return None
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    if len(factors) != len(freqs):
        raise ConversionError(f"{origin}: {len(factors)} factors for {len(freqs)} rotary frequencies")
    smooth = (1 / factors - 1 / factor) / (1 - 1 / factor)
    band = (smooth > 1e-6) & (smooth < 1 - 1e-6)
    if band.sum() >= 2:
        slope, intercept = np.polyfit(freqs[band], smooth[band], 1)
        high = 1 - 1 / intercept
        context = -2 * np.pi * slope / intercept
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                   "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": round(context)}
        context, high = scaling["original_max_position_embeddings"], scaling["high_freq_factor"]
        refit = np.clip((context * freqs / (2 * np.pi) - 1) / (high - 1), 0, 1)
        if np.allclose(1 / ((1 - refit) / factor + refit), factors, rtol=1e-4):
            return scaling
    raise ConversionError(f"{origin} rescales rotary frequencies in a way Llama 3's rope scaling does not describe")


# GGUF value types (llama.cpp's gguf_type): fixed-size scalars by their byte size, then string and array.
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_ARRAY_NESTING = 4
MAX_TENSOR_DIMS = 8


class _HeaderWalk:
    """Steps through a GGUF header checking every count and length it claims against the bytes left.

    The `gguf` reader trusts them: an array claiming 10**12 elements in a file of a few hundred bytes
    keeps it looping without end. Walking first makes the work bounded by the file's size.
    """

    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, count: int, what: str) -> int:
        left = len(self.data) - self.at
        if count > left:
            raise ConversionError(f"{self.path}: {what} claims {count} bytes at offset {self.at}, but only {left} "
                                  "are left in the file")
        start, self.at = self.at, self.at + count
        return start

    def integer(self, fmt: str, what: str) -> int:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind in SCALAR_BYTES:
            self.take(SCALAR_BYTES[kind], what)
        elif kind == STRING:
            self.take(self.integer("<Q", what), what)
        elif kind == ARRAY and depth < MAX_ARRAY_NESTING:
            item, count = self.integer("<I", what), self.integer("<Q", what)
            if item in SCALAR_BYTES:
                self.take(count * SCALAR_BYTES[item], f"{what} ({count} elements)")
            else:
                for _ in range(count):  # every element takes at least 8 bytes, so this ends with the file
                    self.value(item, f"{what} ({count} elements)", depth + 1)
        else:
            raise ConversionError(f"{self.path}: {what} has value type {kind}, which GGUF does not define here")

    def check(self) -> None:
        self.take(8, "the header")  # magic and version
        tensors, fields = self.integer("<Q", "the tensor count"), self.integer("<Q", "the metadata count")
        for index in range(fields):
            self.take(self.integer("<Q", f"metadata entry {index} of {fields}"), f"metadata entry {index} of {fields}")
            self.value(self.integer("<I", f"metadata entry {index}"), f"metadata entry {index}")
        for index in range(tensors):
            what = f"tensor info {index} of {tensors}"
            self.take(self.integer("<Q", what), what)
            dims = self.integer("<I", what)
            if dims > MAX_TENSOR_DIMS:
                raise ConversionError(f"{self.path}: {what} claims {dims} dimensions")
            self.take(8 * dims + 4 + 8, what)


def check_claimed_sizes(path: Path) -> None:
    """Refuse a GGUF file whose header claims more entries or bytes than the file holds."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _HeaderWalk(data, path).check()


class GGUFSource(Source):
    format = "GGUF"

    def __init__(self, path: Path) -> None:
        check_claimed_sizes(path)
        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # the reader raises ValueError, KeyError, struct errors... on a bad file
            raise ConversionError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        # Keep plain values and the tensors' memory-mapped views, not the reader's per-element field views.
        self.meta = {name: field.contents() for name, field in reader.fields.items()}
        stored_tensors = reader.tensors
        del reader
        arch = self.meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise ConversionError(f"{path}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
        self.stored: dict[str, Any] = {}
        self.rope_factors: np.ndarray | None = None
        for tensor in stored_tensors:
            name = hf_name(tensor.name)
            if name is not None:
                self.stored[name] = tensor
            elif tensor.name == ROPE_FREQS:
                self.rope_factors = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
            else:
                raise ConversionError(f"{path}: tensor {tensor.name} is not part of a {arch} model")
        self._check_quantization(path)
        config = self._config(path, arch)
        shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in self.stored.items()}
        origins = {name: f"{path}: tensor {t.name} ({name})" for name, t in self.stored.items()}
        super().__init__(path, path, config, shapes, origins)

    def _check_quantization(self, path: Path) -> None:
        """Refuse, before anything is written, a quantization type the gguf package cannot dequantize."""
        probed = set()
        for tensor in self.stored.values():
            if tensor.tensor_type in probed:
                continue
            try:
                gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
            except NotImplementedError:
                raise ConversionError(f"{path}: tensor {tensor.name} has quantization type "
                                      f"{tensor.tensor_type.name}, which the gguf package cannot dequantize") from None
            probed.add(tensor.tensor_type)

    def _field(self, path: Path, key: str, default: Any = None) -> Any:
        value = self.meta.get(key, default)
        if value is None:
            raise ConversionError(f"{path}: metadata field {key} is missing")
        return value

    def _config(self, path: Path, arch: str) -> dict[str, Any]:
        tokens = self.meta.get("tokenizer.ggml.tokens") or []
        embed = self.stored.get("model.embed_tokens.weight")
        heads = self._field(path, f"{arch}.attention.head_count")
        hidden = self._field(path, f"{arch}.embedding_length")
        for key in (f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
            if not isinstance(self.meta.get(key, 0), int):
                raise ConversionError(f"{path}: metadata field {key} varies per layer, which a Llama does not")
        head_dim = self.meta.get(f"{arch}.attention.key_length") or (hidden // heads if heads else None)
        rotary = self.meta.get(f"{arch}.rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise ConversionError(f"{path}: {arch}.rope.dimension_count {rotary} differs from the head size "
                                  f"{head_dim}; partial rotary embeddings are not supported")
        scaling = self.meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling != "none":
            raise ConversionError(f"{path}: {arch}.rope.scaling.type {scaling!r} is not supported")
        theta = self.meta.get(f"{arch}.rope.freq_base", 10000.0)
        config = {
            "model_type": "llama",
            "num_hidden_layers": self._field(path, f"{arch}.block_count"),
            "hidden_size": hidden,
            "intermediate_size": self._field(path, f"{arch}.feed_forward_length"),
            "num_attention_heads": heads,
            "num_key_value_heads": self.meta.get(f"{arch}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "vocab_size": self.meta.get(f"{arch}.vocab_size") or len(tokens) or (embed.shape[1] if embed else None),
            "max_position_embeddings": self.meta.get(f"{arch}.context_length", 2048),
            "rms_norm_eps": self.meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            "rope_theta": theta,
            "rope_scaling": None if self.rope_factors is None else llama3_rope_scaling(
                self.rope_factors, theta, head_dim, f"{path}: tensor {ROPE_FREQS}"),
            "tie_word_embeddings": "lm_head.weight" not in self.stored,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.stored,
            "mlp_bias": "model.layers.0.mlp.gate_proj.bias" in self.stored,
        }
        for key, field in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):
            if f"tokenizer.ggml.{field}" in self.meta:
                config[key] = self.meta[f"tokenizer.ggml.{field}"]
        return config

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        heads, kv_heads = self.config["num_attention_heads"], self.config["num_key_value_heads"]
        for name, stored in self.stored.items():
            tensor = dequantize(stored.data, stored.tensor_type, self.shapes[name])
            if ".q_proj." in name:
                tensor = half_rotary_order(tensor, heads)
            elif ".k_proj." in name:
                tensor = half_rotary_order(tensor, kv_heads)
            yield name, tensor

    def files(self) -> dict[str, bytes]:
        if "tokenizer.ggml.tokens" not in self.meta:
            return {}
        return {name: text.encode() for name, text in build_tokenizer(self.meta, str(self.path)).items()}
