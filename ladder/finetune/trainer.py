"""One rank's optimizer step and evaluation, and what fits them to tensor and data parallelism.

Under TP=N each rank holds a shard and the model's own autograd-aware collectives make the backward
right. Two kinds of tensor need more, both marked `partial_grad` in the shard table: a tensor every
rank holds whole but whose gradient each rank computes only its share of (a LoRA factor the split
does not cut), and key/value rows held by several ranks when their heads straddle a split. Their
gradients are summed over the tensor-parallel group after backward. Data parallelism over further
ranks is torch's DistributedDataParallel over the data-parallel group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ladder import comm
from ladder.data import PackedSequences
from ladder.finetune.distill import Teacher
from ladder.finetune.settings import FinetuneError, Settings
from ladder.lora import LoRALinear, adapters, add_adapters
from ladder.model import LadderForCausalLM
from ladder.sharding import TensorShard
from ladder.vocab import vocab_parallel_cross_entropy, vocab_parallel_kl_divergence


def trainable_shards(model: LadderForCausalLM) -> dict[str, TensorShard]:
    """The shard-table row of every trainable parameter, LoRA factors included, by name."""
    lora: dict[str, LoRALinear] = adapters(model)
    shards = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        prefix, _, leaf = name.rpartition(".")
        if leaf in ("lora_A", "lora_B") and prefix in lora:
            shards[name] = lora[prefix].factor_shard(param)
        else:
            shards[name] = model.plan.tensors[name]
    return shards


def sum_partial_gradients(params: Sequence[nn.Parameter], shards: Sequence[TensorShard]) -> None:
    """Sum the gradient shares of `partial_grad` tensors over the tensor-parallel group, in one all-reduce."""
    todo = [(p, s) for p, s in zip(params, shards, strict=True) if s.partial_grad and p.grad is not None]
    if not todo:
        return
    pieces = [shard.placed(param.grad).reshape(-1) for param, shard in todo]
    summed = comm.all_reduce(torch.cat(pieces))
    offset = 0
    for (param, shard), piece in zip(todo, pieces, strict=True):
        whole = summed[offset:offset + piece.numel()].view(shard.full_shape)
        offset += piece.numel()
        param.grad.copy_(shard.take(whole))


def global_grad_norm(params: Sequence[nn.Parameter], shards: Sequence[TensorShard]) -> torch.Tensor:
    """The gradient norm of the whole (unsharded) model: every entry counted exactly once."""
    counted = []
    for param, shard in zip(params, shards, strict=True):
        if param.grad is None:
            continue
        if shard.dim is None:
            if comm.tp_rank() == 0:
                counted.append(param.grad)
        else:
            counted.append(param.grad.narrow(shard.dim, shard.owned_from, param.shape[shard.dim] - shard.owned_from))
    norms = torch.stack([torch.linalg.vector_norm(g) for g in counted]) if counted else torch.zeros(1)
    return comm.all_reduce(norms.double().square().sum()).sqrt()


def prepare_model(model: LadderForCausalLM, settings: Settings) -> None:
    """Choose what trains: every weight, only the ladder layers' weights, or LoRA adapters on them."""
    layers = range(model.config.num_hidden_layers)
    if settings.only_ladder_layers:
        layers = model.config.ladder_layers
    model.requires_grad_(settings.lora is None and not settings.only_ladder_layers)
    if settings.lora is not None:
        add_adapters(model, model.plan, settings.lora, layers, settings.seed)
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
        described = trainable_shards(model)
        self.shards = [described[n] for n in self.names]
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": settings.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=settings.lr, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(settings.warmup_steps, total_steps, settings.min_lr_ratio))
        self.autocast = settings.dtype == "bfloat16"
        # Built from the weights as they are now, before training (or a resumed state) changes them;
        # none at all when the distillation has no share of the loss.
        self.teacher = Teacher(model) if settings.distill and settings.distill_weight > 0 else None

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The language-model loss, or its mix with the distillation KL (`distill_weight` the KL's share)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            teacher = None if self.teacher is None else self.teacher.logits(inputs)
            logits = self.network(inputs)
        distill_weight = 0.0 if teacher is None else self.settings.distill_weight
        loss = torch.zeros(())
        if distill_weight > 0:
            kl = vocab_parallel_kl_divergence(logits, teacher, self.settings.distill_temperature)
            loss = loss + distill_weight * kl.mean()
        if distill_weight < 1:
            lm = vocab_parallel_cross_entropy(logits, targets, self.model.plan.vocab.start)
            loss = loss + (1 - distill_weight) * lm.mean()
        return loss

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
