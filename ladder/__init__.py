"""Ladder-Residual transformers: tensor-parallel Llama inference that hides communication."""

from ladder.checkpoint import CheckpointError, from_pretrained
from ladder.config import ConfigError, LadderConfig, Schedule
from ladder.distributed import CommunicationError, LaunchError, Placement, launch
from ladder.generate import Generation, Sampling, generate
from ladder.model import CacheError, LadderForCausalLM, random_full_state_dict
from ladder.sharding import ShardingError, ShardPlan

__all__ = [
    "CacheError",
    "CheckpointError",
    "CommunicationError",
    "ConfigError",
    "Generation",
    "LadderConfig",
    "LadderForCausalLM",
    "LaunchError",
    "Placement",
    "Sampling",
    "Schedule",
    "ShardPlan",
    "ShardingError",
    "from_pretrained",
    "generate",
    "launch",
    "random_full_state_dict",
]
