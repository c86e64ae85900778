"""What the students and the teacher share as answerers: an answer cut where the template's echo
begins, its scores (against the reference, and whether it refuses), and the items a model has still
to answer."""

from __future__ import annotations

from ..config import Config
from ..filter import rouge_l_f1, tokenize
from ..filter.answers import is_refusal
from ..store import Store
from .ifeval import check_response
from .sets import EvalItem

# The Alpaca template starts every section ("### Instruction:", "### Response:") with this.
SECTION_MARKERS = ("### Instruction:", "### Input:", "### Response:")


def cut_answer(text: str) -> str:
    """The answer up to the first line that opens a template section.

    Why: a base model never learned to stop, so after answering it carries on with the template it
    was shown ("### Response:" again, or a next "### Instruction:"). That text is not its answer;
    scoring it would measure the template echo rather than the answer."""
    lines = text.split("\n")
    # Only the template's own headings: a Markdown "### " heading in a real answer stays.
    cut = next((i for i, line in enumerate(lines) if line.startswith(SECTION_MARKERS)), len(lines))
    return "\n".join(lines[:cut]).strip()


def unanswered(
    store: Store, sets: dict[str, list[EvalItem]], role: str
) -> list[tuple[str, EvalItem]]:
    """(set name, item) for every item `role` has no stored answer to."""
    done = {(r["set_name"], r["item_key"]) for r in store.eval_items() if r["model_role"] == role}
    return [
        (name, item)
        for name, items in sets.items()
        for item in items
        if (name, item.key) not in done
    ]


def reference_scores(item: EvalItem, answer: str, config: Config) -> dict:
    """The scores every answerer's answer gets: ROUGE-L against the item's reference (None without
    one), `refusal`, 1.0 when the answer refuses or apologises instead of answering, and for an
    IFEval item `ifeval`, {instruction id: [strict, loose]} (ifeval.check_response).

    Why refusal: a student copies its teacher's refusals (the embedded teacher's chat answers were
    32% refusals, and a student trained on them refused 110 of 252 unseen tasks)."""
    refusal = 1.0 if is_refusal(answer) else 0.0
    if item.ifeval is not None:
        checks = check_response(item.ifeval, answer)
        return {
            "rouge_l": None,
            "refusal": refusal,
            "ifeval": {k: list(v) for k, v in checks.items()},
        }
    if item.reference is None:
        return {"rouge_l": None, "refusal": refusal}
    # The filter's tokenizer choice: unicode=False drops non-ASCII words.
    return {
        "rouge_l": rouge_l_f1(
            tokenize(item.reference, config.filter.unicode), tokenize(answer, config.filter.unicode)
        ),
        "refusal": refusal,
    }
