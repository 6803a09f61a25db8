"""TP=2, 3, 4 on real gloo ranks give TP=1's logits and tokens, for every schedule and uneven splits.

One launch per world size runs every case (launching costs seconds; the cases milliseconds), and the
TP=1 reference is the same function run in this process without a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from ladder import (
    LadderConfig,
    LadderForCausalLM,
    Placement,
    Sampling,
    Schedule,
    comm,
    generate,
    launch,
    random_full_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_compute_thread")

S, L, P, U = Schedule.STANDARD, Schedule.LADDER, Schedule.PARALLEL, Schedule.UPPER_BOUND
# Every schedule but upper-bound at every TP size; the extra interleaving and the upper bound at TP=2.
TINY_SCHEDULES = {"standard": [S] * 4, "ladder": [L] * 4, "parallel": [P] * 4, "hybrid": [S, S, L, L]}
TP2_ONLY = {"interleaved": [L, S, L, S]}
# SmolLM2's head layout, where at TP=2 and TP=4 neither heads, kv heads, MLP nor vocab split evenly.
SMOL_SCHEDULES = {"smol-hybrid": [S, L]}
PROMPTS = [[5, 17, 2, 99, 40, 3, 8], [61, 12, 30]]  # different lengths: left padding under TP too
SAMPLING = Sampling(temperature=0.8, top_k=20, top_p=0.9, seed=3)
ATOL = 1e-4


def _counting_reductions(run: Callable[[], Any]) -> tuple[Any, list[int]]:
    """Run `run` with every reduction launch recorded; returns its result and each reduction's wait count."""
    original = comm.reduce_from_parallel_start
    waits: list[int] = []

    class Counted:
        def __init__(self, inner: comm.Pending) -> None:
            self.inner, self.number = inner, len(waits)
            waits.append(0)

        def wait(self) -> torch.Tensor:
            waits[self.number] += 1
            return self.inner.wait()

    comm.reduce_from_parallel_start = lambda partial: Counted(original(partial))
    try:
        return run(), waits
    finally:
        comm.reduce_from_parallel_start = original


def _refuses_token(model: LadderForCausalLM, token: int) -> bool:
    """Every rank must refuse an id outside the vocabulary: embedding it as zeros would go on silently."""
    try:
        model(torch.tensor([[1, token]]))
    except ValueError:
        return True
    return False


def run_cases(cases: dict[str, tuple[LadderConfig, dict[str, torch.Tensor]]]) -> dict[str, dict[str, Any]]:
    """Logits (full forward and prefill+decode), greedy and sampled tokens of each case on this rank."""
    results = {}
    for name, (config, weights) in cases.items():
        model = LadderForCausalLM(config).eval()
        model.load_full_state_dict(weights)
        ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(12))
        with torch.inference_mode():
            logits, waits = _counting_reductions(lambda model=model, ids=ids: model(ids))
            model.setup_cache(2, 16)
            steps = [model(ids[:, :8], slot=0)] + [model(ids[:, t:t + 1], slot=t) for t in range(8, 12)]
            model.clear_cache()
            results[name] = {
                "rejects_bad_ids": _refuses_token(model, config.vocab_size),
                "local_vocab": logits.shape[-1],
                "logits": model.gather_vocab(logits),
                "decode_logits": model.gather_vocab(torch.cat(steps, dim=1)),
                "waits": waits,
                "greedy": generate(model, PROMPTS, max_new_tokens=6).tokens,
                "sampled": generate(model, PROMPTS, max_new_tokens=6, sampling=SAMPLING).tokens,
            }
    return results


def _cases(world: int, make_tiny: Callable, make_smol: Callable) -> dict[str, tuple[LadderConfig, dict]]:
    """The cases run at `world`, with their whole-model weights (made here: ranks only slice them)."""
    tiny, smol = make_tiny(), make_smol()
    tiny_weights = random_full_state_dict(tiny, seed=11, std=0.2)
    smol_weights = random_full_state_dict(smol, seed=11, std=0.2)
    schedules = dict(TINY_SCHEDULES)
    if world in (1, 2):
        schedules |= TP2_ONLY
    if world == 2:
        schedules["upper-bound"] = [U] * 4
    cases = {name: (tiny.with_schedules(s), tiny_weights) for name, s in schedules.items()}
    if world in (1, 2, 4):
        cases |= {name: (smol.with_schedules(s), smol_weights) for name, s in SMOL_SCHEDULES.items()}
    return cases


@pytest.fixture(scope="module")
def runs(make_tiny_config: Callable, make_smollm2_layout_config: Callable) -> Callable[..., list[dict]]:
    """Each rank's results at a world size over a transport, launched once per module and only when a
    test asks."""
    cache: dict[tuple[int, str], list[dict]] = {}

    def at(world: int, transport: str = "shm") -> list[dict]:
        if (world, transport) not in cache:
            cases = _cases(world, make_tiny_config, make_smollm2_layout_config)
            cache[world, transport] = [run_cases(cases)] if world == 1 else launch(
                run_cases, world, cases, timeout_s=60, placement=Placement(transport=transport))
        return cache[world, transport]

    return at


TP_PARAMS = ([(w, c) for w in (2, 3, 4) for c in TINY_SCHEDULES] + [(2, c) for c in TP2_ONLY]
             + [(w, c) for w in (2, 4) for c in SMOL_SCHEDULES])
TRANSPORT_PARAMS = [(w, c, t) for t in ("shm", "gloo") for w, c in TP_PARAMS]


@pytest.mark.parametrize(("world", "case", "transport"), TRANSPORT_PARAMS,
                         ids=[f"{t}-tp{w}-{c}" for w, c, t in TRANSPORT_PARAMS])
def test_tp_matches_tp1(world: int, case: str, transport: str, runs: Callable) -> None:
    reference = runs(1)[0][case]
    ranks = runs(world, transport)
    local = [r[case]["local_vocab"] for r in ranks]
    assert sum(local) == reference["local_vocab"] and max(local) < reference["local_vocab"]  # really split
    for rank, results in enumerate(ranks):
        got = results[case]
        torch.testing.assert_close(got["logits"], reference["logits"], atol=ATOL, rtol=0,
                                   msg=lambda m, rank=rank: f"rank {rank}: {m}")
        torch.testing.assert_close(got["decode_logits"], reference["logits"], atol=ATOL, rtol=0,
                                   msg=lambda m, rank=rank: f"rank {rank} decode: {m}")
        assert got["greedy"] == reference["greedy"], f"rank {rank}"
        assert got["sampled"] == reference["sampled"], f"rank {rank}"
        assert got["waits"] and all(n == 1 for n in got["waits"]), f"rank {rank}: waits {got['waits']}"
        assert got["rejects_bad_ids"], f"rank {rank} accepted a token id outside the vocabulary"
    assert reference["sampled"] != reference["greedy"]  # sampling did something, so agreement means something
    if transport == "shm":  # every rank sums the partials in rank order: bitwise the same results
        assert all(torch.equal(r[case]["logits"], ranks[0][case]["logits"]) for r in ranks)


def test_upper_bound_runs_at_tp2(runs: Callable) -> None:
    """Not a valid model (its ranks skip communication): it only has to run, not to agree."""
    for results in runs(2):
        got = results["upper-bound"]
        assert got["logits"].shape == (2, 12, 101) and torch.isfinite(got["logits"]).all()
        assert [len(row) for row in got["greedy"]] == [6, 6]
        # Of the standard model's reductions only the embedding's is left: the 4 layers' 8 are skipped.
        assert len(got["waits"]) == len(results["standard"]["waits"]) - 8
    assert not torch.allclose(runs(2)[0]["upper-bound"]["logits"], runs(1)[0]["standard"]["logits"], atol=ATOL)
