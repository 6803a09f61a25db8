"""`ladder generate` end to end: in-process, through our launcher, and under torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_word_checkpoint
from safetensors.torch import load_file, save_file

import ladder
from ladder.checkpoint import CheckpointError
from ladder.cli import main

VOCAB = 64
CONFIG = ladder.LadderConfig(
    vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, eos_token_id=VOCAB - 1,
    schedules=["standard", "standard", "ladder", "ladder"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random hybrid model with a word-level tokenizer: everything `ladder generate` reads."""
    return write_word_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CONFIG, seed=5, std=0.2,
                                 tokenizer_config={"eos_token": "</s>"})


def _expected(checkpoint: Path, prompt: str, max_new: int) -> list[int]:
    model = ladder.from_pretrained(checkpoint)
    ids = [int(w[1:]) for w in prompt.split()]
    return ladder.generate(model, [ids], max_new_tokens=max_new, stop_tokens=[VOCAB - 1]).tokens[0]


def _run(args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / "answer.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([*args, "--json-out", str(out)], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize(("launcher", "transport"), [("tp1", "none"), ("spawn", "shm"), ("spawn", "gloo"),
                                                     ("torchrun", "shm"), ("torchrun", "gloo")])
def test_generate_command(checkpoint: Path, tmp_path: Path, launcher: str, transport: str,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    prompt, max_new = "w3 w17 w42 w8", 10
    command = ["generate", str(checkpoint), "--prompt", prompt, "--max-new-tokens", str(max_new)]
    if launcher == "torchrun":  # torchrun users choose the transport through the environment
        monkeypatch.setenv("LADDER_COMM", transport)
        args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "ladder", *command]
    else:
        args = [sys.executable, "-m", "ladder", *command, "--tp", "1" if launcher == "tp1" else "2"]
        args += ["--comm", transport] if transport != "none" else []
    result = _run(args, tmp_path)
    assert result["world_size"] == (1 if launcher == "tp1" else 2)
    assert result["transport"] == transport
    assert result["tokens"][0] == _expected(checkpoint, prompt, max_new)
    assert result["answers"][0] == " ".join(f"w{t}" for t in result["tokens"][0] if t != VOCAB - 1)


def test_generate_refuses_more_ranks_than_heads(checkpoint: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "ladder", "generate", str(checkpoint), "--prompt", "w1",
                           "--tp", "7"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "larger than the model's 6 attention heads" in done.stderr


@pytest.fixture(scope="module")
def nan_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`checkpoint` with one NaN in a weight that TP=2 gives to rank 1 only."""
    path = tmp_path_factory.mktemp("nan") / "tiny"
    weights = load_file(checkpoint / "model.safetensors")
    weights[POISONED][-1, -1] = float("nan")
    path.mkdir()
    save_file(weights, path / "model.safetensors")
    for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(checkpoint / side, path / side)
    return path


POISONED = "model.layers.1.mlp.up_proj.weight"


def _assert_one_line(command: str, stdout: str, stderr: str, message: str) -> None:
    """One line naming the problem, no traceback, nothing on stdout."""
    assert stdout == "" and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ladder {command}: error: "), stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp", "2", "--temperature", "nan"], r"temperature must be a finite number >= 0 \(0: greedy\), got nan"),
    (["--tp", "2", "--top-k", "-1"], r"top_k must be >= 1"),
    (["--tp", "0"], r"tensor-parallel size must be at least 1, got 0"),
    (["--tp", "2", "--chat"], r"this tokenizer has no chat_template"),
    (["--tp", "2", "--prompt", ""], r"every prompt needs at least one token"),
])
def test_generate_bad_input_is_one_line_before_any_rank_starts(checkpoint: Path, flags: list[str], message: str,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", str(checkpoint), "--prompt", "w1 w2", *flags]) == 2
    _assert_one_line("generate", *capsys.readouterr(), message)


def test_nan_weights_are_refused_naming_the_tensor_once_at_tp2(nan_checkpoint: Path) -> None:
    """Only rank 1 reads the NaN; the job still ends with that one line, not one traceback per rank."""
    done = subprocess.run([sys.executable, "-m", "ladder", "generate", str(nan_checkpoint), "--prompt", "w1 w2",
                           "--tp", "2", "--timeout", "20"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 2, done.stderr[-3000:]
    _assert_one_line("generate", done.stdout, done.stderr,
                     rf"model\.safetensors: tensor {POISONED} holds 1 NaN or infinite value\(s\)")


@pytest.mark.parametrize(("flag", "value"), [("--timeout", "0"), ("--timeout", "nan"), ("--max-new-tokens", "-1"),
                                             ("--threads", "0")])
def test_bad_flag_values_are_refused_by_argparse(checkpoint: Path, flag: str, value: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["generate", str(checkpoint), "--prompt", "w1", flag, value])
    stderr = capsys.readouterr().err
    assert refused.value.code == 2 and f"argument {flag}: must be" in stderr, stderr
    assert "missing rank" not in stderr


@pytest.mark.parametrize(("flag", "value", "message"), [("--lr", "inf", r"--lr must be a finite number > 0, got inf"),
                                                        ("--lora-alpha", "nan", r"--lora-alpha must be a finite number")])
def test_finetune_bad_setting_is_one_line_and_leaves_no_run_record(checkpoint: Path, tmp_path: Path, flag: str,
                                                                    value: str, message: str,
                                                                    capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data.txt"
    data.write_text("w1 w2 w3 " * 200)
    out = tmp_path / "out"
    command = ["finetune", str(checkpoint), "--data", str(data), "--out", str(out), "--lora-rank", "2"]
    assert main([*command, flag, value]) == 2
    _assert_one_line("finetune", *capsys.readouterr(), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]  # no OUT, no OUT.run to refuse a retry


def test_float16_overflow_is_named(checkpoint: Path, tmp_path: Path) -> None:
    big = tmp_path / "big"
    weights = load_file(checkpoint / "model.safetensors")
    weights["model.norm.weight"][0] = 1e6
    big.mkdir()
    save_file(weights, big / "model.safetensors")
    shutil.copy(checkpoint / "config.json", big / "config.json")
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has values as large as 1e\+06, "
                                              r"which overflow float16"):
        ladder.from_pretrained(big, dtype=torch.float16)
    assert ladder.from_pretrained(big, dtype=torch.float32).model.norm.weight[0] == 1e6


def test_checkpoint_loads_same_logits_at_any_rank(checkpoint: Path) -> None:
    """Per-rank sliced loading: the shards of TP=3 joined again are the TP=1 weights."""
    whole = ladder.from_pretrained(checkpoint)
    for rank in range(3):
        shard = ladder.from_pretrained(checkpoint, rank=rank, world=3)
        for name, tensor in shard.state_dict().items():
            part = shard.plan.tensors[name] if name in shard.plan.tensors else shard.plan.tensors["model.embed_tokens.weight"]
            expected = whole.state_dict()[name]
            if part.dim is not None:
                expected = expected.narrow(part.dim, part.start, part.stop - part.start)
            torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)


def test_weights_are_stored_input_major_however_built(checkpoint: Path) -> None:
    """Every projection multiplies x by a contiguous [in, out] matrix (the fast decode layout), whether
    the model was loaded (at TP=1 and as a shard) or built fresh; tied head and embedding stay one tensor."""
    built = [ladder.from_pretrained(checkpoint), ladder.from_pretrained(checkpoint, rank=1, world=3)]
    built.append(ladder.LadderForCausalLM(built[0].config))
    for model in built:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(linears) == 7 * model.config.num_hidden_layers + 1
        for linear in linears:
            assert linear.weight.t().is_contiguous() and not linear.weight.is_contiguous()
        if model.config.tie_word_embeddings:
            assert model.lm_head.weight is model.model.embed_tokens.weight
