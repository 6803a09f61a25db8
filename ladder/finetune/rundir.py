"""The run directory: what defines the run, its metrics, and the checkpoints a killed run resumes from.

    RUN_DIR/run.json                    the run's identity (settings, checkpoint config and content, data)
    RUN_DIR/metrics.jsonl               one JSON record per step and per validation
    RUN_DIR/checkpoints/step-N/         rank-R.pt per rank and state.json, renamed into place when whole
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ladder import comm
from ladder.finetune.settings import CONTENT, FinetuneError, Settings
from ladder.finetune.trainer import Trainer
from ladder.outputs import OutputError, check_output, commit_output, refuse_overlaps, start_output


def check_outputs(settings: Settings) -> None:
    """Refuse, before any work, outputs that overlap the inputs or each other, or may not be replaced
    (`ladder.outputs`): --out and the run directory apart from the checkpoint, the data and each other."""
    inputs = [settings.checkpoint, *settings.data]
    try:
        check_output(settings.out, [*inputs, settings.run_dir], settings.force, "--out")
        if settings.resume:
            refuse_overlaps(settings.run_dir, [*inputs, settings.out], "--run-dir")
        elif settings.run_dir.exists() and not settings.force:
            raise FinetuneError(f"{settings.run_dir} already holds a run; pass --resume to continue it or --force "
                                "to start over")
        else:
            check_output(settings.run_dir, [*inputs, settings.out], settings.force, "--run-dir")
    except OutputError as exc:
        raise FinetuneError(str(exc)) from None


def open_run_dir(settings: Settings) -> Path | None:
    """Start a fresh run directory, or check that `--resume` continues the very same run.

    Returns the newest complete checkpoint to resume from (None: start from step 0). Raises
    before writing anything when the directory holds another run or the base checkpoint changed.
    """
    run_dir, identity = settings.run_dir, settings.identity()
    if settings.resume:
        if not (run_dir / "run.json").exists():
            raise FinetuneError(f"--resume: {run_dir} holds no run to resume (no run.json)")
        saved = json.loads((run_dir / "run.json").read_text())
        if saved.get(CONTENT) != identity[CONTENT]:
            raise FinetuneError(f"--resume: the weights of {settings.checkpoint} changed since the run in {run_dir} "
                                "started (their fingerprint differs); resuming would continue training made for "
                                "other weights. Restore that checkpoint, or start over with --force")
        changed = differences(saved, identity)
        if changed:
            raise FinetuneError(f"--resume: this run differs from the one in {run_dir}: " + "; ".join(changed))
        resume_from = latest_checkpoint(run_dir)
        keep_metrics(run_dir / "metrics.jsonl", 0 if resume_from is None else checkpoint_step(resume_from))
        return resume_from
    staging = start_output(run_dir)
    (staging / "run.json").write_text(json.dumps(identity, indent=2))
    (staging / "metrics.jsonl").write_text("")
    commit_output(staging, run_dir, settings.force)
    return None


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def keep_metrics(path: Path, last_step: int) -> None:
    """Drop the records a killed run logged after its last checkpoint (and any torn last line)."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", math.inf) <= last_step:
            kept.append(line + "\n")
    path.write_text("".join(kept))


class MetricsLog:
    """Appends one JSON line per record (rank 0 only), flushed so a killed run keeps what it logged."""

    def __init__(self, path: Path, active: bool) -> None:
        self.file = open(path, "a") if active else None  # noqa: SIM115 - lives as long as the run

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


# --- resumable checkpoints ------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "state.json").read_text())["step"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (a partial one never got its final name)."""
    done = sorted(p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def save_training_state(run_dir: Path, step: int, trainer: Trainer, meta: dict[str, Any]) -> None:
    """Every rank writes its file into a temporary directory that rank 0 renames when all are done."""
    final = checkpoint_dir(run_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    if comm.global_rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    comm.barrier()
    file = partial / f"rank-{comm.global_rank()}.pt"
    torch.save(trainer.state(), file)
    with open(file, "rb") as f:
        os.fsync(f.fileno())
    comm.barrier()
    if comm.global_rank() == 0:
        (partial / "state.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        partial.rename(final)
        for old in (run_dir / "checkpoints").glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)


def load_training_state(checkpoint: Path, trainer: Trainer) -> int:
    """Restore this rank's trainer from `checkpoint`; returns the step it was taken after."""
    state = torch.load(checkpoint / f"rank-{comm.global_rank()}.pt", weights_only=True)
    trainer.load_state(state, checkpoint)
    return checkpoint_step(checkpoint)
