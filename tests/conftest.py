"""Shared builders for the core-library tests: tiny configs and the Hugging Face reference model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ladder import LadderConfig, Schedule, random_full_state_dict
from ladder.writer import CheckpointWriter

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}


def tiny_config(**overrides: Any) -> LadderConfig:
    """A 4-layer model small enough for multi-rank runs on 2 cores, with every feature switched on.

    GQA (6 heads, 2 kv heads), an explicit head_dim unlike hidden/heads, llama3 rope scaling whose
    original context (16) is shorter than the test sequences, tied embeddings, biases, and sizes
    (vocab 101, MLP 80) that no TP size above 1 divides.
    """
    fields: dict[str, Any] = dict(
        vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
        num_key_value_heads=2, head_dim=10, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
        rope_scaling=dict(LLAMA3_SCALING), tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
    )
    fields.update(overrides)
    return LadderConfig(**fields)


def smollm2_layout_config(**overrides: Any) -> LadderConfig:
    """SmolLM2-135M's head layout (9 heads, 3 kv heads, tied) at toy width: nothing divides by 2 or 4."""
    fields: dict[str, Any] = dict(
        vocab_size=103, hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=9,
        num_key_value_heads=3, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1e5,
        tie_word_embeddings=True,
    )
    fields.update(overrides)
    return LadderConfig(**fields)


def hybrid(n_layers: int) -> list[Schedule]:
    """The paper's adaptation layout: the upper half of the layers ladder, the lower half standard."""
    return [Schedule.STANDARD] * (n_layers // 2) + [Schedule.LADDER] * (n_layers - n_layers // 2)


def write_word_checkpoint(path: Path, config: LadderConfig, seed: int, std: float,
                          tokenizer_config: dict[str, Any]) -> Path:
    """A random model whose tokenizer reads "w0 w1 ..." as ids 0, 1, ... (the last id spelled "</s>"):
    everything a command reads from a checkpoint, with token ids a test can write by hand."""
    vocab = config.vocab_size
    words = {f"w{i}": i for i in range(vocab - 1)} | {"</s>": vocab - 1}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    with CheckpointWriter(path) as writer:
        for name, tensor in random_full_state_dict(config, seed=seed, std=std).items():
            if not (config.tie_word_embeddings and name == "lm_head.weight"):
                writer.add_tensor(name, tensor)
        writer.add_json("config.json", config.to_dict())
        writer.add_file("tokenizer.json", tokenizer.to_str())
        writer.add_json("tokenizer_config.json", tokenizer_config)
    return path


def hf_llama_model(config: LadderConfig, state_dict: dict[str, torch.Tensor], **changes: Any) -> torch.nn.Module:
    """transformers' LlamaForCausalLM built from `config.to_dict()` (plus `changes`) with these weights.

    Eager attention with the test's own mask keeps the reference independent of SDPA's causal path.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = config.with_schedules([Schedule.STANDARD] * config.num_hidden_layers).to_dict()
    fields.update(changes)
    model = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="eager")).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@pytest.fixture(scope="session")
def make_tiny_config() -> Callable[..., LadderConfig]:
    return tiny_config


@pytest.fixture(scope="session")
def make_smollm2_layout_config() -> Callable[..., LadderConfig]:
    return smollm2_layout_config


@pytest.fixture(scope="session")
def hf_llama() -> Callable[..., torch.nn.Module]:
    return hf_llama_model


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    """A small random transformers Llama, the conversion tests' source model."""
    from conversion_sources import random_llama

    return random_llama()


@pytest.fixture(scope="module")
def hf_dir(llama: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llama` saved as a Hugging Face directory."""
    from conversion_sources import write_hf

    return write_hf(llama, tmp_path_factory.mktemp("hf") / "src")


@pytest.fixture(scope="module")
def one_compute_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: a second mostly spins (tiny SDPA calls were 7x slower
    with two on the shared 2-core machine). Launched ranks set their own thread counts anyway."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OPT_IN_MARKERS = ("slow", "netns")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked slow or netns run only when `-m` names their marker."""
    chosen = config.getoption("-m") or ""
    for item in items:
        for marker in OPT_IN_MARKERS:
            if marker in item.keywords and marker not in chosen:
                item.add_marker(pytest.mark.skip(reason=f"opt-in: run with -m {marker}"))
