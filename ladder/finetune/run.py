"""A fine-tuning run from start to end: check the inputs, prepare the data, train on every rank, save.

`finetune(Settings(...))` runs on this process at one rank, spawns tp x dp local ranks, or, under
torchrun, is one of them. Everything that can be refused is refused by `prepare`, before any rank
starts and before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ladder import comm
from ladder.checkpoint import CheckpointError, from_pretrained, load_config, save_pretrained, weight_map
from ladder.config import ConfigError, LadderConfig, Schedule
from ladder.data import (
    DataError,
    PackedSequences,
    SampleOrder,
    TokenSplit,
    read_documents,
    split_stream,
    token_stream,
)
from ladder.finetune.rundir import (
    MetricsLog,
    check_outputs,
    load_training_state,
    open_run_dir,
    save_training_state,
)
from ladder.finetune.settings import FinetuneError, Settings
from ladder.finetune.trainer import Trainer, evaluate, prepare_model
from ladder.launcher import Placement, run, under_torchrun
from ladder.lora import merge_adapters
from ladder.outputs import UnsafeFileError, side_file
from ladder.sharding import ShardingError, ShardPlan
from ladder.tokenizer import TOKENIZER_FILES, Tokenizer

# Seeds of different replicas' dropout lie this far apart, so that no two runs' replicas share one.
REPLICA_SEED_STRIDE = 1009


@dataclass
class PreparedRun:
    """What every rank needs, checked once before any rank starts."""

    settings: Settings
    schedules: list[Schedule] | None
    data: TokenSplit
    total_steps: int
    resume_from: Path | None = None


def check_checkpoint(path: Path) -> LadderConfig:
    """The checkpoint's config, or a clear error if `path` is not a Ladder (Hugging Face Llama) checkpoint."""
    problem = None
    if not path.is_dir():
        problem = "no such directory" if not path.exists() else "a file, not a checkpoint directory"
    else:
        try:
            config = load_config(path)
            weight_map(path)
        except (ConfigError, CheckpointError) as exc:
            problem = str(exc)
    if problem:
        raise FinetuneError(f"{path} is not a Ladder checkpoint (a directory with config.json and safetensors "
                            f"weights; convert other formats with `ladder convert`): {problem}")
    try:  # read now, and copied into --out at the end: refused now rather than after training
        side_files = {name: side_file(path, name) for name in TOKENIZER_FILES}
    except UnsafeFileError as exc:
        raise FinetuneError(str(exc)) from None
    if side_files["tokenizer.json"] is None:
        raise FinetuneError(f"{path}: no tokenizer.json, which fine-tuning needs to tokenize the data")
    return config


def trained_schedules(settings: Settings, config: LadderConfig) -> list[Schedule] | None:
    """The schedules `--ladder-layers` asks for (None: keep the checkpoint's)."""
    if settings.ladder_layers is None:
        return None
    try:
        return config.with_ladder_layers(settings.ladder_layers).schedules
    except ConfigError as exc:
        raise FinetuneError(str(exc)) from None


def load_data(settings: Settings, config: LadderConfig) -> TokenSplit:
    """The data files tokenized with the checkpoint's tokenizer and split into training and validation."""
    tokenizer = Tokenizer(settings.checkpoint)
    separator = tokenizer.token_id("eos_token")
    if separator is None and config.eos_token_ids:
        separator = config.eos_token_ids[0]
    if separator is None:
        raise FinetuneError(f"{settings.checkpoint}: neither tokenizer_config.json nor config.json names an "
                            "end-of-text token to separate documents")
    try:
        documents = read_documents(settings.data, settings.text_field)
        stream = token_stream(documents, tokenizer.encode, separator)
        return split_stream(stream, settings.seq_len, settings.val_fraction, ", ".join(map(str, settings.data)))
    except DataError as exc:
        raise FinetuneError(str(exc)) from None


def validation_loss(settings: Settings) -> float:
    """The mean float32 token loss of `settings.checkpoint` (under `settings.ladder_layers` if given)
    on the validation split that fine-tuning with these settings holds out; one rank, no training."""
    config = check_checkpoint(settings.checkpoint)
    data = load_data(settings, config)
    model = from_pretrained(settings.checkpoint, rank=0, world=1, schedules=trained_schedules(settings, config))
    return evaluate(model, PackedSequences(data.val, settings.seq_len, keep_tail=True), settings.batch_size)


def prepare(settings: Settings) -> PreparedRun:
    """Check everything and set up the run directory; raises before writing anything if a check fails."""
    check_outputs(settings)
    prepared = read_inputs(settings)
    prepared.resume_from = open_run_dir(settings)
    return prepared


def read_inputs(settings: Settings) -> PreparedRun:
    """The checked checkpoint and settings, the tokenized data and the step count; writes nothing."""
    config = check_checkpoint(settings.checkpoint)
    schedules = trained_schedules(settings, config)
    try:
        ShardPlan(config, 0, settings.tp)
    except ShardingError as exc:
        raise FinetuneError(str(exc)) from None
    if settings.only_ladder_layers and Schedule.LADDER not in (schedules or config.schedules):
        raise FinetuneError("--only-ladder-layers: the model has no ladder layers (choose some with --ladder-layers)")
    data = load_data(settings, config)
    steps = settings.steps or math.ceil(settings.epochs * ((len(data.train) - 1) // settings.seq_len)
                                        / settings.sequences_per_step)
    return PreparedRun(settings, schedules, data, max(1, steps))


def train_on_rank(prepared: PreparedRun) -> dict[str, Any]:
    settings = prepared.settings
    comm.init_layout(settings.tp)
    leader = comm.global_rank() == 0
    # Dropout draws alike on a replica's tensor-parallel ranks and differently across replicas.
    torch.manual_seed(settings.seed * REPLICA_SEED_STRIDE + comm.data_parallel_rank())
    model = from_pretrained(settings.checkpoint, dtype=torch.float32, schedules=prepared.schedules)
    prepare_model(model, settings)
    trainer = Trainer(model, settings, prepared.total_steps)
    train = PackedSequences(prepared.data.train, settings.seq_len)
    val = PackedSequences(prepared.data.val, settings.seq_len, keep_tail=True) if len(prepared.data.val) > 1 else None
    start = 0 if prepared.resume_from is None else load_training_state(prepared.resume_from, trainer)
    order = SampleOrder(len(train), settings.seed)
    tokens_per_step = settings.sequences_per_step * settings.seq_len
    metrics = MetricsLog(settings.run_dir / "metrics.jsonl", leader)
    bar = tqdm(total=prepared.total_steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not (leader and settings.progress))

    def validate(step: int) -> float | None:
        if val is None:
            return None
        loss = evaluate(model, val, settings.batch_size)
        metrics.write({"step": step, "val_loss": loss, "val_ppl": math.exp(loss)})
        if leader and settings.progress:
            bar.write(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(loss):.3f}")
        return loss

    if start == 0 and settings.eval_every:
        validate(0)
    train_seconds = 0.0  # optimizer steps only: evaluation and checkpoints are not counted
    result: dict[str, float] = {}
    for step in range(start + 1, prepared.total_steps + 1):
        first = (step - 1) * settings.sequences_per_step
        micro = []
        for a in range(settings.grad_accum):
            offset = first + (a * settings.dp + comm.data_parallel_rank()) * settings.batch_size
            micro.append(train.batch(order.indices(offset, settings.batch_size)))
        began = time.perf_counter()
        result = trainer.step(micro)
        train_seconds += time.perf_counter() - began
        speed = (step - start) * tokens_per_step / train_seconds
        metrics.write({"step": step, **result, "tokens": step * tokens_per_step, "tokens_per_second": speed})
        bar.set_postfix(loss=f"{result['loss']:.4f}", tok_s=f"{speed:.0f}", refresh=False)
        bar.update()
        if settings.eval_every and step % settings.eval_every == 0 and step < prepared.total_steps:
            validate(step)
        if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < prepared.total_steps:
            save_training_state(settings.run_dir, step, trainer,
                                {"tp": settings.tp, "dp": settings.dp, "data_position": step * settings.sequences_per_step})
    bar.close()
    val_loss = validate(prepared.total_steps)
    merge_adapters(model)
    if comm.data_parallel_rank() == 0:
        save_pretrained(model, settings.out, tokenizer_from=settings.checkpoint, force=settings.force)
    metrics.close()
    return {"steps": prepared.total_steps, "resumed_from_step": start, "train_seconds": train_seconds,
            "train_tokens": (prepared.total_steps - start) * tokens_per_step, "final_loss": result.get("loss"),
            "val_loss": val_loss, "val_ppl": None if val_loss is None else math.exp(val_loss),
            "teacher_copied_bytes": 0 if trainer.teacher is None else trainer.teacher.copied_bytes,
            "out": str(settings.out)}


def finetune(settings: Settings) -> dict[str, Any] | None:
    """Run (or resume) a fine-tuning on tp x dp ranks; rank 0's summary (steps, tokens, seconds, final
    validation loss and perplexity), None on torchrun's other ranks."""
    placement = Placement(pin=settings.pin, threads=settings.threads, transport=settings.comm)
    if under_torchrun():
        return run(_prepare_and_train, 0, settings, placement=placement, timeout_s=settings.timeout)[0]
    prepared = prepare(settings)
    return run(train_on_rank, settings.tp * settings.dp, prepared, placement=placement,
               timeout_s=settings.timeout)[0]


def _prepare_and_train(settings: Settings) -> dict[str, Any] | None:
    """Under torchrun: rank 0 alone checks and sets up the run directory; the others take its verdict
    (as JSON: nothing from a peer is unpickled) and read the same inputs."""
    world = comm.global_world_size()
    if world % settings.tp:
        raise FinetuneError(f"--tp {settings.tp} does not divide torchrun's world of {world} ranks")
    settings = dataclasses.replace(settings, dp=world // settings.tp)
    verdict: dict[str, str | None] = {"error": None, "resume_from": None}
    if comm.global_rank() == 0:
        try:
            prepared = prepare(settings)
            verdict["resume_from"] = None if prepared.resume_from is None else str(prepared.resume_from)
        except FinetuneError as exc:
            verdict["error"] = str(exc)
    verdict = comm.broadcast_json(verdict)
    if verdict["error"] is not None:
        raise FinetuneError(verdict["error"])
    if comm.global_rank() != 0:
        prepared = read_inputs(settings)
        prepared.resume_from = None if verdict["resume_from"] is None else Path(verdict["resume_from"])
    summary = train_on_rank(prepared)
    return summary if comm.global_rank() == 0 else None
