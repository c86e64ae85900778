"""Supervised fine-tuning of the student: the stage (`loop.train`) and its plain components, by what
each does: `data` (tokenize, plan, collate, pack), `model` (load, packing, gather), `loss`,
`checkpoints` and `outputs` (the files a run leaves)."""

from .checkpoints import (
    CHECKPOINT_FORMAT,
    KEEP_CHECKPOINTS,
    LoopState,
    checkpoint_hooks,
    checkpoints,
    save_checkpoint,
    trainable_state,
)
from .data import (
    IGNORE,
    MEGABATCH,
    Example,
    batch_plan,
    collate,
    pack,
    tokenize_example,
    tokenize_examples,
)
from .loop import (
    NOT_FINGERPRINTED,
    fingerprint,
    lr_factor,
    make_accelerator,
    torch_threads,
    train,
)
from .loss import PositionLoss, cross_entropy, eval_loss, loss_sum, response_logprobs
from .model import (
    VARLEN_ATTENTION,
    choose_packing,
    load_model,
    packing_is_exact,
    plain_model,
    qlora_quantization,
)
from .outputs import save_student, student_info, swap_in, write_atomically

__all__ = [
    "CHECKPOINT_FORMAT",
    "IGNORE",
    "KEEP_CHECKPOINTS",
    "MEGABATCH",
    "NOT_FINGERPRINTED",
    "VARLEN_ATTENTION",
    "Example",
    "LoopState",
    "PositionLoss",
    "batch_plan",
    "checkpoint_hooks",
    "checkpoints",
    "choose_packing",
    "collate",
    "cross_entropy",
    "eval_loss",
    "fingerprint",
    "load_model",
    "loss_sum",
    "lr_factor",
    "make_accelerator",
    "pack",
    "packing_is_exact",
    "plain_model",
    "qlora_quantization",
    "response_logprobs",
    "save_checkpoint",
    "save_student",
    "student_info",
    "swap_in",
    "tokenize_example",
    "tokenize_examples",
    "torch_threads",
    "train",
    "trainable_state",
    "write_atomically",
]
