"""A fast run of the benchmark machinery (`ladder bench --quick`) and its pieces; no speed is asserted."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ladder import comm
from ladder.cli import main
from ladder.launcher import run
from ladder_benchmarks import netns
from ladder_benchmarks.llamacpp import LlamaCppSpec
from ladder_benchmarks.session import SessionSpec, run_session
from ladder_benchmarks.summary import hidden_wait_share, overlap_efficiency
from ladder_benchmarks.timing import TimedTransport, blocked_time
from ladder_benchmarks.workload import ModelSource, Workload

LOW_BIT = ("bf16", "int4")  # measured beside fp32 in the quick run


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--tp", "1,2", "--no-placements", "--slow-link-rate", "off",
                 "--weights", ",".join(("fp32", *LOW_BIT)), "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


SCHEDULES = {"standard", "ladder", "parallel", "upper-bound"}
LOW_BIT_VARIANTS = {1: {f"standard:{w}" for w in LOW_BIT}, 2: {f"{s}:{w}" for s in ("standard", "ladder") for w in LOW_BIT}}


def test_quick_report_measures_every_variant_at_tp1_and_tp2(quick_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = quick_report
    sessions = {(s["tp"], s["transport"]): s for s in report["sessions"]}
    assert sorted(sessions, key=str) == [(1, None), (2, "gloo"), (2, "shm")]  # TP=2 once per transport
    by_tp = {1: sessions[1, None], 2: sessions[2, "shm"]}
    assert set(by_tp[1]["variants"]) == SCHEDULES | LOW_BIT_VARIANTS[1] | {"hf-transformers"}
    assert set(by_tp[2]["variants"]) == SCHEDULES | LOW_BIT_VARIANTS[2] | {"pytorch-tp"}, by_tp[2]["unavailable"]
    # The baselines run in the first transport's launch.
    assert set(sessions[2, "gloo"]["variants"]) == SCHEDULES | LOW_BIT_VARIANTS[2]
    assert by_tp[1]["unavailable"] == {}  # llama.cpp runs at SmolLM2's shape only: not tried here
    for session in sessions.values():
        for name, v in session["variants"].items():
            for batch in ("1", "2"):
                assert v["decode_ms"][batch] > 0, (session["tp"], name)
                assert len(v["decode_ms_runs"][batch]) == report["workload"]["repeats"]
                assert len(v["blocked_ms_per_token"][batch]) == session["tp"]  # one figure per rank
            assert v["prefill_ms"] > 0
        assert len(session["peak_rss_mb"]) == session["tp"] and min(session["peak_rss_mb"]) > 0
        assert session["roofline_tokens_per_s"] > 0
    # Nothing to wait for without a process group; under TP=2 the standard schedule blocks on every reduction.
    assert by_tp[1]["variants"]["standard"]["blocked_ms_per_token"]["1"] == [0.0]
    assert min(by_tp[2]["variants"]["standard"]["blocked_ms_per_token"]["1"]) > 0
    assert by_tp[2]["variants"]["pytorch-tp"]["blocked_ms_per_token"]["1"] == [0.0, 0.0]  # not instrumented
    assert min(sessions[2, "gloo"]["variants"]["standard"]["blocked_ms_per_token"]["1"]) > 0
    assert set(by_tp[2]["overlap_efficiency"]) == {"1", "2"} and by_tp[1]["overlap_efficiency"] == {}
    for session in sessions.values():  # every format's standard variant, and the ladder where it communicates
        profile = session["profile"]
        assert len(profile) == session["tp"]
        assert set(profile[0]) == {"standard"} | {f"standard:{w}" for w in LOW_BIT} | ({"ladder"} if session["tp"] > 1 else set())
        for parts in profile[0].values():
            assert parts["wall"] > parts["matmul"] > 0 and parts["norms"] > 0 and parts["rotary"] > 0
            assert parts["sampling_and_loop"] > 0 and parts["attention"] > 0
    assert report["slow_link"] == {"skipped": "--slow-link-rate off"}
    assert set(report["bandwidth_gb_s"]) == {str(t) for t in range(1, report["machine"]["cores"] + 1)}
    assert all(set(bw) == {"out-major", "in-major"} and min(bw.values()) > 0 for bw in report["bandwidth_gb_s"].values())
    assert set(by_tp[2]["hidden_wait_share"]) == {"1", "2"} and by_tp[1]["hidden_wait_share"] == {}
    assert set(report["section_seconds"]) == {"bandwidth", "sessions", "placements", "collective cost",
                                              "latency sweep", "slow link", "accuracy"}
    assert report["accuracy"] == {"skipped": "tiny has random weights (give --checkpoint for SmolLM2's)"}


def test_quick_report_measures_one_collective_per_transport_and_size(
        quick_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = quick_report
    cost = report["collective_cost"]
    assert cost["layers"] == 2 and cost["hidden"] == 64
    assert {(row["transport"], row["floats"]) for row in cost["rows"]} == {
        (transport, floats) for transport in ("shm", "gloo") for floats in (64, 576, 4096)}
    for row in cost["rows"]:
        assert len(row["latency_us"]) == len(row["cpu_us"]) == 2  # one figure per rank
        assert min(row["latency_us"]) > 0 and min(row["cpu_us"]) > 0, row


def test_quick_report_sweeps_the_emulated_link_latency(quick_report: tuple[Path, dict[str, Any]]) -> None:
    _, report = quick_report
    sweep = report["latency_sweep"]
    assert sweep["transport"] == "shm" and sweep["link"].startswith("emulated link:")
    assert sweep["subblock_us"] > 0 and set(sweep["subblock_us_by_kind"]) == {"attention", "feed_forward"}
    latencies = [p["latency_us"] for p in sweep["points"]]
    assert latencies == sorted({0, 200, sweep["subblock_us"]})  # the sub-block time is swept too
    assert [p["latency_us"] for p in sweep["points"] if p["is_subblock_time"]] == [sweep["subblock_us"]]
    for point in sweep["points"]:
        assert set(point["decode_ms"]) == SCHEDULES and min(point["decode_ms"].values()) > 0
        assert point["ladder_speedup"] > 0 and len(point["blocked_ms_per_token"]["standard"]) == 2


def test_quick_report_writes_markdown_and_png_plots(quick_report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = quick_report
    markdown = (out / "results.md").read_text()
    assert "| TP | transport | variant | decode ms/token b=1 |" in markdown
    assert "| 2 | shm | ladder |" in markdown and "| 2 | gloo | ladder |" in markdown
    assert "| 1 | - | hf-transformers |" in markdown and "| 2 | shm | pytorch-tp |" in markdown
    assert "Slow interconnect" in markdown and "Skipped: --slow-link-rate off" in markdown
    assert "| scaling vs TP=1, batch 1 (* = oversubscribed) | TP=2 shm | TP=2 gloo |" in markdown
    collective_section = markdown.split("## What one collective costs at TP=2")[1].split("##")[0]
    for transport in ("shm", "gloo"):  # one row per transport and size
        assert f"| {transport} | 576 |" in collective_section and f"| {transport} | 4,096 |" in collective_section
    sweep_section = markdown.split("## Latency sweep (emulated link:")[1].split("##")[0]
    assert "| 0 |" in sweep_section and "| 200 |" in sweep_section and "(= sub-block time) |" in sweep_section
    targets = markdown.split("## Targets")[1].split("##")[0]
    for row in ("576-float all-reduce over shm at TP=2", "TP=2 (shm) batch-1 decode, standard vs upper bound",
                "TP=2 (shm) vs TP=1 batch-1 decode", "ladder never slower than standard",
                "emulated link: swept latency", "ladder vs standard at latency = sub-block time",
                "TP=1 decode vs transformers"):
        assert row in targets, row
    for name in ("decode_tokens_per_s.png", "overlap_efficiency.png", "latency_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Where a batch-1 decode step's time goes at TP=1" in markdown
    profile = markdown.split("Where a batch-1 decode step's time goes at TP=2 shm")[1].split("\n\n")[1]
    assert profile.startswith("| ms per decode step | rank 0 standard |") and "| rotary |" in profile
    assert "## Accuracy of the weight formats\n\nSkipped: tiny has random weights" in markdown


def test_quick_report_measures_the_weight_formats_side_by_side(quick_report: tuple[Path, dict[str, Any]]) -> None:
    out, report = quick_report
    for session in report["sessions"]:
        streamed = {w: mb[0] for w, mb in session["streamed_mb_per_rank_by_weights"].items()}
        assert streamed["int4"] < streamed["bf16"] < streamed["fp32"] == session["streamed_mb_per_rank"][0]
        rooflines = session["roofline_tokens_per_s_by_weights"]
        assert rooflines["int4"] > rooflines["bf16"] > rooflines["fp32"] == session["roofline_tokens_per_s"]
        assert set(session["roofline_fraction_batch1"]) >= LOW_BIT_VARIANTS[session["tp"]]  # each its format's
    markdown = (out / "results.md").read_text()
    assert "| TP | transport | fp32 standard (ladder) | bf16 standard (ladder) | int4 standard (ladder) | " in markdown
    assert "| 2 | shm | standard:int4 |" in markdown and "| 1 | - | standard:bf16 |" in markdown
    targets = markdown.split("## Targets")[1].split("##")[0]
    for row in ("int4 TP=2 (shm) vs int4 TP=1 decode", "int4 TP=2 (shm): ladder vs standard",
                "int4 decode vs transformers fp32", "fp32 decode vs transformers fp32"):
        assert row in targets, row
    assert (out / "weight_formats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_llama_cpp_is_one_clear_line_in_the_report(quick_report: tuple[Path, dict[str, Any]],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "llama_cpp" else find_spec(name, *rest))
    workload = Workload(batches=(1,), repeats=1, prompt_tokens=4, new_tokens=2, prefill_repeats=0)
    spec = SessionSpec(ModelSource("tiny"), workload, schedules=("standard",), baselines=False,
                       llama_cpp=LlamaCppSpec(gguf=__file__, cache_dir=str(tmp_path / "cache")))
    [rank] = run(run_session, 1, spec)  # in this process, where llama_cpp cannot be found
    reason = "llama-cpp-python is not installed (opt-in: pip install -e '.[llamacpp]')"
    assert rank["unavailable"] == {"llama.cpp": reason} and set(rank["samples"]) == {"standard"}
    assert not (tmp_path / "cache").exists()
    _, report = quick_report
    report = json.loads(json.dumps(report))
    report["sessions"][0]["unavailable"] = rank["unavailable"]
    (tmp_path / "results.json").write_text(json.dumps(report))
    assert main(["bench", "--render", str(tmp_path / "results.json"), "--out", str(tmp_path)]) == 0
    notes = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("- ")]
    assert [line for line in notes if "llama.cpp" in line] == [f"- llama.cpp at TP=1 did not run: {reason}"]


def test_render_redraws_a_results_json_from_before_the_transports(tmp_path: Path) -> None:
    """The committed full run may predate the transports: then every TP>1 launch ran over gloo."""
    old = Path(__file__).parent.parent / "bench-results" / "results.json"
    if not old.exists():
        pytest.skip("no committed bench-results/results.json")
    assert main(["bench", "--render", str(old), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| 2 | gloo | ladder |" in markdown or "| 2 | shm | ladder |" in markdown
    assert "## What one collective costs at TP=2" in markdown


def test_overlap_efficiency_is_the_share_of_communication_hidden() -> None:
    def decode(ms: dict[int, float]) -> dict[str, Any]:
        return {"decode_ms": ms}

    variants = {"standard": decode({1: 30.0, 4: 40.0}), "ladder": decode({1: 24.0, 4: 40.0}),
                "upper-bound": decode({1: 22.0, 4: 40.0})}
    assert overlap_efficiency(variants) == {1: 0.75, 4: None}  # nothing to hide at batch 4
    assert overlap_efficiency({"standard": decode({1: 1.0})}) == {}


def test_hidden_wait_share_compares_mean_blocked_time_over_ranks() -> None:
    def blocked(per_batch: dict[int, list[float]]) -> dict[str, Any]:
        return {"blocked_ms_per_token": per_batch}

    variants = {"standard": blocked({1: [8.0, 12.0], 4: [0.0, 0.0]}), "ladder": blocked({1: [1.0, 1.5], 4: [0.0, 0.0]})}
    assert hidden_wait_share(variants) == {1: 0.875, 4: None}  # nothing blocked at batch 4
    assert hidden_wait_share({"standard": variants["standard"]}) == {}


class _SlowTransport:
    """A transport whose every collective blocks for 20 ms."""

    name = "slow"

    def all_reduce_start(self, tensor: torch.Tensor, op: str) -> comm.Pending:
        return comm.Pending(tensor, lambda: time.sleep(0.02))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        return tensor.unsqueeze(0)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        time.sleep(0.02)

    def close(self) -> None:
        pass


def test_blocked_time_counts_only_while_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    tensor = torch.ones(3)
    slow = _SlowTransport()
    monkeypatch.setattr(comm, "tp_size", lambda: 2)  # route the collectives to the transport
    previous = comm.set_transport(slow)
    try:
        with blocked_time() as before:
            pass
        comm.all_reduce_start(tensor).wait()
        assert before.seconds == 0.0  # not measuring: not counted
        with blocked_time() as clock:
            assert isinstance(comm.transport(), TimedTransport) and comm.transport().inner is slow
            assert comm.all_reduce_start(tensor).wait() is tensor
            comm.Pending(tensor).wait()  # nothing in flight: nothing to count
        waited = clock.seconds
        assert 0.02 <= waited < 1.0
        assert comm.transport() is slow  # the wrapper is gone afterwards
        comm.all_reduce_start(tensor).wait()
        assert clock.seconds == waited
        with blocked_time() as clock:  # the blocking all-gather (choosing the next token) and broadcast count too
            assert comm.all_gather(tensor).shape == (1, 3)
            comm.broadcast(tensor)
        assert 0.04 <= clock.seconds < 1.0
    finally:
        comm.set_transport(previous)


def test_blocked_time_is_zero_without_a_process_group() -> None:
    assert comm.transport() is None
    with blocked_time() as clock:
        comm.all_reduce_start(torch.ones(3)).wait()
        assert comm.transport() is None
    assert clock.seconds == 0.0


def test_slow_link_mode_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert "needs root" in netns.availability()
    with pytest.raises(netns.SlowLinkUnavailable, match="needs root"), netns.SlowLink():
        pass
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    assert "iproute2 (tc not found" in netns.availability()


@pytest.mark.slow
@pytest.mark.skipif(netns.availability() is not None, reason=str(netns.availability()))
def test_slow_link_runs_two_hosts_through_torchrun_and_cleans_up() -> None:
    import dataclasses

    spec = SessionSpec(ModelSource("tiny"), dataclasses.replace(Workload.quick(), batches=(1,), prefill_repeats=0),
                       schedules=("standard", "ladder"), baselines=False)
    with netns.SlowLink(rate="50mbit") as link:
        ranks = link.run_session(spec)
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    assert min(ranks[0]["samples"]["standard"].decode[1][0].steps_blocked_s) > 0
    listed = netns._run("ip", "netns", "list").stdout.split()
    assert not set(netns.NAMESPACES) & set(listed)
