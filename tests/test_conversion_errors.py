"""Bad conversion input: every case ends with a clear error naming the file, tensor or field, and
nothing is left at the destination (not even a temporary directory)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time

import gguf
import numpy as np
import pytest
import torch
from conversion_sources import (
    assert_close_logits,
    assert_nothing_written,
    logits_of,
    rewrite_config,
    rewrite_weights,
    write_gguf,
    write_hf,
    write_meta,
)

from ladder.checkpoint import from_pretrained
from ladder.config import ConfigError, LadderConfig
from ladder.outputs import OutputError, OutputExistsError
from ladder.writer import CheckpointWriter
from ladder_conversion.convert import convert
from ladder_conversion.source import ConversionError

# --- bad input: a clear error, and nothing left at DST ------------------------------------------------


Q = gguf.GGMLQuantizationType

BAD_HF = {
    "missing tensor": (lambda src: rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ConversionError, r"missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"),
    "extra tensor": (lambda src: rewrite_weights(src, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)})),
                     ConversionError, r"tensor\(s\) that config\.json does not describe: "
                                      r"\S+/model\.safetensors: tensor model\.layers\.9\.mlp\.up_proj\.weight"),
    "shape disagrees with config": (lambda src: rewrite_config(src, intermediate_size=64), ConversionError,
                                    r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape "
                                    r"\[\d+, \d+\], config\.json implies \[64, 64\]"),
    "integer weights": (lambda src: rewrite_weights(src, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})),
                        ConversionError, r"model\.safetensors: tensor model\.norm\.weight has dtype torch\.int32, "
                                         r"weights must be floating point"),
    "truncated safetensors": (lambda src: (src / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-1000]),
                              ConversionError, r"model\.safetensors: corrupt or truncated safetensors file"),
    "corrupt safetensors header": (lambda src: (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"),
                                   ConversionError, r"model\.safetensors: corrupt or truncated safetensors file"),
    "inconsistent head counts": (lambda src: rewrite_config(src, num_key_value_heads=3), ConfigError,
                                 r"src/config\.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "not a llama": (lambda src: rewrite_config(src, model_type="gpt2"), ConversionError,
                    r"config\.json: model_type 'gpt2' is not a Llama model"),
    "unknown ladder layers": (lambda src: rewrite_config(src, ladder_layers=[0, 7]), ConfigError,
                              r"layer indices \[7\] are outside 0\.\.2"),
    "billion-layer range": (lambda src: rewrite_config(src, ladder_layers="0-1000000000"), ConfigError,
                            r"layer indices \['0-1000000000'\] are outside 0\.\.2"),
    "ten million layers": (lambda src: rewrite_config(src, num_hidden_layers=10_000_000), ConfigError,
                           r"num_hidden_layers must be an integer in 1\.\.4096, got 10000000"),
    "boolean spelled as a string": (lambda src: rewrite_config(src, tie_word_embeddings="no"), ConfigError,
                                    r"config\.json: tie_word_embeddings must be true or false, got 'no'"),
    "rope_scaling not a mapping": (lambda src: rewrite_config(src, rope_scaling="llama3"), ConfigError,
                                   r"config\.json: rope_scaling must be a mapping \(or null\), got 'llama3'"),
    "weight_map not a mapping": (lambda src: (src / "model.safetensors.index.json").write_text('{"weight_map": [1]}'),
                                 ConversionError, r"index\.json: weight_map must map each tensor name to a file "
                                                  r"name, got \[1\]"),
    "NaN weights": (lambda src: rewrite_weights(src, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__(
                        (3, 5), float("nan"))),
                    ConversionError, r"model\.safetensors: tensor model\.layers\.1\.mlp\.up_proj\.weight holds 1 "
                                     r"NaN or infinite value\(s\)"),
}


@pytest.mark.parametrize("case", list(BAD_HF))
def test_bad_hugging_face_input(case, hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    corrupt, error, message = BAD_HF[case]
    corrupt(src)
    with pytest.raises(error, match=message):
        convert(src, tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")


def test_index_naming_a_missing_shard(llama, tmp_path):
    src = write_hf(llama, tmp_path / "src", max_shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (src / gone).unlink()
    with pytest.raises(ConversionError, match=rf"model\.safetensors\.index\.json names shard\(s\) that do not exist: .*{gone}"):
        convert(src, tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")


def test_bad_gguf_input(llama, tmp_path):
    dst = tmp_path / "dst"
    write_gguf(llama, tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ConversionError, match=r"falcon\.gguf: GGUF architecture 'falcon' is not supported"):
        convert(tmp_path / "falcon.gguf", dst)

    block, size = gguf.constants.GGML_QUANT_SIZES[Q.Q8_1]  # a type the gguf package cannot dequantize
    q8_1 = np.zeros((32, 64 // block * size), dtype=np.uint8)
    write_gguf(llama, tmp_path / "q8_1.gguf", raw={"blk.1.attn_v.weight": (q8_1, Q.Q8_1)})
    with pytest.raises(ConversionError, match=r"tensor blk\.1\.attn_v\.weight has quantization type Q8_1, "
                                              r"which the gguf package cannot dequantize"):
        convert(tmp_path / "q8_1.gguf", dst)

    # A type id no GGUF defines: found in the tensor info table and overwritten.
    data = bytearray((tmp_path / "q8_1.gguf").read_bytes())
    at = data.index(b"blk.1.attn_v.weight") + len(b"blk.1.attn_v.weight") + 4 + 2 * 8
    assert int.from_bytes(data[at:at + 4], "little") == Q.Q8_1
    data[at:at + 4] = (250).to_bytes(4, "little")
    (tmp_path / "unknown.gguf").write_bytes(bytes(data))
    with pytest.raises(ConversionError, match=r"unknown\.gguf: not a readable GGUF file .*250"):
        convert(tmp_path / "unknown.gguf", dst)

    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ConversionError, match=r"garbage\.gguf: not a readable GGUF file"):
        convert(tmp_path / "garbage.gguf", dst)

    write_gguf(llama, tmp_path / "pre.gguf", pre="mystery-bpe")
    with pytest.raises(ConversionError, match=r"tokenizer\.ggml\.pre 'mystery-bpe' is not a pre-tokenizer"):
        convert(tmp_path / "pre.gguf", dst)
    assert_nothing_written(dst)


def test_meta_vocab_size_that_is_not_a_number(llama, tmp_path):
    src = write_meta(llama, tmp_path / "meta", shards=1)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "vocab_size": "lots"}))
    with pytest.raises(ConversionError, match=r"params\.json: vocab_size must be an integer .*got 'lots'"):
        convert(src, tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")


def _patched_u32(data: bytes, key: bytes, value: int) -> bytes:
    """`data` (a GGUF file) with the uint32 metadata value of `key` replaced."""
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == gguf.GGUFValueType.UINT32
    return data[:at + 4] + value.to_bytes(4, "little") + data[at + 8:]


def test_gguf_claims_beyond_the_file_are_refused_at_once(llama, tmp_path):
    """Counts and lengths in a GGUF header are checked against the file's size before the reader
    trusts them (an array claiming 10**12 elements kept the gguf reader looping without end)."""
    dst = tmp_path / "dst"
    good = write_gguf(llama, tmp_path / "good.gguf").read_bytes()
    eos = tmp_path / "eos.gguf"
    eos.write_bytes(_patched_u32(good, b"tokenizer.ggml.eos_token_id", 10**6))
    with pytest.raises(ConfigError, match=r"eos\.gguf: eos_token_id \[1000000\] is outside the vocabulary"):
        convert(eos, dst)
    header = b"GGUF" + (3).to_bytes(4, "little")
    claims = {
        "a billion tensors": header + (10**9).to_bytes(8, "little") + bytes(8),
        "a billion metadata entries": header + bytes(8) + (10**9).to_bytes(8, "little"),
        "an array of 10**12 bytes": header + bytes(8) + (1).to_bytes(8, "little") + (1).to_bytes(8, "little") + b"a"
        + (9).to_bytes(4, "little") + bytes(4) + (10**12).to_bytes(8, "little"),
    }
    for name, data in claims.items():
        path = tmp_path / "claims.gguf"
        path.write_bytes(data + bytes(64))
        started = time.perf_counter()
        with pytest.raises(ConversionError, match=r"claims\.gguf: .* claims \d+ bytes at offset \d+, but only "
                                                  r"\d+ are left in the file"):
            convert(path, dst)
        assert time.perf_counter() - started < 1, name
    assert_nothing_written(dst)


def test_bad_paths(hf_dir, tmp_path):
    with pytest.raises(ConversionError, match=r"nowhere: no such file or directory"):
        convert(tmp_path / "nowhere", tmp_path / "dst")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match=r"empty: no config\.json \(Hugging Face\), params\.json \(Meta\)"):
        convert(tmp_path / "empty", tmp_path / "dst")
    copy = tmp_path / "copy"
    shutil.copytree(hf_dir, copy)
    with pytest.raises(OutputError, match=r"copy is .*copy, which this command reads or writes too"):
        convert(copy, copy, force=True)
    assert (copy / "model.safetensors").exists()
    assert_nothing_written(tmp_path / "dst")


def test_existing_destination_needs_force(hf_dir, llama, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"dst already exists \(use --force to replace it\)"):
        convert(hf_dir, dst)
    # --force replaces only what ladder wrote: never a user's own directory, nor a file.
    with pytest.raises(OutputError, match=r"dst already exists and was not written by ladder"):
        convert(hf_dir, dst, force=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    file = tmp_path / "file"
    file.write_text("mine")
    with pytest.raises(OutputError, match=r"file already exists and was not written by ladder"):
        convert(hf_dir, file, force=True)
    assert file.read_text() == "mine"
    convert(hf_dir, tmp_path / "ours")
    convert(hf_dir, tmp_path / "ours", force=True)
    assert_close_logits(logits_of(from_pretrained(tmp_path / "ours", rank=0, world=1)), logits_of(llama))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "file", "ours"], "something was left behind"


def test_full_disk_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    def no_space(self, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CheckpointWriter, "_append", no_space)
    with pytest.raises(ConversionError, match=r"dst: writing failed, nothing was written .*No space left on device"):
        convert(hf_dir, tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")
    # With --force an existing DST survives a failed conversion untouched.
    monkeypatch.undo()
    convert(hf_dir, tmp_path / "dst")
    before = {p.name: p.read_bytes() for p in (tmp_path / "dst").iterdir()}
    monkeypatch.setattr(CheckpointWriter, "_append", no_space)
    with pytest.raises(ConversionError, match="No space left on device"):
        convert(hf_dir, tmp_path / "dst", force=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "dst").iterdir()} == before


def test_full_disk_on_a_real_small_filesystem(hf_dir, tmp_path):
    """A 64 KiB tmpfs (the small model is ~150 KiB): needs root to mount, skipped otherwise."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(ConversionError, match=r"writing failed, nothing was written .*No space left on device"):
            convert(hf_dir, mount / "dst")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_conversion_needs_no_disk_beyond_its_output(hf_dir, tmp_path):
    """Each shard is written once, in place: a tmpfs one shard smaller than output + a shard still fits
    it (each file takes whole 4 KiB pages on tmpfs). Needs root to mount, skipped otherwise."""
    shard_bytes = 48 * 2**10
    convert(hf_dir, tmp_path / "reference", shard_bytes=shard_bytes)
    files = list((tmp_path / "reference").iterdir())
    assert len([f for f in files if f.suffix == ".safetensors"]) > 2
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in files)
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages + 8192}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        convert(hf_dir, mount / "dst", shard_bytes=shard_bytes)
        assert sorted(p.name for p in mount.iterdir()) == ["dst"]
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_config_round_trips_through_ladder_config(hf_dir, tmp_path):
    convert(hf_dir, tmp_path / "dst", ladder_layers="0,2")
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    config = LadderConfig.from_dict(written)
    assert config.ladder_layers == [0, 2] and config.num_key_value_heads == 2 and config.rope_theta == 10000.0
