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
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

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
    closed_form = CLOSED_FORM_GRADIENTS.get(position_loss) or getattr(
        position_loss, "loss_and_gradient", None
    )
    if closed_form is not None and differentiate:
        loss, gradient = closed_form(logits, targets)
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


# -- distillation: the teacher's top-k distributions --------------------------------------------
# A bucket of zero mass has an infinite log: the student's tail when the teacher's top-k covers the
# whole vocabulary, the teacher's when its fp16 top-k log-probs round to a sum of one or more.
TAIL_FLOOR = 1e-30
# The teacher's remaining mass is 1 minus its top-k probabilities, computed from rounded log-probs:
# below this it is rounding, not mass, and counts as none (softened by a temperature, 1e-7 of
# rounding would otherwise grow to 3e-4 of mass at T = 2).
TEACHER_TAIL_ROUNDING = 1e-5
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass(eq=False)  # compared and hashed by identity: it keeps running sums
class Distillation:
    """`alpha` x cross-entropy on the labels + (1 - `alpha`) x T^2 x a divergence between the
    teacher's and the student's next-token distributions, each coarsened to k + 1 outcomes: the
    teacher's top-k tokens, and everything else as one tail bucket (the teacher's remaining mass,
    1 - its top-k probabilities; the student's, its probability outside those k ids).

    Why the tail bucket: the top-k renormalised among themselves (DistillKit's sparse logits,
    EasyDistill) forget how sure the teacher is; a teacher with 0.3 of its mass on its top 20 and
    one with 0.99 look alike. Kept as one outcome, both sides are proper distributions over the
    same k + 1 outcomes, the divergence is zero only when the student puts the teacher's mass on
    each top-k token and on the rest, it never exceeds the full-vocabulary divergence (it is that
    of a coarsening), and it equals it when k is the vocabulary.

    The divergences, over those outcomes, with teacher t and student s:
    - forward_kl: KL(t || s), word-level knowledge distillation (Hinton et al. 2015; Kim and Rush
      2016), DistillKit's default: mass-covering, the student spreads over what the teacher
      considers.
    - reverse_kl: KL(s || t), MiniLLM's objective (Gu et al. 2024): mode-seeking, the student
      concentrates where the teacher is sure.
    - jsd: GKD's generalized Jensen-Shannon divergence (Agarwal et al. 2024), as TRL computes it:
      beta x KL(t || m) + (1 - beta) x KL(s || m), m = beta x t + (1 - beta) x s; bounded, and
      between the two KLs as beta moves.

    Temperature (Hinton et al. 2015): both distributions softened, p^(1/T) renormalised, and the
    divergence scaled by T^2 so that its gradients keep their size as T changes. It softens the
    k + 1 outcomes, because only the teacher's top-k log-probs are stored, not its tail's logits;
    when k is the vocabulary this is exactly Hinton's softened softmax.

    A `PositionLoss` (log-probs of a chunk of positions and their targets: `labels`,
    `teacher_ids` and `teacher_logprobs` (positions, k), `teacher_mask` (positions): whether the
    teacher scored the position; a position it did not score has the cross-entropy only). The
    chunked head uses `loss_and_gradient`, the gradient with respect to the logits in closed form.
    `sums` collects the two parts, unweighted, for the training curves (`take_sums`)."""

    divergence: str = "forward_kl"
    alpha: float = 0.5
    temperature: float = 1.0
    beta: float = 0.5
    sums: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(
                f"training.distill.loss: {self.divergence!r} is not one of {DIVERGENCES}"
            )

    @classmethod
    def from_config(cls, distill) -> Distillation:
        """From `training.distill` (a DistillConfig)."""
        return cls(distill.loss, distill.alpha, distill.temperature, distill.beta)

    def take_sums(self) -> dict[str, float]:
        """The parts summed over the positions scored since the last call: `ce` and
        `divergence` (the latter with T^2, as it enters the loss), then start again."""
        sums = {k: float(v) for k, v in self.sums.items()}
        self.sums.clear()
        return {"ce": sums.get("ce", 0.0), "divergence": sums.get("divergence", 0.0)}

    def _add(self, ce: torch.Tensor, divergence: torch.Tensor) -> None:
        for name, value in (("ce", ce), ("divergence", divergence)):
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().sum()

    def divergence_rows(
        self, student_buckets: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """T^2 x the divergence at each position (0 where the teacher scored nothing), from the
        student's log-probabilities of the k + 1 outcomes (positions, k + 1; tail last)."""
        if "teacher_logprobs" not in targets:
            return student_buckets.new_zeros(len(student_buckets))
        teacher_top = targets["teacher_logprobs"].float()
        remaining = 1 - teacher_top.exp().sum(-1)
        teacher_tail = remaining.where(remaining > TEACHER_TAIL_ROUNDING, TAIL_FLOOR).log()
        temperature = self.temperature
        # Renormalised too: fp16 top-k probabilities may sum to a little more than one.
        t = F.log_softmax(torch.cat([teacher_top, teacher_tail[:, None]], -1) / temperature, -1)
        s = F.log_softmax(student_buckets / temperature, -1)
        if self.divergence == "forward_kl":
            rows = (t.exp() * (t - s)).sum(-1)
        elif self.divergence == "reverse_kl":
            rows = (s.exp() * (s - t)).sum(-1)
        else:
            beta = self.beta
            mixture = torch.logsumexp(
                torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0
            )
            rows = beta * (t.exp() * (t - mixture)).sum(-1) + (1 - beta) * (
                s.exp() * (s - mixture)
            ).sum(-1)
        return rows * targets["teacher_mask"].to(rows.dtype) * temperature**2

    def __call__(self, logprobs: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed loss from the student's full log-probabilities (positions, vocab): the
        reference, differentiated by autograd where the head is not chunked."""
        ce = F.nll_loss(logprobs, targets["labels"], reduction="none")
        if "teacher_ids" in targets:
            ids = targets["teacher_ids"]
            outside = logprobs.exp().scatter(-1, ids, 0.0).sum(-1)  # the student's tail mass
            buckets = torch.cat(
                [logprobs.gather(-1, ids), outside.clamp_min(TAIL_FLOOR).log()[:, None]], -1
            )
            divergence = self.divergence_rows(buckets, targets)
        else:
            divergence = torch.zeros_like(ce)
        self._add(ce, divergence)
        return (self.alpha * ce + (1 - self.alpha) * divergence).sum()

    def loss_and_gradient(
        self, logits: torch.Tensor, targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed loss of the logits' log-softmax, and its gradient with respect to the
        logits: one [positions x vocab] tensor, the probabilities turned into the gradient in
        place. Autograd runs only on the (positions, k + 1) outcome log-probs.

        With H_b the divergence's derivative by the student's log-probability of outcome b, and
        p the student's probabilities: d log p_i / d z_v = [v = i] - p_v for a top-k token i, and
        d log p_tail / d z_v = [v outside the top k] p_v / p_tail - p_v for the tail. So the
        gradient is H_b at top-k token b, p_v H_tail / p_tail outside, minus p_v sum_b H_b
        everywhere; plus alpha (p - one-hot(label)) from the cross-entropy."""
        alpha, labels = self.alpha, targets["labels"]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        rows = torch.arange(len(logprobs), device=logprobs.device)
        ce = -logprobs[rows, labels]
        if "teacher_ids" not in targets:  # nothing to distil here: cross-entropy
            self._add(ce, torch.zeros_like(ce))
            gradient = logprobs.exp_()
            gradient[rows, labels] -= 1
            return alpha * ce.sum(), gradient.mul_(alpha)
        ids = targets["teacher_ids"]
        top = logprobs.gather(-1, ids)
        probs = logprobs.exp_()  # from here on the one big tensor holds probabilities
        outside = probs.scatter_(-1, ids, 0.0).sum(-1)  # ... outside the top k: the tail
        tail = outside.clamp_min(TAIL_FLOOR)
        buckets = torch.cat([top, tail.log()[:, None]], -1).requires_grad_()
        with torch.enable_grad():
            divergence = self.divergence_rows(buckets, targets)
            h = torch.autograd.grad(divergence.sum(), buckets)[0] * (1 - alpha)
        h_top, h_tail = h[:, :-1], h[:, -1].where(outside > TAIL_FLOOR, 0.0)  # clamped: constant
        h_sum = h_top.sum(-1) + h_tail
        gradient = probs.mul_((alpha - h_sum + h_tail / tail)[:, None])  # outside the top k
        gradient.scatter_(-1, ids, top.exp() * (alpha - h_sum)[:, None] + h_top)
        gradient[rows, labels] -= alpha
        self._add(ce, divergence.detach())
        return (alpha * ce + (1 - alpha) * divergence.detach()).sum(), gradient


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


def eval_loss(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    accelerator=None,
) -> float | None:
    """Mean cross-entropy per response token over `examples` (None when there are none)."""
    losses = eval_losses(model, examples, batch_size, pad_id, device, accelerator)
    return None if losses is None else losses["loss"]


@torch.no_grad()
def eval_losses(
    model: torch.nn.Module,
    examples: list[Example],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    accelerator=None,
    position_loss: PositionLoss = cross_entropy,
) -> dict[str, float] | None:
    """Means per response token over `examples` (None when there are none): `loss`, and for a
    `Distillation` loss its parts `ce` and `divergence`. Under several processes each scores its
    share of every batch, and all run the same number of forwards (sharded models need every
    process in every forward)."""
    if not examples:
        return None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    parts = isinstance(position_loss, Distillation)
    if parts:
        position_loss.take_sums()  # start from nothing
    model.eval()
    totals = [0.0, 0.0, 0.0, 0]  # loss, ce, divergence, positions
    ordered = sorted(examples, key=lambda e: len(e.input_ids))  # little padding
    for i in range(0, len(ordered), batch_size):
        part = ordered[i : i + batch_size]
        mine = part[rank::world]
        batch = {k: v.to(device) for k, v in collate(mine or part[:1], pad_id).items()}
        loss, count = loss_sum(model, batch, position_loss)
        sums = position_loss.take_sums() if parts else {"ce": 0.0, "divergence": 0.0}
        if mine:
            totals = [
                totals[0] + loss.item(),
                totals[1] + sums["ce"],
                totals[2] + sums["divergence"],
                totals[3] + count,
            ]
    model.train()
    if world > 1:
        totals = accelerator.reduce(
            torch.tensor(totals, dtype=torch.float64, device=device), "sum"
        ).tolist()
    loss, ce, divergence, n = totals
    if not parts:
        return {"loss": loss / n}
    return {"loss": loss / n, "ce": ce / n, "divergence": divergence / n}
