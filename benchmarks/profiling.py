"""Where a batch-1 decode step's time goes besides the matrix products: torch.profiler, by op category.

Every operator that Python called directly (not one inside another operator) is put in a category
by its name (matrix products, SDPA) or by the function of the model that called it, read from the
profiler's Python call tree: norms, rotary embedding, the rotary tables and mask built once per step,
the KV-cache write, the SwiGLU activation, the rest of attention (reshapes, the kv-head index),
residual adds, the low-bit projections' casts, the embedding, sampling and the generation loop, the
collectives' operators. The step's own time comes from an unprofiled run right before (the Python
tracer slows Python down several times, not the operators), and what the operators and the
blocked time leave of it is Python and dispatch.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from types import ModuleType

import torch

from ladder import layers, model, residual, vocab
from ladder.model import LadderForCausalLM

from .workload import Workload, ladder_runner, make_prompts, timed_run

MATMUL_OPS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
              "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu"}
# The function of the model that called an operator -> its category (the innermost one known wins).
BY_FUNCTION = {
    "rotate": "rotary",
    "LadderForCausalLM.step_context": "rotary_tables_and_mask",
    "KVCache.update": "kv_cache_write",
    "MLP.forward": "activation",
    "Attention.forward": "attention",
    "VocabParallelEmbedding.forward": "embedding",
}
# ... or else the module it was called from.
BY_MODULE = {importlib.import_module("ladder.generate"): "sampling_and_loop",  # `ladder.generate` is the function
             residual: "residual_adds"}
CATEGORIES = ("matmul", "attention", "norms", "rotary", "rotary_tables_and_mask", "kv_cache_write", "activation",
              "residual_adds", "embedding", "low_bit_casts", "sampling_and_loop", "collective_calls", "other_ops",
              "blocked_in_wait", "python_and_dispatch", "wall")


PACKAGE = "ladder/"


def _within_package(frame: str) -> str:
    """A profiler frame name from the package on: the tracer writes 'ladder/layers.py(65): rotate' for a
    file under a `sys.path` entry and the absolute path for one an editable install finds."""
    start = frame.rfind(PACKAGE)
    return frame[start:] if start >= 0 else frame


def _functions(module: ModuleType) -> Iterator[tuple[str, object]]:
    """Every function defined in `module`, and every method of its classes, with its qualified name."""
    for value in vars(module).values():
        if inspect.isclass(value) and value.__module__ == module.__name__:
            for member in vars(value).values():
                if inspect.isfunction(member):
                    yield member.__qualname__, member
        elif inspect.isfunction(value) and value.__module__ == module.__name__:
            yield value.__qualname__, inspect.unwrap(value)


def _frame_name(module: ModuleType, function: object) -> str:
    """How `_within_package` names a profiler frame of a call of `function`: 'ladder/file.py(first line): name'."""
    code = function.__code__  # type: ignore[attr-defined]
    return f"{module.__name__.replace('.', '/')}.py({code.co_firstlineno}): {code.co_name}"


def _frame_categories() -> dict[str, str]:
    """Profiler frame name -> category, for the model's functions that `BY_FUNCTION`/`BY_MODULE` name."""
    frames = {}
    for module in (layers, model, vocab, *BY_MODULE):
        for qualname, function in _functions(module):
            category = BY_FUNCTION.get(qualname) or BY_MODULE.get(module)
            if category:
                frames[_frame_name(module, function)] = category
    return frames


def categorize(op: str, callers: list[str], frames: dict[str, str]) -> str:
    """The category of operator `op` called from the Python frames `callers` (innermost first, named as
    `_within_package` names them)."""
    if op in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in op:
        return "attention"
    if op == "aten::rms_norm" or any("normalization.py" in c for c in callers[:1]):
        return "norms"
    if op.startswith(("c10d::", "gloo:")) or any(c.startswith(f"{PACKAGE}comm/") for c in callers):
        return "collective_calls"
    for caller in callers:
        if caller in frames:
            return frames[caller]
        if caller.startswith(f"{PACKAGE}quant.py"):
            return "low_bit_casts"
    return "other_ops"


def _python_callers(event: torch.autograd.profiler_util.FunctionEvent) -> list[str]:
    callers = []
    parent = event.cpu_parent
    while parent is not None:
        if parent.is_python_function:
            callers.append(_within_package(parent.name))
        parent = parent.cpu_parent
    return callers


def _is_top_operator(event: torch.autograd.profiler_util.FunctionEvent) -> bool:
    """An operator that no other operator called (its own time includes the ones it called)."""
    if event.is_python_function:
        return False
    parent = event.cpu_parent
    while parent is not None and parent.is_python_function:
        parent = parent.cpu_parent
    return parent is None


def profile_decode(model: LadderForCausalLM, workload: Workload, vocab_size: int) -> dict[str, float]:
    """ms per batch-1 decode step by category (`CATEGORIES`), on this rank."""
    from torch.profiler import ProfilerActivity, profile

    steps = max(workload.new_tokens, 8)
    prompts = make_prompts(1, workload.prompt_tokens, vocab_size)
    runner = ladder_runner(model)
    unprofiled = timed_run(runner, prompts, steps)
    profiler = profile(activities=[ProfilerActivity.CPU], with_stack=True)
    tokens = 0

    def on_token() -> None:
        nonlocal tokens
        tokens += 1
        if tokens == 1:  # decode steps only: the prefill is done
            profiler.start()

    try:
        runner(prompts, steps, on_token)
    finally:
        profiler.stop()
    frames = _frame_categories()
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for event in profiler.events():
        if _is_top_operator(event):
            seconds[categorize(event.name, _python_callers(event), frames)] += event.cpu_time_total / 1e6
    decode_steps = steps - 1
    per_step = {kind: 1e3 * s / decode_steps for kind, s in seconds.items()}
    per_step["wall"] = 1e3 * unprofiled.decode_s_per_token
    per_step["blocked_in_wait"] = 1e3 * unprofiled.blocked_s_per_token
    operators = sum(per_step[kind] for kind in CATEGORIES[:-3])
    per_step["python_and_dispatch"] = per_step["wall"] - per_step["blocked_in_wait"] - operators
    return per_step
