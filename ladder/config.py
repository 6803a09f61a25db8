"""Model configuration: the Hugging Face Llama fields plus the residual schedule of every layer.

A Ladder checkpoint keeps Hugging Face's `config.json` and adds `ladder_layers` (the reference
implementation's field: an integer N for the last N layers, or a list of layer indices) and, for the
baselines that are neither standard nor ladder, `residual_schedules` (one name per layer).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class Schedule(enum.StrEnum):
    """How a layer's sub-blocks join the residual stream (`ladder/residual.py` has the equations)."""

    STANDARD = "standard"
    LADDER = "ladder"
    PARALLEL = "parallel"
    UPPER_BOUND = "upper-bound"


class ConfigError(ValueError):
    """A configuration that cannot describe a valid model; the message names the field."""


# The weight dtypes a checkpoint may be written in or loaded as, by their command-line names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# Sane bounds on what a config.json may claim, checked before anything is built from it: the largest
# released Llama has 126 layers, and no tensor dimension reaches 2**31.
MAX_LAYERS = 4096
MAX_DIMENSION = 2**31 - 1
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")
BOOL_FIELDS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
SHOWN_CHARS = 60


def shown(value: Any) -> str:
    """`repr(value)`, cut short: an error message never echoes a huge input whole."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def is_integer(value: Any) -> bool:
    """An int that is not a bool (JSON's true/false must not pass for 1/0)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_size(name: str, value: Any, maximum: int = MAX_DIMENSION) -> None:
    if not is_integer(value) or not 0 < value <= maximum:
        raise ConfigError(f"{name} must be an integer in 1..{maximum}, got {shown(value)}")


@dataclass
class LadderConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    schedules: list[Schedule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._check_field_types()  # before anything is derived or allocated from the fields
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads} and no head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not self.schedules:
            self.schedules = [Schedule.STANDARD] * self.num_hidden_layers
        self.schedules = [Schedule(s) for s in self.schedules]
        self.validate()

    def _check_field_types(self) -> None:
        """Every field has its type and a sane range: a boolean is a boolean, a size a bounded integer."""
        for name in SIZE_FIELDS:
            value = getattr(self, name)
            if value is not None or name not in ("num_key_value_heads", "head_dim"):
                check_size(name, value, MAX_LAYERS if name == "num_hidden_layers" else MAX_DIMENSION)
        for name in BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {shown(getattr(self, name))}")
        if not is_real(self.rms_norm_eps) or not 0 < self.rms_norm_eps < 1:
            raise ConfigError(f"rms_norm_eps must be a number in (0, 1), got {shown(self.rms_norm_eps)}")
        if not is_real(self.rope_theta) or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be a positive finite number, got {shown(self.rope_theta)}")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not is_integer(getattr(self, name)):
                raise ConfigError(f"{name} must be an integer token id, got {shown(getattr(self, name))}")
        eos = self.eos_token_id
        if eos is not None and not (is_integer(eos) or (isinstance(eos, list) and all(map(is_integer, eos)))):
            raise ConfigError(f"eos_token_id must be a token id or a list of them, got {shown(eos)}")
        outside = [t for t in self.eos_token_ids if not 0 <= t < self.vocab_size]
        if outside:
            raise ConfigError(f"eos_token_id {shown(outside)} is outside the vocabulary of {self.vocab_size}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)

    def validate(self) -> None:
        """The relations between fields, once each field alone has passed `_check_field_types`."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if len(self.schedules) != self.num_hidden_layers:
            raise ConfigError(
                f"{len(self.schedules)} residual schedules given for {self.num_hidden_layers} layers"
            )

    @property
    def ladder_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.schedules) if s is Schedule.LADDER]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def with_schedules(self, schedules: list[Schedule | str]) -> LadderConfig:
        return dataclasses.replace(self, schedules=[Schedule(s) for s in schedules])

    def with_ladder_layers(self, spec: int | str | list[int] | None) -> LadderConfig:
        """These layers ladder, the others standard (`spec` as `parse_layer_selection` reads it)."""
        return self.with_schedules(schedules_from_fields(self.num_hidden_layers, spec, None))

    def all_standard(self) -> LadderConfig:
        """The same model with every layer standard: the function its weights were trained for."""
        return self.with_schedules([Schedule.STANDARD] * self.num_hidden_layers)

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> LadderConfig:
        """Read a Hugging Face (or reference Ladder) Llama config, in any of its rope spellings."""
        known = {f.name for f in dataclasses.fields(cls)} - {"schedules"}
        kwargs = {k: raw[k] for k in known if k in raw and raw[k] is not None}
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act {shown(act)} is not supported (Llama uses 'silu')")
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):  # newer transformers fold theta and scaling into one dict
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = kwargs.get("rope_scaling")
        if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
            kwargs["rope_scaling"] = None
        try:
            # The layer count bounds everything built from the layer fields, so it is checked first.
            check_size("num_hidden_layers", raw["num_hidden_layers"], MAX_LAYERS)
            kwargs["schedules"] = schedules_from_fields(
                raw["num_hidden_layers"], raw.get("ladder_layers"), raw.get("residual_schedules")
            )
            return cls(**kwargs)
        except (ConfigError, ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> LadderConfig:
        return cls.from_dict(read_json_object(Path(path), "the model's configuration"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A config.json that Hugging Face reads; non-standard layers mark it as `llamaLadder`."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        for f in dataclasses.fields(self):
            if f.name != "schedules":
                out[f.name] = getattr(self, f.name)
        if any(s is not Schedule.STANDARD for s in self.schedules):
            out["model_type"] = "llamaLadder"
            out["architectures"] = ["LlamaLadderForCausalLM"]
            out["ladder_layers"] = self.ladder_layers
            if any(s not in (Schedule.STANDARD, Schedule.LADDER) for s in self.schedules):
                out["residual_schedules"] = [s.value for s in self.schedules]
        return out


def read_json_object(file: Path, what: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A JSON object from `file`; `error` names the file and what it should have held."""
    try:
        raw = json.loads(file.read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{file}: no such file ({what})") from None
    except OSError as exc:
        raise error(f"{file}: cannot be read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise error(f"{file}: expected a JSON object ({what})")
    return raw


def check_rope_scaling(scaling: Any) -> None:
    """A rope_scaling mapping of a supported type, with finite values that give finite frequencies."""
    if not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be a mapping (or null), got {shown(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("llama3", "default"):
        raise ConfigError(f"rope_scaling type {shown(kind)} is not supported (only 'llama3' and 'default')")
    if kind == "default":
        return
    missing = [k for k in LLAMA3_ROPE_KEYS if k not in scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type llama3 lacks {', '.join(missing)}")
    bad = [k for k in LLAMA3_ROPE_KEYS if not is_real(scaling[k]) or scaling[k] <= 0]
    if bad:
        raise ConfigError(f"rope_scaling {bad[0]} must be a positive finite number, got {shown(scaling[bad[0]])}")
    if scaling["factor"] < 1 or scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("rope_scaling needs factor >= 1 and high_freq_factor > low_freq_factor, got "
                          f"{scaling['factor']}, {scaling['low_freq_factor']} and {scaling['high_freq_factor']}")


def schedules_from_fields(
    n_layers: int, ladder_layers: int | list[int] | None, residual_schedules: list[str] | None
) -> list[Schedule]:
    """Per-layer schedules from `residual_schedules`, else from `ladder_layers` (int = the last N)."""
    if residual_schedules is not None:
        if not isinstance(residual_schedules, list) or len(residual_schedules) != n_layers:
            raise ConfigError(f"residual_schedules must list one schedule for each of {n_layers} layers, "
                              f"got {shown(residual_schedules)}")
        try:
            return [Schedule(s) for s in residual_schedules]
        except ValueError as exc:
            names = ", ".join(s.value for s in Schedule)
            raise ConfigError(f"residual_schedules: {shown(exc.args[0])} (known: {names})") from None
    chosen = set(parse_layer_selection(ladder_layers, n_layers))
    return [Schedule.LADDER if i in chosen else Schedule.STANDARD for i in range(n_layers)]


def parse_layer_selection(spec: int | str | list[int] | None, n_layers: int) -> list[int]:
    """Layer indices from `none`, `all`, `upper-half`, a range `16-31`, `1,5,7`, an int N (last N) or a list.

    Every index and range end is checked against `n_layers` before any list is built, so the work
    and memory are bounded by the number of layers whatever the selection claims.
    """
    if spec is None:
        return []
    if isinstance(spec, bool) or not isinstance(spec, (int, str, list)):
        raise ConfigError(f"ladder_layers must be an integer or a list of layer indices, got {shown(spec)}")
    if isinstance(spec, int):
        if not 0 <= spec <= n_layers:
            raise ConfigError(f"ladder_layers {shown(spec)} is outside 0..{n_layers}")
        return list(range(n_layers - spec, n_layers))
    if isinstance(spec, list):
        spans = [(i, i) for i in spec]
    else:
        text = spec.strip().lower()
        if text in ("", "none"):
            return []
        if text == "all":
            return list(range(n_layers))
        if text == "upper-half":
            return list(range(n_layers // 2, n_layers))
        spans = [_span(part, spec) for part in text.split(",")]
    bad = [lo if lo == hi else f"{lo}-{hi}" for lo, hi in spans
           if not (is_integer(lo) and is_integer(hi) and 0 <= lo <= hi < n_layers)]
    if bad:
        raise ConfigError(f"layer indices {shown(bad)} are outside 0..{n_layers - 1}")
    # +1 where a span starts, -1 after it ends: a running sum > 0 marks a chosen layer, so the work
    # is the number of spans plus the number of layers, however the spans overlap.
    starts_minus_ends = [0] * (n_layers + 1)
    for lo, hi in spans:
        starts_minus_ends[lo] += 1
        starts_minus_ends[hi + 1] -= 1
    chosen, depth = [], 0
    for i in range(n_layers):
        depth += starts_minus_ends[i]
        if depth:
            chosen.append(i)
    return chosen


def _span(part: str, spec: str) -> tuple[int, int]:
    """`16-31` -> (16, 31), `7` -> (7, 7); checked against the layer count by the caller."""
    lo, sep, hi = part.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (int(lo), int(lo))
    except ValueError:
        raise ConfigError(f"layer selection {shown(spec)}: expected none, all, upper-half, a range like 16-31 "
                          "or a list like 1,5,7") from None
