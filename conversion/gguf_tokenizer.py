"""A `tokenizer.json` and `tokenizer_config.json` rebuilt from a GGUF file's tokenizer metadata.

llama.cpp stores either a byte-level BPE tokenizer (`tokenizer.ggml.model` = "gpt2": vocabulary,
merges, token types, special token ids) or a SentencePiece one ("llama": pieces with scores and
byte-fallback tokens). For byte-level BPE it also names the pre-tokenizer (`tokenizer.ggml.pre`) whose
regular expressions split text before the merges apply. Each name maps here to the `tokenizers`
pre-tokenizer that splits text the same way as llama.cpp's regexes for it:
- "gpt2" and kin: GPT-2's regex.
- "smollm", "starcoder" and kin: every digit on its own (llama.cpp's first regex `\\p{N}`), then GPT-2's
  regex, i.e. the `Digits(individual_digits)` + `ByteLevel` pair of the original tokenizers.
- "llama-bpe" (Llama 3) and "qwen2" and kin: their own single regex, then the byte-level mapping.
Control tokens (type 3) become special added tokens and user-defined ones (type 4) plain added
tokens, so text such as `<|im_start|>` in a chat template maps to its id, as llama.cpp does.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from .source import ConversionError

CONTROL, USER_DEFINED = 3, 4
GPT2_PRE = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe"), LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), QWEN2_SPLIT),
}
# SentencePiece pieces are short (its trainer's default limit is 16 characters); bounding them keeps
# finding each piece's merges linear in the vocabulary's size.
MAX_PIECE_CHARS = 256
SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the spelling byte-level BPE vocabularies use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def pre_tokenizer(name: str, source: str) -> pre_tokenizers.PreTokenizer:
    if name in GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PRE[name]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = ", ".join(sorted([*GPT2_PRE, *DIGITS_THEN_GPT2_PRE, *SPLIT_PRE]))
    raise ConversionError(f"{source}: tokenizer.ggml.pre {name!r} is not a pre-tokenizer this converter knows "
                          f"(known: {known})")


def byte_level_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], source: str) -> Tokenizer:
    """llama.cpp's "gpt2" model: byte-level BPE with the file's merges and named pre-tokenizer."""
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A vocabulary entry outside the byte alphabet (a mislabelled raw string) is respelled byte by byte.
    vocab = {token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode()): index
             for index, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"), source)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True)
                                  if kind == CONTROL and set(t) <= alphabet])
    return tokenizer


def sentencepiece_bpe(meta: dict[str, Any], tokens: list[str], types: list[int], source: str) -> Tokenizer:
    """llama.cpp's "llama" model (Llama 1/2 SentencePiece): pieces merge best score first, bytes fall back.

    The merges are the pairs of pieces that form another piece, ranked by that piece's score, which
    is how SentencePiece's BPE picks what to merge.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ConversionError(f"{source}: a SentencePiece vocabulary needs one tokenizer.ggml.scores entry per token")
    longest = max(tokens, key=len, default="")
    if len(longest) > MAX_PIECE_CHARS:  # each piece's splits cost its length squared
        raise ConversionError(f"{source}: SentencePiece piece {tokens.index(longest)} is {len(longest)} characters "
                              f"long; pieces longer than {MAX_PIECE_CHARS} are refused")
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[(left, right) for left, right, _ in merges],
                              fuse_unk=True, byte_fallback=True))
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                       split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           *([decoders.Strip(" ", 1, 0)] if prefix else [])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types, strict=True) if kind == CONTROL])
    return tokenizer


MODELS = {"gpt2": byte_level_bpe, "llama": sentencepiece_bpe}
ADD_BOS_BY_DEFAULT = {"llama"}  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise


def build_tokenizer(meta: dict[str, Any], source: str) -> dict[str, str]:
    """`tokenizer.json` and `tokenizer_config.json` contents from the `tokenizer.*` metadata of a GGUF file."""
    model = meta.get("tokenizer.ggml.model")
    if model not in MODELS:
        raise ConversionError(f"{source}: tokenizer.ggml.model {model!r} is not supported (supported: "
                              f"{', '.join(MODELS)}); convert the Hugging Face checkpoint instead")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConversionError(f"{source}: {len(tokens)} tokens but {len(types)} token types")
    tokenizer = MODELS[model](meta, tokens, types, source)
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types, strict=True) if kind == USER_DEFINED and t in vocab])

    ids = {key: meta[f"tokenizer.ggml.{field}"] for key, field in SPECIAL_TOKEN_KEYS.items()
           if f"tokenizer.ggml.{field}" in meta}
    for key, index in ids.items():
        if not isinstance(index, int) or not 0 <= index < len(tokens):
            raise ConversionError(f"{source}: tokenizer.ggml.{SPECIAL_TOKEN_KEYS[key]} {index!r} is outside the "
                                  f"vocabulary of {len(tokens)} tokens")
    special = {key: tokens[index] for key, index in ids.items()}
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model in ADD_BOS_BY_DEFAULT))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token"))
    bos = ["bos_token"] if add_bos and "bos_token" in ids else []
    eos = ["eos_token"] if add_eos and "eos_token" in ids else []
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join([*(special[k] for k in bos), "$A", *(special[k] for k in eos)]),
        special_tokens=[(special[key], ids[key]) for key in bos + eos])
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
                              "add_bos_token": add_bos, "add_eos_token": add_eos,
                              "clean_up_tokenization_spaces": False}
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tokenizer.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}
