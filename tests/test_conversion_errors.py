"""Bad conversion input: every case ends with a clear error naming the file, tensor or field, and
nothing is left at the destination (not even a temporary directory)."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess

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
