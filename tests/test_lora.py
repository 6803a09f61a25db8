"""LoRA adapters: start as the base model, train alone, merge into the same function, split like TP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import text_file, tiny_checkpoint
from torch import nn

from ladder import LadderConfig, LadderForCausalLM, random_full_state_dict
from ladder.finetune import Settings, Trainer, finetune, prepare_model
from ladder.lora import LoRAConfig, LoRALinear, adapters, merge_adapters
from ladder.sharding import TensorShard


def test_adapter_starts_as_the_base_and_merges_exactly() -> None:
    base = nn.Linear(12, 7)
    lora = LoRALinear(base, LoRAConfig(rank=3, alpha=6.0, dropout=0.5), TensorShard((7, 12)), seed=1)
    assert lora.weight is base.weight and lora.bias is base.bias
    x = torch.randn(4, 12)
    lora.eval()
    torch.testing.assert_close(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    merged = lora.merged()
    torch.testing.assert_close(merged(x), lora(x))
    assert not torch.allclose(merged(x), base(x))
    lora.train()  # dropout acts on the adapter's input only while training
    assert not torch.allclose(lora(x), merged(x))


def test_row_parallel_shards_sum_to_the_whole_adapter() -> None:
    """A row-parallel adapter split in two (A by columns, B whole) adds up to the unsplit one."""
    config = LoRAConfig(rank=2, alpha=2.0)
    whole = LoRALinear(nn.Linear(10, 5, bias=False), config, TensorShard((5, 10)), seed=9)
    halves = [LoRALinear(nn.Linear(5, 5, bias=False), config, TensorShard((5, 10), 1, start, start + 5), seed=9)
              for start in (0, 5)]
    with torch.no_grad():
        whole.lora_B.normal_()
        for half, start in zip(halves, (0, 5), strict=True):
            half.lora_B.copy_(whole.lora_B)
            half.weight.copy_(whole.weight[:, start:start + 5])
    assert torch.equal(torch.cat([h.lora_A for h in halves], dim=1), whole.lora_A)
    x = torch.randn(3, 10)
    torch.testing.assert_close(halves[0](x[:, :5]) + halves[1](x[:, 5:]), whole(x))


def test_training_moves_only_the_adapters_and_merging_keeps_the_function() -> None:
    config = LadderConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = LadderForCausalLM(config)
    model.load_full_state_dict(random_full_state_dict(config, seed=5))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    settings = Settings(Path("ckpt"), [], Path("out"), lora_rank=4, lora_dropout=0.1, lr=1e-2)
    prepare_model(model, settings)
    trainer = Trainer(model, settings, total_steps=3)
    assert trainer.names and all(".lora_" in name for name in trainer.names)
    assert len(adapters(model)) == 2 * 7
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        trainer.step([(ids[:, :-1], ids[:, 1:])])
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert all(not torch.equal(m.lora_B, torch.zeros_like(m.lora_B)) for m in adapters(model).values())
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_adapters(model)
        merged = model(ids)
    assert not adapters(model) and sorted(model.state_dict()) == sorted(before)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_saved_checkpoint_differs_only_in_the_adapted_projections(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "out"
    finetune(Settings(checkpoint, [text_file(tmp_path / "t.txt")], out, seq_len=32, batch_size=2, steps=3,
                      lr=1e-2, lora_rank=2, lora_targets=("q_proj", "down_proj"), progress=False, threads=1))
    before, after = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    expected = {f"model.layers.{i}.{p}.weight" for i in range(4) for p in ("self_attn.q_proj", "mlp.down_proj")}
    assert changed == expected


def test_bad_lora_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="not among"):
        LoRAConfig(targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRAConfig(rank=0)
