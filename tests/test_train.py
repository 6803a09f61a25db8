"""Fine-tuning end to end on tiny random checkpoints: learning, exact resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ladder import LadderConfig, LadderForCausalLM, from_pretrained, random_full_state_dict
from ladder.finetune import FinetuneError, Settings, Trainer, finetune, prepare_model, validation_loss
from ladder.vocab import vocab_parallel_cross_entropy
from ladder.writer import CheckpointWriter

REPO = Path(__file__).resolve().parents[1]
TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin "
        "nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the glass "
        "doors of Victory Mansions. ") * 40


def tiny_checkpoint(path: Path, text: str = TEXT, std: float = 0.02, **overrides: Any) -> Path:
    """A random 4-layer Llama (weights of scale `std`) with a byte-level BPE tokenizer trained on `text`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([text], trainer)
    fields: dict[str, Any] = dict(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=0)
    fields.update(overrides)
    config = LadderConfig(**fields)
    with CheckpointWriter(path) as writer:
        for name, tensor in random_full_state_dict(config, seed=1, std=std).items():
            if not (config.tie_word_embeddings and name == "lm_head.weight"):
                writer.add_tensor(name, tensor)
        writer.add_json("config.json", config.to_dict())
        writer.add_file("tokenizer.json", tokenizer.to_str())
        writer.add_json("tokenizer_config.json", {"eos_token": "<|endoftext|>"})
    return path


def text_file(path: Path, text: str = TEXT) -> Path:
    path.write_text(text)
    return path


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_cross_entropy_at_one_rank_is_torchs() -> None:
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    ours = vocab_parallel_cross_entropy(logits, targets, 0)
    ours.sum().backward()
    grad, logits.grad = logits.grad, None
    theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 5)
    theirs.sum().backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, logits.grad)


def test_loss_falls_on_repeated_text_and_the_output_loads(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    settings = Settings(checkpoint, [text_file(tmp_path / "text.txt")], out, seq_len=32, batch_size=4, steps=40,
                        lr=1e-2, warmup_steps=3, eval_every=10, progress=False, ladder_layers="upper-half", threads=1)
    summary = finetune(settings)
    losses = [loss for _, loss in train_losses(settings.run_dir)]
    assert len(losses) == 40
    assert losses[-1] < 0.55 * losses[0], losses
    evals = [r["val_loss"] for r in records(settings.run_dir) if "val_loss" in r]
    assert len(evals) == 5 and evals[-1] < 0.55 * evals[0], evals
    # The written checkpoint is the trained hybrid model: same validation loss, ladder layers recorded.
    saved = json.loads((out / "config.json").read_text())
    assert saved["ladder_layers"] == [2, 3]
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    reloaded = validation_loss(Settings(out, settings.data, tmp_path / "unused", seq_len=32))
    assert reloaded == pytest.approx(summary["val_loss"], abs=1e-5)
    assert from_pretrained(out).config.ladder_layers == [2, 3]


def test_only_ladder_layers_changes_nothing_else(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finetune(Settings(checkpoint, [text_file(tmp_path / "text.txt")], out, seq_len=32, batch_size=2, steps=3,
                      lr=1e-2, ladder_layers="3", only_ladder_layers=True, progress=False, threads=1))
    before, after = load_file(checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.3.") for name in changed), changed


def finetune_command(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ladder", "finetune", str(checkpoint), "--data", str(data), "--out", str(out),
            "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--steps", "30", "--lr", "2e-3",
            "--warmup-steps", "4", "--lora-rank", "4", "--lora-dropout", "0.2", "--checkpoint-every", "5",
            "--eval-every", "10", "--no-progress", "--threads", "1", *extra]


# LoRA with dropout (the RNG resumes), and full fine-tuning distilled from a teacher that must be the
# original weights, not the ones the resumed run restores.
RECIPES = {"lora": (), "distill": ("--lora-rank", "0", "--ladder-layers", "upper-half", "--distill",
                                   "--distill-temperature", "2", "--distill-weight", "0.5")}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_kill_and_resume_repeats_the_uninterrupted_run(checkpoint: Path, tmp_path: Path, recipe: str) -> None:
    data = text_file(tmp_path / "text.txt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(finetune_command(checkpoint, data, whole, *RECIPES[recipe]), check=True, env=env,
                   capture_output=True)

    killed = subprocess.Popen(finetune_command(checkpoint, data, broken, *RECIPES[recipe]), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = broken.with_name("broken.run") / "checkpoints" / "step-00000005" / "state.json"
    deadline = time.monotonic() + 120
    while not first.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not broken.exists()
    interrupted_at = max(step for step, _ in train_losses(broken.with_name("broken.run")))
    assert 5 <= interrupted_at < 30

    resumed = subprocess.run(finetune_command(checkpoint, data, broken, *RECIPES[recipe], "--resume"), env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert records(broken.with_name("broken.run")) and train_losses(broken.with_name("broken.run")) == \
        train_losses(whole.with_name("whole.run"))
    val = [(r["step"], r["val_loss"]) for r in records(whole.with_name("whole.run")) if "val_loss" in r]
    assert val == [(r["step"], r["val_loss"]) for r in records(broken.with_name("broken.run")) if "val_loss" in r]
    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


# --- bad input: a clear error and nothing written -------------------------------------------------


def assert_refused(settings: Settings, message: str) -> None:
    with pytest.raises(FinetuneError, match=message):
        finetune(settings)
    assert not settings.out.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty"),
    (b"   \n\n  ", "empty"),
    (b"caf\xe9 au lait " * 50, r"not UTF-8 text \(byte 0xe9 at offset 3\)"),
    (b"too short", "fewer than one sequence"),
])
def test_bad_data_is_refused(checkpoint: Path, tmp_path: Path, content: bytes, message: str) -> None:
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    settings = Settings(checkpoint, [data], tmp_path / "out", seq_len=32, progress=False)
    assert_refused(settings, message)
    assert not settings.run_dir.exists()


def test_bad_jsonl_names_the_line(checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert_refused(Settings(checkpoint, [data], tmp_path / "out", progress=False), r"data.jsonl:2: no string field 'text'")


def test_not_a_ladder_checkpoint_is_refused(tmp_path: Path) -> None:
    data = text_file(tmp_path / "text.txt")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LadderConfig(
        vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2).to_dict()))
    for source in (gguf, no_weights, tmp_path / "missing"):
        assert_refused(Settings(source, [data], tmp_path / "out"), "is not a Ladder checkpoint")


def test_existing_output_and_changed_resume_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    data = text_file(tmp_path / "text.txt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="already exists"):
        finetune(Settings(checkpoint, [data], out, seq_len=32))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    first = Settings(checkpoint, [data], tmp_path / "run", seq_len=32, batch_size=2, steps=2, checkpoint_every=1,
                     progress=False, threads=1)
    finetune(first)
    (tmp_path / "run").rename(tmp_path / "done")  # keep the run directory; let --resume find no output
    before = {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()}
    changed = Settings(checkpoint, [data], tmp_path / "run", seq_len=32, batch_size=2, steps=2, lr=5e-4,
                       resume=True, progress=False)
    assert_refused(changed, r"differs from the one in .*lr: 0.0001 -> 0.0005")
    assert {p: p.read_bytes() for p in first.run_dir.rglob("*") if p.is_file()} == before
    with pytest.raises(FinetuneError, match="holds no run to resume"):
        finetune(Settings(checkpoint, [data], tmp_path / "other", seq_len=32, resume=True))
    with pytest.raises(FinetuneError, match="already holds a run"):
        finetune(Settings(checkpoint, [data], tmp_path / "run", seq_len=32))



@pytest.mark.parametrize(("field", "value", "message"), [
    ("lr", float("inf"), r"--lr must be a finite number > 0, got inf"),
    ("lr", float("nan"), r"--lr must be a finite number > 0, got nan"),
    ("lr", 0.0, r"--lr must be a finite number > 0, got 0\.0"),
    ("epochs", float("inf"), r"--epochs must be a finite number > 0, got inf"),
    ("lora_alpha", float("nan"), r"--lora-alpha must be a finite number > 0, got nan"),
    ("max_grad_norm", -1.0, r"--max-grad-norm must be a finite number >= 0 \(0: no clipping\), got -1\.0"),
    ("min_lr_ratio", -0.1, r"--min-lr-ratio must be a finite number in \[0, 1\], got -0\.1"),
    ("weight_decay", -0.01, r"--weight-decay must be a finite number >= 0, got -0\.01"),
    ("lora_dropout", float("nan"), r"--lora-dropout must be a finite number in \[0, 1\), got nan"),
    ("timeout", 0.0, r"--timeout must be a finite number > 0 \(seconds\), got 0\.0"),
    ("warmup_steps", -1, r"--warmup-steps must be an integer >= 0, got -1"),
    ("checkpoint_every", -5, r"--checkpoint-every must be an integer >= 0, got -5"),
    ("steps", 0, r"--steps must be an integer >= 1, got 0"),
    ("seq_len", 2.5, r"--seq-len must be an integer >= 1, got 2\.5"),
])
def test_bad_settings_are_refused_before_a_run_record_exists(tmp_path: Path, field: str, value: object,
                                                             message: str) -> None:
    """Checked when the settings are made, so a refused run leaves no run.json to refuse the retry."""
    with pytest.raises(FinetuneError, match=message):
        Settings(tmp_path / "ckpt", [tmp_path / "data.txt"], tmp_path / "out", **{field: value})


def test_bfloat16_autocast_tracks_float32_and_keeps_float32_weights() -> None:
    config = LadderConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = {}
    for dtype in ("float32", "bfloat16"):
        model = LadderForCausalLM(config)
        model.load_full_state_dict(random_full_state_dict(config, seed=2, std=0.1))
        settings = Settings(Path("ckpt"), [], Path("out"), dtype=dtype, lr=1e-3)
        prepare_model(model, settings)
        trainer = Trainer(model, settings, total_steps=2)
        losses[dtype] = trainer.step([(ids[:, :-1], ids[:, 1:])])["loss"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=1e-2)
    assert losses["bfloat16"] != losses["float32"]  # autocast really computed in bfloat16
