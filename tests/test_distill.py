"""Distillation from the standard schedule: the KL against torch's, the teacher it learns from, learning.

The TP=2 x DP=2 gradients of distillation are checked with the other training variants in
tests/test_train_parallel.py, and exact resume after SIGKILL in tests/test_train.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import hybrid, tiny_config
from test_train import TEXT, text_file, tiny_checkpoint

from ladder import LadderForCausalLM, Schedule, from_pretrained, random_full_state_dict
from ladder.finetune import FinetuneError, Settings, Trainer, finetune, prepare_model
from ladder.tokenizer import Tokenizer
from ladder.vocab import vocab_parallel_kl_divergence


def torch_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token t^2 KL(teacher || student) on whole logits, as torch states it."""
    return F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                    log_target=True, reduction="none").sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_at_one_rank_is_torchs(temperature: float) -> None:
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(2, 5, 11, generator=generator)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 11, generator=generator)
    ours = vocab_parallel_kl_divergence(student, teacher, temperature)
    (grad,) = torch.autograd.grad(ours.sum(), student)
    theirs = torch_kl(student, teacher, temperature)
    (want,) = torch.autograd.grad(theirs.sum(), student)
    assert theirs.min() > 0.01
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, want)


def trainer_for(schedules: list[Schedule], **settings: object) -> Trainer:
    config = tiny_config().with_schedules(schedules)
    model = LadderForCausalLM(config)
    model.load_full_state_dict(random_full_state_dict(config, seed=4, std=0.2))
    options = Settings(Path("ckpt"), [], Path("out"), distill=True, lr=1e-2, **settings)
    prepare_model(model, options)
    return Trainer(model, options, total_steps=5)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 101, (2, 17), generator=torch.Generator().manual_seed(5))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_distillation_loss_is_zero_for_the_teachers_schedule_and_positive_for_another(lora_rank: int) -> None:
    standard = trainer_for([Schedule.STANDARD] * 4, lora_rank=lora_rank)
    assert standard.loss(*batch()).item() == pytest.approx(0.0, abs=1e-6)
    ladder = trainer_for(hybrid(4), lora_rank=lora_rank)
    assert ladder.loss(*batch()).item() > 1e-3
    # LoRA's teacher shares the frozen base weights; full fine-tuning's holds a copy of them all.
    assert (ladder.teacher.copied_bytes == 0) == bool(lora_rank)


def test_teacher_keeps_the_original_weights_while_the_student_trains() -> None:
    trainer = trainer_for(hybrid(4), only_ladder_layers=True)
    inputs, targets = batch()
    before = trainer.teacher.logits(inputs)
    frozen = trainer.model.model.layers[0].mlp.up_proj.weight
    assert trainer.teacher.model.model.layers[0].mlp.up_proj.weight.data_ptr() == frozen.data_ptr()
    trainer.step([(inputs, targets)])
    torch.testing.assert_close(trainer.teacher.logits(inputs), before, rtol=0, atol=0)
    # Only the trained (ladder) layers were copied: two of the four, nothing else.
    layer_bytes = sum(p.numel() * 4 for p in trainer.model.model.layers[2].parameters())
    assert trainer.teacher.copied_bytes == 2 * layer_bytes


def test_distillation_with_a_weight_mixes_in_the_language_model_loss() -> None:
    inputs, targets = batch()
    distill = trainer_for(hybrid(4)).loss(inputs, targets).item()
    language = trainer_for(hybrid(4), distill_weight=0.0).loss(inputs, targets).item()
    mixed = trainer_for(hybrid(4), distill_weight=0.25).loss(inputs, targets).item()
    assert mixed == pytest.approx(0.25 * distill + 0.75 * language, rel=1e-5)


@pytest.mark.parametrize(("field", "value"), [("distill_temperature", 0.0), ("distill_temperature", float("inf")),
                                              ("distill_weight", 1.5), ("distill_weight", -0.1)])
def test_bad_distillation_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(FinetuneError, match="--" + field.replace("_", "-")):
        Settings(Path("ckpt"), [], Path("out"), distill=True, **{field: value})


def mean_kl(student: LadderForCausalLM, teacher: LadderForCausalLM, ids: torch.Tensor) -> float:
    """Mean KL from `teacher`'s next-token distributions to `student`'s, by torch on whole logits."""
    with torch.no_grad():
        return torch_kl(student(ids), teacher(ids), 1.0).mean().item()


def test_distilling_moves_the_ladder_model_towards_the_standard_one(tmp_path: Path) -> None:
    original = tiny_checkpoint(tmp_path / "tiny", std=0.15)
    data = text_file(tmp_path / "text.txt")
    ids = torch.tensor(Tokenizer(original).encode(TEXT)[:128]).view(4, 32)
    teacher = from_pretrained(original, schedules=[Schedule.STANDARD] * 4)
    out = tmp_path / "distilled"
    finetune(Settings(original, [data], out, ladder_layers="upper-half", distill=True, seq_len=32, batch_size=4,
                      steps=40, lr=1e-3, warmup_steps=10, progress=False, threads=1))
    before = mean_kl(from_pretrained(original, schedules=hybrid(4)), teacher, ids)
    after = mean_kl(from_pretrained(out), teacher, ids)
    assert before > 0.05
    assert after < 0.6 * before, (before, after)


def test_bfloat16_autocast_distills_like_float32() -> None:
    inputs, targets = batch()
    losses = {dtype: trainer_for(hybrid(4), dtype=dtype).loss(inputs, targets).item()
              for dtype in ("float32", "bfloat16")}
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=5e-2)
    assert losses["bfloat16"] != losses["float32"]  # autocast really computed in bfloat16
