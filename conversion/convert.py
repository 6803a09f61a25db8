"""SRC (Hugging Face directory, Meta original directory or GGUF file) -> Ladder checkpoint.

Everything that can be checked before writing is: the config, every tensor's name and shape, the
tokenizer. Tensors then stream from the reader to the writer one at a time, and the writer renames
its temporary directory into place only when all of it is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ladder.checkpoint import full_shapes, non_finite
from ladder.config import LadderConfig, dtype_name
from ladder.outputs import OutputError, UnsafeFileError, check_output
from ladder.writer import DEFAULT_SHARD_BYTES, CheckpointWriter

from .gguf_file import GGUFSource
from .hf import HuggingFaceSource
from .meta import MetaSource
from .source import ConversionError, Source

GGUF_MAGIC = b"GGUF"
TIED_HEAD = "lm_head.weight"  # optional in a tied source, never written (the embedding is the head)


@dataclass(frozen=True)
class Summary:
    source_format: str
    tensors: int
    bytes: int
    seconds: float
    ladder_layers: list[int]
    num_layers: int

    def __str__(self) -> str:
        layers = _ranges(self.ladder_layers) if self.ladder_layers else "none"
        return (f"converted {self.source_format} checkpoint: {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB "
                f"in {self.seconds:.1f} s; ladder layers: {layers} ({len(self.ladder_layers)} of {self.num_layers})")


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    groups: list[list[int]] = []
    for i in indices:
        if groups and i == groups[-1][-1] + 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return ",".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups)


def open_source(path: str | Path) -> Source:
    """The reader for whatever `path` holds, recognised by its files."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == GGUF_MAGIC:
                return GGUFSource(path)
        raise ConversionError(f"{path}: not a GGUF file (a source is a GGUF file, or a directory holding "
                              "config.json for Hugging Face or params.json for Meta's original format)")
    if (path / "config.json").exists():
        return HuggingFaceSource(path)
    if (path / "params.json").exists():
        return MetaSource(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return GGUFSource(ggufs[0])
    raise ConversionError(f"{path}: no config.json (Hugging Face), params.json (Meta) or single .gguf file "
                          f"found{f'; {len(ggufs)} .gguf files, name one' if ggufs else ''}")


def target_config(source: Source, ladder_layers: str | None) -> LadderConfig:
    """The source's config with the chosen ladder layers (None keeps the source's own schedules)."""
    config = LadderConfig.from_dict(source.config, source=str(source.config_file))
    return config if ladder_layers is None else config.with_ladder_layers(ladder_layers)


def _listed(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")


def check_tensors(source: Source, config: LadderConfig) -> None:
    """Every tensor the config implies is there with its shape, and nothing else is.

    A tied head is stored once, as the embedding; a source that also stores `lm_head.weight` (some
    exporters do) is accepted if it has the embedding's shape, and `convert` does not write it.
    """
    expected = dict(full_shapes(config))
    missing = [name for name in expected if name not in source.shapes]
    if missing:
        raise ConversionError(f"{source.path}: missing tensor(s) {_listed(missing)}")
    if config.tie_word_embeddings:
        expected[TIED_HEAD] = expected["model.embed_tokens.weight"]
    extra = [name for name in source.shapes if name not in expected]
    if extra:
        raise ConversionError(f"tensor(s) that {source.config_file.name} does not describe: "
                              f"{_listed([source.origins[name] for name in extra])}")
    for name, shape in source.shapes.items():
        if tuple(shape) != tuple(expected[name]):
            raise ConversionError(f"{source.origins[name]} has shape {list(shape)}, "
                                  f"{source.config_file.name} implies {list(expected[name])}")


def config_json(config: LadderConfig, dtype: torch.dtype) -> dict[str, Any]:
    out = config.to_dict()
    out["torch_dtype"] = dtype_name(dtype)
    return out


def generation_config(config: LadderConfig) -> dict[str, Any]:
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    return {key: value for key, value in ids.items() if value is not None}


def convert(src: str | Path, dst: str | Path, ladder_layers: str | None = None, dtype: torch.dtype = torch.float32,
            force: bool = False, progress: bool = False, shard_bytes: int = DEFAULT_SHARD_BYTES) -> Summary:
    """Write a Ladder checkpoint of `src` at `dst`, all or nothing; see the module docstring."""
    start = time.perf_counter()
    dst = Path(dst)
    check_output(dst, [Path(src)], force)
    source = open_source(src)
    check_output(dst, [source.path], force)  # a directory's GGUF file, or what a link led to
    config = target_config(source, ladder_layers)
    check_tensors(source, config)
    try:
        side_files = source.files()
    except UnsafeFileError as exc:
        raise ConversionError(str(exc)) from None
    try:
        with CheckpointWriter(dst, force=force, shard_bytes=shard_bytes) as writer:
            for name, tensor in tqdm(source.tensors(), total=len(source.shapes), unit="tensor",
                                     desc="converting", disable=not progress):
                if not tensor.is_floating_point():
                    raise ConversionError(f"{source.origins[name]} has dtype {tensor.dtype}, "
                                          "weights must be floating point")
                if tuple(tensor.shape) != tuple(source.shapes[name]):  # a reader broke its own promise
                    raise ConversionError(f"{source.origins[name]} was read with shape {list(tensor.shape)}, "
                                          f"not the declared {list(source.shapes[name])}")
                if config.tie_word_embeddings and name == TIED_HEAD:
                    continue  # tied: the head is the embedding
                cast = tensor.to(dtype)
                if problem := non_finite(tensor, cast):
                    raise ConversionError(f"{source.origins[name]} {problem}")
                writer.add_tensor(name, cast)
            writer.add_json("config.json", config_json(config, dtype))
            if "generation_config.json" not in side_files:
                writer.add_json("generation_config.json", generation_config(config))
            for name, content in side_files.items():
                writer.add_file(name, content)
    except OutputError:
        raise
    except OSError as exc:
        raise ConversionError(f"{dst}: writing failed, nothing was written ({exc})") from exc
    return Summary(source.format, writer.tensor_count, writer.total_bytes, time.perf_counter() - start,
                   config.ladder_layers, config.num_hidden_layers)
