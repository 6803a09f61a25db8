"""Bad inputs and broken worlds end in clear errors, within the configured timeout, never a hang."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ladder import (
    CacheError,
    CommunicationError,
    LadderConfig,
    LadderForCausalLM,
    LaunchError,
    Placement,
    ShardingError,
    ShardPlan,
    comm,
    generate,
    launch,
    launcher,
    random_full_state_dict,
)
from ladder import model as model_module

pytestmark = pytest.mark.usefixtures("one_compute_thread")

TIMEOUT_S = 4.0
NOTICE_MARGIN_S = 2.0  # scheduling slack on a loaded 2-core machine, on top of the timeout
STARTUP_ALLOWANCE_S = 60.0  # spawning ranks that import torch, on that same machine


# --- more ranks than heads ----------------------------------------------------------------------------


def test_more_ranks_than_heads_fails_before_any_weight(make_tiny_config: Callable,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []
    monkeypatch.setattr(model_module, "LadderModel", lambda *args: built.append(args))
    with pytest.raises(ShardingError, match="tensor-parallel size 7 is larger than the model's 6 attention heads"):
        LadderForCausalLM(make_tiny_config(), rank=0, world=7)
    assert built == []  # refused before a single layer (or weight) was constructed


def test_as_many_ranks_as_heads_is_fine(make_tiny_config: Callable) -> None:
    config = make_tiny_config()
    plans = [ShardPlan(config, r, 6) for r in range(6)]
    assert [list(p.heads) for p in plans] == [[h] for h in range(6)]
    assert [list(p.kv_heads) for p in plans] == [[0], [0], [0], [1], [1], [1]]
    with pytest.raises(ShardingError, match=r"rank 6 is outside 0\.\.5"):
        ShardPlan(config, 6, 6)


# --- a rank that dies or hangs mid-decode --------------------------------------------------------------


def decode_with_a_failing_rank(config: LadderConfig, weights: dict, victim: int, how: str,
                               hang_mark: str | None = None) -> int:
    """Decode until step 3, when `victim` is SIGKILLed or stops answering for twice the timeout
    ("hang") or for good ("hang-forever", first writing the monotonic time it hung at to `hang_mark`).

    A surviving rank re-raises the error it got, adding how long after its last good step it noticed.
    """
    model = LadderForCausalLM(config)
    model.load_full_state_dict(weights)
    state = {"steps": 0, "last_good": time.monotonic()}

    def on_tokens(_: torch.Tensor) -> None:
        state["steps"] += 1
        state["last_good"] = time.monotonic()
        if comm.tp_rank() == victim and state["steps"] == 3:
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "hang-forever":
                Path(hang_mark).write_text(str(time.monotonic()))
                time.sleep(600)
            time.sleep(2 * TIMEOUT_S)

    try:
        generate(model, [[1, 2, 3]], max_new_tokens=60, on_tokens=on_tokens)
    except CommunicationError as exc:
        raise CommunicationError(f"{exc} [noticed {time.monotonic() - state['last_good']:.2f}s after the "
                                 "last good step]") from exc
    return state["steps"]


def _rank_messages(error: LaunchError) -> dict[int, str]:
    parts = re.split(r"^--- rank (\d+) ---$", str(error), flags=re.MULTILINE)
    return {int(rank): text for rank, text in zip(parts[1::2], parts[2::2], strict=True)}


def _assert_noticed_it(message: str, rank: int) -> None:
    """The rank stopped on its own with a CommunicationError that says what failed, within the timeout."""
    assert "was killed" not in message, message  # the launcher did not have to kill a hung survivor
    # gloo: "rank 0: all_reduce(sum) failed: ..."; shared memory: "rank 0: shared-memory all_reduce(sum)
    # (op 31) failed: rank 1's process died".
    assert re.search(rf"CommunicationError: rank {rank}: (shared-memory )?\w+(\(\w+\))?( \(op \d+\))? failed",
                     message), message
    noticed = float(re.findall(r"noticed ([\d.]+)s after the last good step", message)[-1])
    assert noticed < TIMEOUT_S + NOTICE_MARGIN_S, message


@pytest.fixture(scope="module")
def small_model(make_tiny_config: Callable) -> tuple[LadderConfig, dict]:
    config = make_tiny_config()
    return config, random_full_state_dict(config, seed=0)


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_killed_rank_makes_the_others_fail_within_the_timeout(small_model: tuple, transport: str) -> None:
    started = time.monotonic()
    with pytest.raises(LaunchError) as failure:
        launch(decode_with_a_failing_rank, 3, *small_model, 1, "kill", timeout_s=TIMEOUT_S,
               placement=Placement(transport=transport))
    elapsed = time.monotonic() - started
    messages = _rank_messages(failure.value)
    assert sorted(messages) == [0, 1, 2]
    assert "rank 1 exited with code -9" in messages[1]
    _assert_noticed_it(messages[0], 0)
    _assert_noticed_it(messages[2], 2)
    assert elapsed < STARTUP_ALLOWANCE_S + TIMEOUT_S


@pytest.mark.parametrize("transport", ["shm", "gloo"])
def test_hung_rank_makes_the_others_fail_at_the_timeout(small_model: tuple, transport: str) -> None:
    with pytest.raises(LaunchError) as failure:
        launch(decode_with_a_failing_rank, 2, *small_model, 1, "hang", timeout_s=TIMEOUT_S,
               placement=Placement(transport=transport))
    messages = _rank_messages(failure.value)
    _assert_noticed_it(messages[0], 0)
    assert float(re.findall(r"noticed ([\d.]+)s", messages[0])[-1]) > TIMEOUT_S / 2  # it did wait for it


def test_a_rank_hung_for_good_ends_the_job_within_the_timeout(small_model: tuple, tmp_path: Path) -> None:
    """The launcher kills the hung rank soon after its peer gives up (it once waited the timeout
    again plus ten seconds)."""
    hang_mark = tmp_path / "hung-at"
    with pytest.raises(LaunchError) as failure:
        launch(decode_with_a_failing_rank, 2, *small_model, 1, "hang-forever", str(hang_mark), timeout_s=TIMEOUT_S)
    ended_after = time.monotonic() - float(hang_mark.read_text())
    messages = _rank_messages(failure.value)
    _assert_noticed_it(messages[0], 0)
    assert "rank 1 was killed" in messages[1]
    assert ended_after < TIMEOUT_S + launcher.FAILURE_GRACE_S + NOTICE_MARGIN_S, ended_after


# --- a rank that never arrives -------------------------------------------------------------------------

JOIN_ALONE = """
import json, sys, time
from ladder import comm, launcher
started = time.monotonic()
try:
    comm.init(timeout_s=float(sys.argv[1]))
    outcome = "joined"
except comm.CommunicationError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "elapsed": time.monotonic() - started}))
"""


def test_rank_that_never_arrives_gives_a_clear_error_within_the_timeout() -> None:
    """World 2 where only rank 0 (the store's host) or only rank 1 (its client) ever starts.

    The host gives up at the timeout. torch's store client retries its connection once after a
    backoff, so a lone client can take up to about twice the timeout: bounded, but not by the timeout.
    """
    timeout = 3.0
    bound = {0: timeout + NOTICE_MARGIN_S, 1: 2 * timeout + NOTICE_MARGIN_S}
    alone = {}
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(launcher.free_port()))
        alone[rank] = subprocess.Popen([sys.executable, "-c", JOIN_ALONE, str(timeout)], env=env,
                                       stdout=subprocess.PIPE, text=True)
    for rank, process in alone.items():
        stdout, _ = process.communicate(timeout=STARTUP_ALLOWANCE_S + timeout)
        result = json.loads(stdout.strip().splitlines()[-1])
        assert result["outcome"].startswith(f"rank {rank}: could not join the gloo process group within 3s")
        assert "did every rank start?" in result["outcome"]
        assert result["elapsed"] < bound[rank], result


# --- inputs that do not fit ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(small_model: tuple) -> LadderForCausalLM:
    config, weights = small_model
    out = LadderForCausalLM(config).eval()
    out.load_full_state_dict(weights)
    return out


def test_prompt_longer_than_the_cache(model: LadderForCausalLM) -> None:
    with pytest.raises(CacheError, match="a prompt of 70 tokens plus 4 new tokens does not fit"):
        generate(model, [list(range(70))], max_new_tokens=4)  # max_position_embeddings is 64
    with pytest.raises(CacheError, match="does not fit the KV cache of 8"):
        generate(model, [list(range(6))], max_new_tokens=4, max_seq_len=8)
    with pytest.raises(CacheError, match="exceeds max_position_embeddings 64"):
        model.setup_cache(1, 65)
    model.setup_cache(1, 8)
    try:
        with pytest.raises(CacheError, match="10 tokens do not fit the KV cache of 8"):
            model(torch.zeros(1, 10, dtype=torch.long), slot=0)
        model(torch.zeros(1, 8, dtype=torch.long), slot=0)  # exactly full is fine...
        with pytest.raises(CacheError, match="9 tokens do not fit"):
            model(torch.zeros(1, 1, dtype=torch.long), slot=8)  # ... one more is not
    finally:
        model.clear_cache()


@pytest.mark.parametrize("bad", [101, -1, 10**6])
def test_token_ids_outside_the_vocabulary(model: LadderForCausalLM, bad: int) -> None:
    with pytest.raises(ValueError, match=rf"token ids \[{bad}\] are outside the vocabulary of 101"):
        generate(model, [[1, 2], [3, bad]], max_new_tokens=2)
    with pytest.raises(ValueError, match=rf"token ids \[{bad}\] are outside the vocabulary of 101"):
        model(torch.tensor([[1, bad]]))


def test_empty_prompts_are_refused(model: LadderForCausalLM) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], max_new_tokens=2)


# --- a launcher that dies takes its ranks with it ----------------------------------------------------

ORPHANED_JOB = """
import os, sys, time
from ladder import comm, launch

def wait_forever(ready):
    with open(ready + str(comm.tp_rank()), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)

if __name__ == "__main__":
    launch(wait_forever, 2, sys.argv[1])
"""


def test_killing_the_launcher_ends_its_ranks(tmp_path: Path) -> None:
    ready, script = str(tmp_path / "ready"), tmp_path / "job.py"
    script.write_text(ORPHANED_JOB)
    job = subprocess.Popen([sys.executable, str(script), ready])
    deadline = time.monotonic() + STARTUP_ALLOWANCE_S
    while not all(os.path.exists(ready + str(r)) and os.path.getsize(ready + str(r)) for r in range(2)):
        assert time.monotonic() < deadline and job.poll() is None, "the ranks never started"
        time.sleep(0.1)
    ranks = [int(Path(ready + str(r)).read_text()) for r in range(2)]
    job.kill()  # SIGKILL: the launcher gets no chance to clean up
    job.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in ranks):
        assert time.monotonic() < deadline, f"ranks {ranks} outlived their launcher"
        time.sleep(0.1)
