"""The benchmark report as markdown tables and matplotlib PNGs (from the JSON that `ladder bench` writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PAPER_OVERLAP_EFFICIENCY = 0.72  # the Ladder-Residual paper's: 70B, TP=8, H100, batch 1
ORDER = ("standard", "ladder", "parallel", "upper-bound", "hf-transformers", "pytorch-tp")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return str(value)


def _names(variants: dict[str, Any]) -> list[str]:
    return sorted(variants, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))


def _tp_label(session: dict[str, Any]) -> str:
    return f"{session['tp']}{' (oversubscribed)' if session['oversubscribed'] else ''}"


def _session_rows(session: dict[str, Any], batches: list[int]) -> list[str]:
    rows = []
    variants = session["variants"]
    for name in _names(variants):
        v = variants[name]
        cells = [_tp_label(session), name]
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
        f"Method: per (shape, TP) one launch; all variants hold the same weights and are measured interleaved "
        f"(A B C D, {workload['repeats']} rounds per batch size after a warm-up; at most 3 when the TP size oversubscribes the cores); each run generates "
        f"{workload['new_tokens']} tokens greedily after a {workload['prompt_tokens']}-token prompt; figures are medians "
        f"over rounds of each run's mean decode step. Prefill: a {workload['prefill_tokens']}-token prompt, batch 1, "
        f"{workload['prefill_repeats']} rounds. Blocked = time per decode step spent waiting on communication (`Pending.wait` and the blocking all-gather that picks the next token), per rank.",
        "",
        *_targets(report),
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
        header = (["TP", "variant"] + [f"decode ms/token b={b}" for b in batches] + ["tokens/s b=1"]
                  + [f"speedup vs standard b={b}" for b in batches]
                  + [f"prefill {workload['prefill_tokens']} ms", "e2e tokens/s b=1", "blocked ms/token b=1 (per rank)",
                     "of roofline b=1"])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for session in sessions:
            lines += _session_rows(session, batches)
        lines += ["", "| TP | overlap efficiency " + " | ".join(f"b={b}" for b in batches)
                  + " | blocked time hidden " + " | ".join(f"b={b}" for b in batches)
                  + " | roofline tokens/s | weights MB/rank | resident MB/rank after load | peak RSS MB/rank "
                  "(incl. baselines) | threads/rank |",
                  "|" + "---|" * (2 * len(batches) + 6)]
        for s in sessions:
            eff = [_fmt(s.get(key, {}).get(b), 2) for key in ("overlap_efficiency", "hidden_wait_share") for b in batches]
            lines.append(f"| {_tp_label(s)} | " + " | ".join(eff) + f" | {_fmt(s.get('roofline_tokens_per_s'))} | "
                         f"{' / '.join(map(str, s['streamed_mb_per_rank']))} | "
                         f"{' / '.join(map(str, s['resident_mb_after_load']))} | "
                         f"{' / '.join(map(str, s['peak_rss_mb']))} | {' / '.join(map(str, s['threads_per_rank']))} |")
        notes = {name: why for s in sessions for name, why in s["unavailable"].items()}
        lines += [""] + [f"- {name} at TP={s['tp']} did not run: {s['unavailable'][name]}"
                         for s in sessions for name in s["unavailable"]] if notes else []
        lines.append("")
        lines += _scaling_table(sessions)
        profiled = [s for s in sessions if s["profile"]]
        if profiled:
            lines += [*_profile_table(profiled[0]), ""]
    lines += _collective_table(report.get("collective_cost", {}))
    lines += _placement_table(report.get("placements", [])) + _slow_link_table(report.get("slow_link", {}))
    lines += [f"Paper reference overlap efficiency (70B, TP=8, H100, batch 1): {PAPER_OVERLAP_EFFICIENCY}.", ""]
    path.write_text("\n".join(lines))


def _find(report: dict[str, Any], shape: str, tp: int) -> dict[str, Any] | None:
    return next((s for s in report["sessions"] if s["shape"] == shape and s["tp"] == tp), None)


def _targets(report: dict[str, Any]) -> list[str]:
    """The issue's targets next to what this run measured (batch 1)."""
    rows = []
    tp1, tp2 = _find(report, "smollm2-135m", 1), _find(report, "smollm2-135m", 2)
    if tp1 and "hf-transformers" in tp1["variants"]:
        v = tp1["variants"]
        ratio = v["hf-transformers"]["decode_ms"][1] / v["standard"]["decode_ms"][1]
        rows.append(("SmolLM2 TP=1 decode vs transformers (standard schedule)", ">= 2x", f"{ratio:.2f}x", ratio >= 2))
    if tp1 and "roofline_fraction_batch1" in tp1:
        share = tp1["roofline_fraction_batch1"]["standard"]
        rows.append(("SmolLM2 TP=1 decode, share of the roofline", ">= 0.70", f"{share:.2f}", share >= 0.7))
    if tp2 and tp2["overlap_efficiency"].get(1) is not None:
        eff = tp2["overlap_efficiency"][1]
        rows.append(("SmolLM2 TP=2 ladder overlap efficiency", ">= 0.8", f"{eff:.2f}", eff >= 0.8))
    if tp2 and tp2.get("hidden_wait_share", {}).get(1) is not None:
        share = tp2["hidden_wait_share"][1]
        rows.append(("(for information) SmolLM2 TP=2: share of standard's blocked time the ladder hides", "-",
                     f"{share:.2f}", None))
    for run in report.get("slow_link", {}).get("runs", []):
        if run["link"]["qdisc"]:
            speedup = run["speedup_vs_standard"]["ladder"][1]
            rows.append((f"{run['shape']} TP=2 over a {run['link']['rate']} link, ladder vs standard", ">= 1.3x",
                         f"{speedup:.2f}x", speedup >= 1.3))
    if not rows:
        return []
    lines = ["## Targets (batch 1)", "", "| target | wanted | measured | met |", "|---|---|---|---|"]
    verdict = {True: "yes", False: "no", None: "-"}
    lines += [f"| {name} | {want} | {got} | {verdict[ok]} |" for name, want, got, ok in rows]
    return [*lines, ""]


def _scaling_table(sessions: list[dict[str, Any]]) -> list[str]:
    """TP=N vs TP=1 decode speed (batch 1) per schedule."""
    base = next((s for s in sessions if s["tp"] == 1), None)
    others = [s for s in sessions if s["tp"] > 1]
    if not base or not others:
        return []
    lines = ["| scaling vs TP=1, batch 1 | " + " | ".join(f"TP={_tp_label(s)}" for s in others) + " |",
             "|" + "---|" * (len(others) + 1)]
    for name in ("standard", "ladder", "parallel", "upper-bound"):
        if name in base["variants"]:
            cells = [_fmt(base["variants"][name]["decode_ms"][1] / s["variants"][name]["decode_ms"][1], 2) + "x"
                     for s in others]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _profile_table(session: dict[str, Any]) -> list[str]:
    kinds = ["matmul", "attention", "other_ops", "collective_calls", "blocked_in_wait", "python_and_dispatch", "wall"]
    lines = [f"Where a batch-1 decode step's time goes at TP={session['tp']} (torch.profiler, ms/token, "
             "per rank; the profiler's own overhead is in python_and_dispatch):", "",
             "| rank | variant | " + " | ".join(kinds) + " |", "|" + "---|" * (len(kinds) + 2)]
    for rank, profile in enumerate(session["profile"]):
        for name, parts in profile.items():
            lines.append(f"| {rank} | {name} | " + " | ".join(_fmt(parts[k], 2) for k in kinds) + " |")
    return lines


def _collective_table(cost: dict[str, Any]) -> list[str]:
    """Latency and CPU time of one all-reduce at TP=2, and what the CPU time adds up to per token."""
    if not cost:
        return []
    calls = 2 * cost["layers"] + 2  # two sub-blocks per layer, the embedding, choosing the next token
    lines = [f"## What one collective costs at TP=2 ({cost['shape']}, {cost['ranks'][0]['floats']} floats)", "",
             "| rank | latency us | CPU us per call (calling thread asleep) | CPU ms per decode step "
             f"({calls} collectives) |", "|---|---|---|---|"]
    for rank, r in enumerate(cost["ranks"]):
        lines.append(f"| {rank} | {_fmt(r['latency_us'])} | {_fmt(r['cpu_us'])} | {_fmt(r['cpu_us'] * calls / 1e3, 2)} |")
    return [*lines, "", "gloo hands each message between the calling thread, its worker threads and its TCP "
            "loop; that CPU time lands on cores that are busy computing, so no schedule can hide it. "
            "Only the rest of the latency (waiting for the peer and the wire) is there for the ladder to hide.", ""]


def _placement_table(placements: list[dict[str, Any]]) -> list[str]:
    if not placements:
        return []
    lines = [f"## Pinning and threads at TP=2 ({placements[0]['shape']}, batch 1)", "",
             "| placement | cores per rank | standard ms/token | ladder ms/token | upper-bound ms/token | "
             "overlap efficiency | blocked ms/token standard (per rank) |", "|---|---|---|---|---|---|---|"]
    for p in placements:
        v = p["variants"]
        lines.append(f"| {p['placement']} | {p['cores_per_rank']} | {_fmt(v['standard']['decode_ms'][1])} | "
                     f"{_fmt(v['ladder']['decode_ms'][1])} | {_fmt(v['upper-bound']['decode_ms'][1])} | "
                     f"{_fmt(p['overlap_efficiency'].get(1), 2)} | "
                     f"{' / '.join(_fmt(x, 2) for x in v['standard']['blocked_ms_per_token'][1])} |")
    return [*lines, ""]


def _slow_link_table(slow: dict[str, Any]) -> list[str]:
    lines = ["## Slow interconnect: TP=2, one rank per network namespace, torchrun rendezvous over a veth pair", ""]
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
    return [*lines, "", f"Overlap efficiency: {effs}.", ""]


# --- plots ----------------------------------------------------------------------------------------


def write_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    shapes = list(dict.fromkeys(s["shape"] for s in report["sessions"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4.5), squeeze=False)
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
        ax.set_xticks(range(len(sessions)), [f"TP={_tp_label(s)}".replace(" (oversubscribed)", "*") for s in sessions])
        ax.set_ylabel("decode tokens/s, batch 1")
        ax.set_title(f"{shape} (* = oversubscribed)")
        ax.legend(fontsize=7)
    written.append(_save(fig, out / "decode_tokens_per_s.png"))

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    for s in report["sessions"]:
        eff = {b: e for b, e in s["overlap_efficiency"].items() if e is not None}
        if eff:
            ax.plot([str(b) for b in eff], list(eff.values()), marker="o", label=f"{s['shape']} TP={_tp_label(s)}")
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
    return written
