"""Conversion of Hugging Face, Meta original and GGUF checkpoints into Ladder checkpoints.

The reference for each format is independent of our readers: transformers' own model for HF and
Meta sources (the Meta files are written from it), and transformers loading the very same GGUF file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conversion_sources import (
    CHATML,
    SENTENCEPIECE_TOKENS,
    TEXTS,
    assert_close_logits,
    assert_nothing_written,
    logits_of,
    random_llama,
    rewrite_weights,
    write_gguf,
    write_hf,
    write_meta,
)
from safetensors.torch import load_file

from ladder.checkpoint import from_pretrained
from ladder.cli import main
from ladder.config import Schedule
from ladder.tokenizer import Tokenizer
from ladder_conversion import gguf_file
from ladder_conversion.convert import convert, open_source
from ladder_conversion.source import ConversionError
from ladder_conversion.verify import verify

# --- Hugging Face ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["untied-single-file", "tied-sharded-llama3-rope-biases", "legacy-rope-spelling"])
def test_hf_round_trip_matches_transformers(variant, tmp_path):
    from transformers import LlamaForCausalLM

    scaling = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 4, "rope_theta": 5000.0}
    if variant == "untied-single-file":
        model, shard = random_llama(), None
    else:
        model = random_llama(seed=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                             rope_parameters=scaling)
        shard = "40KB" if variant.startswith("tied-sharded") else None
    src = write_hf(model, tmp_path / "src", max_shard_size=shard)
    if variant == "legacy-rope-spelling":  # top-level rope_theta + rope_scaling with the old key "type"
        config = json.loads((src / "config.json").read_text())
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        config["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
        (src / "config.json").write_text(json.dumps(config))
    assert (src / "model.safetensors.index.json").exists() == (shard is not None)

    summary = convert(src, tmp_path / "dst", ladder_layers="none")
    dst = tmp_path / "dst"
    assert summary.tensors == len(model.state_dict()) - model.config.tie_word_embeddings
    assert_close_logits(logits_of(from_pretrained(dst, rank=0, world=1)), logits_of(model))
    written = json.loads((dst / "config.json").read_text())
    assert written["model_type"] == "llama" and "ladder_layers" not in written
    # A plain Llama checkpoint: transformers loads it as it is.
    assert_close_logits(logits_of(LlamaForCausalLM.from_pretrained(dst).eval()), logits_of(model))


def test_ladder_layers_written_and_reconverted(hf_dir, llama, tmp_path):
    from transformers import LlamaForCausalLM

    first, second, kept, plain = (tmp_path / n for n in ("upper", "layer0", "kept", "plain"))
    assert convert(hf_dir, first, ladder_layers="upper-half").ladder_layers == [1, 2]
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == "llamaLadder" and config["ladder_layers"] == [1, 2]
    model = from_pretrained(first, rank=0, world=1)
    assert model.config.schedules == [Schedule.STANDARD, Schedule.LADDER, Schedule.LADDER]
    ladder_logits = logits_of(model)
    assert (ladder_logits - logits_of(llama)).abs().max() > 1e-2, "a ladder model is a different function"
    standard = [Schedule.STANDARD] * 3
    assert_close_logits(logits_of(from_pretrained(first, rank=0, world=1, schedules=standard)), logits_of(llama))

    # A Ladder checkpoint converts again: new layers, same weights; no flag keeps its layers.
    assert convert(first, second, ladder_layers="0").ladder_layers == [0]
    assert convert(first, kept).ladder_layers == [1, 2]
    assert torch.equal(logits_of(from_pretrained(kept, rank=0, world=1)), ladder_logits)
    for a, b in ((first, second), (first, kept)):
        assert load_file(a / "model.safetensors").keys() == load_file(b / "model.safetensors").keys()
        assert all(torch.equal(t, load_file(b / "model.safetensors")[n])
                   for n, t in load_file(a / "model.safetensors").items())
    convert(first, plain, ladder_layers="none")
    assert json.loads((plain / "config.json").read_text())["model_type"] == "llama"
    assert_close_logits(logits_of(LlamaForCausalLM.from_pretrained(plain).eval()), logits_of(llama))


def test_tied_source_that_also_stores_the_head(tmp_path):
    """Some exporters store a tied head as well; it is accepted and not written (the embedding is the head)."""
    model = random_llama(tie_word_embeddings=True)
    src = write_hf(model, tmp_path / "src")
    embedding = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    rewrite_weights(src, lambda t: t.update({"lm_head.weight": embedding.clone()}))
    summary = convert(src, tmp_path / "dst")
    written = load_file(tmp_path / "dst" / "model.safetensors")
    assert "lm_head.weight" not in written and summary.tensors == len(written)
    assert_close_logits(logits_of(from_pretrained(tmp_path / "dst", rank=0, world=1)), logits_of(model))
    rewrite_weights(src, lambda t: t.update({"lm_head.weight": embedding[:-1].clone()}))
    with pytest.raises(ConversionError, match=r"tensor lm_head\.weight has shape \[\d+, 64\], config\.json implies"):
        convert(src, tmp_path / "bad")
    assert_nothing_written(tmp_path / "bad")


def test_reference_implementation_config_loads(hf_dir, llama, tmp_path):
    """The reference writes model_type llamaLadder and ladder_layers as an int (the last N layers)."""
    src = tmp_path / "reference"
    shutil.copytree(hf_dir, src)
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="llamaLadder", architectures=["LlamaLadderForCausalLM"], ladder_layers=2)
    (src / "config.json").write_text(json.dumps(config))
    assert from_pretrained(src, rank=0, world=1).config.ladder_layers == [1, 2]
    assert convert(src, tmp_path / "kept").ladder_layers == [1, 2]
    assert convert(src, tmp_path / "plain", ladder_layers="none").ladder_layers == []
    assert_close_logits(logits_of(from_pretrained(tmp_path / "plain", rank=0, world=1)), logits_of(llama))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype(hf_dir, tmp_path, dtype):
    dst = tmp_path / "dst"
    summary = convert(hf_dir, dst, ladder_layers="all", dtype=dtype)
    tensors = load_file(dst / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {dtype}
    assert summary.bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    result = verify(open_source(hf_dir), dst, dtype)
    assert result.passed and result.max_abs_diff <= 1e-4
    assert result.ladder_max_abs_diff > 1e-2 and 0 <= result.ladder_top1_agreement <= 1


def test_cli_converts_verifies_and_reports(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(hf_dir), str(dst), "--ladder-layers", "upper-half", "--verify", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "converted Hugging Face checkpoint: 30 tensors" in out
    assert "ladder layers: 1-2 (2 of 3)" in out and "verify OK" in out
    assert "DST as written (ladder layers) vs SRC" in out
    assert main(["convert", str(hf_dir), str(dst), "--quiet"]) == 2
    assert "already exists (use --force" in capsys.readouterr().err


def test_cli_runs_as_a_program(hf_dir, tmp_path):
    dst = tmp_path / "dst"
    done = subprocess.run([sys.executable, "-m", "ladder", "convert", str(hf_dir), str(dst), "--ladder-layers", "16-31"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "layer indices" in done.stderr and "outside 0..2" in done.stderr
    assert_nothing_written(dst)


# --- Meta original ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("shards", "embedding_dim"), [(1, 0), (2, 0), (2, 1)])
def test_meta_round_trip_matches_transformers(llama, tmp_path, shards, embedding_dim):
    src = write_meta(llama, tmp_path / "meta", shards=shards, embedding_dim=embedding_dim)
    convert(src, tmp_path / "dst")
    assert_close_logits(logits_of(from_pretrained(tmp_path / "dst", rank=0, world=1)), logits_of(llama))


def test_meta_scaled_rope_is_llama31_rope_scaling(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    model = random_llama(rope_parameters=scaling, max_position_embeddings=16384)
    convert(write_meta(model, tmp_path / "meta", shards=1), tmp_path / "dst")
    assert_close_logits(logits_of(from_pretrained(tmp_path / "dst", rank=0, world=1)), logits_of(model))
    assert (logits_of(model) - logits_of(random_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))).abs().max() > 1e-3


class Payload:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_meta_refuses_arbitrary_pickled_objects(llama, tmp_path):
    src = write_meta(llama, tmp_path / "meta", shards=1)
    shard = torch.load(src / "consolidated.00.pth", weights_only=True)
    marker = tmp_path / "code-ran"
    torch.save({**shard, "payload": Payload(marker)}, src / "consolidated.00.pth")
    with pytest.raises(ConversionError, match=r"consolidated\.00\.pth: refusing to unpickle"):
        convert(src, tmp_path / "dst")
    assert not marker.exists()
    assert_nothing_written(tmp_path / "dst")


# --- GGUF -------------------------------------------------------------------------------------------

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("quantization", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1, Q.Q5_0], ids=lambda q: q.name)
def test_gguf_round_trip_matches_transformers(quantization, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = random_llama(tie_word_embeddings=quantization == Q.Q8_0)
    src = write_gguf(model, tmp_path / "model.gguf", quantization)
    dst = tmp_path / "dst"
    convert(src, dst)
    reference = LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32).eval()
    assert_close_logits(logits_of(from_pretrained(dst, rank=0, world=1)), logits_of(reference))
    if quantization == Q.F32:  # the reader un-permutes q/k exactly: the original model comes back
        assert_close_logits(logits_of(from_pretrained(dst, rank=0, world=1)), logits_of(model), tol=1e-5)
        ref_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
        tokenizer = Tokenizer(dst)
        for text in TEXTS:
            assert tokenizer.encode(text, add_special_tokens=True) == ref_tokenizer(text).input_ids
            assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text
        messages = [{"role": "user", "content": "hi"}]
        assert tokenizer.apply_chat_template(messages) == ref_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        assert tokenizer.inner.id_to_token(tokenizer.encode("a<think>b")[1]) == "<think>"
        assert tokenizer.decode(tokenizer.encode("a<think>b")) == "a<think>b"  # not special: kept in text
        assert tokenizer.chat_template == CHATML
        assert tokenizer.token_id("eos_token") == 2 and tokenizer.token_id("bos_token") == 1
        assert json.loads((dst / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}


def dequantizable_types() -> list[gguf.GGMLQuantizationType]:
    """Every type the installed gguf package can dequantize."""
    kinds = []
    for kind in Q:
        try:
            gguf.quants.dequantize(np.zeros((1, gguf.constants.GGML_QUANT_SIZES[kind][1]), np.uint8), kind)
            kinds.append(kind)
        except NotImplementedError:
            pass
    return kinds


@pytest.mark.parametrize("kind", dequantizable_types(), ids=lambda q: q.name)
def test_gguf_dequantizes_every_supported_type_block_by_block(kind, monkeypatch):
    size = gguf.constants.GGML_QUANT_SIZES[kind][1]
    # Random blocks whose fp16 scale fields are all finite (bit 6 of each high byte cleared).
    raw = np.random.default_rng(0).integers(0, 256, (7, 2 * size), dtype=np.uint8) & 0xBF
    whole = gguf.quants.dequantize(raw, kind)
    monkeypatch.setattr(gguf_file, "DEQUANTIZE_ROWS", 3)
    ours = gguf_file.dequantize(raw, kind, whole.shape)
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(whole.astype(np.float32)))


def test_gguf_llama31_rope_factors_become_llama3_rope_scaling(tmp_path):
    """llama.cpp keeps Llama 3.1's rope rescaling only as the rope_freqs tensor; its parameters come back."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 16.0,
               "original_max_position_embeddings": 512, "rope_theta": 10000.0}
    model = random_llama(rope_parameters=scaling, max_position_embeddings=1024)
    convert(write_gguf(model, tmp_path / "model.gguf"), tmp_path / "dst")
    written = json.loads((tmp_path / "dst" / "config.json").read_text())["rope_scaling"]
    # (512, 2, 16) and (256, 1, 8) rescale alike: the converter picks low_freq_factor 1.
    assert written == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 256}
    assert_close_logits(logits_of(from_pretrained(tmp_path / "dst", rank=0, world=1)), logits_of(model), tol=1e-5)
    unscaled = random_llama()
    assert (logits_of(unscaled) - logits_of(model)).abs().max() > 1e-3, "the rescaling must change the logits"


def test_gguf_rope_factors_llama3_cannot_describe_are_refused():
    origin = "m.gguf: tensor rope_freqs.weight"
    assert gguf_file.llama3_rope_scaling(np.ones(8), 10000.0, 16, origin) is None
    with pytest.raises(ConversionError, match=r"m\.gguf: tensor rope_freqs\.weight rescales rotary frequencies in a way"):
        gguf_file.llama3_rope_scaling(np.array([1, 3, 2, 5, 1, 8, 2, 8.0]), 10000.0, 16, origin)


def test_gguf_smollm_pre_tokenizer_splits_digits_like_llama_cpp(llama, tmp_path):
    """llama.cpp's "smollm" pre-tokenizer isolates each digit (regex \\p{N}) before GPT-2's regex."""
    ids = {}
    for pre in ("gpt2", "smollm"):
        write_gguf(llama, tmp_path / f"{pre}.gguf", pre=pre)
        convert(tmp_path / f"{pre}.gguf", tmp_path / pre)
        tokenizer = Tokenizer(tmp_path / pre)
        ids[pre] = [tokenizer.inner.id_to_token(i) for i in tokenizer.encode("x 12")]
    assert ids == {"gpt2": ["x", "Ġ", "12"], "smollm": ["x", "Ġ", "1", "2"]}


def test_gguf_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers import AutoTokenizer

    write_gguf(random_llama(vocab_size=len(SENTENCEPIECE_TOKENS)), tmp_path / "spm.gguf", sentencepiece=True)
    convert(tmp_path / "spm.gguf", tmp_path / "dst")
    reference = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    tokenizer = Tokenizer(tmp_path / "dst")
    for text in ("the world and the tin", "  the\nworld ünï 12 </s>"):
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert ids == reference(text).input_ids and ids[0] == 1  # BOS: llama.cpp's default for SentencePiece
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert [tokenizer.inner.id_to_token(i) for i in tokenizer.encode("the world")] == ["▁the", "▁world"]
