"""Weight formats on a small random checkpoint: logits against fp32 and against an independent
dequantized reference, TP=1 against TP=2, the bytes the projections take, and refused group splits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ladder import LadderConfig
from ladder.checkpoint import CheckpointError, from_pretrained, save_pretrained
from ladder.generate import generate
from ladder.launcher import launch
from ladder.model import LadderForCausalLM, random_full_state_dict
from ladder.quant import (
    WEIGHT_FORMATS,
    Int4Linear,
    Int8Linear,
    LowBitLinear,
    WeightFormatError,
    projection_bytes,
    quantize_int4,
    quantize_int8,
)

pytestmark = pytest.mark.usefixtures("one_compute_thread")

# Largest |logit - fp32 logit| over the largest |fp32 logit|: half precision rounds each weight to 8
# (bf16) or 11 (fp16) bits and the activations with them; int8 to 127 steps per row, int4 to 15 per 32
# (a third of a random weight's deviation per step: the exact check is against dequantized weights below).
TOLERANCE = {"bf16": 0.03, "fp16": 0.005, "int8": 0.03, "int4": 0.3}
PROMPTS = [[3, 17, 29, 4], [8, 1]]


def quant_config(**overrides: object) -> LadderConfig:
    """Every width a multiple of the int4 group (32) and splittable at TP=2 without cutting one;
    GQA, biases and a tied head like the tiny test model; a vocabulary no 16-row tile divides."""
    fields: dict = dict(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                        rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=True, attention_bias=True,
                        mlp_bias=True)
    fields.update(overrides)
    return LadderConfig(**fields)


def write_checkpoint(path: Path, config: LadderConfig, std: float = 0.1) -> Path:
    model = LadderForCausalLM(config, 0, 1)
    model.load_full_state_dict(random_full_state_dict(config, seed=5, std=std))
    save_pretrained(model, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("quant") / "ckpt", quant_config())


def logits(model: LadderForCausalLM) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPTS[0] * 3]))


@pytest.mark.parametrize("weights", WEIGHT_FORMATS[1:])  # every format but fp32, the reference
def test_logits_match_fp32_within_the_formats_tolerance(weights: str, checkpoint: Path) -> None:
    expected = logits(from_pretrained(checkpoint, 0, 1))
    got = logits(from_pretrained(checkpoint, 0, 1, weights=weights))
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"\n{weights}: largest logit error {error:.4f} of the largest logit")
    assert got.dtype == torch.float32 and error <= TOLERANCE[weights]


def dequantized_int8(weight: torch.Tensor) -> torch.Tensor:
    integers, scales = quantize_int8(weight)
    return integers.float() * scales.bfloat16().float()[:, None]


def dequantized_int4(weight: torch.Tensor, group_size: int = 32) -> torch.Tensor:
    """q * scale + minimum with the scale and the zero (minimum + 8 scale) rounded to bf16 as stored."""
    integers, scales, minima = quantize_int4(weight, group_size)
    scale, zero = scales.bfloat16().float(), (minima + 8 * scales).bfloat16().float()
    groups = integers.reshape(*scales.shape, group_size).float()
    return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(weight.shape)


@pytest.mark.parametrize(("weights", "module", "dequantize"),
                         [("int8", Int8Linear, dequantized_int8), ("int4", Int4Linear, dequantized_int4)])
def test_int_kernels_compute_with_the_dequantized_weights(weights: str, module: type, dequantize, checkpoint: Path) -> None:
    """Independent reference: an fp32 model holding the dequantized weights, fed bf16-rounded inputs."""
    quantized = from_pretrained(checkpoint, 0, 1, weights=weights)
    reference = from_pretrained(checkpoint, 0, 1)
    layers = range(reference.config.num_hidden_layers)
    fused = [f"model.layers.{i}.{p}" for i in layers for p in ("self_attn.qkv_proj", "mlp.gate_up_proj")]
    row_parallel = [f"model.layers.{i}.{p}" for i in layers for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert {name: type(m) for name, m in quantized.named_modules() if isinstance(m, LowBitLinear)} == (
        dict.fromkeys(fused + row_parallel, module) | {"lm_head": Int8Linear})  # the head is int8 under int4 too
    with torch.no_grad():
        for name, linear in reference.named_modules():
            if isinstance(linear, torch.nn.Linear):
                exact = dequantized_int8 if name == "lm_head" else dequantize
                linear.weight = torch.nn.Parameter(exact(linear.weight.detach()))
                linear.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    got, expected = logits(quantized), logits(reference)
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()


def greedy_and_scored(path: Path, sequences: dict[str, list[list[int]]] | None) -> dict[str, tuple]:
    """Per format: the greedy continuations of PROMPTS, and the whole logits of `sequences[format]`
    (TP=1's prompts plus continuations) fed as they are."""
    results = {}
    for weights in WEIGHT_FORMATS:
        model = from_pretrained(path, weights=weights)
        tokens = generate(model, PROMPTS, max_new_tokens=8).tokens
        fed = sequences[weights] if sequences else [p + t for p, t in zip(PROMPTS, tokens, strict=True)]
        with torch.inference_mode():
            scored = [model.gather_vocab(model(torch.tensor([seq])))[0] for seq in fed]
        results[weights] = (tokens, fed, scored)
    return results


def test_tp1_and_tp2_choose_the_same_tokens_in_every_format(checkpoint: Path) -> None:
    """TP=2 rounds the row-parallel partial sums separately (in bf16 for the low-bit kernels), so its
    logits differ from TP=1's by rounding, and a greedy choice may differ only where TP=1's two best
    logits are closer than that: every token up to such a near-tie must be the same."""
    alone = greedy_and_scored(checkpoint, None)  # in this process: rank 0 of 1
    pair = launch(greedy_and_scored, 2, checkpoint, {weights: fed for weights, (_, fed, _) in alone.items()})
    assert all(pair[0][weights][0] == pair[1][weights][0] for weights in WEIGHT_FORMATS)
    for weights, (tokens, _, scored) in alone.items():
        tp2_tokens, _, tp2_scored = pair[0][weights]
        for prompt, row, tp2_row, logits, tp2_logits in zip(PROMPTS, tokens, tp2_tokens, scored, tp2_scored,
                                                            strict=True):
            rounding = (logits - tp2_logits).abs().max().item()
            assert rounding <= (1e-5 if weights == "fp32" else 0.02) * logits.abs().max().item(), weights
            differs = [i for i, (a, b) in enumerate(zip(row, tp2_row, strict=True)) if a != b]
            if differs:  # the step chose from the logits at the position before the new token
                best_two = logits[len(prompt) - 1 + differs[0]].topk(2).values
                assert (best_two[0] - best_two[1]).item() <= 2 * rounding, (weights, row, tp2_row)


def test_int4_projections_take_under_a_fifth_of_fp32s_bytes(checkpoint: Path) -> None:
    """4 bits per weight plus a bf16 scale and zero per 32 (5/32 of fp32); the int8 head a quarter."""
    fp32 = from_pretrained(checkpoint, 0, 1)
    int4 = from_pretrained(checkpoint, 0, 1, weights="int4")
    head = fp32.lm_head.weight.numel() * 4
    body = projection_bytes(fp32) - head
    int4_head = int4.lm_head.integers.numel() + int4.lm_head.scales.numel() * 2
    assert projection_bytes(int4) - int4_head == pytest.approx(5 / 32 * body, rel=0.02)
    assert int4_head == pytest.approx(head / 4, rel=0.05)
    assert not any(t.is_meta for t in int4.state_dict().values())


def test_a_group_that_the_tp_split_would_cut_is_refused(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ckpt", quant_config(intermediate_size=96))  # down_proj: 48 + 48 at TP=2
    from_pretrained(path, 0, 1, weights="int4")  # whole at TP=1
    from_pretrained(path, 1, 2, weights="int8")  # int8 scales whole rows
    with pytest.raises(WeightFormatError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: rank 0 of 2 "
                                                r"holds input features 0:48, so the split cuts an int4 group of 32"):
        from_pretrained(path, 1, 2, weights="int4")


@pytest.mark.parametrize(("weights", "group_size", "message"), [
    ("int3", 32, r"unknown weight format 'int3'; choose one of fp32, bf16, fp16, int8, int4"),
    ("int4", 16, r"int4 group size must be one of 32, 64, 128, 256"),
    ("int4", 128, r"tensor model\.layers\.0\.self_attn\.q_proj\.weight: its 64 input features are not a "
                  r"multiple of the int4 group size 128"),
])
def test_bad_formats_are_refused_naming_the_problem(weights: str, group_size: int, message: str,
                                                    checkpoint: Path) -> None:
    with pytest.raises(WeightFormatError, match=message):
        from_pretrained(checkpoint, 0, 1, weights=weights, group_size=group_size)


def test_a_low_bit_model_is_not_saved(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"rank 0: the model's projections are in a low-bit format"):
        save_pretrained(from_pretrained(checkpoint, 0, 1, weights="int8"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
