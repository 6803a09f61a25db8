"""Loading a Ladder checkpoint (a Hugging Face Llama directory) one rank's slices at a time.

Each rank opens the safetensors files lazily and reads only the rows or columns its shard plan
names, so its peak memory is about the model's size divided by the TP size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ladder import distributed as comm
from ladder.config import LadderConfig, Schedule
from ladder.model import LadderForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


def load_config(path: str | Path) -> LadderConfig:
    return LadderConfig.from_file(Path(path) / "config.json")


def weight_map(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        files = {name: path / file for name, file in mapping.items()}
        missing = sorted({str(f) for f in files.values() if not f.exists()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    try:
        with safe_open(single, "pt") as f:
            return dict.fromkeys(f.keys(), single)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{single}: corrupt or truncated safetensors file ({exc})") from None


def full_shapes(config: LadderConfig) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of `config` holds (Hugging Face names) and its whole-model shape."""
    with torch.device("meta"):
        return {name: t.shape for name, t in LadderForCausalLM(config, rank=0, world=1).state_dict().items()}


def read_shard(files: dict[str, Path], model: LadderForCausalLM, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor `model` holds, read lazily and checked against the config."""
    expected_full = full_shapes(model.config)
    own = model.state_dict()
    wanted = [n for n in own if not (model.config.tie_word_embeddings and n == "lm_head.weight")]
    missing = [n for n in wanted if n not in files]
    if missing:
        raise CheckpointError(f"{next(iter(files.values())).parent}: missing tensor(s) "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(files) - set(expected_full))
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: tensor(s) the config does not describe: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    shard: dict[str, torch.Tensor] = {}
    for name in wanted:
        file = files[name]
        try:
            # One mapping per tensor, closed right after, and a private copy of the slice: safetensors
            # hands out views of the memory-mapped file, and a column slice touches every page of its
            # tensor, so keeping views or the mapping would leave the whole file in the rank's memory.
            with safe_open(file, "pt") as f:
                lazy = f.get_slice(name)
                shape, full_shape = tuple(lazy.get_shape()), tuple(expected_full[name])
                if shape != full_shape:
                    raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, "
                                          f"the config implies {list(full_shape)}")
                if lazy.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {lazy.get_dtype()}, "
                                          "weights must be floating point")
                part = model.plan.slice_of(name)
                if part is None:
                    view = lazy[:]
                elif part.dim == 0:
                    view = lazy[part.start:part.stop]
                else:
                    view = lazy[:, part.start:part.stop]
                # In the model's own memory layout (see layers.input_major), so no copy is made later.
                shard[name] = torch.empty_strided(view.shape, own[name].stride(), dtype=dtype).copy_(view)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None
    return shard


def from_pretrained(path: str | Path, rank: int | None = None, world: int | None = None,
                    dtype: torch.dtype = torch.float32,
                    schedules: list[Schedule | str] | None = None) -> LadderForCausalLM:
    """Build this rank's shard of the Ladder (or plain Llama) checkpoint at `path`.

    `rank`/`world` default to the current process group; `schedules` overrides the per-layer
    residual schedules stored in the checkpoint (e.g. to benchmark the same weights as standard).
    """
    config = load_config(path)
    if schedules is not None:
        config = config.with_schedules(list(schedules))
    rank = comm.rank() if rank is None else rank
    world = comm.world_size() if world is None else world
    with torch.device("meta"):
        model = LadderForCausalLM(config, rank, world)
    model.load_state_dict(read_shard(weight_map(path), model, dtype), strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
