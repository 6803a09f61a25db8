"""Light fine-tuning of a Ladder checkpoint under tensor (and data) parallelism, on CPU ranks.

`ladder finetune CKPT --data FILE... --out DIR` or `finetune(Settings(...))`. The rooms:
`settings` (what defines a run, and its flags), `trainer` (one optimizer step, evaluation, the
tensor-parallel gradient fix-ups), `rundir` (metrics and resumable checkpoints), `run` (a run from
its checks to the saved checkpoint, on one, spawned or torchrun ranks), `cli` (the command).
"""

from ladder.finetune.run import finetune, validation_loss
from ladder.finetune.settings import FinetuneError, Settings
from ladder.finetune.trainer import Trainer, prepare_model

__all__ = ["FinetuneError", "Settings", "Trainer", "finetune", "prepare_model", "validation_loss"]
