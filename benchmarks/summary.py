"""From the ranks' raw runs to the figures the report shows: medians per variant, ratios, efficiencies.

Every rank of a launch returns its own samples; the ranks ran in lockstep, so decode times are
read on rank 0's clock and blocked times are kept per rank.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from .llamacpp import NAME as LLAMA_CPP
from .workload import ModelSource, Run, Samples, variant_weights


def _median_ms(values: list[float]) -> float:
    return round(1e3 * statistics.median(values), 3) if values else float("nan")


def _blocked(runs: list[Run]) -> list[float]:
    return [r.blocked_s_per_token for r in runs]


def best_bandwidth(bandwidth: dict[int, dict[str, float]], threads: int) -> float:
    """The faster layout's GB/s with `threads` threads (capped at the most threads measured)."""
    return max(bandwidth[min(threads, max(bandwidth))].values())


def summarize_variants(samples_by_rank: list[dict[str, Samples]]) -> dict[str, Any]:
    """Per variant: decode ms/token per batch (median over rounds, rank 0), every round, end-to-end
    tokens/s, prefill, and the blocked time of each rank."""
    variants: dict[str, Any] = {}
    for name, sample in samples_by_rank[0].items():
        variants[name] = {
            "decode_ms": {b: _median_ms([r.decode_s_per_token for r in runs]) for b, runs in sample.decode.items()},
            "decode_ms_runs": {b: [round(1e3 * r.decode_s_per_token, 3) for r in runs]
                               for b, runs in sample.decode.items()},
            "e2e_tokens_per_s": {b: round(statistics.median(b * (1 + len(r.steps_s)) / r.total_s for r in runs), 2)
                                 for b, runs in sample.decode.items()},
            "prefill_ms": _median_ms([r.prefill_s for r in sample.prefill]),
            "blocked_ms_per_token": {b: [_median_ms(_blocked(rank[name].decode[b])) for rank in samples_by_rank]
                                     for b in sample.decode},
        }
    return variants


def speedup_vs_standard(variants: dict[str, Any]) -> dict[str, dict[int, float]]:
    """T_standard / T_variant per batch (above 1: faster than standard)."""
    standard = variants.get("standard")
    if not standard:
        return {}
    return {name: {b: round(standard["decode_ms"][b] / v["decode_ms"][b], 3) for b in v["decode_ms"]}
            for name, v in variants.items()}


def summarize(shape: str, source: ModelSource, ranks: list[dict[str, Any]],
              bandwidth: dict[int, dict[str, float]]) -> dict[str, Any]:
    """One launch's medians per variant, ratios, efficiency, roofline (per weight format: the bytes it
    streams), memory, placement. llama.cpp's variants get no roofline share: their bytes are not ours."""
    lead = ranks[0]
    world = lead["world"]
    cores = len(os.sched_getaffinity(0))
    threads_total = sum(r["threads"] for r in ranks)
    variants = summarize_variants([r["samples"] for r in ranks])
    summary: dict[str, Any] = {
        "shape": shape, "checkpoint": None if source.random_weights else source.checkpoint, "tp": world,
        "transport": lead.get("transport"),
        "oversubscribed": threads_total > cores, "threads_per_rank": [r["threads"] for r in ranks],
        "cores_per_rank": [r["cores"] for r in ranks],
        "resident_mb_after_load": [round(r["resident_bytes_after_load"] / 2**20) for r in ranks],
        "peak_rss_mb": [round(r["peak_rss_bytes"] / 2**20) for r in ranks],
        "streamed_mb_per_rank": [round(r["streamed_bytes"] / 2**20, 1) for r in ranks],
        "variants": variants, "speedup_vs_standard": speedup_vs_standard(variants),
        "overlap_efficiency": overlap_efficiency(variants) if world > 1 else {},
        "hidden_wait_share": hidden_wait_share(variants) if world > 1 else {},
        "unavailable": lead["unavailable"], "profile": [r["profile"] for r in ranks if r["profile"]],
    }
    streamed = {weights: [r["streamed_bytes_by_weights"][weights] for r in ranks]
                for weights in lead.get("streamed_bytes_by_weights", {})}
    summary["streamed_mb_per_rank_by_weights"] = {w: [round(b / 2**20, 1) for b in per_rank]
                                                  for w, per_rank in streamed.items()}
    if bandwidth:
        usable = best_bandwidth(bandwidth, threads_total)
        roofline = usable * 1e9 / sum(r["streamed_bytes"] for r in ranks)
        summary["roofline_tokens_per_s"] = round(roofline, 2)
        by_weights = {weights: usable * 1e9 / sum(per_rank) for weights, per_rank in streamed.items()}
        summary["roofline_tokens_per_s_by_weights"] = {w: round(r, 2) for w, r in by_weights.items()}
        summary["roofline_fraction_batch1"] = {
            name: round(1e3 / v["decode_ms"][1] / by_weights.get(variant_weights(name), roofline), 3)
            for name, v in variants.items() if 1 in v["decode_ms"] and not name.startswith(f"{LLAMA_CPP}:")}
    return summary


def hidden_wait_share(variants: dict[str, Any]) -> dict[int, float | None]:
    """1 - blocked(ladder) / blocked(standard) per batch (means over ranks): the share of the time a
    standard model spends waiting on communication that the ladder takes off the critical path.
    Unlike the overlap efficiency it leaves out the CPU time communication costs (`collectives.py`)."""
    if not all(n in variants for n in ("standard", "ladder")):
        return {}
    std, lad = (variants[n]["blocked_ms_per_token"] for n in ("standard", "ladder"))
    return {b: round(1 - statistics.mean(lad[b]) / statistics.mean(std[b]), 3) if statistics.mean(std[b]) > 0
            else None for b in std}


def overlap_efficiency(variants: dict[str, Any]) -> dict[int, float | None]:
    """(T_standard - T_ladder) / (T_standard - T_upper_bound) per batch: the share of the exposed
    communication that the ladder hides (the paper's overlap efficiency). None when there is nothing to hide."""
    needed = ("standard", "ladder", "upper-bound")
    if not all(n in variants for n in needed):
        return {}
    std, lad, ub = (variants[n]["decode_ms"] for n in needed)
    return {b: round((std[b] - lad[b]) / (std[b] - ub[b]), 3) if std[b] - ub[b] > 0 else None for b in std}
