"""The checkpoint's own tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2.sandbox
from tokenizers import Tokenizer as _Tokenizer

from ladder.outputs import side_file

# The files beside the weights that describe the tokenizer and the generation defaults: a
# checkpoint written from another carries them over as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = side_file(path, "tokenizer.json")
        if file is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json (pass token ids instead of text)")
        self.inner = _Tokenizer.from_file(str(file))
        config_file = side_file(path, "tokenizer_config.json")
        self.config: dict[str, Any] = json.loads(config_file.read_text()) if config_file else {}
        self.chat_template: str | None = self.config.get("chat_template")

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def token_id(self, key: str) -> int | None:
        text = self._special(key)
        return None if text is None else self.inner.token_to_id(text)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template; pass a plain prompt")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self._special("bos_token") or "", eos_token=self._special("eos_token") or "")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, holding back incomplete UTF-8."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.printed = text[self.printed:], len(text)
        return piece
