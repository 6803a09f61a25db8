"""Small random Llama checkpoints in the three source formats, laid out the way their own tools write them.

Every source starts from one random transformers `LlamaForCausalLM`; the Meta and GGUF writers put
q and k back into interleaved rotary order, as Meta's checkpoints and llama.cpp store them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED_TOKENS = ["<think>"]  # llama.cpp matches these whole in text, but they are not special
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "o n", "e r", "a n", "Ġ w", "o r", "1 2"]


def byte_level_vocabulary() -> list[str]:
    """Control tokens, the 256 byte characters of GPT-2's alphabet, one token per merge, user-defined tokens."""
    from ladder_conversion.gguf_tokenizer import byte_alphabet

    return [*CONTROL_TOKENS, *byte_alphabet().values(), *(m.replace(" ", "") for m in MERGES), *USER_DEFINED_TOKENS]


VOCAB_SIZE = len(byte_level_vocabulary())
# A Llama 1/2 style SentencePiece vocabulary: specials, byte-fallback tokens, pieces by falling score.
PIECES = ["▁", "t", "h", "e", "a", "n", "i", "o", "w", "r", "l", "d", "▁t", "he", "▁the", "▁a", "an", "in",
          "▁w", "or", "ld", "▁wor", "▁world", "nd", "▁and"]
SENTENCEPIECE_TOKENS = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *PIECES]
SENTENCEPIECE_TYPES = [2, 3, 3, *[6] * 256, *[1] * len(PIECES)]  # unknown, control, byte, normal
SENTENCEPIECE_SCORES = [0.0] * (3 + 256) + [-float(i) for i in range(len(PIECES))]


def random_llama(seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """A 3-layer GQA Llama with weights large enough (std 0.1) that its logits vary a lot."""
    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
        initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms away from 1 so that a lost norm weight shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def write_hf(model: LlamaForCausalLM, path: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def interleaved_rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotate-half rows back to interleaved pairs (what Meta and llama.cpp store)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


META_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0), "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0), "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0), "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}


def meta_state_dict(model: LlamaForCausalLM) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Meta name -> (whole tensor in Meta's layout, model-parallel split dim)."""
    cfg = model.config
    out: dict[str, tuple[torch.Tensor, int | None]] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.clone()
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = (tensor, 0)
        elif name == "model.norm.weight":
            out["norm.weight"] = (tensor, None)
        elif name == "lm_head.weight":
            out["output.weight"] = (tensor, 0)
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            meta, dim = META_NAMES[rest]
            if rest == "self_attn.q_proj.weight":
                tensor = interleaved_rotary_order(tensor, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                tensor = interleaved_rotary_order(tensor, cfg.num_key_value_heads)
            out[f"layers.{layer}.{meta}"] = (tensor, dim)
    return out


def write_meta(model: LlamaForCausalLM, path: Path, shards: int = 2, embedding_dim: int = 0) -> Path:
    """params.json + consolidated.NN.pth split over `shards` model-parallel ranks.

    `embedding_dim` 0 splits the embedding by vocabulary rows (Llama 3), 1 by hidden columns (Llama 1/2).
    """
    cfg = model.config
    path.mkdir(parents=True)
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": cfg.vocab_size, "multiple_of": 32,
              "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"]}
    if cfg.rope_parameters.get("rope_type") == "llama3":  # Meta states only the flag and the factor
        params.update(use_scaled_rope=True, rope_scaling_factor=cfg.rope_parameters["factor"])
    (path / "params.json").write_text(json.dumps(params))
    whole = meta_state_dict(model)
    for rank in range(shards):
        shard = {}
        for name, (tensor, dim) in whole.items():
            if name == "tok_embeddings.weight":
                dim = embedding_dim
            shard[name] = tensor if dim is None else tensor.tensor_split(shards, dim=dim)[rank].clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
    return path


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_tensor_name(name: str) -> str:
    if name.startswith("model.layers."):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def llama3_rope_divisors(head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs: the divisor of each rotary frequency."""
    freqs = 1.0 / scaling["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    context, low, high = (scaling[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                "high_freq_factor"))
    wavelength = 2 * np.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    divisors = np.where(wavelength < context / high, 1.0,
                        np.where(wavelength > context / low, scaling["factor"],
                                 1 / ((1 - smooth) / scaling["factor"] + smooth)))
    return divisors.astype(np.float32)


def write_gguf(model: LlamaForCausalLM, path: Path, quantization: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               arch: str = "llama", pre: str = "gpt2", sentencepiece: bool = False,
               raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> Path:
    """A llama.cpp-style GGUF: metadata, a tokenizer, 2-D weights in `quantization`, norms F32.

    The tokenizer is byte-level BPE (with pre-tokenizer `pre`), or SentencePiece with `sentencepiece`.
    `raw` stores the named GGUF tensors as the given bytes of the given type instead.
    """
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if sentencepiece:
        writer.add_tokenizer_model("llama")
        writer.add_token_list(SENTENCEPIECE_TOKENS)
        writer.add_token_types(SENTENCEPIECE_TYPES)
        writer.add_token_scores(SENTENCEPIECE_SCORES)
        writer.add_unk_token_id(0)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        tokens = byte_level_vocabulary()
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in CONTROL_TOKENS else 4 if t in USER_DEFINED_TOKENS else 1 for t in tokens])
        writer.add_token_merges(MERGES)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    raw = raw or {}
    scaling = cfg.rope_parameters
    if scaling.get("rope_type") == "llama3":  # llama.cpp stores Llama 3.1's rescaling as a tensor
        writer.add_tensor("rope_freqs.weight", llama3_rope_divisors(cfg.hidden_size // cfg.num_attention_heads, scaling))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for a tied head
        if name.endswith("q_proj.weight"):
            tensor = interleaved_rotary_order(tensor, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = interleaved_rotary_order(tensor, cfg.num_key_value_heads)
        values = tensor.float().numpy()
        if gguf_tensor_name(name) in raw:
            data, kind = raw[gguf_tensor_name(name)]
            writer.add_tensor(gguf_tensor_name(name), data, raw_dtype=kind)
        elif values.ndim == 1 or quantization == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_tensor_name(name), values)
        else:
            writer.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(values, quantization),
                              raw_dtype=quantization)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- shared by the conversion test modules -----------------------------------------------------------

IDS = torch.tensor([[5, 77, 100, 3, 250, 260, 8, 9, 42, 199, 7, 31]])
TEXTS = ["the 12 then <|im_start|>in", "Hello world, où est 2024?\n\n  tabs\tand spaces  ", "a<think>b"]


def logits_of(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids)
    return getattr(out, "logits", out)


def assert_close_logits(ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> None:
    assert reference.abs().max() > 0.5, "the reference logits are too flat to tell models apart"
    assert (ours - reference).abs().max().item() <= tol


def assert_nothing_written(dst: Path) -> None:
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.partial-*")), "a temporary directory was left behind"


def rewrite_weights(src: Path, change) -> None:
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def rewrite_config(src: Path, **fields) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(fields)
    (src / "config.json").write_text(json.dumps(config))
