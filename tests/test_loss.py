"""The chunked loss: the same loss and gradients as projecting every response position at once,
while no more than one chunk of positions is ever projected onto the vocabulary."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GraniteConfig,
    LlamaConfig,
    Qwen2Config,
)

from tutelage.train import IGNORE, collate, tokenize_examples
from tutelage.train import loss as L

EXAMPLES = [
    ("Name a primary colour.", "", "Red is a primary colour, and so is blue."),
    ("Translate to French.", "cat", "chat"),
    ("Add the numbers.", "2 and 3", "2 plus 3 is 5, which is odd."),
]
CHUNK = 7  # positions a chunk: the batch's ~40 response positions make several, the last ragged


def tiny(family: str, vocab: int, dtype=torch.float32, **extra) -> torch.nn.Module:
    """A 2-layer random model of `family` in memory."""
    torch.manual_seed(0)
    size = {
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    config = {
        "llama": lambda: LlamaConfig(**size),
        "qwen2": lambda: Qwen2Config(**size),
        # Gemma 3 ties the head to the embeddings; the cap is Gemma 2's, which some configs keep
        "gemma3": lambda: Gemma3TextConfig(
            **size,
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            final_logit_softcapping=0.1,  # low: the tiny model's logits are about 0.16
        ),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            **dict.fromkeys(["resid_pdrop", "embd_pdrop", "attn_pdrop"], 0.0),  # deterministic
        ),
        # Granite divides its logits by `logits_scaling` after the head: a transform finish_logits
        # does not know
        "granite": lambda: GraniteConfig(**size, logits_scaling=4.0),
    }[family]()
    for key, value in extra.items():
        setattr(config, key, value)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def with_lora(model: torch.nn.Module, head: bool) -> torch.nn.Module:
    """LoRA on every linear layer, and on the output head too when `head`; no dropout (the two
    paths draw it differently)."""
    targets = "all-linear" if not head else ["q_proj", "v_proj", "lm_head", "c_attn"]
    return get_peft_model(
        model,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=targets,
            task_type="CAUSAL_LM",
            init_lora_weights=False,  # B random too, so that every adapter weight has a gradient
        ),
    )


def make_batch(tokenizer) -> dict[str, torch.Tensor]:
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in EXAMPLES]
    return collate(tokenize_examples(tokenizer, rows, "alpaca", 384)[0], tokenizer.pad_token_id)


def whole_batch_loss(model, batch, position_loss=L.cross_entropy) -> tuple[torch.Tensor, int]:
    """The reference: the model's own logits for every response position at once."""
    logprobs, targets = L.response_logprobs(model, batch)
    return position_loss(logprobs, targets), len(logprobs)


def loss_and_gradients(loss_of, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = loss_of(model, batch)
    (loss * 0.37).backward()  # scaled, as the loop scales the sum by 1 / response tokens
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def assert_same_loss_and_gradients(model, batch, rtol, position_loss=L.cross_entropy):
    chunked = loss_and_gradients(
        lambda m, b: L.loss_sum(m, b, position_loss, chunk_positions=CHUNK), model, batch
    )
    whole = loss_and_gradients(lambda m, b: whole_batch_loss(m, b, position_loss), model, batch)
    assert chunked[0] == pytest.approx(whole[0], rel=rtol)
    assert chunked[1].keys() == whole[1].keys() and chunked[1]
    for name, grad in whole[1].items():
        assert grad.abs().max() > 0, name  # the comparison means something
        # summed in another order: elementwise within rtol of the gradient's largest entry
        scale = grad.abs().max().item()
        torch.testing.assert_close(chunked[1][name], grad, rtol=rtol, atol=rtol * scale, msg=name)


# -- exact: the same loss and gradients ---------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("method", ["full", "lora", "lora+head"])
def test_chunked_loss_and_gradients_are_the_whole_batchs(tokenizer, family, method):
    model = tiny(family, len(tokenizer))
    if method != "full":
        model = with_lora(model, head=method == "lora+head")
    batch = make_batch(tokenizer)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert n > 3 * CHUNK and n % CHUNK  # several chunks, the last one short
    assert L.head_is_exact(model)
    assert_same_loss_and_gradients(model, batch, rtol=1e-5)
    # and the evaluation's path, without gradients
    with torch.no_grad():
        chunked, count = L.loss_sum(model, batch, chunk_positions=CHUNK)
        whole, whole_count = whole_batch_loss(model, batch)
    assert count == whole_count == n
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5)


def test_the_soft_cap_is_applied_as_the_model_does(tokenizer):
    batch = make_batch(tokenizer)
    capped = tiny("gemma3", len(tokenizer))
    uncapped = tiny("gemma3", len(tokenizer), final_logit_softcapping=None)
    assert L.head_is_exact(capped)  # the chunks cap as the model does, or the probe would say no
    with torch.no_grad():
        losses = [L.loss_sum(m, batch, chunk_positions=CHUNK)[0].item() for m in (capped, uncapped)]
        reference = [whole_batch_loss(m, batch)[0].item() for m in (capped, uncapped)]
    assert losses == pytest.approx(reference, rel=1e-5)
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)  # the cap changes the loss here


def test_a_model_that_transforms_its_logits_otherwise_is_scored_whole(tokenizer):
    """Granite divides its logits after the head: the probe sees it, and the loss takes the model's
    own logits instead, still right."""
    model = tiny("granite", len(tokenizer))
    assert not L.head_is_exact(model)
    batch = make_batch(tokenizer)
    with torch.no_grad():
        loss, n = L.loss_sum(model, batch, chunk_positions=CHUNK)
        own = model(**batch).loss  # transformers' own shifted, masked mean over full logits
    assert (loss / n).item() == pytest.approx(own.item(), rel=1e-5)


def test_a_sharded_head_is_scored_whole(tokenizer):
    model = tiny("llama", len(tokenizer))
    assert not L.head_is_sharded(model)
    model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned weights with
    assert L.head_is_sharded(model)
    heads = count_head_rows(model)
    _, n = L.loss_sum(model, make_batch(tokenizer), chunk_positions=CHUNK)
    assert heads == [n]  # one projection of every position, the model's own


def test_any_per_position_loss_gets_its_targets_row_for_row(tokenizer):
    """What a distillation loss needs: per-token tensors beside the labels, laid out like them,
    reach the per-position loss sliced row for row with the chunk's log-probs."""
    model = with_lora(tiny("llama", len(tokenizer)), head=False)
    batch = make_batch(tokenizer)
    generator = torch.Generator().manual_seed(0)
    k = 5
    batch["teacher_ids"] = torch.randint(0, len(tokenizer), (*batch["labels"].shape, k))
    teacher = torch.randn(*batch["labels"].shape, k, generator=generator)
    batch["teacher_logprobs"] = torch.log_softmax(teacher, dim=-1)

    def forward_kl(logprobs, targets):  # KL(teacher || student) over the teacher's top k
        teacher_lp = targets["teacher_logprobs"]
        student_lp = logprobs.gather(-1, targets["teacher_ids"])
        return (teacher_lp.exp() * (teacher_lp - student_lp)).sum()

    assert_same_loss_and_gradients(model, batch, rtol=1e-5, position_loss=forward_kl)
    # the rows are the positions before each response token: moving a target moves the loss
    shifted = dict(batch, teacher_ids=batch["teacher_ids"].roll(1, dims=1))
    with torch.no_grad():
        assert L.loss_sum(model, shifted, forward_kl)[0].item() != pytest.approx(
            L.loss_sum(model, batch, forward_kl)[0].item(), rel=1e-3
        )


# -- memory: never more than a chunk of positions x vocabulary ---------------------------------
class WidestLogits(TorchDispatchMode):
    """The most rows of any fresh tensor (not a view, not written in place) whose last dimension
    is the vocabulary: logits, log-probs and their gradients, in the forward and the backward."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                    self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def count_head_rows(model) -> list[int]:
    """Rows of every call of the model's output head from now on."""
    calls = []
    head = L.unwrapped(model).get_output_embeddings()
    head.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("method", ["full", "lora+head"])
def test_at_most_one_chunk_of_logits_exists_forward_and_backward(tokenizer, method):
    vocab = len(tokenizer)
    model = tiny("gemma3", vocab)
    if method != "full":
        model = with_lora(model, head=True)
    batch = make_batch(tokenizer)
    L.head_is_exact(model)  # its one-off probe projects 4 positions
    calls = count_head_rows(model)
    with WidestLogits(vocab) as chunked:
        loss, n = L.loss_sum(model, batch, chunk_positions=CHUNK)
        loss.backward()
    assert chunked.rows == CHUNK
    # one call that projects nothing (the model's forward), then one per chunk: none recomputed
    assert calls == [0] + [CHUNK] * (n // CHUNK) + [n % CHUNK]

    with WidestLogits(vocab) as whole:  # the instrument sees a whole batch where there is one
        whole_batch_loss(model, batch)[0].backward()
    assert whole.rows == n


def test_the_default_chunk_holds_a_fixed_number_of_logits(tokenizer, monkeypatch):
    vocab = len(tokenizer)
    model = tiny("llama", vocab)
    batch = make_batch(tokenizer)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    L.head_is_exact(model)
    calls = count_head_rows(model)
    monkeypatch.setattr(L, "CHUNK_LOGITS", 10 * vocab + 5)  # 10 positions a chunk
    L.loss_sum(model, batch)
    assert calls[1:] == [10] * (n // 10) + [n % 10] * bool(n % 10)


# -- liger-kernel on CUDA -----------------------------------------------------------------------
def test_liger_is_chosen_only_for_cross_entropy_on_cuda_with_a_plain_head(tokenizer):
    plain = tiny("llama", len(tokenizer)).lm_head
    lora_head = with_lora(tiny("llama", len(tokenizer)), head=True).get_output_embeddings()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert L.liger_applies(plain, cuda, L.cross_entropy, installed=True)
    assert not L.liger_applies(plain, cuda, L.cross_entropy, installed=False)
    assert not L.liger_applies(plain, cpu, L.cross_entropy, installed=True)
    assert not L.liger_applies(plain, cuda, lambda lp, t: lp.sum(), installed=True)
    assert not L.liger_applies(lora_head, cuda, L.cross_entropy, installed=True)
    installed = importlib.util.find_spec("liger_kernel") is not None
    assert (L.liger_cross_entropy_function() is not None) == installed


def test_the_liger_branch_passes_the_head_and_labels(tokenizer, monkeypatch):
    """On the CPU, with a stand-in for liger's function (its real kernels need CUDA): loss_sum
    hands it the scored hidden states, the head's weight, the labels and the soft cap."""
    calls = []

    def stand_in(hidden, weight, target, bias=None, reduction="mean", softcap=None, **kwargs):
        calls.append((hidden.shape, reduction, softcap))
        logits = F.linear(hidden, weight, bias)
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits.float(), target, reduction=reduction)

    real = L.liger_applies
    monkeypatch.setattr(L, "liger_cross_entropy_function", lambda: stand_in)
    monkeypatch.setattr(
        L,
        "liger_applies",
        lambda head, device, loss, installed: real(head, "cuda", loss, installed),
    )
    model = tiny("gemma3", len(tokenizer))
    batch = make_batch(tokenizer)
    with torch.no_grad():
        loss, n = L.loss_sum(model, batch)
        whole, _ = whole_batch_loss(model, batch)
    assert calls == [(torch.Size([n, 64]), "sum", 0.1)]
    assert loss.item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels: needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_on_cuda_matches_the_whole_batch(tokenizer, family, monkeypatch):
    model = tiny(family, len(tokenizer), dtype=torch.bfloat16).cuda()
    batch = {k: v.cuda() for k, v in make_batch(tokenizer).items()}
    monkeypatch.setattr(L, "liger_cross_entropy_function", lambda: None)  # the chunked path
    assert_same_loss_and_gradients(model, batch, rtol=2e-2)
    if importlib.util.find_spec("liger_kernel") is not None:
        monkeypatch.undo()
        with torch.no_grad():
            fused, _ = L.loss_sum(model, batch)
            whole, _ = whole_batch_loss(model, batch)
        assert fused.item() == pytest.approx(whole.item(), rel=1e-2)
