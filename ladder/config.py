"""Model configuration: the Hugging Face Llama fields plus the residual schedule of every layer.

A Ladder checkpoint keeps Hugging Face's `config.json` and adds `ladder_layers` (the reference
implementation's field: an integer N for the last N layers, or a list of layer indices) and, for the
baselines that are neither standard nor ladder, `residual_schedules` (one name per layer).
"""

from __future__ import annotations

import dataclasses
import enum
import json
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
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # A non-positive head count is left for validate() to name, rather than dividing by it here.
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
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

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
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
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported (only 'llama3' and 'default')")
            missing = [k for k in LLAMA3_ROPE_KEYS if kind == "llama3" and k not in self.rope_scaling]
            if missing:
                raise ConfigError(f"rope_scaling of type llama3 lacks {', '.join(missing)}")

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
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (Llama uses 'silu')")
        rope = raw.get("rope_parameters")
        if isinstance(rope, dict):  # newer transformers fold theta and scaling into one dict
            kwargs.setdefault("rope_theta", rope.get("rope_theta", cls.rope_theta))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = kwargs.get("rope_scaling")
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            kwargs["rope_scaling"] = None
        n_layers = raw["num_hidden_layers"]
        try:
            kwargs["schedules"] = schedules_from_fields(
                n_layers, raw.get("ladder_layers"), raw.get("residual_schedules")
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


def schedules_from_fields(
    n_layers: int, ladder_layers: int | list[int] | None, residual_schedules: list[str] | None
) -> list[Schedule]:
    """Per-layer schedules from `residual_schedules`, else from `ladder_layers` (int = the last N)."""
    if residual_schedules is not None:
        if len(residual_schedules) != n_layers:
            raise ConfigError(f"residual_schedules has {len(residual_schedules)} entries for {n_layers} layers")
        try:
            return [Schedule(s) for s in residual_schedules]
        except ValueError as exc:
            names = ", ".join(s.value for s in Schedule)
            raise ConfigError(f"residual_schedules: {exc} (known: {names})") from None
    chosen = set(parse_layer_selection(ladder_layers, n_layers))
    return [Schedule.LADDER if i in chosen else Schedule.STANDARD for i in range(n_layers)]


def parse_layer_selection(spec: int | str | list[int] | None, n_layers: int) -> list[int]:
    """Layer indices from `none`, `all`, `upper-half`, a range `16-31`, `1,5,7`, an int N (last N) or a list."""
    if spec is None:
        return []
    if isinstance(spec, bool):
        raise ConfigError(f"ladder_layers must be an integer or a list of layer indices, got {spec!r}")
    if isinstance(spec, int):
        if not 0 <= spec <= n_layers:
            raise ConfigError(f"ladder_layers {spec} is outside 0..{n_layers}")
        return list(range(n_layers - spec, n_layers))
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("", "none"):
            return []
        if text == "all":
            return list(range(n_layers))
        if text == "upper-half":
            return list(range(n_layers // 2, n_layers))
        indices: list[int] = []
        for part in text.split(","):
            lo, sep, hi = part.partition("-")
            try:
                indices.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
            except ValueError:
                raise ConfigError(
                    f"layer selection {spec!r}: expected none, all, upper-half, a range like 16-31 "
                    "or a list like 1,5,7"
                ) from None
        spec = indices
    indices = sorted(set(spec))
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"layer indices {bad} are outside 0..{n_layers - 1}")
    return indices
