"""Light fine-tuning of a Ladder checkpoint under tensor (and data) parallelism, on CPU ranks.

`ladder finetune CKPT --data FILE... --out DIR` or `finetune(Settings(...))`. The run directory
(default `DIR.run`) holds `run.json` (what defines the run), `metrics.jsonl` and the resumable
checkpoints `checkpoints/step-N/`; `DIR` receives the fine-tuned Ladder checkpoint at the end.

Under TP=N each rank holds a shard and the model's own autograd-aware collectives make the
backward right (DESIGN.md section 2). Two kinds of tensor need more: a tensor every rank holds
whole but whose gradient each rank only computes its share of (a LoRA factor that is not split),
and key/value rows held by several ranks when their heads straddle a split. Their gradients are
summed over the tensor-parallel group after backward. Data parallelism over further ranks is
torch's DistributedDataParallel over the data-parallel group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from conversion.writer import CheckpointWriter
from ladder import distributed as comm
from ladder.checkpoint import CheckpointError, from_pretrained, full_shapes, load_config, weight_map
from ladder.config import ConfigError, LadderConfig, Schedule, parse_layer_selection
from ladder.data import (
    DataError,
    PackedSequences,
    SampleOrder,
    TokenSplit,
    fingerprint,
    read_documents,
    split_stream,
    token_stream,
)
from ladder.lora import (
    PROJECTIONS,
    InputSplit,
    LoRAConfig,
    LoRALinear,
    adapter_seed,
    adapters,
    merge_adapters,
    replace_module,
)
from ladder.model import LadderForCausalLM
from ladder.sharding import ShardingError, ShardPlan
from ladder.tokenizer import Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class FinetuneError(ValueError):
    """A fine-tuning run that cannot start (or resume); nothing has been written when it is raised."""


# --- settings -----------------------------------------------------------------------------------


@dataclass
class Settings:
    """Everything a fine-tuning run needs; the CLI flags map one to one onto these fields."""

    checkpoint: Path
    data: list[Path]
    out: Path
    run_dir: Path | None = None           # default: OUT.run beside the output
    ladder_layers: str | None = None      # turn these layers into ladder layers first ("upper-half", "16-29")
    seq_len: int = 256
    batch_size: int = 8                   # sequences per micro-batch on each data-parallel replica
    grad_accum: int = 1
    steps: int | None = None              # optimizer steps; default: `epochs` over the training split
    epochs: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1             # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0             # on matrices only, never on norms or biases
    max_grad_norm: float | None = 1.0
    dtype: str = "float32"                # "bfloat16": autocast compute, float32 master weights
    seed: int = 0
    val_fraction: float = 0.1
    text_field: str = "text"
    lora_rank: int = 0                    # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = PROJECTIONS
    only_ladder_layers: bool = False
    tp: int = 1
    dp: int = 1
    eval_every: int = 0                   # 0: evaluate at the end only
    checkpoint_every: int = 0             # 0: no resumable checkpoints
    resume: bool = False
    force: bool = False
    progress: bool = True
    threads: int | None = None
    pin: bool = False
    timeout: float = comm.DEFAULT_TIMEOUT_S

    # Fields that do not change what the run computes: a resumed run may change them.
    PRESENTATION = ("out", "run_dir", "eval_every", "checkpoint_every", "resume", "force", "progress",
                    "threads", "pin", "timeout")

    def __post_init__(self) -> None:
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        self.data = [Path(p) for p in ([self.data] if isinstance(self.data, (str, Path)) else self.data)]
        self.run_dir = Path(self.run_dir) if self.run_dir else self.out.with_name(self.out.name + ".run")
        self.lora_targets = tuple(self.lora_targets)
        positive = {"seq_len": self.seq_len, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "tp": self.tp, "dp": self.dp}
        for name, value in positive.items():
            if value < 1:
                raise FinetuneError(f"{name} must be >= 1, got {value}")
        if self.steps is not None and self.steps < 1:
            raise FinetuneError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.lr <= 0 or self.warmup_steps < 0:
            raise FinetuneError("epochs and lr must be positive and warmup_steps non-negative")
        if self.dtype not in DTYPES:
            raise FinetuneError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lora_rank:
            try:
                LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
            except ValueError as exc:
                raise FinetuneError(str(exc)) from None

    @property
    def lora(self) -> LoRAConfig | None:
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.dp

    def identity(self) -> dict[str, Any]:
        """What defines the computation; a resumed run must match it field for field."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.PRESENTATION}
        out["checkpoint"] = str(self.checkpoint.resolve())
        out["checkpoint_config"] = json.loads((self.checkpoint / "config.json").read_text())
        out["data"] = fingerprint(self.data)
        out["lora_targets"] = list(self.lora_targets)
        return out


# --- how each trainable tensor is sharded ---------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    """How this rank's copy of a trainable tensor relates to the full (TP=1) tensor.

    `dim` is the axis along which ranks hold different parts (None: every rank holds all of it),
    starting at `start` of `full`; `owned_from` is the first local index along `dim` that no lower
    rank also holds, so that a norm counts shared rows once. `partial`: the local gradient is only
    this rank's share and must be summed over the tensor-parallel group.
    """

    dim: int | None
    start: int = 0
    full: int = 0
    owned_from: int = 0
    partial: bool = False


def base_shard(plan: ShardPlan, name: str) -> ShardInfo:
    """ShardInfo of model tensor `name` (Hugging Face naming) on this rank, from the shard plan."""
    part = plan.slice_of(name)
    if plan.world == 1 or part is None:
        return ShardInfo(None)
    below = ShardPlan(plan.config, plan.rank - 1, plan.world).slice_of(name).stop if plan.rank else part.start
    full = ShardPlan(plan.config, plan.world - 1, plan.world).slice_of(name).stop
    # Key/value rows: every rank holding a kv head computes only its own query heads' share.
    partial = name.rsplit(".", 2)[-2] in ("k_proj", "v_proj")
    return ShardInfo(part.dim, part.start, full, max(0, below - part.start), partial)


def describe_shards(model: LadderForCausalLM) -> dict[str, ShardInfo]:
    """ShardInfo of every trainable parameter, by name."""
    plan, shards = model.plan, {}
    lora_modules = adapters(model)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") and prefix in lora_modules:
            base = base_shard(plan, prefix + ".weight")
            whole = lora_modules[prefix].whole_factor is param
            shards[name] = ShardInfo(None, partial=plan.world > 1) if whole else base
        else:
            shards[name] = base_shard(plan, name)
    return shards


def sum_partial_gradients(params: Sequence[nn.Parameter], shards: Sequence[ShardInfo]) -> None:
    """Sum the gradient shares of `partial` tensors over the tensor-parallel group, in one all-reduce."""
    todo = [(p, s) for p, s in zip(params, shards, strict=True) if s.partial and p.grad is not None]
    if not todo:
        return
    pieces = []
    for param, shard in todo:
        if shard.dim is None:
            pieces.append(param.grad.reshape(-1))
        else:
            shape = list(param.shape)
            shape[shard.dim] = shard.full
            full = param.grad.new_zeros(shape)
            full.narrow(shard.dim, shard.start, param.shape[shard.dim]).copy_(param.grad)
            pieces.append(full.reshape(-1))
    summed = comm.all_reduce(torch.cat(pieces))
    offset = 0
    for (param, shard), piece in zip(todo, pieces, strict=True):
        flat = summed[offset:offset + piece.numel()]
        offset += piece.numel()
        if shard.dim is None:
            param.grad.copy_(flat.view_as(param.grad))
        else:
            shape = list(param.shape)
            shape[shard.dim] = shard.full
            param.grad.copy_(flat.view(shape).narrow(shard.dim, shard.start, param.shape[shard.dim]))


def global_grad_norm(params: Sequence[nn.Parameter], shards: Sequence[ShardInfo]) -> torch.Tensor:
    """The gradient norm of the whole (unsharded) model: every entry counted exactly once."""
    counted = []
    for param, shard in zip(params, shards, strict=True):
        if param.grad is None:
            continue
        if shard.dim is None:
            if comm.rank() == 0:
                counted.append(param.grad)
        else:
            counted.append(param.grad.narrow(shard.dim, shard.owned_from, param.shape[shard.dim] - shard.owned_from))
    norms = torch.stack([torch.linalg.vector_norm(g) for g in counted]) if counted else torch.zeros(1)
    return comm.all_reduce(norms.double().square().sum()).sqrt()


# --- vocabulary-parallel cross-entropy ------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy over logits split by vocabulary: max, sum of exp and target logit reduced."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
        local = targets - first
        inside = (local >= 0) & (local < logits.shape[-1])
        local = local.masked_fill(~inside, 0)
        peak = comm.all_reduce(logits.amax(dim=-1), op="max")
        shifted = logits - peak.unsqueeze(-1)
        target = comm.all_reduce(shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0.0))
        exp = shifted.exp_()
        total = comm.all_reduce(exp.sum(dim=-1))
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), local, inside)
        return total.log() - target

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, local, inside = ctx.saved_tensors
        # d loss / d logit = softmax - one_hot(target); the one-hot lives on the rank holding the target.
        grad_logits = probs.scatter_add(-1, local.unsqueeze(-1), -inside.unsqueeze(-1).to(probs.dtype))
        return grad_logits * grad.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, first: int) -> torch.Tensor:
    """Per-token losses from this rank's vocabulary slice `[first, first + V_local)` of the logits."""
    return _VocabParallelCrossEntropy.apply(local_logits.float(), targets, first)


# --- the model to train ---------------------------------------------------------------------------


def schedules_for(config: LadderConfig, ladder_layers: str | None) -> list[Schedule] | None:
    """The per-layer schedules `--ladder-layers` asks for (None: keep the checkpoint's)."""
    if ladder_layers is None:
        return None
    chosen = set(parse_layer_selection(ladder_layers, config.num_hidden_layers))
    return [Schedule.LADDER if i in chosen else Schedule.STANDARD for i in range(config.num_hidden_layers)]


def add_adapters(model: LadderForCausalLM, lora: LoRAConfig, layers: Sequence[int], seed: int) -> None:
    """LoRA on the target projections of `layers`, each split like the projection it adapts."""
    plan = model.plan
    for index in layers:
        layer = model.model.layers[index]
        targets = [(n, m) for n, m in layer.named_modules() if n.rpartition(".")[2] in lora.targets]
        for name, module in targets:
            full_name = f"model.layers.{index}.{name}"
            part = plan.slice_of(full_name + ".weight") if plan.world > 1 else None
            split_dim = part.dim if part is not None else None
            input_split = None
            if split_dim == 1:
                full = ShardPlan(plan.config, plan.world - 1, plan.world).slice_of(full_name + ".weight").stop
                input_split = InputSplit(part.start, full)
            replace_module(layer, name, LoRALinear(module, lora, split_dim, input_split, adapter_seed(seed, full_name)))


def prepare_model(model: LadderForCausalLM, settings: Settings) -> None:
    """Choose what trains: every weight, only the ladder layers' weights, or LoRA adapters on them."""
    layers = range(model.config.num_hidden_layers)
    if settings.only_ladder_layers:
        layers = model.config.ladder_layers
    model.requires_grad_(settings.lora is None and not settings.only_ladder_layers)
    if settings.lora is not None:
        add_adapters(model, settings.lora, layers, settings.seed)
    elif settings.only_ladder_layers:
        for index in layers:
            model.model.layers[index].requires_grad_(True)
    model.train()


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor after `step` optimizer steps: linear warm-up, then cosine down to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Trainer:
    """One rank's optimizer step: micro-batches with accumulation, gradient fix-ups, clipping, AdamW."""

    def __init__(self, model: LadderForCausalLM, settings: Settings, total_steps: int) -> None:
        self.model, self.settings = model, settings
        self.network = comm.data_parallel(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise FinetuneError("nothing to train: no parameter requires a gradient")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        described = describe_shards(model)
        self.shards = [described[n] for n in self.names]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(settings.warmup_steps, total_steps, settings.min_lr_ratio))
        self.autocast = settings.dtype == "bfloat16"

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.network(inputs)
        return vocab_parallel_cross_entropy(logits, targets, self.model.plan.vocab.start).mean()

    def backward(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Accumulate the gradients of the micro-batches' mean loss; returns that loss (all replicas)."""
        total = 0.0
        for i, (inputs, targets) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Data-parallel replicas average gradients once, after the last micro-batch.
            no_sync = getattr(self.network, "no_sync", None)
            sync = no_sync() if no_sync and not last else nullcontext()
            with sync:
                loss = self.loss(inputs, targets) / len(micro_batches)
                loss.backward()
            total += loss.item()
        sum_partial_gradients(self.params, self.shards)
        mean = torch.tensor([total], dtype=torch.float64)
        return comm.all_reduce_data_parallel(mean).item() / comm.data_parallel_size()

    def step(self, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        return {"loss": self.backward(micro_batches), **self.update()}

    def update(self) -> dict[str, float]:
        """Clip the accumulated gradients by the whole model's norm, then take one AdamW step."""
        norm = global_grad_norm(self.params, self.shards).item()
        if self.settings.max_grad_norm is not None and norm > self.settings.max_grad_norm:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, self.settings.max_grad_norm / (norm + 1e-6))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": norm}

    # --- resumable state ---

    def state(self) -> dict[str, Any]:
        return {"params": {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state()}

    def load_state(self, state: dict[str, Any], source: Path) -> None:
        saved = state["params"]
        if sorted(saved) != sorted(self.names):
            raise FinetuneError(f"{source}: holds other trainable tensors than this run trains")
        with torch.no_grad():
            for name, param in zip(self.names, self.params, strict=True):
                if saved[name].shape != param.shape:
                    raise FinetuneError(f"{source}: tensor {name} has shape {list(saved[name].shape)}, "
                                        f"this rank holds {list(param.shape)}")
                param.copy_(saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])


@torch.no_grad()
def evaluate(model: LadderForCausalLM, sequences: PackedSequences, batch_size: int) -> float:
    """Mean per-token loss over every sequence (data-parallel replicas share the work).

    Always in float32, whatever the training's autocast, so that losses compare across runs.
    """
    was_training = model.training
    model.eval()
    mine = list(range(comm.data_parallel_rank(), len(sequences), comm.data_parallel_size()))
    full = [i for i in mine if i < sequences.full]
    batches = [full[k:k + batch_size] for k in range(0, len(full), batch_size)]
    batches += [[i] for i in mine if i >= sequences.full]
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        inputs, targets = sequences.batch(batch)
        losses = vocab_parallel_cross_entropy(model(inputs), targets, model.plan.vocab.start)
        sums += torch.tensor([losses.double().sum().item(), losses.numel()], dtype=torch.float64)
    comm.all_reduce_data_parallel(sums)
    model.train(was_training)
    return (sums[0] / sums[1]).item()


# --- saving -------------------------------------------------------------------------------------


def gather_whole(tensor: torch.Tensor | None, shard: ShardInfo) -> torch.Tensor | None:
    """The full tensor from every tensor-parallel rank's part, on that group's rank 0 (None elsewhere).

    A rank that does not hold the tensor at all (a row-parallel bias off rank 0) passes None.
    """
    parts = comm.gather_objects(None if tensor is None else (shard.start, tensor.detach().clone()))
    if parts is None or shard.dim is None:
        return None if parts is None else parts[0][1]
    shape = list(parts[0][1].shape)
    shape[shard.dim] = shard.full
    whole = parts[0][1].new_empty(shape)
    for start, part in parts:
        whole.narrow(shard.dim, start, part.shape[shard.dim]).copy_(part)
    return whole


def gather_full_state(model: LadderForCausalLM) -> dict[str, torch.Tensor] | None:
    """Every tensor whole, in Hugging Face names, on tensor-parallel rank 0; None on the other ranks."""
    names = list(full_shapes(model.config))
    if model.config.tie_word_embeddings:
        names.remove("lm_head.weight")
    own = model.state_dict()
    full = {name: gather_whole(own.get(name), base_shard(model.plan, name)) for name in names}
    return full if comm.rank() == 0 else None


def write_checkpoint(state: dict[str, torch.Tensor], config: LadderConfig, source: Path, out: Path,
                     force: bool) -> None:
    """A Ladder checkpoint (Hugging Face layout plus the ladder fields) with the source's tokenizer."""
    with CheckpointWriter(out, force=force) as writer:
        for name, tensor in state.items():
            writer.add_tensor(name, tensor)
        writer.add_json("config.json", config.to_dict())
        for file in TOKENIZER_FILES:
            if (source / file).exists():
                writer.add_file(file, (source / file).read_bytes())


# --- resumable checkpoints ------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a partial one never got its final name)."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_training_state(run_dir: Path, step: int, trainer: Trainer, meta: dict[str, Any]) -> None:
    """Every rank writes its file into a temporary directory that rank 0 renames when all are done."""
    final = checkpoint_dir(run_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    if comm.global_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    comm.barrier()
    file = partial / f"rank-{comm.global_rank()}.pt"
    torch.save(trainer.state(), file)
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    comm.barrier()
    if comm.global_rank() == 0:
        (partial / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        partial.rename(final)
        for old in (run_dir / "checkpoints").glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


# --- one rank's run -------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """What every rank needs, prepared (and validated) once before any rank starts."""

    settings: Settings
    schedules: list[Schedule] | None
    data: TokenSplit
    total_steps: int
    resume_from: Path | None = None


class MetricsLog:
    """Appends one JSON line per record (rank 0 only), flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path, active: bool) -> None:
        self.file = open(path, "a") if active else None  # noqa: SIM115 - lives as long as the run

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def train_on_rank(run: RunPlan) -> dict[str, Any]:
    settings = run.settings
    comm.init_layout(settings.tp)
    leader = comm.global_rank() == 0
    # Dropout draws alike on a replica's tensor-parallel ranks and differently across replicas.
    torch.manual_seed(settings.seed * 1009 + comm.data_parallel_rank())
    model = from_pretrained(settings.checkpoint, dtype=torch.float32, schedules=run.schedules)
    prepare_model(model, settings)
    trainer = Trainer(model, settings, run.total_steps)
    train = PackedSequences(run.data.train, settings.seq_len)
    val = PackedSequences(run.data.val, settings.seq_len, keep_tail=True) if len(run.data.val) > 1 else None
    start = 0
    if run.resume_from is not None:
        state = torch.load(run.resume_from / f"rank-{comm.global_rank()}.pt", weights_only=True)
        trainer.load_state(state, run.resume_from)
        start = json.loads((run.resume_from / "state.json").read_text())["step"]
    order = SampleOrder(len(train), settings.seed)
    tokens_per_step = settings.sequences_per_step * settings.seq_len
    metrics = MetricsLog(settings.run_dir / "metrics.jsonl", leader)
    bar = tqdm(total=run.total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (leader and settings.progress))

    def validate(step: int) -> float | None:
        if val is None:
            return None
        loss = evaluate(model, val, settings.batch_size)
        metrics.write({"step": step, "val_loss": loss, "val_ppl": math.exp(loss)})
        if leader and settings.progress:
            bar.write(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(loss):.3f}")
        return loss

    if start == 0 and settings.eval_every:
        validate(0)
    train_seconds = 0.0  # optimizer steps only: evaluation and checkpoints are not counted
    result: dict[str, float] = {}
    for step in range(start + 1, run.total_steps + 1):
        first = (step - 1) * settings.sequences_per_step
        micro = []
        for a in range(settings.grad_accum):
            offset = first + (a * settings.dp + comm.data_parallel_rank()) * settings.batch_size
            micro.append(train.batch(order.indices(offset, settings.batch_size)))
        began = time.perf_counter()
        result = trainer.step(micro)
        train_seconds += time.perf_counter() - began
        speed = (step - start) * tokens_per_step / train_seconds
        metrics.write({"step": step, **result, "tokens": step * tokens_per_step, "tokens_per_second": speed})
        bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{speed:.0f}", refresh=False)
        bar.update()
        if settings.eval_every and step % settings.eval_every == 0 and step < run.total_steps:
            validate(step)
        if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < run.total_steps:
            save_training_state(settings.run_dir, step, trainer,
                                {"tp": settings.tp, "dp": settings.dp, "data_position": step * settings.sequences_per_step})
    bar.close()
    val_loss = validate(run.total_steps)
    merge_adapters(model)
    state = gather_full_state(model) if comm.data_parallel_rank() == 0 else None
    if leader:
        write_checkpoint(state, model.config, settings.checkpoint, settings.out, settings.force)
    metrics.close()
    return {"steps": run.total_steps, "resumed_from_step": start, "train_seconds": train_seconds,
            "train_tokens": (run.total_steps - start) * tokens_per_step, "final_loss": result.get("loss"),
            "val_loss": val_loss, "val_ppl": None if val_loss is None else math.exp(val_loss),
            "out": str(settings.out)}


# --- preparing and launching a run ----------------------------------------------------------------


def check_checkpoint(path: Path) -> LadderConfig:
    """The checkpoint's config, or a clear error if `path` is not a Ladder (Hugging Face Llama) checkpoint."""
    problem = None
    if not path.is_dir():
        problem = "no such directory" if not path.exists() else "a file, not a checkpoint directory"
    else:
        try:
            config = load_config(path)
            weight_map(path)
        except (ConfigError, CheckpointError) as exc:
            problem = str(exc)
    if problem:
        raise FinetuneError(f"{path} is not a Ladder checkpoint (a directory with config.json and safetensors "
                            f"weights; convert other formats with `ladder convert`): {problem}")
    if not (path / "tokenizer.json").exists():
        raise FinetuneError(f"{path}: no tokenizer.json, which fine-tuning needs to tokenize the data")
    return config


def separator_token(tokenizer: Tokenizer, config: LadderConfig, path: Path) -> int:
    token = tokenizer.token_id("eos_token")
    if token is None and config.eos_token_ids:
        token = config.eos_token_ids[0]
    if token is None:
        raise FinetuneError(f"{path}: neither tokenizer_config.json nor config.json names an end-of-text token "
                            "to separate documents")
    return token


def load_data(settings: Settings, config: LadderConfig) -> TokenSplit:
    """The data files tokenized with the checkpoint's tokenizer and split into training and validation."""
    tokenizer = Tokenizer(settings.checkpoint)
    try:
        documents = read_documents(settings.data, settings.text_field)
        stream = token_stream(documents, tokenizer.encode, separator_token(tokenizer, config, settings.checkpoint))
        return split_stream(stream, settings.seq_len, settings.val_fraction, ", ".join(map(str, settings.data)))
    except DataError as exc:
        raise FinetuneError(str(exc)) from None


def validation_loss(settings: Settings) -> float:
    """The mean float32 token loss of `settings.checkpoint` (under `settings.ladder_layers` if given)
    on the validation split that fine-tuning with these settings holds out; one rank, no training."""
    config = check_checkpoint(settings.checkpoint)
    data = load_data(settings, config)
    model = from_pretrained(settings.checkpoint, rank=0, world=1, schedules=schedules_for(config, settings.ladder_layers))
    sequences = PackedSequences(data.val, settings.seq_len, keep_tail=True)
    return evaluate(model, sequences, settings.batch_size)


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def prepare(settings: Settings) -> RunPlan:
    """Check everything and set up the run directory; raises before writing anything if a check fails."""
    config = check_checkpoint(settings.checkpoint)
    try:
        schedules = schedules_for(config, settings.ladder_layers)
        trained_config = config.with_schedules(schedules) if schedules else config
        ShardPlan(config, 0, settings.tp)
    except (ConfigError, ShardingError) as exc:
        raise FinetuneError(str(exc)) from None
    if settings.only_ladder_layers and not trained_config.ladder_layers:
        raise FinetuneError("--only-ladder-layers: the model has no ladder layers (choose some with --ladder-layers)")
    data = load_data(settings, config)
    if settings.out.exists() and not settings.force:
        raise FinetuneError(f"{settings.out} already exists; choose another --out or pass --force to replace it")
    run_dir, identity = settings.run_dir, json.loads(json.dumps(settings.identity(), default=str))
    resume_from = None
    if settings.resume:
        if not (run_dir / "run.json").exists():
            raise FinetuneError(f"--resume: {run_dir} holds no run to resume (no run.json)")
        saved = json.loads((run_dir / "run.json").read_text())
        changed = differences(saved, identity)
        if changed:
            raise FinetuneError(f"--resume: this run differs from the one in {run_dir}: " + "; ".join(changed))
        resume_from = latest_checkpoint(run_dir)
        resumed_step = 0 if resume_from is None else json.loads((resume_from / "state.json").read_text())["step"]
        keep_metrics(run_dir / "metrics.jsonl", resumed_step)
    else:
        if run_dir.exists() and not settings.force:
            raise FinetuneError(f"{run_dir} already holds a run; pass --resume to continue it or --force to "
                                "start over")
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps(identity, indent=2))
        (run_dir / "metrics.jsonl").write_text("")
    steps = settings.steps or math.ceil(settings.epochs * ((len(data.train) - 1) // settings.seq_len)
                                        / settings.sequences_per_step)
    return RunPlan(settings, schedules, data, max(1, steps), resume_from)


def keep_metrics(path: Path, last_step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (and any torn last line)."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


def finetune(settings: Settings) -> dict[str, Any] | None:
    """Run (or resume) a fine-tuning: on this process at one rank, else on tp x dp spawned local ranks.

    Under torchrun (WORLD_SIZE > 1 in the environment) this process is one of the ranks already.
    Returns rank 0's summary (steps, tokens, seconds, final validation loss and perplexity); None on
    torchrun's other ranks.
    """
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun:
        return _finetune_under_torchrun(settings)
    world = settings.tp * settings.dp
    run = prepare(settings)
    if world == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(settings.threads or previous)
        try:
            return train_on_rank(run)
        finally:
            torch.set_num_threads(previous)
    placement = comm.Placement(pin=settings.pin, threads=settings.threads)
    return comm.launch(train_on_rank, world, run, placement=placement, timeout_s=settings.timeout)[0]


def _finetune_under_torchrun(settings: Settings) -> dict[str, Any] | None:
    world = int(os.environ["WORLD_SIZE"])
    if world % settings.tp:
        raise FinetuneError(f"--tp {settings.tp} does not divide torchrun's world of {world} ranks")
    settings = dataclasses.replace(settings, dp=world // settings.tp)
    rank = int(os.environ["RANK"])
    comm.apply_placement(comm.Placement(pin=settings.pin, threads=settings.threads), rank, world)
    comm.init(settings.timeout)
    try:
        # Rank 0 alone checks and sets up the run directory; the others wait for its verdict.
        run: RunPlan | FinetuneError | None = None
        if rank == 0:
            try:
                run = prepare(settings)
            except FinetuneError as exc:
                run = exc
        run = comm.broadcast_object(run)
        if isinstance(run, FinetuneError):
            raise run
        summary = train_on_rank(run)
        return summary if rank == 0 else None
    finally:
        comm.shutdown()


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = argparse.Namespace(**{f.name: f.default for f in dataclasses.fields(Settings)})
    parser.add_argument("checkpoint", type=Path, help="Ladder (or Hugging Face Llama) checkpoint directory")
    parser.add_argument("--data", type=Path, nargs="+", required=True, help="text files, or JSONL with a text field")
    parser.add_argument("--out", type=Path, required=True, help="where the fine-tuned Ladder checkpoint goes")
    parser.add_argument("--run-dir", type=Path, help="metrics and resumable checkpoints (default: OUT.run)")
    parser.add_argument("--ladder-layers", help="first turn these layers into ladder layers: upper-half, all, "
                        "none, 16-29, 1,5,7 (default: the checkpoint's own schedules)")
    parser.add_argument("--seq-len", type=int, default=d.seq_len)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch per replica")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: --epochs over the training split)")
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final LR / peak LR (cosine)")
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="clip threshold (0: off)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype,
                        help="bfloat16: autocast compute with float32 master weights")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out tail of the tokens")
    parser.add_argument("--text-field", default=d.text_field, help="the JSONL field holding the text")
    parser.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (0: full fine-tuning)")
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--lora-targets", default=",".join(d.lora_targets), help="comma-separated projections")
    parser.add_argument("--only-ladder-layers", action="store_true", help="train only the ladder layers")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel replicas (ignored under torchrun)")
    parser.add_argument("--eval-every", type=int, default=0, help="validation every N steps (0: at the end only)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="resumable checkpoint every N steps")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    parser.add_argument("--force", action="store_true", help="replace an existing --out and run directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    parser.add_argument("--pin", action="store_true", help="pin each rank to its own cores")
    parser.add_argument("--timeout", type=float, default=comm.DEFAULT_TIMEOUT_S,
                        help="seconds before a dead or missing rank makes the others fail")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(
        checkpoint=args.checkpoint, data=args.data, out=args.out, run_dir=args.run_dir,
        ladder_layers=args.ladder_layers, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, steps=args.steps, epochs=args.epochs, lr=args.lr,
        min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, dtype=args.dtype, seed=args.seed,
        val_fraction=args.val_fraction, text_field=args.text_field, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        only_ladder_layers=args.only_ladder_layers, tp=args.tp, dp=args.dp, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, resume=args.resume, force=args.force,
        progress=not args.no_progress, threads=args.threads, pin=args.pin, timeout=args.timeout)


def run(args: argparse.Namespace) -> int:
    try:
        summary = finetune(settings_from_args(args))
    except FinetuneError as exc:
        raise SystemExit(f"ladder finetune: error: {exc}") from None
    if summary is None:
        return 0
    if summary["val_loss"] is not None:
        print(f"validation loss {summary['val_loss']:.4f}, perplexity {summary['val_ppl']:.3f}")
    print(f"{summary['steps'] - summary['resumed_from_step']} steps, {summary['train_tokens']} tokens in "
          f"{summary['train_seconds']:.1f} s; "
          f"wrote {summary['out']}")
    return 0
