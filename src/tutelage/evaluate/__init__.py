"""Evaluation: the base and the tuned student answer the same tasks, and we measure how they differ.

The modules, in the order the stage (`stage.evaluate`) uses them:
- sets: the evaluation sets (held-out examples, the built-in sets, the user's files) as EvalItems;
- ifeval: verifiable instruction following (IFEval's checkers, prompts and scores);
- answers: what student and teacher answers share (cutting the template's echo, reference scores);
- students: the students' greedy answers and the reference NLL (the only part that needs torch);
- teacher: the teacher's answers, asked through the run's ledger;
- judge / judging: the judge's prompts and parsing / judging every pair and grading every answer;
- summary and stats: means, bootstrap intervals, IFEval accuracies, win rates, position bias;
- outputs: the answers as AlpacaEval model_outputs files (RUN/eval/ROLE.json);
- compare: two runs' stored answers side by side (`tutelage evaluate --compare`).

Each name below is imported from its module on first use (the module `__getattr__`), so importing
`compare`, `stats` or `summary` (as `tutelage evaluate --compare` does) never loads torch or
transformers.
"""

from __future__ import annotations

import importlib

# name -> the module (in this package) that defines it
_EXPORTS = {
    "evaluate": "stage",
    "BUILTIN_SET": "sets",
    "EvalItem": "sets",
    "eval_sets": "sets",
    "load_eval_file": "sets",
    "IFEVAL_SET": "sets",
    "ifeval_items": "sets",
    "SECTION_MARKERS": "answers",
    "cut_answer": "answers",
    "answer_with_students": "students",
    "generate_answers": "students",
    "load_student": "students",
    "model_fingerprint": "students",
    "reference_nll": "students",
    "answer_request": "teacher",
    "answer_with_teacher": "teacher",
    "teacher_fingerprint": "teacher",
    "judge_answers": "judging",
    "judge_fingerprint": "judging",
    "judge_label": "judging",
    "judge_mode": "judging",
    "write_model_outputs": "outputs",
    "IFEVAL_METRICS": "summary",
    "ANSWER_METRICS": "summary",
    "answer_metric": "summary",
    "summarise": "summary",
    "bootstrap_ci": "stats",
    "compare_runs": "compare",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
