"""Evaluation: the base and the tuned student answer the same tasks, and we measure how they differ.

Sets: `held_out` (generated examples the filter set aside and training never saw; the reference is
the teacher's answer), `builtin` (our own evaluation instructions) and any file the user names.
Two scores per answer, both against the item's reference when it has one:
- rouge_l: ROUGE-L F1 of the greedy answer. Cheap and crude, but it is what Self-Instruct reports.
- nll: mean negative log-likelihood per token of the *reference* given the prompt (teacher-forced).
  It needs no generation, so it shows how much of the teacher's answers the student has learned
  even when its greedy answer drifts. Lower is better.
Every answer is stored as soon as it is made, so a killed evaluation resumes where it stopped. The
summary gives each mean a bootstrap 95% interval, and the paired tuned-minus-base delta its own.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..config import Config, TeacherConfig
from ..filter import rouge_l_f1, tokenize
from ..jsonrows import read_rows
from ..model_files import ModelNotFound, resolve_student
from ..store import Store
from ..student_prompt import prompt_ids, student_prompt
from ..teachers import Ledger, Request, Teacher, make_teacher, price_for, speaks_chat
from ..templating import TEMPLATE_DIR
from .judge import grade_answer, judge_pair
from .stats import bootstrap_ci, grade_summary, length_controlled_win_rate, win_rate

BUILTIN_SET = Path(__file__).parent.parent / "data" / "eval_instructions.jsonl"
BATCH_SIZE = 8
METRICS = ("rouge_l", "nll", "answer_words")
# The Alpaca template starts every section ("### Instruction:", "### Response:") with this.
SECTION_MARKERS = ("### Instruction:", "### Input:", "### Response:")


@dataclass(frozen=True)
class EvalItem:
    instruction: str
    input: str = ""
    reference: str | None = None  # None: nothing to compare with (e.g. AlpacaEval instructions)

    @property
    def key(self) -> str:
        """Stable across runs and files: the same task is the same item wherever it comes from."""
        return hashlib.sha256(f"{self.instruction}\0{self.input}".encode()).hexdigest()[:16]


# -- evaluation files ---------------------------------------------------------------------------
def load_eval_file(path: Path) -> list[EvalItem]:
    """Read an evaluation set, whichever of these shapes its rows have (JSONL or a JSON list):
    Self-Instruct {"instruction", "instances": [{"input", "output"}]} (one item per instance),
    Alpaca {"instruction", "input", "output"}, or AlpacaEval {"instruction"} (no reference)."""
    path = Path(path)
    items = [item for where, row in read_rows(path) for item in _row_items(where, row)]
    if not items:
        raise ValueError(f"{path}: no evaluation items in the file")
    return items


def _row_items(where: str, row: object) -> list[EvalItem]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object")
    instruction = row.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError(f"{where}: missing or empty 'instruction'")
    pairs = row["instances"] if "instances" in row else [row]
    if not isinstance(pairs, list) or not pairs:
        raise ValueError(f"{where}: 'instances' must be a non-empty list of {{input, output}}")
    items = []
    for pair in pairs:
        if not isinstance(pair, dict):
            raise ValueError(f"{where}: an instance must be a JSON object")
        task_input, output = pair.get("input", ""), pair.get("output")
        if not isinstance(task_input, str) or not isinstance(output, (str, type(None))):
            raise ValueError(f"{where}: 'input' and 'output' must be strings")
        items.append(EvalItem(instruction, task_input, output))
    return items


def eval_sets(store: Store, config: Config) -> dict[str, list[EvalItem]]:
    """Every set to evaluate, by name, each without duplicate tasks."""
    sets = {
        "held_out": [
            EvalItem(e["instruction"], e["input"], e["output"])
            for e in store.examples(split="test")
        ]
    }
    if config.evaluation.builtin_set:
        sets["builtin"] = load_eval_file(BUILTIN_SET)[: config.evaluation.builtin_limit]
    for path in config.evaluation.sets:
        name = Path(path).stem
        if name in sets:
            raise ValueError(f"{path}: a set named '{name}' is already evaluated; rename the file")
        sets[name] = load_eval_file(path)
    return {name: list({item.key: item for item in items}.values()) for name, items in sets.items()}


# -- the student --------------------------------------------------------------------------------
def load_student(path: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # generation continues every row from its right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def cut_answer(text: str) -> str:
    """The answer up to the first line that opens a template section.

    Why: a base model never learned to stop, so after answering it carries on with the template it
    was shown ("### Response:" again, or a next "### Instruction:"). That text is not its answer;
    scoring it would measure the template echo rather than the answer."""
    lines = text.split("\n")
    # Only the template's own headings: a Markdown "### " heading in a real answer stays.
    cut = next((i for i, line in enumerate(lines) if line.startswith(SECTION_MARKERS)), len(lines))
    return "\n".join(lines[:cut]).strip()


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], style: str, max_new_tokens: int
) -> list[str]:
    """Greedy answers for a batch of prompts (left-padded), each stopped at EOS and cut."""
    ids = [prompt_ids(tokenizer, p, style) for p in prompts]
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    eos = model.generation_config.eos_token_id  # None, an id or a list of ids
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted({tokenizer.eos_token_id, *eos}),
        pad_token_id=tokenizer.pad_token_id,
        # A row that has opened a new section is finished (see cut_answer): stop spending on it.
        stop_strings=["\n" + m for m in SECTION_MARKERS],
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [cut_answer(t) for t in texts]


@torch.no_grad()
def reference_nll(model, tokenizer, prompt: str, reference: str, style: str) -> tuple[float, int]:
    """Mean NLL per token of `reference` + EOS after `prompt` (prompt tokens are not scored), and
    the number of tokens scored. EOS counts: knowing where the answer ends is part of the answer."""
    context = prompt_ids(tokenizer, prompt, style)
    target = tokenizer(reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([context + target])
    # Keep only the logits that predict the reference: over the whole prompt a 262k vocabulary
    # costs gigabytes. Position t predicts token t+1, so drop the last kept position.
    logits = model(ids, logits_to_keep=len(target) + 1).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(target)).item(), len(target)


def model_fingerprint(path: Path, config: Config) -> str:
    """What a model's stored answers depend on: its files (names, sizes, modification times) and
    how it was asked. Any change makes those answers stale."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    parts = [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    parts.append(
        [str(path.resolve()), config.training.prompt_format, config.evaluation.max_new_tokens]
    )
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# -- statistics ---------------------------------------------------------------------------------
def summarise(
    store: Store,
    sets: dict[str, list[EvalItem]],
    roles: list[str],
    pairs: list[str],
    config: Config,
) -> dict:
    """{set: {"n_items", "metrics": {metric: {role: {"mean", "ci_low", "ci_high", "n", ...}}}}}.
    Answer metrics per role, where role "delta" is tuned minus base over the items both have a
    value for; `win_rate` and `lc_win_rate` per judged pair ("tuned:base": how often the first
    wins, ties half); `rubric_acceptable` per graded role (the share graded A or B)."""
    n, seed = config.evaluation.bootstrap, config.seed
    out = {}
    for name, items in sets.items():
        stored = {(r["item_key"], r["model_role"]): r for r in store.eval_items(name)}
        metrics = {}
        for metric in METRICS:
            # One value (or None) per item, in item order, so tuned and base pair up by position.
            values = {
                role: [_metric(stored.get((i.key, role)), metric) for i in items] for role in roles
            }
            if "tuned" in values:
                values["delta"] = [
                    t - b if t is not None and b is not None else None
                    for t, b in zip(values["tuned"], values["base"])
                ]
            values = {role: [v for v in vals if v is not None] for role, vals in values.items()}
            if any(values.values()):  # e.g. no rouge_l or nll for a set without references
                metrics[metric] = {role: _ci(vals, config) for role, vals in values.items() if vals}
        judged = {(r["item_key"], r["kind"], r["subject"]): r for r in store.judgements(name)}
        for pair in pairs:
            first, second = pair.split(":")
            rows = [
                (
                    judged.get((i.key, "pairwise", pair)),
                    stored.get((i.key, first)),
                    stored.get((i.key, second)),
                )
                for i in items
            ]
            rows = [
                (j["score"], len(a["answer"].split()), len(b["answer"].split()))
                for j, a, b in rows
                if j is not None
            ]
            if not rows:
                continue
            scores, len_first, len_second = (list(col) for col in zip(*rows))
            metrics.setdefault("win_rate", {})[pair] = win_rate(scores, n, seed)
            metrics.setdefault("lc_win_rate", {})[pair] = length_controlled_win_rate(
                scores, len_first, len_second, n, seed
            )
        for role in roles:
            grades = [j["grade"] for key, j in judged.items() if key[1:] == ("rubric", role)]
            if grades:
                metrics.setdefault("rubric_acceptable", {})[role] = grade_summary(grades, n, seed)
        out[name] = {"n_items": len(items), "metrics": metrics}
    return out


def _metric(row: dict | None, metric: str) -> float | None:
    if row is None:
        return None
    return len(row["answer"].split()) if metric == "answer_words" else row["scores"].get(metric)


def _ci(values: list[float], config: Config) -> dict:
    mean, low, high = bootstrap_ci(values, config.evaluation.bootstrap, config.seed)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": len(values)}


# -- the stage ----------------------------------------------------------------------------------
def evaluate(
    store: Store,
    config: Config,
    run_dir: Path,
    tuned_model: Path | None = None,
    progress: Callable | None = None,
    teacher: Teacher | None = None,
    judge: Teacher | None = None,
) -> dict:
    """Answer every set with the base and the tuned student (and the teacher), score the
    answers, judge them in pairs (and grade them), then write the summary to the store and to
    `run_dir/evaluation.json`; returns that summary. Everything stored is reused.

    `teacher` and `judge`: backends to use instead of making them from the configuration (the
    judge defaults to the teacher when `evaluation.judge` is unset)."""
    run_dir = Path(run_dir)
    ev = config.evaluation
    sets = eval_sets(store, config)
    notes = [f"{name}: no items" for name, items in sets.items() if not items]
    sets = {name: items for name, items in sets.items() if items}

    models = {"base": resolve_student(config.student.model)}
    tuned = Path(tuned_model) if tuned_model is not None else run_dir / "student"
    if (tuned / "config.json").exists():
        models["tuned"] = tuned
    elif tuned_model is not None:
        raise ModelNotFound(f"{tuned}: not an HF model folder (with config.json)")
    else:
        notes.append(f"no tuned student at {tuned}: evaluated the base model only")
        # Answers from weights that are gone can no longer be attributed to anything.
        store.clear_eval("tuned")
        store.clear_eval("delta")
    fingerprints = {role: model_fingerprint(path, config) for role, path in models.items()}
    if ev.include_teacher:
        fingerprints["teacher"] = teacher_fingerprint(config)
    for role, fingerprint in fingerprints.items():
        if store.get_meta(f"eval_fingerprint_{role}") != fingerprint:
            store.clear_eval(role)
            store.clear_eval("delta")
            store.set_meta(f"eval_fingerprint_{role}", fingerprint)
    roles = [*models, *(["teacher"] if ev.include_teacher else [])]
    pairs = [pair for pair in ev.pairs if set(pair.split(":")) <= set(roles)]
    judge_print = judge_fingerprint(config)
    if store.get_meta("eval_fingerprint_judge") != judge_print:
        store.clear_judgements()
        store.set_meta("eval_fingerprint_judge", judge_print)

    if judge is None and ev.judge is None:
        judge = teacher
    answer_with_students(store, config, sets, models, progress)
    if ev.include_teacher:
        asyncio.run(answer_with_teacher(store, config, sets, progress, teacher))
    if pairs or ev.rubric:
        asyncio.run(
            judge_answers(store, config, sets, pairs, roles if ev.rubric else [], progress, judge)
        )

    table = summarise(store, sets, roles, pairs, config)
    store.put_eval_summary(
        [
            {
                "set_name": name,
                "model_role": role,
                "metric": metric,
                "value": ci["mean"],
                "ci_low": ci["ci_low"],
                "ci_high": ci["ci_high"],
                "n": ci["n"],
            }
            for name, s in table.items()
            for metric, by_role in s["metrics"].items()
            for role, ci in by_role.items()
            if ci.get("mean") is not None
        ]
    )
    summary = {
        "models": {role: str(path) for role, path in models.items()},
        "notes": notes,
        "judge": judge_label(config) if pairs or ev.rubric else None,
        "pairs": pairs,
        "sets": table,
    }
    if ev.include_teacher:
        summary["models"]["teacher"] = f"{config.teacher.backend}:{config.teacher.model}"
    (run_dir / "evaluation.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _todo(store: Store, sets: dict[str, list[EvalItem]], role: str) -> list[tuple[str, EvalItem]]:
    done = {(r["set_name"], r["item_key"]) for r in store.eval_items() if r["model_role"] == role}
    return [
        (name, item)
        for name, items in sets.items()
        for item in items
        if (name, item.key) not in done
    ]


def _reference_scores(item: EvalItem, answer: str, config: Config) -> dict:
    if item.reference is None:
        return {"rouge_l": None}
    # The filter's tokenizer choice: unicode=False drops non-ASCII words.
    return {
        "rouge_l": rouge_l_f1(
            tokenize(item.reference, config.filter.unicode), tokenize(answer, config.filter.unicode)
        )
    }


def answer_with_students(
    store: Store, config: Config, sets: dict[str, list[EvalItem]], models: dict[str, Path], progress
) -> None:
    """Greedy answers, ROUGE-L and the teacher's reference NLL for each student model."""
    style = config.training.prompt_format
    todo = {role: _todo(store, sets, role) for role in models}
    total, done = sum(map(len, todo.values())), 0
    for role, work in todo.items():
        if not work:
            continue
        model, tokenizer = load_student(models[role])  # one model in memory at a time
        # Similar lengths share a batch: less padding to compute.
        work.sort(key=lambda w: len(w[1].instruction) + len(w[1].input))
        for start in range(0, len(work), BATCH_SIZE):
            batch = work[start : start + BATCH_SIZE]
            prompts = [
                student_prompt(item.instruction, item.input, style, tokenizer) for _, item in batch
            ]
            answers = generate_answers(
                model, tokenizer, prompts, style, config.evaluation.max_new_tokens
            )
            for (name, item), prompt, answer in zip(batch, prompts, answers):
                scores = {
                    **_reference_scores(item, answer, config),
                    "nll": None,
                    "n_ref_tokens": None,
                }
                if item.reference is not None:
                    scores["nll"], scores["n_ref_tokens"] = reference_nll(
                        model, tokenizer, prompt, item.reference, style
                    )
                store.put_eval_item(
                    name,
                    item.key,
                    role,
                    item.instruction,
                    item.input,
                    item.reference,
                    answer,
                    scores,
                )
            done += len(batch)
            if progress:
                progress(done, total, role)
        del model, tokenizer
        gc.collect()


# -- the teacher and the judge --------------------------------------------------------------------
def _ledger(store: Store, config: Config, teacher_config: TeacherConfig, teacher) -> Ledger:
    price = price_for(
        teacher_config.backend, teacher.model, teacher_config.price, batch=teacher_config.batch
    )
    # The run's budget covers evaluation too: the ledger's totals are the run's.
    return Ledger(
        teacher,
        store,
        price=price,
        budget_usd=config.generation.budget_usd,
        concurrency=teacher_config.concurrency,
    )


def answer_request(config: Config, item: EvalItem) -> Request:
    """What the teacher is asked: the task as a user message (chat teachers), or the student's
    Alpaca prompt to continue (completion teachers), greedy, as long as the students may be."""
    sampling = {"temperature": 0.0, "max_tokens": config.evaluation.max_new_tokens}
    if speaks_chat(config.teacher):
        content = f"{item.instruction}\n\n{item.input}" if item.input else item.instruction
        return Request.make(messages=[{"role": "user", "content": content}], sampling=sampling)
    return Request.make(
        prompt=student_prompt(item.instruction, item.input, "alpaca"),
        sampling={**sampling, "stop": ["\n" + m for m in SECTION_MARKERS]},
    )


async def answer_with_teacher(
    store: Store,
    config: Config,
    sets: dict[str, list[EvalItem]],
    progress,
    teacher: Teacher | None = None,
) -> None:
    work = _todo(store, sets, "teacher")
    if not work:
        return
    owned = teacher is None
    teacher = teacher or make_teacher(config.teacher)
    try:
        ledger = _ledger(store, config, config.teacher, teacher)
        done = 0

        async def answer(name: str, item: EvalItem) -> None:
            nonlocal done
            result = await ledger.complete(answer_request(config, item), purpose="evaluate")
            text = cut_answer(result.completion.text)
            store.put_eval_item(
                name,
                item.key,
                "teacher",
                item.instruction,
                item.input,
                item.reference,
                text,
                {**_reference_scores(item, text, config), "nll": None, "request_key": result.key},
            )
            done += 1
            if progress:
                progress(done, len(work), "teacher")

        await _all(answer(name, item) for name, item in work)
    finally:
        if owned:
            await teacher.aclose()


async def judge_answers(
    store: Store,
    config: Config,
    sets: dict[str, list[EvalItem]],
    pairs: list[str],
    graded_roles: list[str],
    progress,
    teacher: Teacher | None = None,
) -> None:
    """Every pair judged in both orders, and every graded role's answer graded, per item; each
    decision stored as soon as it is made."""
    ev = config.evaluation
    judge_config = ev.judge or config.teacher
    chat = speaks_chat(judge_config)
    answers = {(r["set_name"], r["item_key"], r["model_role"]): r for r in store.eval_items()}
    stored = {(r["set_name"], r["item_key"], r["kind"], r["subject"]) for r in store.judgements()}
    work = []
    for name, items in sets.items():
        for item in items:
            for pair in pairs:
                if (name, item.key, "pairwise", pair) not in stored:
                    work.append((name, item, "pairwise", pair))
            for role in graded_roles:
                if (name, item.key, "rubric", role) not in stored:
                    work.append((name, item, "rubric", role))
    if not work:
        return
    owned = teacher is None
    teacher = teacher or make_teacher(judge_config)
    try:
        ledger = _ledger(store, config, judge_config, teacher)
        done = 0
        common = {"chat": chat, "retries": ev.judge_retries, "max_tokens": ev.judge_max_tokens}

        async def decide(name: str, item: EvalItem, kind: str, subject: str) -> None:
            nonlocal done
            task = {
                "instruction": item.instruction,
                "input": item.input,
                "reference": item.reference,
            }
            if kind == "pairwise":
                first, second = (
                    answers[name, item.key, role]["answer"] for role in subject.split(":")
                )
                verdict = await judge_pair(ledger, first=first, second=second, **task, **common)
                store.put_judgement(
                    name,
                    item.key,
                    kind,
                    subject,
                    "failed" if verdict.score is None else "done",
                    verdict.score,
                    None,
                    verdict.to_dict(),
                )
            else:
                grade = await grade_answer(
                    ledger, answer=answers[name, item.key, subject]["answer"], **task, **common
                )
                store.put_judgement(
                    name,
                    item.key,
                    kind,
                    subject,
                    "failed" if grade.grade is None else "done",
                    None,
                    grade.grade,
                    grade.to_dict(),
                )
            done += 1
            if progress:
                progress(done, len(work), "judge")

        await _all(decide(*w) for w in work)
    finally:
        if owned:
            await teacher.aclose()


async def _all(coroutines) -> None:
    """Run them together (the ledger bounds concurrency); every one finishes and is stored before
    the first error, if any, is raised."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


def teacher_fingerprint(config: Config) -> str:
    """What the teacher's stored answers depend on."""
    t = config.teacher
    return hashlib.sha256(
        json.dumps([t.backend, t.model, speaks_chat(t), config.evaluation.max_new_tokens]).encode()
    ).hexdigest()


def judge_fingerprint(config: Config) -> str:
    """What stored judgements depend on: the judge, how it is asked, and the prompt texts."""
    ev = config.evaluation
    judge = ev.judge or config.teacher
    templates = [
        (TEMPLATE_DIR / "evaluate" / f"{name}.jinja").read_text(encoding="utf-8")
        for name in ("pairwise", "rubric")
    ]
    blob = [
        judge.backend,
        judge.model,
        speaks_chat(judge),
        ev.judge_retries,
        ev.judge_max_tokens,
        templates,
    ]
    return hashlib.sha256(json.dumps(blob).encode()).hexdigest()


def judge_label(config: Config) -> str:
    judge = config.evaluation.judge or config.teacher
    return f"{judge.backend}:{judge.model}"
