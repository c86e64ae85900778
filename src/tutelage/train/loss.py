"""The loss of a batch: the student's log-probabilities at the response positions, scored by one
per-position loss summed over them (today cross-entropy on the labels).

The output head is where the memory goes. Gemma 3's is 262,144 x 640: one fp32 row of logits is
1 MB, so a batch's 1,000-odd response positions make a gigabyte per logits tensor, and the
log-softmax and the backward pass hold several. So the head never sees a whole batch:

  1. the model runs once, through its own forward (and through what wraps it: peft, DDP), and a
     hook on its output head takes the final hidden states of the scored positions, handing the
     head itself none of them (`response_hidden`);
  2. the hidden states go through the head a chunk of positions at a time; each chunk's logits
     are scored, differentiated and freed before the next chunk (`ChunkedHeadLoss`), so at most
     one chunk's [positions x vocab] exists at a time, in the forward pass and the backward.
     Cross-entropy's gradient with respect to the logits is computed in closed form (softmax
     minus one-hot, in place): one such tensor a chunk instead of three.

The per-position loss is a plain function of rows: a chunk's log-probs (positions, vocab) and its
targets, a dict of tensors sliced row for row alongside. Cross-entropy reads `labels`; a
distillation loss reads a teacher's top-k log-probs from the same dict and plugs in the same way.

On CUDA with liger-kernel installed (the `gpu` extra), plain cross-entropy goes through liger's
fused linear cross-entropy instead, the same chunking in Triton kernels. Two cases keep the old
way, every response position's logits at once from the model's own forward: a head whose weights
FSDP or DeepSpeed hold (`head_is_sharded`), and a family whose forward changes the logits after the
head in a way `finish_logits` does not know (`head_is_exact`, checked once per model).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE, Example, collate

# The loss summed over some scored positions, from the student's log-probabilities there
# (positions, vocab) and what each position is scored against, row for row: {"labels": ...}.
PositionLoss = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

# How many logits one chunk holds: 32M, 128 MB in fp32. A chunk's forward and backward hold about
# three such tensors. With Gemma's 262k vocabulary that is 128 positions a chunk; with a 49k one,
# 682. Big enough that the head's matrix product runs at full speed on a CPU.
CHUNK_LOGITS = 2**25

# What a batch feeds the model; every other tensor in it is a per-token target laid out like
# `labels` (index t describes token t, so the position before it is scored against it).
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def cross_entropy(logprobs: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed negative log-likelihood of the labels: with the log-softmax before it, exactly what
    F.cross_entropy computes (it is those two steps)."""
    return F.nll_loss(logprobs, targets["labels"], reduction="sum")


# -- the scored positions -----------------------------------------------------------------------
def response_targets(
    batch: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Which positions of a batch (padded or packed) are scored: a (batch, length) mask of those
    that predict a response token, and their targets, one row per scored position in the order
    the mask picks them (row-major)."""
    shifted = {k: v[:, 1:] for k, v in batch.items() if k not in MODEL_INPUTS}  # t predicts t + 1
    scored = shifted["labels"] != IGNORE
    keep = torch.cat([scored, scored.new_zeros(len(scored), 1)], dim=1)
    return keep, {k: v[scored] for k, v in shifted.items()}


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's wrapper (peft's wrapper passes through: it answers
    `get_output_embeddings` and `config` itself)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def head_is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP (1 or 2) or DeepSpeed holds the weights: they gather a module's weights only
    inside its forward, so the chunks, which call the head after the model's forward, would find
    them missing or in pieces."""
    if type(model).__name__ in ("FullyShardedDataParallel", "DeepSpeedEngine"):
        return True
    head = unwrapped(model).get_output_embeddings()
    return any(
        hasattr(p, "ds_id") or type(p.data) is not torch.Tensor  # ZeRO-3; FSDP2's DTensor
        for p in head.parameters()
    )


def response_hidden(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The final hidden states (positions, hidden) of the positions that predict a response token,
    and their targets row for row.

    The model runs its own forward, so every wrapper and family does what it always does; with
    `logits_to_keep` the forward gathers the scored positions itself, and the hook on the head
    takes them and hands the head zero rows, so the forward computes no logits at all."""
    keep, targets = response_targets(batch)
    head = unwrapped(model).get_output_embeddings()
    taken = []

    def take_rows(module, args):
        taken.append(args[0])
        return (args[0][:0], *args[1:])

    handle = head.register_forward_pre_hook(take_rows)
    try:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
        model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    n = int(keep.sum())
    if len(taken) != 1 or taken[0].shape[:-1] != (n,):
        raise ValueError(
            f"{type(unwrapped(model)).__name__}: its forward did not pass the {n} kept positions "
            "through its output head once; the chunked loss cannot score it"
        )
    return taken[0], targets


def logit_softcap(config) -> float | None:
    """The soft cap on the logits (Gemma 2 and 3, where the config sets one), or None."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None)


def finish_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What a causal LM's forward does to the head's output, the same operations in the same
    order: Gemma 2 and 3 cap the logits softly (tanh) where the config sets a cap; the other
    families `head_is_exact` accepts use them as they are."""
    cap = logit_softcap(config)
    if cap is not None:
        logits = logits / cap
        logits = torch.tanh(logits)
        logits = logits * cap
    return logits


# Models checked by head_is_exact, and the answer (checked once: a tiny forward).
_EXACT_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.no_grad()
def head_is_exact(model: torch.nn.Module) -> bool:
    """Whether `finish_logits` of the output head's output is what the model's forward returns
    as logits: true of every family that only projects (and perhaps soft-caps), false of one that
    scales or slices its logits some other way (Cohere, Granite, ...), or does not call its head
    module at all. Checked once per model, in eval mode, on four tokens."""
    inner = unwrapped(model)
    if inner in _EXACT_HEADS:
        return _EXACT_HEADS[inner]
    head = inner.get_output_embeddings()
    outputs = []
    handle = head.register_forward_hook(lambda module, args, output: outputs.append(output))
    was_training = inner.training
    inner.eval()
    try:
        device = next(inner.parameters()).device
        logits = inner(
            input_ids=torch.tensor([[1, 2, 3, 4]], device=device), use_cache=False
        ).logits
        ours = finish_logits(inner.config, outputs[0]) if len(outputs) == 1 else None
        exact = ours is not None and ours.shape == logits.shape and torch.allclose(ours, logits)
    except Exception:  # noqa: BLE001 - a probe of arbitrary model code: no means the old way
        exact = False
    finally:
        handle.remove()
        inner.train(was_training)
    _EXACT_HEADS[inner] = exact
    return exact


# -- the loss, a chunk of positions at a time ---------------------------------------------------
def chunk_loss(
    project: Callable[[torch.Tensor], torch.Tensor],
    position_loss: PositionLoss,
    hidden: torch.Tensor,
    targets: dict[str, torch.Tensor],
) -> torch.Tensor:
    """The loss of one chunk: its logits, their fp32 log-softmax, scored against its targets."""
    return position_loss(F.log_softmax(project(hidden).float(), dim=-1), targets)


def cross_entropy_and_gradient(
    logits: torch.Tensor, targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy` of the logits' log-softmax, and its gradient with respect to the logits in
    closed form, softmax minus one-hot: one [positions x vocab] tensor, turned from log-probs into
    the gradient in place, where autograd through log-softmax and the loss would hold three (and
    spend a tenth of the head's time on their backward)."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    rows, labels = torch.arange(len(logprobs), device=logprobs.device), targets["labels"]
    loss = -logprobs[rows, labels].sum()
    gradient = logprobs.exp_()
    gradient[rows, labels] -= 1
    return loss, gradient


# Per-position losses whose gradient with respect to the logits has a closed form.
CLOSED_FORM_GRADIENTS = {cross_entropy: cross_entropy_and_gradient}


def loss_and_logits_gradient(
    logits: torch.Tensor,
    position_loss: PositionLoss,
    targets: dict[str, torch.Tensor],
    differentiate: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's loss (detached) and, when `differentiate`, its gradient with respect to the
    chunk's logits: in closed form where there is one, else by autograd."""
    if position_loss in CLOSED_FORM_GRADIENTS and differentiate:
        loss, gradient = CLOSED_FORM_GRADIENTS[position_loss](logits, targets)
        return loss, gradient
    logits = logits.requires_grad_(differentiate)
    with torch.enable_grad():
        loss = position_loss(F.log_softmax(logits.float(), dim=-1), targets)
    gradient = torch.autograd.grad(loss, logits)[0] if differentiate else None
    return loss.detach(), gradient


class ChunkedHeadLoss(torch.autograd.Function):
    """The summed loss of all rows of `hidden`, a chunk at a time, its gradients computed in the
    forward pass: each chunk's logits are made, scored, differentiated (the loss with respect to
    the logits, then the logits with respect to the chunk's hidden states and the head's
    trainable parameters) and freed before the next chunk. The backward pass only scales the
    stored gradients by the incoming one (the loss is a sum).

    So at most one chunk's [positions x vocab] exists at a time, and nothing is recomputed: the
    same matrix products as projecting everything at once. (Recomputing each chunk in the backward
    pass, as a checkpoint would, costs one more head projection, more than the whole rest of
    Gemma-270M's forward.) Dropout on a LoRA-wrapped head is drawn once, in the forward.

    Inputs: hidden (positions, hidden), targets (a dict sliced row for row), project (hidden rows
    -> logits, through the head's own module), position_loss, chunk_positions, then the head's
    trainable parameters, the tensors `project` uses that need a gradient."""

    @staticmethod
    def forward(ctx, hidden, targets, project, position_loss, chunk_positions, *params):
        wants_hidden, wants_params = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        wanted = [p for p, wants in zip(params, wants_params) if wants]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_params = [None] * len(wanted)  # summed over the chunks in fp32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(hidden), chunk_positions):
            rows = slice(start, start + chunk_positions)
            chunk = hidden[rows].detach().requires_grad_(wants_hidden)
            with torch.enable_grad():
                logits = project(chunk)
            differentiate = wants_hidden or bool(wanted)
            loss, grad_logits = loss_and_logits_gradient(
                logits.detach(), position_loss, slice_rows(targets, rows), differentiate
            )
            if differentiate:
                grads = torch.autograd.grad(
                    logits,
                    [chunk] * wants_hidden + wanted,
                    grad_outputs=grad_logits.to(logits.dtype),
                    allow_unused=True,
                    materialize_grads=True,
                )
                if wants_hidden:
                    grad_hidden[rows], grads = grads[0], grads[1:]
                for i, grad in enumerate(grads):
                    if grad_params[i] is None:
                        grad_params[i] = grad.float()
                    else:
                        grad_params[i].add_(grad)
            total += loss
            del logits, grad_logits  # before the next chunk's are made
        # Kept on ctx, not saved: they are ours, and backward scales them in place and lets go, so
        # that a fully trained head's gradient exists once, not twice.
        ctx.grad_hidden = grad_hidden
        ctx.grad_params = [g if g is None else g.to(p.dtype) for p, g in zip(wanted, grad_params)]
        ctx.wants_params = wants_params
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_params = ctx.grad_hidden, iter(ctx.grad_params)
        ctx.grad_hidden = ctx.grad_params = None

        def scaled(grad):
            return None if grad is None else grad.mul_(grad_total)

        return (
            scaled(grad_hidden),
            None,
            None,
            None,
            None,
            *(scaled(next(grad_params)) if wants else None for wants in ctx.wants_params),
        )


def slice_rows(targets: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in targets.items()}


def chunked_loss_sum(
    head: torch.nn.Module,
    project: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: dict[str, torch.Tensor],
    position_loss: PositionLoss = cross_entropy,
    chunk_positions: int | None = None,
) -> torch.Tensor:
    """`position_loss` summed over all rows of `hidden` (positions, hidden), projected onto the
    vocabulary by `project` (the output `head`, then what the model's forward does after it)
    `chunk_positions` rows at a time (default: CHUNK_LOGITS logits a chunk), never more."""
    chunk_positions = chunk_positions or max(1, CHUNK_LOGITS // head.weight.shape[0])
    if not torch.is_grad_enabled():  # evaluation: score the chunks, keep nothing
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, len(hidden), chunk_positions):
            rows = slice(start, start + chunk_positions)
            total += chunk_loss(project, position_loss, hidden[rows], slice_rows(targets, rows))
        return total
    params = [p for p in head.parameters() if p.requires_grad]
    return ChunkedHeadLoss.apply(hidden, targets, project, position_loss, chunk_positions, *params)


# -- liger-kernel's fused linear cross-entropy, on CUDA -----------------------------------------
@functools.cache  # a failed import is not cached by Python: it would search the path every step
def liger_cross_entropy_function():
    """liger-kernel's functional fused linear cross-entropy, or None where it is not installed."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def liger_applies(
    head: torch.nn.Module, device: torch.device, position_loss: PositionLoss, installed: bool
) -> bool:
    """Whether liger's kernel scores a batch: liger installed, plain cross-entropy (its kernel
    knows no other loss), on CUDA (Triton), and a head that is a plain linear layer (a LoRA-wrapped
    head's adapter is not in the one weight liger reads; sharded heads never get here)."""
    return (
        installed
        and position_loss is cross_entropy
        and torch.device(device).type == "cuda"
        and type(head) is torch.nn.Linear
    )


def liger_loss_sum(
    head: torch.nn.Linear, config, hidden: torch.Tensor, targets: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Summed cross-entropy of the labels, by liger's fused linear cross-entropy: the head's
    projection, the soft cap and the loss in chunks, the gradients computed in the forward pass."""
    return liger_cross_entropy_function()(
        hidden,
        head.weight,
        targets["labels"],
        bias=head.bias,
        reduction="sum",
        softcap=logit_softcap(config),
        accum_dtype=torch.float32,  # the head's gradient summed over chunks in fp32
    )


# -- the loss of a batch ------------------------------------------------------------------------
def response_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The student's log-probabilities (fp32) at the positions that predict a response token of a
    batch, one row each, and their targets: all of them at once, from the model's own logits.

    The path for a sharded head or a family `head_is_exact` refuses, and the reference the chunked
    loss is tested against."""
    keep, targets = response_targets(batch)
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (scored, vocab)
    return F.log_softmax(logits.float(), dim=-1), targets


def loss_sum(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    position_loss: PositionLoss = cross_entropy,
    chunk_positions: int | None = None,
) -> tuple[torch.Tensor, int]:
    """The loss summed over the response tokens of a batch, and how many there are.

    Cross-entropy on CUDA with liger installed: liger's fused kernel. Otherwise the chunked head,
    `chunk_positions` positions a chunk (default: CHUNK_LOGITS logits a chunk). A sharded head or
    an unknown logits transform: the whole batch's response logits at once."""
    if head_is_sharded(model) or not head_is_exact(model):
        logprobs, targets = response_logprobs(model, batch)
        return position_loss(logprobs, targets), len(logprobs)
    inner = unwrapped(model)
    head = inner.get_output_embeddings()
    hidden, targets = response_hidden(model, batch)
    if liger_applies(
        head, hidden.device, position_loss, liger_cross_entropy_function() is not None
    ):
        return liger_loss_sum(head, inner.config, hidden, targets), len(hidden)

    def project(rows: torch.Tensor) -> torch.Tensor:
        return finish_logits(inner.config, head(rows))

    loss = chunked_loss_sum(head, project, hidden, targets, position_loss, chunk_positions)
    return loss, len(hidden)


@torch.no_grad()
def eval_loss(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    accelerator=None,
) -> float | None:
    """Mean loss per response token over `examples` (None when there are none). Under several
    processes each scores its share of every batch, and all run the same number of forwards
    (sharded models need every process in every forward)."""
    if not examples:
        return None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    model.eval()
    total, n = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    for i in range(0, len(ordered), batch_size):
        part = ordered[i : i + batch_size]
        mine = part[rank::world]
        batch = {k: v.to(device) for k, v in collate(mine or part[:1], pad_id).items()}
        loss, count = loss_sum(model, batch)
        if mine:
            total, n = total + loss.item(), n + count
    model.train()
    if world > 1:
        total, n = accelerator.reduce(
            torch.tensor([total, n], dtype=torch.float64, device=device), "sum"
        ).tolist()
    return total / n
