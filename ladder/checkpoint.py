"""Ladder checkpoints (Hugging Face Llama directories): loading one rank's slices, saving the whole.

`from_pretrained` opens the safetensors files lazily on each rank and reads only the rows or
columns its shard plan names, so a rank's peak memory is about the model's size over the TP size.
`save_pretrained` is its inverse: every rank's parts are joined on rank 0 and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ladder import comm
from ladder.config import LadderConfig, Schedule, dtype_name, shown
from ladder.model import LadderForCausalLM
from ladder.outputs import read_side_files
from ladder.quant import (
    DEFAULT_GROUP_SIZE,
    EMBEDDING,
    LowBitLinear,
    check_format,
    head_format,
    low_bit_linear,
)
from ladder.sharding import FUSED_PROJECTIONS, ShardPlan
from ladder.tokenizer import TOKENIZER_FILES
from ladder.writer import CheckpointWriter

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# A fingerprint hashes weights of up to this many bytes whole, and samples larger ones.
FINGERPRINT_WHOLE_BYTES = 64 * 2**20
FINGERPRINT_SAMPLES = 256  # per file
FINGERPRINT_SAMPLE_BYTES = 64 * 2**10
FINITE_CHECK_ELEMENTS = 2**20


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
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        if not isinstance(mapping, dict) or not all(isinstance(f, str) for f in mapping.values()):
            raise CheckpointError(f"{index}: weight_map must map each tensor name to a file name, got "
                                  f"{shown(mapping)}")
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


def content_fingerprint(path: str | Path) -> str:
    """A SHA-256 that changes when the checkpoint's weights do, cheap enough for every start and resume.

    Each weight file's name, size and safetensors header (every tensor's name, dtype, shape and
    place) is hashed, then its data: all of it for a small checkpoint; for a large one, evenly spaced
    samples, since reading gigabytes on every resume would cost more than a short run. Retraining,
    re-converting or swapping a model changes nearly every sample; a change confined to bytes
    between samples of a large checkpoint goes unnoticed.
    """
    files = sorted(set(weight_map(path).values()))
    sizes = {file: file.stat().st_size for file in files}
    whole = sum(sizes.values()) <= FINGERPRINT_WHOLE_BYTES
    digest = hashlib.sha256()
    for file in files:
        size = sizes[file]
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as f:
            if whole:
                digest.update(f.read())
                continue
            (header_bytes,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            digest.update(f.read(min(header_bytes, size)))
            for i in range(FINGERPRINT_SAMPLES):
                f.seek(i * max(0, size - FINGERPRINT_SAMPLE_BYTES) // (FINGERPRINT_SAMPLES - 1))
                digest.update(f.read(FINGERPRINT_SAMPLE_BYTES))
    return digest.hexdigest()


def full_shapes(config: LadderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of `config` stores (Hugging Face names) and its whole-model shape."""
    return ShardPlan(config).full_shapes()


def all_finite(tensor: torch.Tensor) -> bool:
    """Checked a slab of rows at a time: `isfinite` on a whole embedding would allocate temporaries
    larger than the tensor itself (it takes the absolute values first)."""
    if tensor.dim() == 0:
        return bool(torch.isfinite(tensor))
    rows = max(1, FINITE_CHECK_ELEMENTS // max(1, tensor[0].numel()))
    return all(bool(torch.isfinite(slab).all()) for slab in tensor.split(rows))


def non_finite(stored: torch.Tensor, cast: torch.Tensor) -> str | None:
    """Why `cast` (`stored` in the dtype it is used in) is not all finite, None when it is.

    NaN or infinite weights would run and generate garbage without a word; so would a cast to a
    narrower dtype that turns large weights into infinities. One pass over the cast tensor, and a
    second over the stored one only to say which of the two it was.
    """
    if all_finite(cast):
        return None
    if not all_finite(stored):
        return f"holds {int((~torch.isfinite(stored)).sum())} NaN or infinite value(s)"
    return (f"has values as large as {float(stored.abs().max()):.4g}, which overflow {dtype_name(cast.dtype)} "
            "(choose a wider --dtype)")


def refuse_non_finite(file: Path, name: str, stored: torch.Tensor, cast: torch.Tensor) -> None:
    if problem := non_finite(stored, cast):
        raise CheckpointError(f"{file}: tensor {name} {problem}")


def read_parts(files: dict[str, Path], plan: ShardPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """This rank's part of every tensor in `plan`, read lazily and checked against the config.

    Each part is a view of the memory-mapped file, valid only until the next part is asked for: one
    mapping per tensor, closed right after, because a column slice touches every page of its tensor,
    so keeping views or the mapping would leave the whole file in the rank's memory.
    """
    expected_full = plan.full_shapes()
    missing = [n for n in plan.tensors if n not in files]
    if missing:
        raise CheckpointError(f"{next(iter(files.values())).parent}: missing tensor(s) "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    # A tied head may still be stored (some exporters do); it is the embedding, so it is not read.
    tied_head = {"lm_head.weight"} if plan.config.tie_word_embeddings else set()
    unexpected = sorted(set(files) - set(expected_full) - tied_head)
    if unexpected:
        raise CheckpointError(f"{files[unexpected[0]]}: tensor(s) the config does not describe: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name, part in plan.tensors.items():
        file = files[name]
        try:
            with safe_open(file, "pt") as f:
                lazy = f.get_slice(name)
                shape = tuple(lazy.get_shape())
                if shape != part.full_shape:
                    raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, "
                                          f"the config implies {list(part.full_shape)}")
                if lazy.get_dtype() not in FLOAT_DTYPES:
                    raise CheckpointError(f"{file}: tensor {name} has dtype {lazy.get_dtype()}, "
                                          "weights must be floating point")
                if part.dim is None:
                    view = lazy[:]
                elif part.dim == 0:
                    view = lazy[part.start:part.stop]
                else:
                    view = lazy[:, part.start:part.stop]
                yield name, view
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({exc})") from None


def from_pretrained(path: str | Path, rank: int | None = None, world: int | None = None,
                    dtype: torch.dtype = torch.float32,
                    schedules: list[Schedule | str] | None = None,
                    weights: str = "fp32", group_size: int = DEFAULT_GROUP_SIZE) -> LadderForCausalLM:
    """Build this rank's shard of the Ladder (or plain Llama) checkpoint at `path`.

    `rank`/`world` default to the current process group; `schedules` overrides the per-layer
    residual schedules stored in the checkpoint (e.g. to benchmark the same weights as standard).
    `weights` is the format of the projections and the LM head (`ladder.quant.WEIGHT_FORMATS`; int4
    in groups of `group_size` input features); `dtype` is that of everything else (embedding, norms,
    residual stream, KV cache). Each projection is converted as it is read, so a rank's peak memory
    stays about its shard. A tied head in a low-bit format is a converted copy of the embedding rows
    (`ladder.quant.head_format` says which format the head takes).
    """
    config = load_config(path)
    if schedules is not None:
        config = config.with_schedules(list(schedules))
    rank = comm.tp_rank() if rank is None else rank
    world = comm.tp_size() if world is None else world
    model = LadderForCausalLM.empty(config, rank, world)
    check_format(weights, group_size, model.plan)
    layout = model.state_dict()  # read each part straight into the model's memory layout
    sources = model.plan.projection_sources() if weights != "fp32" else {}
    module_of = {tensor: module for module, tensors in sources.items() for tensor in tensors}
    pending: dict[str, torch.Tensor] = {}  # parts of a low-bit projection until it has them all
    shard: dict[str, torch.Tensor] = {}
    files = weight_map(path)
    for name, part in read_parts(files, model.plan):
        if name not in module_of or name == EMBEDDING:
            shard[name] = torch.empty_strided(part.shape, layout[name].stride(), dtype=dtype).copy_(part)
            refuse_non_finite(files[name], name, part, shard[name])
        if name in module_of:
            module = module_of[name]
            pending[name] = part.clone()
            refuse_non_finite(files[name], name, part, part.to(torch.float16) if weights == "fp16" else part)
            if all(tensor in pending for tensor in sources[module]):
                parts = [pending.pop(tensor) for tensor in sources[module]]
                fmt = head_format(weights) if module == "lm_head" else weights
                set_projection(model, module, parts, fmt, group_size, dtype)
    return model.adopt(shard)


def set_projection(model: LadderForCausalLM, module: str, parts: list[torch.Tensor], weights: str,
                   group_size: int, dtype: torch.dtype) -> None:
    """Put the low-bit projection made of `parts` (weights, then biases, of its sources) at `module`,
    replacing the projections a fused one stands for."""
    matrices, biases = [p for p in parts if p.dim() == 2], [p for p in parts if p.dim() == 1]
    weight = matrices[0] if len(matrices) == 1 else torch.cat(matrices)
    bias = torch.cat(biases).to(dtype) if biases else None
    parent_name, _, leaf = module.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, low_bit_linear(weight, bias, weights, group_size))
    for replaced in FUSED_PROJECTIONS.get(leaf, ()):
        delattr(parent, replaced)


def gather_state_dict(model: LadderForCausalLM) -> dict[str, torch.Tensor] | None:
    """Every tensor whole, in Hugging Face names, on tensor-parallel rank 0; None on the other ranks."""
    own, plan = model.state_dict(), model.plan
    if any(isinstance(module, LowBitLinear) for module in model.modules()):
        raise CheckpointError(f"rank {plan.rank}: the model's projections are in a low-bit format, which is for "
                              "inference only; load the checkpoint with weights='fp32' to save or train it")
    names = plan.of_rank(0).tensors
    whole = {}
    for name in names:
        parts = comm.gather_tensors(own[name].detach().clone() if name in plan.tensors else None)
        if parts is not None:
            whole[name] = plan.unshard(name, parts)
    return whole if comm.tp_rank() == 0 else None


def save_pretrained(model: LadderForCausalLM, path: str | Path, tokenizer_from: str | Path | None = None,
                    force: bool = False, dtype: torch.dtype | None = None) -> None:
    """Write `model` as a Ladder checkpoint at `path`, the inverse of `from_pretrained`.

    Under TP every rank of the group calls it; rank 0 joins the parts and writes. The tokenizer and
    generation files are copied from `tokenizer_from` (e.g. the checkpoint it was loaded from).
    `dtype` casts the weights on the way (default: as they are).
    """
    state = gather_state_dict(model)
    if state is None:
        return
    config = model.config.to_dict()
    config["torch_dtype"] = dtype_name(dtype or next(iter(state.values())).dtype)
    with CheckpointWriter(path, force=force) as writer:
        for name, tensor in state.items():
            writer.add_tensor(name, tensor if dtype is None else tensor.to(dtype))
        writer.add_json("config.json", config)
        side_files = read_side_files(Path(tokenizer_from), TOKENIZER_FILES) if tokenizer_from is not None else {}
        for file, content in side_files.items():
            writer.add_file(file, content)
