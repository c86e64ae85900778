"""The student as training sees it: loaded and LoRA-wrapped (or whole, or on a 4-bit base), whether
it can train on packed sequences, and the trained model gathered back into one plain module."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from .checkpoints import trainable_state

# Attention kernels that take packed sequences apart from position_ids at no extra cost.
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def load_model(
    config: Config, path: Path, device: torch.device, bf16: bool = False, for_export: bool = False
) -> torch.nn.Module:
    """The student ready to train on `device`: LoRA-wrapped (`lora`, `qlora`) or whole (`full`),
    its weights in bf16 when asked (pure bf16, as torchtune does), else fp32.
    `for_export`: full precision on the CPU, the shape a trained state is merged into."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    method, cfg = config.student.method, config.training
    kwargs: dict = (
        {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    )
    bf16 = bf16 and not for_export
    quantized = method == "qlora" and not for_export
    if quantized:
        kwargs.update(quantization_config=qlora_quantization(device), device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if bf16 else torch.float32, **kwargs
        )
    except Exception as e:  # a folder with a config.json that transformers cannot load
        raise ValueError(
            f"student.model: {config.student.model}: cannot load the model ({first_line(e)})"
        ) from e
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    else:
        model.to(device)
        if cfg.gradient_checkpointing and not for_export:
            model.activation_checkpointing_enable()  # non-reentrant: LoRA needs no input grads
    if method in ("lora", "qlora"):
        lora = config.student.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
    return model


def qlora_quantization(device: torch.device):
    """QLoRA's base model: 4-bit NormalFloat with double quantization, computing in bf16."""
    if device.type != "cuda":
        raise ValueError(
            "student.method: qlora needs a CUDA GPU (4-bit bitsandbytes kernels); "
            "use lora on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            "student.method: qlora needs bitsandbytes: pip install bitsandbytes"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
    )


@torch.no_grad()
def packing_is_exact(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether `model` keeps packed sequences apart: two short sequences scored packed and one
    by one must give the same logits. Cheap, and true for any architecture that passes."""
    vocab = (
        model.config.get_text_config().vocab_size
        if hasattr(model.config, "get_text_config")
        else model.config.vocab_size
    )
    first, second = torch.arange(7) * 13 % vocab, torch.arange(5) * 29 % vocab + 3
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat(
            [
                model(input_ids=s[None].to(device), use_cache=False).logits[0]
                for s in (first, second)
            ]
        )
        packed = model(
            input_ids=torch.cat([first, second])[None].to(device),
            position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None].to(device),
            use_cache=False,
        ).logits[0]
    # Any failure (a forward without position_ids, say) only means: do not pack.
    except Exception:  # noqa: BLE001 - a probe of arbitrary model code
        return False
    finally:
        model.train(was_training)
    tolerance = 5e-2 if apart.dtype in (torch.bfloat16, torch.float16) else 1e-3
    return bool(torch.allclose(apart.float(), packed.float(), atol=tolerance, rtol=tolerance))


def choose_packing(setting: bool | str, model: torch.nn.Module, device: torch.device) -> bool:
    """`auto` packs only with a varlen attention kernel (flash attention), where it is free. With
    sdpa or eager attention the packed mask is a dense block-diagonal matrix, and on the CPU we
    measured no gain over length-grouped padding (docs/benchmarks.md); `true` packs anyway."""
    if setting is False:
        return False
    implementation = getattr(model.config, "_attn_implementation", None) or ""
    if setting == "auto" and implementation not in VARLEN_ATTENTION:
        return False
    if packing_is_exact(model, device):
        return True
    if setting is True:
        raise ValueError(
            f"training.packing: {type(model).__name__} with {implementation or 'its'} "
            f"attention mixes packed sequences; set packing: false"
        )
    return False


def plain_model(accelerator, model, config: Config, path: Path) -> torch.nn.Module | None:
    """The trained model as one plain full-precision module on the main process (None on the
    others). Sharded (FSDP, DeepSpeed) or 4-bit (QLoRA) training is gathered into a fresh
    full-precision copy of the base, so merging LoRA never rounds through 4 bits."""
    from accelerate.utils import DistributedType

    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if not sharded and config.student.method != "qlora":
        return accelerator.unwrap_model(model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(model)  # every process takes part in the gather
    if not accelerator.is_main_process:
        return None
    rebuilt = load_model(config, path, torch.device("cpu"), for_export=True)
    wanted = trainable_state(rebuilt).keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise RuntimeError(f"the trained state lacks {missing[0]}")
    rebuilt.load_state_dict({k: state[k] for k in wanted}, strict=False)
    return rebuilt


def first_line(e: BaseException) -> str:
    """An error as one line: the first of its message, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
