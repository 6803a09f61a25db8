"""External baselines on the very same weights: Hugging Face transformers (TP=1) and PyTorch's own
tensor parallelism (DTensor `parallelize_module`, Megatron-style column/row split, on gloo).

The PyTorch-TP baseline is the one place outside `ladder/comm.py` that touches `torch.distributed`:
it *is* PyTorch's distributed API, measured for comparison. It joins the process group the
benchmark's ranks already share.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ladder import comm
from ladder.config import LadderConfig

from .workload import Runner


class BaselineUnavailable(RuntimeError):
    """The baseline cannot run here; the message says why (it goes into the report)."""


def hf_model(config: LadderConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' LlamaForCausalLM (fp32, its default SDPA attention) holding these weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = config.all_standard().to_dict()
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise BaselineUnavailable(f"transformers' Llama does not match the weights: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


class _Marks:
    """A transformers streamer that only reports each new token (its first `put` is the prompt)."""

    def __init__(self, on_token: Callable[[], None]) -> None:
        self.on_token, self.seen_prompt = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.on_token()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def hf_runner(model: torch.nn.Module) -> Runner:
    """Greedy `generate` of exactly `new_tokens` tokens, with the KV cache, as a user would call it."""

    @torch.inference_mode()
    def run(prompts: list[list[int]], new_tokens: int, on_token: Callable[[], None]) -> None:
        ids = torch.tensor(prompts)
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       streamer=_Marks(on_token))
    return run


def pytorch_tp_obstacle(config: LadderConfig, world: int) -> str | None:
    """Why DTensor's column/row split cannot divide this model over `world` ranks, or None if it can."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % world or kv_heads % world:
        return (f"PyTorch's ColwiseParallel shards q/k/v rows evenly (DTensor Shard(0)); {heads} query heads and "
                f"{kv_heads} kv heads do not divide by TP={world}, so a rank would hold part of a head")
    return None


def pytorch_tp_model(config: LadderConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' Llama split by DTensor's ColwiseParallel/RowwiseParallel over every rank."""
    world = comm.tp_size()
    obstacle = pytorch_tp_obstacle(config, world)
    if obstacle:
        raise BaselineUnavailable(obstacle)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = hf_model(config, state_dict)
    mesh = init_device_mesh("cpu", (world,))
    styles = {}
    for i in range(config.num_hidden_layers):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            styles[f"model.layers.{i}.{leaf}"] = ColwiseParallel()
        for leaf in ("self_attn.o_proj", "mlp.down_proj"):
            styles[f"model.layers.{i}.{leaf}"] = RowwiseParallel()
    return parallelize_module(model, mesh, styles)


def agree_everywhere(ok: bool) -> bool:
    """True only if every rank says so: keeps the ranks running the same variants in lockstep."""
    flag = torch.tensor([0.0 if ok else 1.0])
    return comm.all_reduce(flag, op="max").item() == 0.0
