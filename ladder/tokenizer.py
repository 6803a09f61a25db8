"""The checkpoint's own tokenizer (`tokenizer.json`) and chat template (`tokenizer_config.json`)."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
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
        self.path = path = Path(path)
        file = side_file(path, "tokenizer.json")
        if file is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json (pass token ids instead of text)")
        try:
            self.inner = _Tokenizer.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a bare Exception on a malformed file
            raise ValueError(f"{file}: not a tokenizer the tokenizers library reads ({exc})") from None
        config_file = side_file(path, "tokenizer_config.json")
        self.config: dict[str, Any] = _json_object(config_file) if config_file else {}
        self.chat_template = _default_template(self.config.get("chat_template"), config_file)

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def token_id(self, key: str) -> int | None:
        text = self._special(key)
        return None if text is None else self.inner.token_to_id(text)

    def stop_tokens(self, eos_token_ids: list[int]) -> list[int]:
        """The ids that end a generation: the config's end-of-text ids and the tokenizer's eos token."""
        eos = self.token_id("eos_token")
        return sorted(set(eos_token_ids) | ({eos} if eos is not None else set()))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as the template found in the checkpoint spells it, rendered in a sandbox
        under a time and a size limit: the template came with a download and may loop or grow forever."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template; pass a plain prompt")
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        try:
            template = env.from_string(self.chat_template)
            pieces = template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                       bos_token=self._special("bos_token") or "",
                                       eos_token=self._special("eos_token") or "")
            with _time_limit(TEMPLATE_SECONDS):
                out, size = [], 0
                for piece in pieces:
                    size += len(piece)
                    if size > TEMPLATE_CHARS:
                        raise TemplateLimitError(f"renders more than {TEMPLATE_CHARS} characters")
                    out.append(piece)
        except (jinja2.TemplateError, TemplateLimitError) as exc:
            raise ValueError(f"{self.path}: the chat template cannot be rendered: {exc}") from None
        return "".join(out)


# A chat template renders a few messages into a prompt: these bounds are far above any real one's.
TEMPLATE_SECONDS = 2.0
TEMPLATE_CHARS = 4 * 2**20
MAX_EXPONENT = 1024


class TemplateLimitError(Exception):
    """A chat template went past its time or size limit."""


class _BoundedSandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """The sandbox, with `*`, `**` and `+` refused where one step would make a huge value (a template
    such as {{ 'x' * 10**10 }} would allocate gigabytes before any other limit is looked at)."""

    intercepted_binops = frozenset(["*", "**", "+"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if _too_large(operator, left, right):
            raise TemplateLimitError(f"{operator!r} would make a value beyond the template's limits")
        return super().call_binop(context, operator, left, right)


def _too_large(operator: str, left: Any, right: Any) -> bool:
    sequences = (str, list, tuple)
    if operator == "**":
        return isinstance(right, int) and right > MAX_EXPONENT
    if operator == "*":
        return any(isinstance(seq, sequences) and isinstance(n, int) and len(seq) * n > TEMPLATE_CHARS
                   for seq, n in ((left, right), (right, left)))
    return isinstance(left, sequences) and isinstance(right, sequences) and len(left) + len(right) > TEMPLATE_CHARS


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TemplateLimitError in this (main) thread after `seconds`; elsewhere no limit can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TemplateLimitError(f"takes longer than {seconds:g} s to render")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _json_object(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return raw


def _default_template(template: Any, file: Path | None) -> str | None:
    """The chat template: a string, or the one named "default" in Hugging Face's list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{file}: chat_template must be a template string (or a list holding one named "
                         "'default')")
    return template


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
