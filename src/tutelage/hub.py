"""A run published on the Hugging Face Hub (`tutelage export RUN --push-to-hub REPO`): the student
as the model repository REPO, with a card written from the run, and the kept dataset as the
dataset repository of the same name.

`prepare_upload` builds, on disk, exactly what goes up; nothing leaves the machine until `upload`,
the one function that talks to the Hub. The token is huggingface_hub's own business (`HF_TOKEN`
or `hf auth login`): tutelage never reads, stores or prints it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from . import __version__
from .export import export_data, export_model
from .store import Store
from .templating import TEMPLATE_DIR

EXAMPLE_INSTRUCTION = "Give three tips for keeping a houseplant alive."
# The embedded student, as its Hub id and licence (its GGUF is Google's Gemma-3-270M base).
EMBEDDED_STUDENT_ID = "google/gemma-3-270m"
PRUNED_TEACHER = "<the teacher, pruned>"  # student.from_teacher: no base model of its own


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a full Hub id (namespace/name), else one line saying what is wrong."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        raise ValueError(
            f"--push-to-hub: {repo_id!r}: give the full id, user/name or org/name (the model and "
            "the dataset both go there)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"--push-to-hub: {repo_id!r}: {str(e).split(':')[0]}") from None
    return repo_id


def push_to_hub(
    run_dir: Path, repo_id: str, private: bool = False, folder: Path | None = None
) -> dict[str, str]:
    """Prepare `folder` (default RUN/hub) and upload it; returns the repositories' addresses."""
    check_repo_id(repo_id)
    folder = prepare_upload(Path(run_dir), repo_id, folder)
    return upload(folder, repo_id, private)


def prepare_upload(run_dir: Path, repo_id: str, folder: Path | None = None) -> Path:
    """Write what goes to the Hub: FOLDER/model (the student, LoRA merged, with its README.md
    card) and FOLDER/dataset (the kept examples as a `datasets` folder, one split per data
    split). The default folder, RUN/hub, is rebuilt each time; another must be empty or absent."""
    run_dir = Path(run_dir)
    if folder is None:
        folder = run_dir / "hub"
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder}: exists and is not empty")
    model_dir = export_model(run_dir, folder / "model")
    export_data(run_dir, "hf", folder / "dataset")
    info_path = model_dir / "tutelage.json"
    if info_path.exists():  # the base's local path says nothing to a reader, and names a home
        info = json.loads(info_path.read_text())
        info.pop("base_path", None)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    with Store(run_dir) as store:
        card = model_card(store, run_dir, repo_id)
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    return folder


def upload(folder: Path, repo_id: str, private: bool) -> dict[str, str]:
    """Send a prepared folder to the Hub: FOLDER/dataset with `datasets` (Parquet shards and its
    own dataset card), FOLDER/model with huggingface_hub. Both repositories are created, private
    if asked, when missing; uploading again replaces what changed."""
    from datasets import load_from_disk
    from huggingface_hub import HfApi

    load_from_disk(str(folder / "dataset")).push_to_hub(
        repo_id, private=private, commit_message=f"tutelage {__version__}: the kept dataset"
    )
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder / "model"),
        commit_message=f"tutelage {__version__}: the student and its card",
    )
    return {
        "model": f"https://huggingface.co/{repo_id}",
        "dataset": f"https://huggingface.co/datasets/{repo_id}",
    }


# -- the model card -----------------------------------------------------------------------------
def model_card(store: Store, run_dir: Path, repo_id: str) -> str:
    """README.md for the student's repository, from the store: where the data came from (the
    funnel, by rejection reason), how the student was trained, and how it scored (means with
    their 95% intervals)."""
    import jinja2

    from .report.formatting import template_environment
    from .report.page import _evaluation, _funnel, _training

    config = store.get_meta("config") or {}
    info = json.loads((Path(run_dir) / "student" / "tutelage.json").read_text())
    kept_rows = store.examples(status="kept")
    training = _training(store)
    run = store.latest_train_run(status="done")
    settings = json.loads(run["config_json"]) if run else config
    base = info.get("base_model") or settings.get("student", {}).get("model", "")
    if settings.get("student", {}).get("from_teacher"):  # the teacher's own weights, pruned
        base = PRUNED_TEACHER
    # The report's filters (numbers, intervals, Markdown made inert), the card's own template.
    env = template_environment().overlay(loader=jinja2.FileSystemLoader(TEMPLATE_DIR / "hub"))
    return env.get_template("model_card.md.jinja").render(
        metadata=yaml.safe_dump(_metadata(base, repo_id, info), sort_keys=False).strip(),
        repo_id=repo_id,
        version=__version__,
        base=_base_label(base, settings.get("teacher", {}).get("model", "")),
        method=info.get("method", ""),
        teacher=_teacher(settings.get("teacher", {})),
        recipe=settings.get("generation", {}).get("recipe"),
        training_settings=settings.get("training", {}),
        funnel=_funnel(store.funnel(), kept_rows, store.batch_stats()),
        training=training,
        evaluation=_evaluation(store.eval_summary()),
        usage=_usage(settings.get("training", {}).get("prompt_format", "alpaca")),
    )


def _metadata(base: str, repo_id: str, info: dict) -> dict:
    """The card's YAML header: what the Hub indexes (base model, dataset, tags)."""
    from .config import EMBEDDED
    from .model_files import is_hub_id

    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if base == EMBEDDED:
        meta |= {"license": "gemma", "base_model": EMBEDDED_STUDENT_ID}
    elif is_hub_id(base):
        meta["base_model"] = base
    meta["datasets"] = [repo_id]
    meta["tags"] = ["tutelage", "distillation", info.get("method") or "fine-tuned"]
    return meta


def _base_label(base: str, teacher: str) -> str:
    """The base model as a reader knows it: a Hub id, else a local folder's name (not its path)."""
    from .config import EMBEDDED

    if base == PRUNED_TEACHER:
        return f"the teacher ({_model_name(teacher)}), pruned"
    if base == EMBEDDED:
        return f"{EMBEDDED_STUDENT_ID} (its Q4_K_M GGUF, dequantized)"
    return _model_name(base)


def _model_name(model: str, embedded: str = "") -> str:
    """A Hub id or an API model name as it is; a local path by its last part only."""
    from .config import EMBEDDED
    from .model_files import is_hub_id

    if model == EMBEDDED:
        return embedded or model
    return model if is_hub_id(model) or "/" not in model else Path(model).name


def _teacher(teacher: dict) -> str:
    from .model_files import TEACHER_NAME

    name = _model_name(teacher.get("model", ""), embedded=TEACHER_NAME)
    return f"{name} ({teacher.get('backend', '?')})"


def _usage(prompt_format: str) -> dict:
    """How to prompt the student as it was trained: the rendered prompt of an example, or the
    chat template."""
    from .student_prompt import student_prompt

    if prompt_format == "chat":
        return {"chat": True, "prompt": None}
    try:
        prompt = student_prompt(EXAMPLE_INSTRUCTION, "", prompt_format)
    except OSError:  # a user template no longer where it was: say so rather than guess
        return {"chat": False, "prompt": None}
    return {"chat": False, "prompt": repr(prompt)}
