"""Training under tensor and data parallelism agrees with one rank: gradients, clipping norm, AdamW step.

One launch of 4 real gloo ranks laid out as 2 data-parallel replicas of TP=2 covers, in one go, the
autograd-aware collectives (the ladder's asynchronous ones included), the vocabulary-parallel
cross-entropy, the key/value rows that two ranks share (SmolLM2's 9 heads / 3 kv heads split in 2),
row-parallel biases on rank 0 only, LoRA factors split with their projections, distillation from
the standard schedule (the vocabulary-parallel KL, alone and mixed with the language-model loss),
DDP's averaging across replicas with gradient accumulation, and gathering the shards for saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import hybrid, smollm2_layout_config

from ladder import LadderForCausalLM, Schedule, comm, launcher, random_full_state_dict
from ladder.checkpoint import gather_state_dict
from ladder.finetune import Settings, Trainer, prepare_model
from ladder.finetune.trainer import trainable_shards
from ladder.lora import adapters, merge_adapters
from ladder.sharding import join

TP, DP = 2, 2
VARIANTS = {  # name: (schedule per layer, LoRA rank, distillation's share of the loss: None for none)
    "standard": ("standard", 0, None),
    "ladder": ("ladder", 0, None),
    "hybrid": ("hybrid", 0, None),
    "hybrid-lora": ("hybrid", 4, None),
    "hybrid-distill": ("hybrid", 0, 1.0),
    "hybrid-lora-distill-mixed": ("hybrid", 4, 0.6),
}


def variant_config(schedule: str):
    config = smollm2_layout_config(num_hidden_layers=4, attention_bias=True, mlp_bias=True)
    layers = hybrid(4) if schedule == "hybrid" else [Schedule(schedule)] * 4
    return config.with_schedules(layers)


def settings_for(lora_rank: int, distill_weight: float | None) -> Settings:
    # Clipping at a norm the gradients exceed, so the whole-model norm decides the step.
    distill = {} if distill_weight is None else {"distill": True, "distill_weight": distill_weight,
                                                 "distill_temperature": 1.5}
    return Settings(Path("ckpt"), [], Path("out"), lr=1e-2, max_grad_norm=0.05, weight_decay=0.1,
                    lora_rank=lora_rank, lora_alpha=8.0, batch_size=1, grad_accum=2, dp=DP, tp=TP, **distill)


def batch() -> torch.Tensor:
    return torch.randint(0, 103, (4, 12), generator=torch.Generator().manual_seed(7))


def build(schedule: str, lora_rank: int, distill_weight: float | None, rank: int | None = None,
          world: int | None = None):
    config = variant_config(schedule)
    model = LadderForCausalLM(config, rank, world)
    model.load_full_state_dict(random_full_state_dict(config, seed=3, std=0.2))
    settings = settings_for(lora_rank, distill_weight)
    prepare_model(model, settings)
    shards = trainable_shards(model)
    with torch.no_grad():
        for name, module in adapters(model).items():
            # B starts at zero, which would leave A without a gradient: give it the same random
            # full value at every TP size, each rank taking its own rows.
            shard = shards[name + ".lora_B"]
            full = torch.randn(shard.full_shape[0], lora_rank,
                               generator=torch.Generator().manual_seed(len(name)))
            module.lora_B.copy_(full if shard.dim is None else full.narrow(0, shard.start, module.out_features))
    trainer = Trainer(model, settings, total_steps=10)
    for group in trainer.optimizer.param_groups:
        # Adam's first step is about lr * sign(gradient): an eps above rounding noise keeps the
        # comparison meaningful for gradient entries that are nearly zero.
        group["eps"] = 1e-5
    return model, trainer


def gather_objects(obj: Any) -> list[Any] | None:
    """Every tensor-parallel rank's `obj` on that group's rank 0 (pickled: the library never does this,
    but these ranks are the test's own)."""
    box = [None] * comm.tp_size() if comm.tp_rank() == 0 else None
    dist.gather_object(obj, box, group=comm._groups.tensor, group_dst=0)
    return box


def whole_tensors(model: LadderForCausalLM, trainer: Trainer, grads: bool) -> dict[str, torch.Tensor]:
    """Every trainable tensor (or its gradient) whole, on rank 0; every rank calls in the same order."""
    full_names = list(model.plan.full_shapes())
    names = full_names + [n for n in trainer.names if "lora_" in n]
    own = dict(zip(trainer.names, trainer.params, strict=True))
    shards = trainable_shards(model)
    out = {}
    for name in names:
        if name not in own and not (name in full_names and trainer.settings.lora is None):
            continue  # a frozen base tensor under LoRA
        param = own.get(name)  # None: a row-parallel bias this rank does not hold
        tensor = None if param is None else (param.grad if grads else param.detach()).clone()
        gathered = gather_objects(None if param is None else (shards[name], tensor))
        if gathered is not None:
            held = [(None, None) if g is None else g for g in gathered]
            out[name] = join([s for s, _ in held], [t for _, t in held])
    return out


def _train_step_on_rank() -> dict[str, Any] | None:
    comm.init_layout(TP)
    inputs = batch()
    replica = comm.data_parallel_rank()
    mine = inputs[2 * replica:2 * replica + 2]
    results = {}
    for variant, (schedule, lora_rank, distill_weight) in VARIANTS.items():
        torch.manual_seed(0)
        model, trainer = build(schedule, lora_rank, distill_weight)
        micro = [(mine[i:i + 1, :-1], mine[i:i + 1, 1:]) for i in range(2)]
        loss = trainer.backward(micro)
        grads = whole_tensors(model, trainer, grads=True)
        update = trainer.update()
        params = whole_tensors(model, trainer, grads=False)
        out = {"loss": loss, "grads": grads, "norm": update["grad_norm"], "params": params}
        if lora_rank:
            model.eval()
            with torch.no_grad():
                adapted = model.gather_vocab(model(inputs[:, :-1]))
                merge_adapters(model)
                merged = model.gather_vocab(model(inputs[:, :-1]))
            out["merge_error"] = ((adapted - merged).abs().max() / adapted.abs().max()).item()
            out["saved"] = gather_state_dict(model)
        results[variant] = out
    return results if comm.global_rank() == 0 else None


def reference(schedule: str, lora_rank: int, distill_weight: float | None) -> dict[str, Any]:
    """The same step at TP=1 on one replica holding the whole batch."""
    torch.manual_seed(0)
    model, trainer = build(schedule, lora_rank, distill_weight, 0, 1)
    inputs = batch()
    loss = trainer.backward([(inputs[:, :-1], inputs[:, 1:])])
    grads = {n: p.grad.clone() for n, p in zip(trainer.names, trainer.params, strict=True)}
    norm = trainer.update()["grad_norm"]
    params = {n: p.detach().clone() for n, p in zip(trainer.names, trainer.params, strict=True)}
    merge_adapters(model)
    return {"loss": loss, "grads": grads, "norm": norm, "params": params, "saved": model.state_dict()}


@pytest.fixture(scope="module")
def distributed_results() -> dict[str, Any]:
    return launcher.launch(_train_step_on_rank, TP * DP, placement=launcher.Placement(threads=1), timeout_s=120)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tp2_dp2_step_matches_one_rank(distributed_results: dict[str, Any], variant: str) -> None:
    got, want = distributed_results[variant], reference(*VARIANTS[variant])
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert got["norm"] == pytest.approx(want["norm"], rel=1e-5)
    assert want["norm"] > 0.05  # clipping was active
    assert sorted(got["grads"]) == sorted(want["grads"])
    for name, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, atol=1e-4, rtol=1e-4, msg=f"gradient of {name}")
        torch.testing.assert_close(got["params"][name], want["params"][name], atol=1e-4, rtol=1e-4,
                                   msg=f"{name} after the step")
    if "merge_error" in got:
        assert got["merge_error"] < 1e-5  # relative to the largest logit: float32 rounding
        assert sorted(got["saved"]) == sorted(k for k in want["saved"] if k != "lm_head.weight")
        for name, tensor in got["saved"].items():
            torch.testing.assert_close(tensor, want["saved"][name], atol=1e-4, rtol=1e-4, msg=name)
