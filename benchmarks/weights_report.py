"""The weight formats' part of the report: decode speed per format next to llama.cpp's, accuracy
against fp32, and the profile of a decode step, as markdown tables and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ladder.quant import WEIGHT_FORMATS

from .llamacpp import KINDS as LLAMA_CPP_KINDS
from .llamacpp import NAME as LLAMA_CPP
from .llamacpp import variant as llama_cpp_variant
from .profiling import CATEGORIES
from .session import HF_BASELINE
from .text import fmt, save_figure, table
from .workload import REFERENCE_WEIGHTS, variant_name

# The accuracy targets of issue 10: the largest perplexity increase over fp32 each format may have.
PERPLEXITY_TOLERANCE = {"bf16": 0.005, "fp16": 0.005, "int8": 0.01, "int4": 0.005}


def formats_measured(sessions: list[dict[str, Any]]) -> list[str]:
    """The weight formats any of `sessions` measured, in `WEIGHT_FORMATS` order (fp32 first)."""
    present = {name.partition(":")[2] or REFERENCE_WEIGHTS for s in sessions for name in s["variants"]
               if not name.startswith(f"{LLAMA_CPP}:")}
    return sorted(present, key=lambda w: WEIGHT_FORMATS.index(w) if w in WEIGHT_FORMATS else len(WEIGHT_FORMATS))


def _ms(variants: dict[str, Any], name: str) -> str:
    return fmt(variants[name]["decode_ms"].get(1)) if name in variants else "-"


def weights_table(sessions: list[dict[str, Any]]) -> list[str]:
    """Batch-1 decode ms/token of each format (standard schedule; ladder too at TP>1) per session,
    with llama.cpp's files and transformers where they ran."""
    formats = formats_measured(sessions)
    kinds = [k for k in LLAMA_CPP_KINDS if any(llama_cpp_variant(k) in s["variants"] for s in sessions)]
    if formats == [REFERENCE_WEIGHTS] and not kinds:
        return []
    header = ["TP", "transport", *(f"{w} standard (ladder)" for w in formats),
              *(f"llama.cpp {k}" for k in kinds), "transformers fp32"]
    rows = []
    for s in sessions:
        v = s["variants"]
        cells = [_ms(v, variant_name("standard", w)) + (f" ({_ms(v, variant_name('ladder', w))})" if s["tp"] > 1 else "")
                 for w in formats]
        rows.append([str(s["tp"]), s.get("transport") or "-", *cells,
                     *(_ms(v, llama_cpp_variant(k)) for k in kinds), _ms(v, HF_BASELINE)])
    return ["Batch-1 decode ms/token per weight format (standard schedule; in brackets the ladder at TP>1), "
            "llama.cpp on the same GGUF with the same threads (TP=1 only), same run, interleaved:", "",
            *table(header, rows), ""]


def accuracy_table(accuracy: dict[str, Any]) -> list[str]:
    lines = ["## Accuracy of the weight formats", ""]
    if "rows" not in accuracy:
        return [*lines, f"Skipped: {accuracy.get('skipped', 'not run')}", ""]
    rows = []
    for weights, row in accuracy["rows"].items():
        tolerance = PERPLEXITY_TOLERANCE.get(weights)
        change = row["perplexity_vs_fp32"]
        rows.append([weights, f"{row['loss']:.4f}", f"{row['perplexity']:.3f}",
                     "-" if change is None or weights == REFERENCE_WEIGHTS else f"{change:+.2%}",
                     f"<= +{tolerance:.1%}" if tolerance is not None else "-",
                     row["answer"].replace("|", "\\|").replace("\n", " ")])
    return [*lines, f"Held-out perplexity on the last 10% of Botchan ({accuracy['held_out_tokens']} tokens, "
            f"sequences of {accuracy['seq_len']}, `{accuracy['data']}`), and the greedy chat answer to "
            f"\"{accuracy['question']}\"; checkpoint `{accuracy['checkpoint']}`, int4 groups of "
            f"{accuracy['group_size']}.", "",
            *table(["weights", "loss", "perplexity", "vs fp32", "target", "greedy answer"], rows), ""]


def profile_table(label: str, profiles: list[dict[str, dict[str, float]]]) -> list[str]:
    """Per category (rows), ms per batch-1 decode step of each profiled variant on each rank (columns)."""
    columns = [(rank, name) for rank, profile in enumerate(profiles) for name in profile]
    if not columns:
        return []
    prefix = len(profiles) > 1
    header = ["ms per decode step", *(f"{'rank ' + str(r) + ' ' if prefix else ''}{n}" for r, n in columns)]
    rows = [[kind, *(fmt(profiles[r][n].get(kind), 2) for r, n in columns)] for kind in CATEGORIES]
    return [f"Where a batch-1 decode step's time goes at {label} (torch.profiler with Python stacks; each "
            "operator Python called is put in a category by its name or the model function that called it; "
            "`wall` and `blocked_in_wait` are from an unprofiled run just before, and python_and_dispatch is what "
            "the operators and the blocked time leave of it (negative when the profiler's per-operator overhead "
            "exceeds it); shm's collectives are no profiler operators, so their CPU time lands there too):", "",
            *table(header, rows), ""]


def weights_plot(sessions: list[dict[str, Any]], out: Path) -> Path | None:
    """Decode tokens/s at batch 1, TP=1, of each format next to llama.cpp's files and transformers."""
    tp1 = next((s for s in sessions if s["tp"] == 1), None)
    if tp1 is None:
        return None
    names = [variant_name("standard", w) for w in formats_measured([tp1])]
    llama = [n for n in map(llama_cpp_variant, LLAMA_CPP_KINDS) if n in tp1["variants"]]
    if len(names) == 1 and not llama:
        return None  # fp32 alone: the main plot shows it
    names += llama + [HF_BASELINE] * (HF_BASELINE in tp1["variants"])
    import matplotlib.pyplot as plt  # render.write_plots chose the Agg backend

    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(names)), 4.5))
    speeds = [1e3 / tp1["variants"][n]["decode_ms"][1] for n in names]
    ax.bar(range(len(names)), speeds, color=["tab:blue" if not n.startswith(LLAMA_CPP) else "tab:orange" for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("decode tokens/s, batch 1, TP=1")
    ax.set_title(f"{tp1['shape']}: weight formats vs llama.cpp (same GGUF, same threads)")
    return save_figure(fig, out / "weight_formats.png")
