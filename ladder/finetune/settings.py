"""What defines a fine-tuning run, and the command-line flags generated from it.

Every field of `Settings` is one flag (`seq_len` -> `--seq-len`), with its help text in the field's
metadata, so a new setting is one line here and the command line follows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ladder.checkpoint import content_fingerprint
from ladder.comm import DEFAULT_TIMEOUT_S, TRANSPORTS
from ladder.config import is_integer, is_real, shown
from ladder.data import fingerprint
from ladder.lora import PROJECTIONS, LoRAConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
CONTENT = "checkpoint_content"  # the identity's fingerprint of the base checkpoint's weights


class FinetuneError(ValueError):
    """A fine-tuning run that cannot start (or resume); nothing has been written when it is raised."""


# The least value of each integer setting, and the rule each real-valued one must meet.
INTEGER_SETTINGS = {"seq_len": 1, "batch_size": 1, "grad_accum": 1, "steps": 1, "warmup_steps": 0, "seed": 0,
                    "lora_rank": 0, "tp": 1, "dp": 1, "eval_every": 0, "checkpoint_every": 0, "threads": 1}
REAL_SETTINGS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "epochs": ("> 0", lambda v: v > 0),
    "lr": ("> 0", lambda v: v > 0),
    "min_lr_ratio": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "max_grad_norm": (">= 0 (0: no clipping)", lambda v: v >= 0),
    "val_fraction": ("in [0, 1)", lambda v: 0 <= v < 1),
    "lora_alpha": ("> 0", lambda v: v > 0),
    "lora_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "timeout": ("> 0 (seconds)", lambda v: v > 0),
    "distill_temperature": ("> 0", lambda v: v > 0),
    "distill_weight": ("in [0, 1]", lambda v: 0 <= v <= 1),
}
OPTIONAL_SETTINGS = ("steps", "threads", "max_grad_norm")  # None: chosen by the run


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def setting(default: Any, help: str, **flag: Any) -> Any:
    """A field of `Settings` with the help text (and any extra argparse options) of its flag."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass
class Settings:
    """Everything a fine-tuning run needs."""

    checkpoint: Path = setting(None, "Ladder (or Hugging Face Llama) checkpoint directory", positional=True)
    data: list[Path] = setting(None, "text files, or JSONL with a text field", required=True)
    out: Path = setting(None, "where the fine-tuned Ladder checkpoint goes", required=True)
    run_dir: Path | None = setting(None, "metrics and resumable checkpoints (default: OUT.run)")
    ladder_layers: str | None = setting(None, "first turn these layers into ladder layers: upper-half, all, none, "
                                        "16-29, 1,5,7 (default: the checkpoint's own schedules)")
    seq_len: int = setting(256, "tokens per training sequence")
    batch_size: int = setting(8, "sequences per micro-batch on each data-parallel replica")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    steps: int | None = setting(None, "optimizer steps (default: --epochs over the training split)")
    epochs: float = setting(1.0, "passes over the training split (when --steps is not given)")
    lr: float = setting(1e-4, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "final LR / peak LR (cosine)")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay, on matrices only (never norms or biases)")
    max_grad_norm: float | None = setting(1.0, "clip threshold of the whole model's gradient norm (0: off)")
    dtype: str = setting("float32", "bfloat16: autocast compute with float32 master weights",
                         choices=COMPUTE_DTYPES)
    seed: int = setting(0, "seed of the data order, adapters and dropout")
    val_fraction: float = setting(0.1, "held-out tail of the tokens")
    text_field: str = setting("text", "the JSONL field holding the text")
    lora_rank: int = setting(0, "LoRA rank (0: full fine-tuning)")
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / rank)")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input")
    lora_targets: tuple[str, ...] = setting(PROJECTIONS, "comma-separated projections to adapt")
    only_ladder_layers: bool = setting(False, "train only the ladder layers")
    distill: bool = setting(False, "learn the next-token distributions of the same weights under the standard "
                            "schedule (a frozen teacher computed on the fly) instead of only the text's tokens")
    distill_temperature: float = setting(1.0, "softmax temperature of both distributions in the distillation")
    distill_weight: float = setting(1.0, "with --distill: the distillation's share of the loss, the rest being "
                                    "the language-model loss")
    tp: int = setting(1, "tensor-parallel ranks per replica")
    dp: int = setting(1, "data-parallel replicas (ignored under torchrun)")
    eval_every: int = setting(0, "validation every N steps (0: at the end only)")
    checkpoint_every: int = setting(0, "resumable checkpoint every N steps (0: none)")
    resume: bool = setting(False, "continue the run in --run-dir exactly")
    force: bool = setting(False, "replace an --out and run directory that ladder wrote before")
    progress: bool = setting(True, "progress bar")
    threads: int | None = setting(None, "torch threads per rank (default: cores / ranks)")
    pin: bool = setting(False, "pin each rank to its own cores")
    comm: str | None = setting(None, "how ranks exchange data (auto, shm, gloo)", choices=TRANSPORTS)
    timeout: float = setting(DEFAULT_TIMEOUT_S, "seconds before a dead or missing rank makes the others fail")

    # Fields that do not change what the run computes: a resumed run may change them.
    PRESENTATION: typing.ClassVar[tuple[str, ...]] = (
        "out", "run_dir", "eval_every", "checkpoint_every", "resume", "force", "progress", "threads", "pin",
        "comm", "timeout")

    def __post_init__(self) -> None:
        if self.checkpoint is None or self.data is None or self.out is None:
            raise FinetuneError("a run needs a checkpoint, data and an output directory")
        self.checkpoint, self.out = Path(self.checkpoint), Path(self.out)
        self.data = [Path(p) for p in ([self.data] if isinstance(self.data, (str, Path)) else self.data)]
        self.run_dir = Path(self.run_dir) if self.run_dir else self.out.with_name(self.out.name + ".run")
        self.lora_targets = tuple(self.lora_targets)
        self.validate()
        self.max_grad_norm = self.max_grad_norm or None

    def validate(self) -> None:
        """Refuse any setting out of its range, before a run directory exists (so a corrected retry
        starts clean): a NaN or infinite rate, a negative decay or clip norm would train garbage."""
        for name, least in INTEGER_SETTINGS.items():
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL_SETTINGS) and not (is_integer(value) and value >= least):
                raise FinetuneError(f"{_flag(name)} must be an integer >= {least}, got {shown(value)}")
        for name, (rule, holds) in REAL_SETTINGS.items():
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL_SETTINGS) and not (is_real(value) and holds(value)):
                raise FinetuneError(f"{_flag(name)} must be a finite number {rule}, got {shown(value)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise FinetuneError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {shown(self.dtype)}")
        if self.lora_rank:
            try:
                LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)
            except ValueError as exc:
                raise FinetuneError(str(exc)) from None

    @property
    def lora(self) -> LoRAConfig | None:
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, self.lora_targets)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.dp

    def identity(self) -> dict[str, Any]:
        """What defines the computation; a resumed run must match it field for field."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.PRESENTATION}
        out["checkpoint"] = str(self.checkpoint.resolve())
        out["checkpoint_config"] = json.loads((self.checkpoint / "config.json").read_text())
        out[CONTENT] = content_fingerprint(self.checkpoint)
        out["data"] = fingerprint(self.data)
        out["lora_targets"] = list(self.lora_targets)
        return json.loads(json.dumps(out, default=str))


# --- the command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of `Settings`, its kind read from the field's type."""
    hints = typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        options = dict(f.metadata)
        kind = hints[f.name]
        if options.pop("positional", False):
            parser.add_argument(f.name, type=Path, help=options["help"])
            continue
        flag = _flag(f.name)
        if kind is bool:
            if f.default:  # on by default: the flag turns it off
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    help="no " + options["help"])
            else:
                parser.add_argument(flag, action="store_true", **options)
        elif kind == list[Path]:
            parser.add_argument(flag, type=Path, nargs="+", **options)
        elif kind == tuple[str, ...]:
            parser.add_argument(flag, type=_comma_list, default=f.default, **options)
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=base, default=f.default, **options)


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
