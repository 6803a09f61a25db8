"""The benchmark report as markdown tables and matplotlib PNGs (from the JSON that `ladder bench` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ladder.quant import WEIGHT_FORMATS

from .collectives import collective_table, collectives_per_token, cpu_us
from .sweep import sweep_plot, sweep_table
from .targets import targets_table
from .text import fmt as _fmt
from .text import save_figure as _save
from .weights_report import accuracy_table, profile_table, weights_plot, weights_table
from .workload import variant_weights

PAPER_OVERLAP_EFFICIENCY = 0.72  # the Ladder-Residual paper's: 70B, TP=8, H100, batch 1
ORDER = ("standard", "ladder", "parallel", "upper-bound", "hf-transformers", "pytorch-tp")


def _names(variants: dict[str, Any]) -> list[str]:
    """fp32's schedules and baselines, then each weight format's schedules, then llama.cpp's files."""
    def key(name: str) -> tuple[int, int]:
        weights, schedule = variant_weights(name), name.partition(":")[0]
        order = WEIGHT_FORMATS.index(weights) if weights in WEIGHT_FORMATS else len(WEIGHT_FORMATS)
        return order, ORDER.index(schedule) if schedule in ORDER else len(ORDER)
    return sorted(variants, key=key)


def _tp_label(session: dict[str, Any]) -> str:
    return f"{session['tp']}{' (oversubscribed)' if session['oversubscribed'] else ''}"


def _transport(session: dict[str, Any]) -> str:
    """The session's transport; '-' at TP=1, which has none."""
    return session.get("transport") or "-"


def _session_label(session: dict[str, Any]) -> str:
    """'TP=2 shm' (a '*' marks an oversubscribed TP size), for plot ticks and column heads."""
    star = "*" if session["oversubscribed"] else ""
    return f"TP={session['tp']}{star}" + (f" {session['transport']}" if session.get("transport") else "")


def _session_rows(session: dict[str, Any], batches: list[int]) -> list[str]:
    rows = []
    variants = session["variants"]
    for name in _names(variants):
        v = variants[name]
        cells = [_tp_label(session), _transport(session), name]
        cells += [_fmt(v["decode_ms"].get(b)) for b in batches]
        cells += [_fmt(1e3 / v["decode_ms"][1], 1) if 1 in v["decode_ms"] else "-"]
        cells += [_fmt(session["speedup_vs_standard"].get(name, {}).get(b), 2) for b in batches]
        cells += [_fmt(v["prefill_ms"], 0), _fmt(v["e2e_tokens_per_s"].get(1), 1)]
        cells += [" / ".join(_fmt(x, 2) for x in v["blocked_ms_per_token"].get(1, []))]
        cells += [_fmt(session.get("roofline_fraction_batch1", {}).get(name), 2)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def write_markdown(report: dict[str, Any], path: Path) -> None:
    machine, workload = report["machine"], report["workload"]
    batches = list(workload["batches"])
    lines = [
        "# Ladder benchmark",
        "",
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB; torch {machine['torch']}, "
        f"Python {machine['python']}. Load average (1/5/15 min) before: "
        f"{' / '.join(f'{x:.2f}' for x in report['load_before'])}, after: "
        f"{' / '.join(f'{x:.2f}' for x in report['load_after'])}. Wall time {report['wall_seconds']:.0f} s.",
        "",
        f"Method: per (shape, TP, transport) one launch (TP=1 has no transport); all variants hold the same weights and are measured interleaved "
        f"(A B C D, {workload['repeats']} rounds per batch size after a warm-up; at most 3 when the TP size oversubscribes the cores); each run generates "
        f"{workload['new_tokens']} tokens greedily after a {workload['prompt_tokens']}-token prompt; figures are medians "
        f"over rounds of each run's mean decode step. Prefill: a {workload['prefill_tokens']}-token prompt, batch 1, "
        f"{workload['prefill_repeats']} rounds. Blocked = time per decode step spent waiting on communication (`Pending.wait` and the blocking all-gather that picks the next token), per rank.",
        "",
        *targets_table(report),
        "## Memory-bandwidth roofline",
        "",
        "| threads | fp32 matrix-vector GB/s, weight [out, in] in memory | weight [in, out] in memory (the model's) |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {bw['out-major']} | {bw['in-major']} |" for t, bw in report["bandwidth_gb_s"].items()]
    lines += ["", "Roofline tokens/s = the faster layout's bandwidth on the cores the ranks use / weight bytes all "
              "ranks stream per token.", ""]
    for shape in dict.fromkeys(s["shape"] for s in report["sessions"]):
        sessions = [s for s in report["sessions"] if s["shape"] == shape]
        checkpoint = sessions[0]["checkpoint"]
        lines += [f"## {shape} ({'checkpoint ' + checkpoint if checkpoint else 'random weights'})", ""]
        header = (["TP", "transport", "variant"] + [f"decode ms/token b={b}" for b in batches] + ["tokens/s b=1"]
                  + [f"speedup vs standard b={b}" for b in batches]
                  + [f"prefill {workload['prefill_tokens']} ms", "e2e tokens/s b=1", "blocked ms/token b=1 (per rank)",
                     "of roofline b=1"])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for session in sessions:
            lines += _session_rows(session, batches)
        lines += ["", "| TP | transport | overlap efficiency " + " | ".join(f"b={b}" for b in batches)
                  + " | blocked time hidden " + " | ".join(f"b={b}" for b in batches)
                  + " | roofline tokens/s | weights MB/rank | resident MB/rank after load | peak RSS MB/rank "
                  "(incl. baselines) | threads/rank |",
                  "|" + "---|" * (2 * len(batches) + 7)]
        for s in sessions:
            eff = [_fmt(s.get(key, {}).get(b), 2) for key in ("overlap_efficiency", "hidden_wait_share") for b in batches]
            lines.append(f"| {_tp_label(s)} | {_transport(s)} | " + " | ".join(eff) + f" | {_fmt(s.get('roofline_tokens_per_s'))} | "
                         f"{' / '.join(map(str, s['streamed_mb_per_rank']))} | "
                         f"{' / '.join(map(str, s['resident_mb_after_load']))} | "
                         f"{' / '.join(map(str, s['peak_rss_mb']))} | {' / '.join(map(str, s['threads_per_rank']))} |")
        notes = {name: why for s in sessions for name, why in s["unavailable"].items()}
        lines += [""] + [f"- {name} at {_session_label(s)} did not run: {s['unavailable'][name]}"
                         for s in sessions for name in s["unavailable"]] if notes else []
        lines.append("")
        lines += _scaling_table(sessions)
        lines += weights_table(sessions)
        for profiled in (s for s in sessions if s["profile"]):
            lines += profile_table(_session_label(profiled), profiled["profile"])
    lines += accuracy_table(report.get("accuracy", {"skipped": "not measured (a run before weight formats)"}))
    lines += collective_table(report.get("collective_cost", {}))
    lines += sweep_table(report.get("latency_sweep", {}))
    lines += _placement_table(report.get("placements", []))
    lines += _slow_link_table(report.get("slow_link", {}), report.get("collective_cost", {}))
    lines += _section_times(report.get("section_seconds", {}))
    lines += [f"Paper reference overlap efficiency (70B, TP=8, H100, batch 1): {PAPER_OVERLAP_EFFICIENCY}.", ""]
    path.write_text("\n".join(lines))


def _scaling_table(sessions: list[dict[str, Any]]) -> list[str]:
    """TP=N (each transport) vs TP=1 decode speed (batch 1) per schedule and weight format."""
    base = next((s for s in sessions if s["tp"] == 1), None)
    others = [s for s in sessions if s["tp"] > 1]
    if not base or not others:
        return []
    lines = ["| scaling vs TP=1, batch 1 (* = oversubscribed) | " + " | ".join(_session_label(s) for s in others) + " |",
             "|" + "---|" * (len(others) + 1)]
    for name in _names(base["variants"]):
        if name.partition(":")[0] in ("standard", "ladder", "parallel", "upper-bound"):
            cells = [_fmt(base["variants"][name]["decode_ms"][1] / s["variants"][name]["decode_ms"][1], 2) + "x"
                     if name in s["variants"] else "-" for s in others]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _placement_table(placements: list[dict[str, Any]]) -> list[str]:
    if not placements:
        return []
    transport = placements[0].get("transport") or "gloo"
    lines = [f"## Pinning and threads at TP=2 ({placements[0]['shape']}, batch 1, over {transport})", "",
             "| placement | cores per rank | standard ms/token | ladder ms/token | upper-bound ms/token | "
             "overlap efficiency | blocked ms/token standard (per rank) |", "|---|---|---|---|---|---|---|"]
    for p in placements:
        v = p["variants"]
        lines.append(f"| {p['placement']} | {p['cores_per_rank']} | {_fmt(v['standard']['decode_ms'][1])} | "
                     f"{_fmt(v['ladder']['decode_ms'][1])} | {_fmt(v['upper-bound']['decode_ms'][1])} | "
                     f"{_fmt(p['overlap_efficiency'].get(1), 2)} | "
                     f"{' / '.join(_fmt(x, 2) for x in v['standard']['blocked_ms_per_token'][1])} |")
    return [*lines, ""]


def _slow_link_table(slow: dict[str, Any], cost: dict[str, Any]) -> list[str]:
    lines = ["## Slow interconnect: TP=2 over gloo, one rank per network namespace, torchrun rendezvous over a veth pair", ""]
    if "runs" not in slow:
        return [*lines, f"Skipped: {slow.get('skipped', 'not run')}", ""]
    batches = sorted({b for run in slow["runs"] for b in run["variants"]["standard"]["decode_ms"]})
    header = ["link", "variant"] + [f"decode ms/token b={b}" for b in batches] + [
        f"speedup vs standard b={b}" for b in batches] + ["blocked ms/token b=1 (per rank)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in slow["runs"]:
        link = run["link"]
        label = link["rate"] + (f" (tbf burst {link['burst']})" if link["qdisc"] else "")
        for name in _names(run["variants"]):
            v = run["variants"][name]
            lines.append(f"| {label} | {name} | " + " | ".join(_fmt(v["decode_ms"][b]) for b in batches) + " | "
                         + " | ".join(_fmt(run["speedup_vs_standard"][name][b], 2) for b in batches) + " | "
                         + " / ".join(_fmt(x, 2) for x in v["blocked_ms_per_token"][1]) + " |")
    effs = "; ".join(f"{run['link']['rate']}: " + ", ".join(f"b={b} {_fmt(e, 2)}" for b, e in
                                                             run["overlap_efficiency"].items()) for run in slow["runs"])
    return [*lines, "", f"Overlap efficiency: {effs}.", "", *_gloo_cpu_share(slow["runs"], cost)]


def _gloo_cpu_share(runs: list[dict[str, Any]], cost: dict[str, Any]) -> list[str]:
    """How much of each slow-link decode step gloo's own CPU time accounts for: its CPU per call on
    this host (the collective table, loopback) times the collectives of a step, over the step's time."""
    per_call = cpu_us(cost, "gloo", cost.get("hidden", 0))
    if not per_call:
        return []
    calls = collectives_per_token(cost["layers"])
    cpu_ms = sum(per_call) / len(per_call) * calls / 1e3
    shares = "; ".join(f"{run['link']['rate']}: " + ", ".join(
        f"{name} {cpu_ms / run['variants'][name]['decode_ms'][1]:.0%} of {_fmt(run['variants'][name]['decode_ms'][1])} ms"
        for name in ("standard", "ladder") if name in run["variants"]) for run in runs)
    return [f"How much of it gloo's CPU cost eats (batch 1): {calls} collectives per token x "
            f"{sum(per_call) / len(per_call):.1f} us CPU per call (gloo, {cost['hidden']} floats, the collective "
            f"table, measured over loopback in this run) = {cpu_ms:.1f} ms per token per rank: {shares}.", ""]


def _section_times(seconds: dict[str, float]) -> list[str]:
    if not seconds:
        return []
    return ["Wall time per section: " + ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items()) + ".", ""]


# --- plots ----------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    shapes = list(dict.fromkeys(s["shape"] for s in report["sessions"]))
    widest = max(sum(s["shape"] == shape for s in report["sessions"]) for shape in shapes)
    fig, axes = plt.subplots(1, len(shapes), figsize=(max(6.5, 1.2 * widest) * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        sessions = [s for s in report["sessions"] if s["shape"] == shape]
        names = _names({n: None for s in sessions for n in s["variants"]})
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, s in enumerate(sessions):
                if name in s["variants"]:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(1e3 / s["variants"][name]["decode_ms"][1])
            ax.bar(xs, ys, width, label=name)
        for j, s in enumerate(sessions):
            if "roofline_tokens_per_s" in s:
                ax.hlines(s["roofline_tokens_per_s"], j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                          label="roofline" if j == 0 else None)
        ax.set_xticks(range(len(sessions)), [_session_label(s) for s in sessions], fontsize=7)
        ax.set_ylabel("decode tokens/s, batch 1")
        ax.set_title(f"{shape} (* = oversubscribed)")
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "decode_tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for s in report["sessions"]:
        eff = {b: e for b, e in s["overlap_efficiency"].items() if e is not None}
        if eff:
            ax.plot([str(b) for b in eff], list(eff.values()), marker="o", label=f"{s['shape']} {_session_label(s)}")
    for run in report.get("slow_link", {}).get("runs", []):
        eff = {b: e for b, e in run["overlap_efficiency"].items() if e is not None}
        ax.plot([str(b) for b in eff], list(eff.values()), marker="s", linestyle="dotted",
                label=f"{run['shape']} TP=2 link {run['link']['rate']}")
    ax.axhline(PAPER_OVERLAP_EFFICIENCY, color="gray", linestyle="dashed", label="paper (70B, TP=8, H100)")
    ax.set_xlabel("batch")
    ax.set_ylabel("overlap efficiency (T_std - T_ladder) / (T_std - T_ub)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    written.append(_save(fig, out / "overlap_efficiency.png"))

    runs = report.get("slow_link", {}).get("runs", [])
    if runs:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        names = _names(runs[0]["variants"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([j + (i - (len(names) - 1) / 2) * width for j in range(len(runs))],
                   [1e3 / run["variants"][name]["decode_ms"][1] for run in runs], width, label=name)
        ax.set_xticks(range(len(runs)), [f"veth {run['link']['rate']}" for run in runs])
        ax.set_ylabel("decode tokens/s, batch 1, TP=2")
        ax.set_title(f"{runs[0]['shape']}: one rank per network namespace")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "slow_link.png"))
    formats = weights_plot([s for s in report["sessions"] if s["shape"] == shapes[0]], out)
    sweep = sweep_plot(report.get("latency_sweep", {}), out)
    return [*written, *(plot for plot in (formats, sweep) if plot)]
