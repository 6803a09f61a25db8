"""Ladder-Residual transformers: tensor-parallel Llama inference that hides communication."""

from ladder.checkpoint import CheckpointError, from_pretrained, save_pretrained
from ladder.comm import CommunicationError
from ladder.config import ConfigError, LadderConfig, Schedule
from ladder.generate import Generation, Sampling, generate
from ladder.launcher import LaunchError, Placement, launch
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
    "save_pretrained",
]
