"""A Llama-style decoder whose layers each follow their own residual schedule.

The model holds one rank's shard (the whole model at TP=1, with no process group needed) and returns
that rank's slice of the vocabulary logits. Tensor names follow Hugging Face's `LlamaForCausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ladder import comm
from ladder.config import LadderConfig
from ladder.layers import DecoderLayer, KVCache, StepContext, input_major, rope_inverse_frequencies
from ladder.residual import residual_stream
from ladder.sharding import ShardPlan, even_range
from ladder.vocab import VocabParallelEmbedding


class CacheError(ValueError):
    """A prompt or generation that does not fit the KV cache."""


class LadderModel(nn.Module):
    def __init__(self, config: LadderConfig, plan: ShardPlan) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config, plan)
        self.layers = nn.ModuleList(DecoderLayer(config, plan, s) for s in config.schedules)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, ids: torch.Tensor, step: StepContext) -> torch.Tensor:
        return self.norm(residual_stream(self.embed_tokens(ids), self.layers, step))


class LadderForCausalLM(nn.Module):
    """Embed, decoder layers under their schedules, final norm, vocab-parallel LM head.

    `rank`/`world` default to the current process group (rank 0 of 1 without one).
    """

    def __init__(self, config: LadderConfig, rank: int | None = None, world: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.plan = ShardPlan(config, comm.tp_rank() if rank is None else rank,
                              comm.tp_size() if world is None else world)
        self.model = LadderModel(config, self.plan)
        self.lm_head = nn.Linear(config.hidden_size, len(self.plan.vocab), bias=False)
        self.tie_weights()
        for module in self.modules():
            if isinstance(module, nn.Linear):  # a tied head lays out the embedding too
                module.weight.data = input_major(module.weight.data)
        self.inv_freq = rope_inverse_frequencies(config)  # fp32 whatever the weights' dtype
        self.cache_length = 0

    # --- weights --------------------------------------------------------------------------------

    @classmethod
    def empty(cls, config: LadderConfig, rank: int, world: int) -> LadderForCausalLM:
        """This rank's model with no weights allocated yet (on the meta device), to `adopt` a shard."""
        with torch.device("meta"):
            return cls(config, rank, world)

    def adopt(self, shard: dict[str, torch.Tensor]) -> LadderForCausalLM:
        """Take exactly the tensors of `shard` (this rank's parts, `ShardPlan.tensors` names, except the
        projections already built in a low-bit format) as the weights, without copying, and re-tie the head."""
        state = self.state_dict(keep_vars=True)  # a low-bit projection's weight is no longer meta (or named so)
        wanted = {name for name in self.plan.tensors if name in state and state[name].is_meta}
        if set(shard) != wanted:
            missing, extra = sorted(wanted - set(shard)), sorted(set(shard) - wanted)
            raise ValueError(f"rank {self.plan.rank}: shard lacks {missing[:5]} and has extra {extra[:5]}")
        self.load_state_dict(shard, strict=False, assign=True)
        self.tie_weights()
        return self.eval()

    def tie_weights(self) -> None:
        """A tied LM head is the embedding's very parameter (the checkpoint stores it once)."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):  # not a low-bit copy
            self.lm_head.weight = self.model.embed_tokens.weight

    def load_full_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Load this rank's shard out of a whole-model Hugging Face state dict."""
        self.load_state_dict({name: self.plan.shard(name, full[name]) for name in self.plan.tensors}, strict=False)

    # --- inference ----------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the residual stream, rotary tables and KV cache: the embedding's (projections
        in a low-bit format convert their input and output)."""
        return self.model.embed_tokens.weight.dtype

    def setup_cache(self, batch: int, length: int, dtype: torch.dtype | None = None) -> None:
        """Preallocate the KV cache for `batch` sequences of up to `length` tokens."""
        dtype = dtype or self.compute_dtype
        if length > self.config.max_position_embeddings:
            raise CacheError(f"cache length {length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.cache = KVCache(batch, attn.n_kv_heads, length, attn.head_dim, dtype)
        self.cache_length = length

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.cache_length = 0

    def step_context(self, tokens: int, batch: int, slot: int | None,
                     padding: torch.Tensor | None) -> StepContext:
        """Rotary tables and attention mask for `tokens` new tokens, shared by every layer.

        `padding[b]` is how many left-padding slots sequence b has: its positions start after them
        and no query attends to them.
        """
        start = slot or 0
        if slot is not None and start + tokens > self.cache_length:
            raise CacheError(f"{start + tokens} tokens do not fit the KV cache of {self.cache_length}; "
                             "call setup_cache with a larger length")
        slots = torch.arange(start, start + tokens)
        positions = slots.expand(batch, tokens)
        if padding is not None:
            positions = (positions - padding[:, None]).clamp(min=0)
        angles = (positions[..., None].float() * self.inv_freq).unsqueeze(1)
        dtype = self.compute_dtype
        mask = None
        if padding is not None or (tokens > 1 and start > 0):
            keys = torch.arange(start + tokens)
            mask = keys <= slots[:, None]
            if padding is not None:
                # Padding queries attend to themselves only, so their rows stay finite.
                mask = (mask & (keys >= padding[:, None, None])) | (keys == slots[:, None])
            mask = mask.expand(batch, tokens, start + tokens).unsqueeze(1)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        return StepContext(torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1), mask, slot)

    def forward(self, ids: torch.Tensor, slot: int | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's vocabulary slice of the logits, [batch, tokens, len(plan.vocab)].

        Without `slot` the tokens are a whole sequence and no cache is used (training, scoring);
        with it they are written to the KV cache from `slot` on (prefill, decode).
        """
        step = self.step_context(ids.shape[1], ids.shape[0], slot, padding)
        hidden = comm.copy_to_parallel(self.model(ids, step))
        return self.lm_head(hidden).float()

    def gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's vocabulary slices joined into full logits (for checks, not the decode path)."""
        if self.plan.world == 1:
            return local
        vocab, world = self.config.vocab_size, self.plan.world
        parts = comm.all_gather(F.pad(local, (0, self.plan.widest_vocab - local.shape[-1])))
        return torch.cat([parts[r, ..., :len(even_range(vocab, world, r))] for r in range(world)], dim=-1)


def random_full_state_dict(config: LadderConfig, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random whole-model weights in Hugging Face naming, identical whatever the TP size."""
    generator = torch.Generator().manual_seed(seed)
    full = {}
    for name, shape in ShardPlan(config).full_shapes().items():
        if name.endswith("norm.weight"):
            full[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            full[name] = std * torch.randn(shape, generator=generator)
    if config.tie_word_embeddings:  # as Hugging Face state dicts hold it
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    return full
