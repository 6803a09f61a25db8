"""KV cache, left-padded batches, stop tokens and sampling, at TP=1 (the TP>1 runs are in test_tensor_parallel)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from ladder import (
    LadderConfig,
    LadderForCausalLM,
    Sampling,
    Schedule,
    ShardPlan,
    generate,
    random_full_state_dict,
)
from ladder.generate import choose_next
from ladder.tokenizer import TEMPLATE_SECONDS
from ladder.tokenizer import Tokenizer as LadderTokenizer

pytestmark = pytest.mark.usefixtures("one_compute_thread")

S, L, P = Schedule.STANDARD, Schedule.LADDER, Schedule.PARALLEL
SCHEDULES = {"standard": [S] * 4, "ladder": [L] * 4, "hybrid": [S, S, L, L], "parallel": [P] * 4}
ATOL = 1e-4


@pytest.fixture(scope="module")
def models(make_tiny_config: Callable) -> dict[str, LadderForCausalLM]:
    config = make_tiny_config()
    weights = random_full_state_dict(config, seed=5, std=0.2)
    out = {}
    for name, schedules in SCHEDULES.items():
        out[name] = LadderForCausalLM(config.with_schedules(schedules)).eval()
        out[name].load_full_state_dict(weights)
    return out


def _tokens(config: LadderConfig, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_prefill_then_decode_equals_full_forward(name: str, models: dict) -> None:
    model = models[name]
    ids = _tokens(model.config, 2, 20)
    with torch.inference_mode():
        full = model(ids)
        model.setup_cache(2, 32)
        steps = [model(ids[:, :12], slot=0)]
        steps += [model(ids[:, t:t + 1], slot=t) for t in range(12, 20)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["standard", "hybrid"])
def test_chunked_prefill_equals_full_forward(name: str, models: dict) -> None:
    model = models[name]
    ids = _tokens(model.config, 2, 20, seed=1)
    with torch.inference_mode():
        full = model(ids)
        model.setup_cache(2, 24)
        chunks = [model(ids[:, :7], slot=0), model(ids[:, 7:16], slot=7), model(ids[:, 16:17], slot=16),
                  model(ids[:, 17:20], slot=17)]
        model.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["standard", "hybrid", "ladder"])
def test_left_padded_batch_equals_each_prompt_alone(name: str, models: dict) -> None:
    model = models[name]
    lengths = [9, 4, 6]
    prompts = [_tokens(model.config, n, seed=10 + i) for i, n in enumerate(lengths)]
    fed = _tokens(model.config, 3, 3, seed=20)  # tokens fed in three decode steps
    longest = max(lengths)
    pads = torch.tensor([longest - n for n in lengths])
    # Padding slots hold a token that would change the result if it were attended to.
    batch = torch.stack([torch.cat([torch.full((longest - len(p),), 7), p]) for p in prompts])
    with torch.inference_mode():
        model.setup_cache(3, 16)
        prefill = model(batch, slot=0, padding=pads)
        decoded = [model(fed[:, k:k + 1], slot=longest + k, padding=pads) for k in range(3)]
        model.clear_cache()
        for i, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, fed[i]])[None])[0]
            torch.testing.assert_close(prefill[i, pads[i]:], alone[:lengths[i]], atol=ATOL, rtol=0)
            torch.testing.assert_close(torch.cat([d[i] for d in decoded]), alone[lengths[i]:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["standard", "hybrid"])
def test_generate_batch_equals_each_prompt_alone(name: str, models: dict) -> None:
    model = models[name]
    prompts = [_tokens(model.config, n, seed=30 + n).tolist() for n in (7, 2, 5)]
    batch = generate(model, prompts, max_new_tokens=8)
    assert batch.tokens == [generate(model, [p], max_new_tokens=8).tokens[0] for p in prompts]
    assert all(len(row) == 8 for row in batch.tokens)
    assert len({tuple(row) for row in batch.tokens}) == 3  # different prompts, different continuations


def test_generate_streams_each_step(models: dict) -> None:
    seen: list[list[int]] = []
    result = generate(models["ladder"], [[1, 2, 3], [4, 5]], max_new_tokens=5, on_tokens=lambda t: seen.append(t.tolist()))
    assert [list(step) for step in zip(*result.tokens, strict=True)] == seen
    assert result.decode_steps == 4 and result.prompt_tokens == 5


def test_stop_tokens_end_each_sequence(models: dict) -> None:
    model = models["standard"]
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    free = generate(model, prompts, max_new_tokens=10).tokens
    stop = free[0][3]
    first_hit = free[0].index(stop)
    stopped = generate(model, prompts, max_new_tokens=10, stop_tokens=[stop])
    assert stopped.tokens[0] == free[0][:first_hit + 1]
    assert stopped.stopped[0]
    if stop in free[1]:
        assert stopped.tokens[1] == free[1][:free[1].index(stop) + 1] and stopped.stopped[1]
    else:
        assert stopped.tokens[1] == free[1] and not stopped.stopped[1]
    alone = generate(model, prompts[:1], max_new_tokens=10, stop_tokens=[stop])
    assert alone.decode_steps == first_hit  # decoding really stopped, not just the output trimmed


def test_max_new_tokens_one_is_just_the_prefill_token(models: dict) -> None:
    result = generate(models["hybrid"], [[5, 6, 7]], max_new_tokens=1)
    assert len(result.tokens[0]) == 1 and result.decode_steps == 0


def test_max_new_tokens_zero_generates_nothing(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero means zero (it once produced the prefill's token); the model is not even run."""
    model = models["hybrid"]
    monkeypatch.setattr(model, "forward", lambda *args, **kwargs: pytest.fail("the model ran"))
    result = generate(model, [[5, 6, 7], [8]], max_new_tokens=0)
    assert result.tokens == [[], []] and result.decode_steps == 0 and result.prompt_tokens == 4
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -1"):
        generate(model, [[5, 6, 7]], max_new_tokens=-1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [(dict(temperature=-0.5), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
     (dict(top_p=1.5), "top_p"), (dict(temperature=float("nan")), "temperature must be a finite number"),
     (dict(temperature=float("inf")), "temperature must be a finite number"), (dict(top_k=-3), "top_k"),
     (dict(top_p=float("nan")), "top_p")],
)
def test_sampling_parameters_are_validated(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Sampling(**fields)


def test_seeded_sampling_is_reproducible(models: dict) -> None:
    model = models["ladder"]
    def run(seed: int) -> list[list[int]]:
        return generate(model, [[1, 2, 3]], 12, Sampling(temperature=1.5, top_k=30, top_p=0.95, seed=seed)).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(1) != generate(model, [[1, 2, 3]], 12).tokens  # sampling is not greedy


def test_greedy_ties_go_to_the_lowest_index(make_tiny_config: Callable) -> None:
    config = make_tiny_config()
    logits = torch.zeros(2, config.vocab_size)
    logits[0, [17, 40]] = 3.0
    logits[1, [99, 5]] = 2.0
    chosen = choose_next(logits, ShardPlan(config), Sampling(), torch.Generator())
    assert chosen.tolist() == [17, 5]


def _hf_allowed_probabilities(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution transformers samples from: temperature, then top-k, then top-p, on the full vocab."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(sampling.temperature)(None, logits[None].clone())
    if sampling.top_k is not None:
        scores = TopKLogitsWarper(sampling.top_k)(None, scores)
    if sampling.top_p is not None:
        scores = TopPLogitsWarper(sampling.top_p)(None, scores)
    return scores.softmax(dim=-1)[0]


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=0.7, top_k=6), Sampling(temperature=1.0, top_p=0.7),
     Sampling(temperature=1.3, top_k=12, top_p=0.6), Sampling(temperature=2.0, top_k=3, top_p=0.99)],
    ids=["top_k", "top_p", "top_k+top_p", "top_k-binds"],
)
def test_filtering_matches_transformers(sampling: Sampling, make_tiny_config: Callable) -> None:
    config = make_tiny_config()
    logits = 2.0 * torch.randn(config.vocab_size, generator=torch.Generator().manual_seed(7))
    expected = _hf_allowed_probabilities(logits, sampling)
    allowed = set(torch.nonzero(expected).flatten().tolist())
    unfiltered = (logits / sampling.temperature).softmax(dim=-1)
    # The case is built so a wrong filter shows: the best excluded token is far from negligible.
    assert 2 <= len(allowed) < config.vocab_size
    assert unfiltered[[t for t in range(config.vocab_size) if t not in allowed]].max() > 0.01

    draws = 4000  # every row gets its own noise, so one call draws 4000 independent samples
    chosen = choose_next(logits.expand(draws, -1).contiguous(), ShardPlan(config), sampling,
                         torch.Generator().manual_seed(0))
    counts = torch.bincount(chosen, minlength=config.vocab_size).double() / draws
    assert set(torch.nonzero(counts).flatten().tolist()) <= allowed
    assert {t for t in allowed if expected[t] > 0.005} <= set(chosen.tolist())
    torch.testing.assert_close(counts, expected.double(), atol=0.03, rtol=0)


# --- chat templates found in a checkpoint render under time and size limits --------------------------


@pytest.mark.parametrize(("template", "message"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "takes longer than 2 s"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}many words{% endfor %}{% endfor %}",
     "renders more than 4194304 characters"),
    ("{{ 'x' * 10**10 }}", "'\\*' would make a value beyond the template's limits"),
    ("{{ 7 ** 100000000 }}", "'\\*\\*' would make a value"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
     "'\\+' would make a value"),
])
def test_hostile_chat_templates_are_refused_within_their_limits(tmp_path: Path, template: str, message: str) -> None:
    Tokenizer(WordLevel({"a": 0}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    started = time.perf_counter()
    with pytest.raises(ValueError, match=f"the chat template cannot be rendered: .*{message}"):
        LadderTokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.perf_counter() - started < TEMPLATE_SECONDS + 2
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert LadderTokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_malformed_tokenizer_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizer the tokenizers library reads"):
        LadderTokenizer(tmp_path)
    Tokenizer(WordLevel({"a": 0}, unk_token="a")).save(str(tmp_path / "tokenizer.json"))
    for config, message in (("[1, 2]", "expected a JSON object"), ('{"chat_template": 5}', "chat_template must be a template string")):
        (tmp_path / "tokenizer_config.json").write_text(config)
        with pytest.raises(ValueError, match=rf"tokenizer_config\.json: {message}"):
            LadderTokenizer(tmp_path)
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ messages[0].content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert LadderTokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
