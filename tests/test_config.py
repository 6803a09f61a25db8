"""The config: Hugging Face field variants, the ladder layer selection, and clear errors."""

from __future__ import annotations

import json
import time
import tracemalloc
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


# --- hostile configs: bounded work, strict types, finite values ----------------------------------------


@pytest.mark.parametrize(("spec", "refused"), [("0-1000000000", "['0-1000000000'] are outside 0..7"),
                                               ("5-1000000000000", "['5-1000000000000'] are outside 0..7"),
                                               (",".join(["0-7"] * 2_000), None)])
def test_a_huge_layer_range_is_refused_at_once_in_little_memory(spec: str, refused: str | None) -> None:
    """A few bytes claiming a billion layers must not build a billion-element list or message; 2,000
    copies of one valid range select those 8 layers once."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        for build in (lambda: parse_layer_selection(spec, 8),
                      lambda: LadderConfig.from_dict({**SMALL, "ladder_layers": spec}),
                      lambda: LadderConfig(**SMALL).with_ladder_layers(spec)):
            if refused is None:
                selected = build()
                assert list(getattr(selected, "ladder_layers", selected)) == list(range(8))
                continue
            with pytest.raises(ConfigError) as caught:
                build()
            assert refused in str(caught.value) and len(str(caught.value)) < 300
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 0.5
    assert peak < 2**20 + 100 * len(spec)  # what parsing the spec itself needs, nothing per layer


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_hidden_layers": 10_000_000}, r"num_hidden_layers must be an integer in 1\.\.4096, got 10000000"),
        ({"num_hidden_layers": 10**12, "ladder_layers": "all"}, r"num_hidden_layers must be an integer in 1\.\.4096"),
        ({"vocab_size": 2**40}, r"vocab_size must be an integer in 1\.\.2147483647"),
        ({"hidden_size": 64.0}, r"hidden_size must be an integer in 1\.\.\d+, got 64\.0"),
        ({"num_attention_heads": True}, r"num_attention_heads must be an integer in 1\.\.\d+, got True"),
        ({"tie_word_embeddings": "no"}, r"tie_word_embeddings must be true or false, got 'no'"),
        ({"attention_bias": 0}, r"attention_bias must be true or false, got 0"),
        ({"rope_theta": -1}, r"rope_theta must be a positive finite number, got -1"),
        ({"rope_theta": "10000"}, r"rope_theta must be a positive finite number, got '10000'"),
        ({"rope_theta": float("inf")}, r"rope_theta must be a positive finite number, got inf"),
        ({"rms_norm_eps": float("nan")}, r"rms_norm_eps must be a number in \(0, 1\), got nan"),
        ({"rms_norm_eps": 0}, r"rms_norm_eps must be a number in \(0, 1\)"),
        ({"rope_scaling": "llama3"}, r"rope_scaling must be a mapping \(or null\), got 'llama3'"),
        ({"rope_scaling": [1, 2]}, r"rope_scaling must be a mapping"),
        ({"rope_scaling": {"rope_type": "llama3", **LLAMA3, "factor": float("nan")}},
         r"rope_scaling factor must be a positive finite number, got nan"),
        ({"rope_scaling": {"rope_type": "llama3", **LLAMA3, "high_freq_factor": 1.0}},
         r"high_freq_factor > low_freq_factor"),
        ({"eos_token_id": "2"}, r"eos_token_id must be a token id or a list of them, got '2'"),
        ({"eos_token_id": [1, 100]}, r"eos_token_id \[100\] is outside the vocabulary of 100"),
        ({"bos_token_id": 1.5}, r"bos_token_id must be an integer token id, got 1\.5"),
        ({"ladder_layers": {"0": 1}}, r"ladder_layers must be an integer or a list of layer indices"),
        ({"ladder_layers": [0, "x"]}, r"layer indices \['x'\] are outside 0\.\.7"),
        ({"residual_schedules": "ladder"}, r"residual_schedules must list one schedule for each of 8 layers"),
        ({"hidden_act": "x" * 10_000}, r"hidden_act 'xxxx.*\.\.\. \(10002 characters\) is not supported"),
    ],
)
def test_hostile_config_fields_are_refused_by_name(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        LadderConfig.from_dict({**SMALL, **fields}, source="config.json")
    assert str(refused.value).startswith("config.json: ") and len(str(refused.value)) < 300


def test_strict_booleans_keep_the_real_head() -> None:
    """`"tie_word_embeddings": "no"` once read as true and silently dropped the stored LM head."""
    assert LadderConfig.from_dict({**SMALL, "tie_word_embeddings": False}).tie_word_embeddings is False
    assert LadderConfig.from_dict({**SMALL, "tie_word_embeddings": True}).tie_word_embeddings is True
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        LadderConfig(**SMALL, tie_word_embeddings="no")  # type: ignore[arg-type]
