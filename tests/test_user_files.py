"""What the tool promises about a user's files (README, "Your files"): each case asserts the message
and that nothing was written, deleted or left running."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conversion_sources import rewrite_weights, write_gguf
from test_train import text_file, tiny_checkpoint

from ladder.finetune import FinetuneError, Settings, finetune
from ladder.outputs import LAUNCHER_PID_ENV, MARKER, OutputError, UnsafeFileError, write_report
from ladder.tokenizer import Tokenizer
from ladder.writer import CheckpointWriter
from ladder_conversion.convert import convert
from ladder_conversion.source import ConversionError

STARTUP_ALLOWANCE_S = 120  # spawning ranks and importing torch on a loaded 2-core machine


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for a directory): what a refusal must not change."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*")) if not p.is_symlink() and not p.is_fifo()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def test_force_never_deletes_a_source_inside_the_destination(llama: torch.nn.Module, tmp_path: Path) -> None:
    models = tmp_path / "m"
    models.mkdir()
    write_gguf(llama, models / "model.gguf")
    (models / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    for src, dst, relation in ((models / "model.gguf", models, "contains"), (models, models / "out", "lies inside"),
                               (models / "model.gguf", models / "model.gguf", "is")):
        with pytest.raises(OutputError, match=f"{dst} {relation} {src}, which this command reads or writes too"):
            convert(src, dst, force=True)
    assert snapshot(tmp_path) == before


def test_finetune_refuses_overlapping_paths_before_any_work(checkpoint: Path, tmp_path: Path) -> None:
    data = text_file(tmp_path / "text.txt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before_checkpoint, before = snapshot(checkpoint), snapshot(tmp_path)
    cases = [
        (dict(out=checkpoint), rf"--out {checkpoint} is {checkpoint}"),
        (dict(out=tmp_path / "out", run_dir=checkpoint), rf"--run-dir {checkpoint} is {checkpoint}"),
        (dict(out=tmp_path / "out", run_dir=tmp_path / "out" / "run"), r"--out .*out contains .*out/run"),
        (dict(out=tmp_path), r"--out .* contains .*text.txt"),
        (dict(out=tmp_path / "out", run_dir=mine), r"--run-dir .*mine already exists and was not written by ladder"),
        (dict(out=mine), r"--out .*mine already exists and was not written by ladder"),
    ]
    for paths, message in cases:
        started = time.perf_counter()
        with pytest.raises(FinetuneError, match=message):
            finetune(Settings(checkpoint, [data], seq_len=32, steps=1, force=True, progress=False, **paths))
        assert time.perf_counter() - started < 5, "refused only after doing work"
    assert snapshot(checkpoint) == before_checkpoint
    assert snapshot(tmp_path) == before


def test_side_files_must_be_regular_files_inside_the_source(hf_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    src = copy_of(hf_dir, tmp_path / "src")
    (src / "tokenizer_config.json").symlink_to(secret)
    dst = tmp_path / "dst"
    with pytest.raises(ConversionError, match=rf"{src}/tokenizer_config.json is a link to {secret}, outside {src}"):
        convert(src, dst)
    (src / "tokenizer_config.json").unlink()
    os.mkfifo(src / "chat_template.jinja")  # reading it would block forever
    with pytest.raises(ConversionError, match=r"chat_template.jinja is not a regular file"):
        convert(src, dst)
    assert not dst.exists() and not list(tmp_path.glob(".dst.partial-*"))
    # A link that stays inside the directory is an ordinary file.
    (src / "chat_template.jinja").unlink()
    (src / "real.json").write_text("{}")
    (src / "tokenizer_config.json").symlink_to("real.json")
    convert(src, dst)
    assert (dst / "tokenizer_config.json").read_text() == "{}"


def test_tokenizer_and_finetune_refuse_a_link_out_of_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    copy = copy_of(checkpoint, tmp_path / "ckpt")
    (tmp_path / "elsewhere.json").write_text("{}")
    (copy / "tokenizer_config.json").unlink()
    (copy / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UnsafeFileError, match=r"tokenizer_config.json is a link to .*elsewhere.json"):
        Tokenizer(copy)
    data = text_file(tmp_path / "text.txt")
    with pytest.raises(FinetuneError, match=r"tokenizer_config.json is a link to .*elsewhere.json"):
        finetune(Settings(copy, [data], tmp_path / "out", seq_len=32, steps=1, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "elsewhere.json", "text.txt"]


def test_resume_refuses_changed_base_weights(tmp_path: Path) -> None:
    base = tiny_checkpoint(tmp_path / "base")
    data = text_file(tmp_path / "text.txt")
    settings = dict(seq_len=32, batch_size=2, steps=2, checkpoint_every=1, progress=False, threads=1)
    finetune(Settings(base, [data], tmp_path / "out", **settings))
    shutil.rmtree(tmp_path / "out")  # as if killed before the end: the run directory remains
    run_dir = tmp_path / "out.run"
    before = snapshot(run_dir)
    rewrite_weights(base, lambda tensors: tensors["model.norm.weight"].mul_(1.5))
    with pytest.raises(FinetuneError, match=rf"--resume: the weights of {base} changed since the run in {run_dir}"):
        finetune(Settings(base, [data], tmp_path / "out", **settings, resume=True))
    assert snapshot(run_dir) == before
    assert not (tmp_path / "out").exists()


def test_stale_partial_directories_of_dead_jobs_are_removed(hf_dir: Path, tmp_path: Path) -> None:
    dead = _dead_pid()
    host = socket.gethostname()
    stale, live, foreign = (tmp_path / f".dst.partial-{host}-{pid}-abc" for pid in (dead, os.getpid(), "x"))
    for partial in (stale, live):
        partial.mkdir()
        (partial / MARKER).write_text("")
    foreign.mkdir()  # not ours (no marker): never touched
    convert(hf_dir, tmp_path / "dst")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert (tmp_path / "dst" / MARKER).exists()


def test_a_rank_whose_launcher_died_commits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(_dead_pid()))  # this process's parent is not that launcher
    with (pytest.raises(OutputError, match="the launcher of this job has died; nothing is committed"),
          CheckpointWriter(tmp_path / "dst") as writer):
        writer.add_tensor("w", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_a_report_file_is_replaced_whole_and_only_by_a_live_job(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "answer.json"
    report.write_text("old")
    write_report(report, "new")
    assert report.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["answer.json"]
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(_dead_pid()))
    with pytest.raises(OutputError, match="the launcher of this job has died"):
        write_report(report, "from an orphan")
    assert report.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["answer.json"]


@pytest.mark.parametrize(("command", "sig"), [("finetune", signal.SIGKILL), ("finetune", signal.SIGTERM),
                                              ("generate", signal.SIGKILL), ("generate", signal.SIGTERM)])
def test_killing_the_launcher_of_a_tp2_job_leaves_no_rank_and_no_output(
        checkpoint: Path, tmp_path: Path, command: str, sig: signal.Signals) -> None:
    out = tmp_path / "out"
    if command == "finetune":
        data = text_file(tmp_path / "text.txt")
        args = ["finetune", str(checkpoint), "--data", str(data), "--out", str(out), "--tp", "2", "--steps", "400",
                "--seq-len", "32", "--batch-size", "2", "--no-progress", "--threads", "1", "--checkpoint-every", "1"]
    else:
        args = ["generate", str(checkpoint), "--prompt", "It was", "--tp", "2", "--max-new-tokens", "64",
                "--json-out", str(tmp_path / "answer.json"), "--threads", "1"]
    job = subprocess.Popen([sys.executable, "-m", "ladder", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    ranks = _wait_for_ranks(job, 2)
    if command == "finetune":  # kill it while it trains: its ranks would write OUT within seconds
        _wait_for(lambda: (tmp_path / "out.run" / "checkpoints").exists(), job)
    job.send_signal(sig)
    _, err = job.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while alive := [pid for pid in ranks if _running(pid)]:
        assert time.monotonic() < deadline, f"ranks {alive} outlived their launcher"
        time.sleep(0.1)
    if sig == signal.SIGTERM:
        assert job.returncode == 130
        assert err.strip().splitlines()[-1] == (f"ladder {command}: stopped by a signal; every rank has ended and "
                                                "nothing half-written was left")
        assert "Traceback" not in err
    time.sleep(1)
    assert not out.exists() and not (tmp_path / "answer.json").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


# --- helpers ----------------------------------------------------------------------------------------


def copy_of(directory: Path, to: Path) -> Path:
    shutil.copytree(directory, to)
    return to


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_for(condition: Callable[[], object], job: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_ALLOWANCE_S
    while not condition():
        assert job.poll() is None, f"the job ended early: {job.communicate()}"
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.05)


def _wait_for_ranks(job: subprocess.Popen, world: int) -> list[int]:
    def ranks() -> list[int]:
        return [c for c in _children(job.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    _wait_for(lambda: len(ranks()) == world, job)
    return ranks()
