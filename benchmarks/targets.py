"""The issues' targets next to what the same run measured, each marked met or not.

The decode targets are read on the run's first shape (SmolLM2's in the full run, the tiny model in
`--quick`), so that the quick run exercises every row.
"""

from __future__ import annotations

from typing import Any

from .collectives import cpu_us
from .llamacpp import variant as llama_cpp_variant
from .session import HF_BASELINE
from .sweep import at_subblock_time, efficiency_up_to_subblock
from .text import per_rank
from .weights_report import PERPLEXITY_TOLERANCE
from .workload import variant_name

TARGET_FLOATS = 576  # SmolLM2's hidden vector: one batch-1 decode reduction
# Issue 10: each weight format at least as fast as llama.cpp's nearest file type...
NEAREST_LLAMA_CPP = (("int4", "Q4_1"), ("int8", "Q8_0"), ("fp16", "F16"))
# ... and at least this many times as fast as transformers in fp32.
VS_TRANSFORMERS = (("int4", 4.0), ("fp32", 1.5))
Row = tuple[str, str, str, bool | None]  # target, wanted, measured, met (None: for information)


def find_session(report: dict[str, Any], shape: str, tp: int, transport: str | None = None) -> dict[str, Any] | None:
    """The session of (shape, TP) over `transport` (any transport when None; TP=1 has none)."""
    return next((s for s in report["sessions"] if s["shape"] == shape and s["tp"] == tp
                 and (transport is None or tp == 1 or s.get("transport") == transport)), None)


def _decode_ms(session: dict[str, Any], name: str, batch: int = 1) -> float:
    return session["variants"][name]["decode_ms"][batch]


def tp1_rows(report: dict[str, Any], shape: str) -> list[Row]:
    tp1 = find_session(report, shape, 1)
    rows: list[Row] = []
    if tp1 and "hf-transformers" in tp1["variants"]:
        ratio = _decode_ms(tp1, "hf-transformers") / _decode_ms(tp1, "standard")
        rows.append((f"{shape} TP=1 decode vs transformers (standard schedule)", ">= 2x", f"{ratio:.2f}x", ratio >= 2))
    if tp1 and "roofline_fraction_batch1" in tp1:
        share = tp1["roofline_fraction_batch1"]["standard"]
        rows.append((f"{shape} TP=1 decode, share of the roofline", ">= 0.70", f"{share:.2f}", share >= 0.7))
    return rows


def overlap_rows(report: dict[str, Any], shape: str) -> list[Row]:
    rows: list[Row] = []
    for session in (s for s in report["sessions"] if s["shape"] == shape and s["tp"] == 2):
        transport = session.get("transport")
        eff, hidden = session["overlap_efficiency"].get(1), session.get("hidden_wait_share", {}).get(1)
        if eff is not None:
            rows.append((f"{shape} TP=2 ({transport}) ladder overlap efficiency", ">= 0.8", f"{eff:.2f}", eff >= 0.8))
        if hidden is not None:
            rows.append((f"(for information) {shape} TP=2 ({transport}): share of standard's blocked time "
                         "the ladder hides", "-", f"{hidden:.2f}", None))
    return rows


def collective_row(report: dict[str, Any]) -> list[Row]:
    cost = report.get("collective_cost", {})
    shm = cpu_us(cost, "shm", TARGET_FLOATS)
    if shm is None:
        return []
    figures = {"gloo, caller asleep": cpu_us(cost, "gloo", TARGET_FLOATS),
               "shm back to back": cpu_us(cost, "shm", TARGET_FLOATS, "back_to_back_cpu_us"),
               "gloo back to back": cpu_us(cost, "gloo", TARGET_FLOATS, "back_to_back_cpu_us")}
    others = "; ".join(f"{label}: {per_rank(values)} us" for label, values in figures.items() if values)
    return [(f"{TARGET_FLOATS}-float all-reduce over shm at TP=2, CPU per call per rank (caller asleep)",
             "<= 10 us", f"{per_rank(shm)} us ({others})", max(shm) <= 10)]


def shm_decode_rows(report: dict[str, Any], shape: str) -> list[Row]:
    tp1, tp2 = find_session(report, shape, 1), find_session(report, shape, 2, "shm")
    rows: list[Row] = []
    if tp2 and "upper-bound" in tp2["variants"]:
        ratio = _decode_ms(tp2, "standard") / _decode_ms(tp2, "upper-bound")
        rows.append((f"{shape} TP=2 (shm) batch-1 decode, standard vs upper bound", "<= 1.10x",
                     f"{ratio:.2f}x", ratio <= 1.10))
    if tp1 and tp2:
        speedup = _decode_ms(tp1, "standard") / _decode_ms(tp2, "standard")
        rows.append((f"{shape} TP=2 (shm) vs TP=1 batch-1 decode (standard schedule)", ">= 1.2x",
                     f"{speedup:.2f}x", speedup >= 1.2))
    return rows


def worst_ladder_row(report: dict[str, Any]) -> list[Row]:
    """The ladder against standard at every (shape, TP, transport, batch) session measured."""
    ratios = [(_decode_ms(s, "ladder", b) / _decode_ms(s, "standard", b),
               f"{s['shape']} TP={s['tp']}{' ' + s['transport'] if s.get('transport') else ''} b={b}")
              for s in report["sessions"] if {"standard", "ladder"} <= set(s["variants"])
              for b in s["variants"]["standard"]["decode_ms"]]
    if not ratios:
        return []
    worst, where = max(ratios)
    return [("ladder never slower than standard (every shape, TP, transport and batch of the sessions): "
             "worst T_ladder / T_standard", "<= 1.00", f"{worst:.3f} ({where})", worst <= 1.0)]


def sweep_rows(report: dict[str, Any]) -> list[Row]:
    sweep = report.get("latency_sweep", {})
    if not sweep.get("points"):
        return []
    subblock = sweep["subblock_us"]
    rows: list[Row] = []
    effs = efficiency_up_to_subblock(sweep)
    name = (f"{sweep['link']}: {sweep['shape']} ladder overlap efficiency at every swept latency "
            f"from 100 us to the sub-block time ({subblock:g} us)")
    if effs:
        measured = ", ".join(f"{latency:g} us: {'-' if e is None else f'{e:.2f}'}" for latency, e in effs)
        rows.append((name, ">= 0.9 each", measured, all(e is not None and e >= 0.9 for _, e in effs)))
    else:
        rows.append((name, ">= 0.9 each", f"no swept latency in [100, {subblock:g}] us", None))
    point = at_subblock_time(sweep)
    if point:
        rows.append((f"{sweep['link']}: {sweep['shape']} ladder vs standard at latency = sub-block time "
                     f"({subblock:g} us)", ">= 1.3x", f"{point['ladder_speedup']:.2f}x", point["ladder_speedup"] >= 1.3))
    return rows


def slow_link_rows(report: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for run in report.get("slow_link", {}).get("runs", []):
        if run["link"]["qdisc"]:
            speedup = run["speedup_vs_standard"]["ladder"][1]
            rows.append((f"{run['shape']} TP=2 over a {run['link']['rate']} link (netns + tbf, gloo), "
                         "ladder vs standard", ">= 1.3x", f"{speedup:.2f}x", speedup >= 1.3))
    return rows


def weight_format_rows(report: dict[str, Any], shape: str) -> list[Row]:
    """Issue 10's speed targets: each format against llama.cpp and transformers at TP=1, int4 at TP=2."""
    tp1, tp2 = find_session(report, shape, 1), find_session(report, shape, 2, "shm")
    rows: list[Row] = []
    measured = tp1["variants"] if tp1 else {}
    for weights, kind in NEAREST_LLAMA_CPP:
        ours, theirs = variant_name("standard", weights), llama_cpp_variant(kind)
        if ours in measured and theirs in measured:
            mine, llama = _decode_ms(tp1, ours), _decode_ms(tp1, theirs)
            rows.append((f"{shape} TP=1 {weights} decode vs llama.cpp {kind} (same GGUF, same threads)",
                         "<= llama.cpp's ms/token", f"{mine:.1f} vs {llama:.1f} ms ({llama / mine:.2f}x)", mine <= llama))
    for weights, wanted in VS_TRANSFORMERS:
        ours = variant_name("standard", weights)
        if ours in measured and HF_BASELINE in measured:
            ratio = _decode_ms(tp1, HF_BASELINE) / _decode_ms(tp1, ours)
            rows.append((f"{shape} TP=1 {weights} decode vs transformers fp32 (issue 10)", f">= {wanted:g}x",
                         f"{ratio:.2f}x", ratio >= wanted))
    standard, ladder = variant_name("standard", "int4"), variant_name("ladder", "int4")
    if tp2 and standard in measured and standard in tp2["variants"]:
        speedup = _decode_ms(tp1, standard) / _decode_ms(tp2, standard)
        rows.append((f"{shape} int4 TP=2 (shm) vs int4 TP=1 decode (standard schedule)", "> 1.00x",
                     f"{speedup:.2f}x", speedup > 1))
        if ladder in tp2["variants"]:
            ratio = _decode_ms(tp2, standard) / _decode_ms(tp2, ladder)
            rows.append((f"(for information) {shape} int4 TP=2 (shm): ladder vs standard", "-", f"{ratio:.2f}x", None))
    return rows


def accuracy_rows(report: dict[str, Any]) -> list[Row]:
    """Issue 10's accuracy targets: perplexity against fp32 per format, and the right chat answer."""
    measured = report.get("accuracy", {}).get("rows", {})
    rows: list[Row] = []
    for weights, tolerance in PERPLEXITY_TOLERANCE.items():
        if weights in measured and measured[weights]["perplexity_vs_fp32"] is not None:
            change = measured[weights]["perplexity_vs_fp32"]
            rows.append((f"{weights} held-out Botchan perplexity vs fp32", f"<= +{tolerance:.1%}", f"{change:+.2%}",
                         change <= tolerance))
    if measured:
        expected = report["accuracy"]["expected"]
        answers = ", ".join(f"{w}: {'yes' if row['expected_in_answer'] else 'no'}" for w, row in measured.items())
        rows.append((f"greedy chat answer says {expected}, every weight format", "all", answers,
                     all(row["expected_in_answer"] for row in measured.values())))
    return rows


def targets_table(report: dict[str, Any]) -> list[str]:
    """Markdown: every target this run can speak to (batch 1 unless the row says otherwise)."""
    shape = report["sessions"][0]["shape"] if report["sessions"] else ""
    rows = (tp1_rows(report, shape) + overlap_rows(report, shape) + collective_row(report)
            + shm_decode_rows(report, shape) + worst_ladder_row(report) + sweep_rows(report) + slow_link_rows(report)
            + weight_format_rows(report, shape) + accuracy_rows(report))
    if not rows:
        return []
    verdict = {True: "yes", False: "no", None: "-"}
    lines = ["## Targets (batch 1)", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {want} | {got} | {verdict[ok]} |" for name, want, got, ok in rows]
    return [*lines, ""]
