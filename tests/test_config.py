"""The config: Hugging Face field variants, the ladder layer selection, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ladder import ConfigError, LadderConfig, Schedule
from ladder.config import parse_layer_selection
from ladder.layers import rope_inverse_frequencies

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4)
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_hf_defaults_fill_kv_heads_and_head_dim() -> None:
    config = LadderConfig.from_dict({**SMALL, "rope_scaling": None, "hidden_act": "silu", "model_type": "llama"})
    assert config.num_key_value_heads == 4
    assert config.head_dim == 16
    assert config.rope_scaling is None
    assert config.schedules == [Schedule.STANDARD] * 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_attention_heads=5), "num_attention_heads 5"),  # 64 % 5 and no head_dim
        (dict(head_dim=15), "head_dim must be even"),
        (dict(num_attention_heads=0), "num_attention_heads"),
        (dict(schedules=["ladder"] * 3), "3 residual schedules given for 8 layers"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
    ],
)
def test_inconsistent_fields_are_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LadderConfig(**{**SMALL, **fields})


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, []),
        ("none", []),
        ("", []),
        ("all", list(range(8))),
        ("upper-half", [4, 5, 6, 7]),
        ("4-7", [4, 5, 6, 7]),
        ("1,5,7", [1, 5, 7]),
        ("0-1,6", [0, 1, 6]),
        (3, [5, 6, 7]),        # an integer N means the last N layers, as the reference writes it
        (0, []),
        (8, list(range(8))),
        ([6, 2, 2], [2, 6]),
    ],
)
def test_layer_selection_forms(spec: object, expected: list[int]) -> None:
    assert parse_layer_selection(spec, 8) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [(9, "outside 0..8"), (-1, "outside 0..8"), ([0, 8], r"\[8\] are outside"), ("2-x", "expected none, all"),
     ("lower", "expected none, all"), (True, "integer or a list")],
)
def test_bad_layer_selection_is_refused(spec: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_layer_selection(spec, 8)


def test_ladder_layers_field_sets_schedules() -> None:
    assert LadderConfig.from_dict({**SMALL, "ladder_layers": 4}).ladder_layers == [4, 5, 6, 7]
    assert LadderConfig.from_dict({**SMALL, "ladder_layers": [0, 3]}).ladder_layers == [0, 3]
    with pytest.raises(ConfigError, match=r"config: layer indices \[12\]"):
        LadderConfig.from_dict({**SMALL, "ladder_layers": [12]})
    with pytest.raises(ConfigError, match=r"residual_schedules.*known: standard, ladder"):
        LadderConfig.from_dict({**SMALL, "residual_schedules": ["standard"] * 7 + ["diagonal"]})


@pytest.mark.parametrize(
    "rope_fields",
    [
        {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},
        {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}},              # older spelling
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},     # transformers 5
    ],
)
def test_rope_spellings_give_the_same_frequencies(rope_fields: dict) -> None:
    config = LadderConfig.from_dict({**SMALL, **rope_fields})
    assert config.rope_theta == 5e5
    reference = LadderConfig(**SMALL, rope_theta=5e5, rope_scaling={"rope_type": "llama3", **LLAMA3})
    assert torch.equal(rope_inverse_frequencies(config), rope_inverse_frequencies(reference))
    unscaled = LadderConfig(**SMALL, rope_theta=5e5)
    assert not torch.equal(rope_inverse_frequencies(config), rope_inverse_frequencies(unscaled))


@pytest.mark.parametrize(
    "rope_fields",
    [{"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}},
     {"rope_theta": 1e5, "rope_scaling": {"type": "default"}}],
)
def test_default_rope_means_no_scaling(rope_fields: dict) -> None:
    config = LadderConfig.from_dict({**SMALL, **rope_fields})
    assert (config.rope_theta, config.rope_scaling) == (1e5, None)


@pytest.mark.parametrize(
    "schedules",
    [
        [Schedule.STANDARD] * 8,
        [Schedule.STANDARD] * 4 + [Schedule.LADDER] * 4,
        [Schedule.LADDER, Schedule.STANDARD] * 4,
        [Schedule.PARALLEL] * 4 + [Schedule.UPPER_BOUND] * 2 + [Schedule.LADDER] * 2,
    ],
)
def test_to_dict_from_dict_round_trip(schedules: list[Schedule]) -> None:
    config = LadderConfig(**SMALL, num_key_value_heads=2, head_dim=8, rope_scaling={"rope_type": "llama3", **LLAMA3},
                          tie_word_embeddings=True, attention_bias=True, eos_token_id=[1, 2], schedules=schedules)
    raw = json.loads(json.dumps(config.to_dict()))  # what config.json holds
    assert LadderConfig.from_dict(raw) == config


def test_model_type_marks_any_non_standard_layer() -> None:
    standard = LadderConfig(**SMALL).to_dict()
    assert standard["model_type"] == "llama" and "ladder_layers" not in standard
    hybrid = LadderConfig(**SMALL, schedules=["standard"] * 4 + ["ladder"] * 4).to_dict()
    assert hybrid["model_type"] == "llamaLadder"
    assert hybrid["ladder_layers"] == [4, 5, 6, 7] and "residual_schedules" not in hybrid
    parallel = LadderConfig(**SMALL, schedules=["parallel"] * 8).to_dict()
    assert parallel["model_type"] == "llamaLadder"
    assert parallel["ladder_layers"] == [] and parallel["residual_schedules"] == ["parallel"] * 8


@pytest.mark.parametrize(
    ("raw", "message"),
    [({"vocab_size": 10}, "missing field\\(s\\) hidden_size, intermediate_size"),
     ({**SMALL, "hidden_act": "gelu"}, "hidden_act 'gelu'")],
)
def test_from_dict_names_the_problem(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LadderConfig.from_dict(raw)


def test_from_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        LadderConfig.from_file(tmp_path / "config.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match=r"broken\.json: not valid JSON"):
        LadderConfig.from_file(broken)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SMALL, "ladder_layers": 99}))
    with pytest.raises(ConfigError, match=r"bad\.json: ladder_layers 99 is outside"):
        LadderConfig.from_file(bad)
