"""Meta's original Llama checkpoints: `params.json` + `consolidated.NN.pth`, one file per model-parallel rank.

The files are memory-mapped and unpickled with `weights_only=True`, which refuses anything but
tensors and plain containers. Meta's model-parallel split is undone per tensor: column-parallel
weights (wq, wk, wv, w1, w3, output) concatenate on dim 0, row-parallel ones (wo, w2) on dim 1, the
embedding on dim 0 (Llama 3) or dim 1 (Llama 1/2), norms are replicated. q and k rows go from
Meta's interleaved rotary pairs to Hugging Face's rotate-half order.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ladder.config import shown

from .hf import read_json
from .source import ConversionError, Source, half_rotary_order

# Meta name (with N for the layer) -> (Hugging Face name, dim the model-parallel shards split; None = replicated)
LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
MODEL_TENSORS = {
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
}
EMBEDDING = "tok_embeddings.weight"
IGNORED = ("rope.freqs",)  # precomputed rotary table in Llama 1/2 files; recomputed from the config
LAYER_NAME = re.compile(r"layers\.(\d+)\.(.+)")
# Llama 3.1's rope rescaling, which Meta's files state only as `use_scaled_rope`.
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def load_weights(file: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, memory-mapped; refuses any pickled object that is not a tensor."""
    try:
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # files from before torch's zip format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConversionError(f"{file}: refusing to unpickle it, it holds more than tensors "
                              f"({str(exc).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ConversionError(f"{file}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise ConversionError(f"{file}: expected a dict of tensor name -> tensor")
    return loaded


class MetaSource(Source):
    format = "Meta original"

    def __init__(self, path: Path) -> None:
        params_file = path / "params.json"
        params = read_json(params_file, "Meta's model parameters")
        self.shard_files = sorted(path.glob("consolidated.*.pth"))
        if not self.shard_files:
            raise ConversionError(f"{path}: params.json but no consolidated.NN.pth file")
        self.shards = [load_weights(f) for f in self.shard_files]
        first_keys = set(self.shards[0]) - set(IGNORED)
        for file, shard in zip(self.shard_files[1:], self.shards[1:], strict=True):
            if set(shard) - set(IGNORED) != first_keys:
                diff = sorted(first_keys ^ (set(shard) - set(IGNORED)))
                raise ConversionError(f"{file}: holds different tensors from {self.shard_files[0].name} "
                                      f"({', '.join(diff[:5])})")
        try:
            self.hidden, heads = int(params["dim"]), int(params["n_heads"])
            kv_heads = int(params.get("n_kv_heads") or heads)
            layers = int(params["n_layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{params_file}: missing or malformed field {exc}") from None
        self.heads, self.kv_heads = heads, kv_heads
        for needed in (EMBEDDING, "layers.0.feed_forward.w1.weight"):
            if needed not in first_keys:
                raise ConversionError(f"{self.shard_files[0]}: missing tensor {needed}")
        self.layout = self._tensor_layout(first_keys)
        shapes = {hf: self._joined_shape(meta, dim) for hf, (meta, dim) in self.layout.items()}
        embed, gate = shapes["model.embed_tokens.weight"], shapes["model.layers.0.mlp.gate_proj.weight"]
        vocab = params.get("vocab_size", -1)
        if not isinstance(vocab, int) or isinstance(vocab, bool):
            raise ConversionError(f"{params_file}: vocab_size must be an integer (-1: the embedding's rows), "
                                  f"got {shown(vocab)}")
        config = {
            "model_type": "llama",
            "hidden_size": self.hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "intermediate_size": gate[0],
            "vocab_size": vocab if vocab > 0 else embed[0],
            "rms_norm_eps": params.get("norm_eps", 1e-5),
            "rope_theta": params.get("rope_theta", 10000.0),
            "tie_word_embeddings": "output.weight" not in first_keys,
            "max_position_embeddings": params.get("max_seq_len") or self._context_length(params, embed[0]),
        }
        if params.get("use_scaled_rope"):
            config["rope_scaling"] = dict(LLAMA31_ROPE_SCALING,
                                          factor=params.get("rope_scaling_factor", LLAMA31_ROPE_SCALING["factor"]))
        origins = {hf: f"{self.shard_files[0]}: tensor {meta} ({hf})" for hf, (meta, _) in self.layout.items()}
        super().__init__(path, params_file, config, shapes, origins)

    @staticmethod
    def _context_length(params: dict[str, Any], vocab: int) -> int:
        """Meta's files do not say; these are the lengths each Llama generation was released with."""
        if params.get("use_scaled_rope"):
            return 131072
        return 8192 if vocab >= 128000 else 4096

    def _tensor_layout(self, keys: set[str]) -> dict[str, tuple[str, int | None]]:
        """Hugging Face name -> (Meta name, concatenation dim), refusing names a Llama does not have."""
        layout: dict[str, tuple[str, int | None]] = {}
        for meta in sorted(keys, key=_natural):
            if meta == EMBEDDING:
                layout["model.embed_tokens.weight"] = (meta, self._embedding_dim(meta))
            elif meta in MODEL_TENSORS:
                hf, dim = MODEL_TENSORS[meta]
                layout[hf] = (meta, dim)
            elif (match := LAYER_NAME.fullmatch(meta)) and match[2] in LAYER_TENSORS:
                hf, dim = LAYER_TENSORS[match[2]]
                layout[f"model.layers.{match[1]}.{hf}"] = (meta, dim)
            else:
                raise ConversionError(f"{self.shard_files[0]}: tensor {meta} is not part of a Llama model")
        return layout

    def _embedding_dim(self, meta: str) -> int | None:
        """Llama 3 splits the embedding by vocabulary rows, Llama 1/2 by hidden columns."""
        if len(self.shards) == 1:
            return None
        return 0 if self.shards[0][meta].shape[1] == self.hidden else 1

    def _joined_shape(self, meta: str, dim: int | None) -> tuple[int, ...]:
        shape = list(self.shards[0][meta].shape)
        if dim is not None and len(self.shards) > 1:
            for file, shard in zip(self.shard_files, self.shards, strict=True):
                other = list(shard[meta].shape)
                if len(other) != len(shape) or other[:dim] + other[dim + 1:] != shape[:dim] + shape[dim + 1:]:
                    raise ConversionError(f"{file}: tensor {meta} has shape {other}, which does not join "
                                          f"{self.shard_files[0].name}'s {list(self.shards[0][meta].shape)} on dim {dim}")
            shape[dim] = sum(shard[meta].shape[dim] for shard in self.shards)
        return tuple(shape)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for hf, (meta, dim) in self.layout.items():
            if dim is None or len(self.shards) == 1:
                tensor = self.shards[0][meta]
            else:
                tensor = torch.cat([shard[meta] for shard in self.shards], dim=dim)
            if hf.endswith("q_proj.weight"):
                tensor = half_rotary_order(tensor, self.heads)
            elif hf.endswith("k_proj.weight"):
                tensor = half_rotary_order(tensor, self.kv_heads)
            yield hf, tensor


def _natural(name: str) -> list[Any]:
    """Sort key putting layers.2 before layers.10, so tensors stream in model order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
