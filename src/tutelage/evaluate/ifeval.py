"""Verifiable instruction following: the method of IFEval (Zhou et al. 2023, arXiv 2311.07911).

Each prompt carries one to three instructions a program can check ("answer in fewer than 50
words", "end with the phrase ...", "wrap the whole answer in double quotes"). No judge is asked:
every check is exact, cheap and the same on every machine, so a CI job can score a student.

The pieces, in the order the evaluation uses them:
- CHECKERS: one small function per instruction id, registered under IFEval's ids
  ("length_constraints:number_words", ...), each taking the response and IFEval's kwargs for it
  by IFEval's names (`relation`, `num_words`, ...);
- load_ifeval_file / builtin_ifeval_prompts: prompts in Google's IFEval JSONL format
  (`key`, `prompt`, `instruction_id_list`, `kwargs`), checked when read;
- check_response: strict and loose verdicts for one answer;
- ifeval_scores / ifeval_model_scores: the accuracies with bootstrap 95% intervals.

Where we differ from Google's reference code, and why:
- Sentences are counted by a regex splitter (split_sentences), not NLTK's punkt model: punkt's
  data is a separate download that cannot be made offline (the PyPI packages that offer it either
  download it while installing or ship nothing). The splitter follows punkt's conventions (only
  . ! ? end a sentence; newlines do not) and knows abbreviations, initials and decimals. Counts
  can differ from punkt's on unusual text ("No. 5" is one sentence here, two for punkt).
- Language identification is langdetect, as in IFEval, but from our own factory seeded with 0:
  langdetect is random unless seeded, so IFEval's verdicts can change from one run to the next.
  A requested "zh" also accepts langdetect's "zh-cn" and "zh-tw".
- `change_case:capital_word_frequency` splits words at whitespace and trims punctuation (IFEval
  uses NLTK's word_tokenize, which needs punkt too).
- Keywords, forbidden words, section splitters and postscript markers are matched literally
  (escaped); IFEval passes them to `re` as patterns, where e.g. "C++" would raise.
- A missing kwarg is an error when the file is read; IFEval would draw a random value for it.
  Keys whose value is null are dropped first (the HF copy of IFEval stores every kwarg of every
  instruction, mostly null); IFEval's harness also drops 0 and "", which we keep and check.

Otherwise the verdicts are Google's: on the built-in answers and thousands of variants of them,
every check but number_sentences and capital_word_frequency (which need punkt there) agreed with
the reference code as lm-eval 0.4.13 ships it.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from ..jsonrows import read_rows
from .stats import bootstrap_ci

BUILTIN_IFEVAL = Path(__file__).parent.parent / "data" / "ifeval_prompts.jsonl"

Relation = Literal["less than", "at least"]

# -- the checkers ---------------------------------------------------------------------------------
# instruction id -> check(response, **kwargs) -> bool. Each sees one response text; the strict and
# loose wrappers (check_response) decide which texts and reject blank ones.
CHECKERS: dict[str, Callable[..., bool]] = {}


def checker(instruction_id: str):
    def register(fn: Callable[..., bool]) -> Callable[..., bool]:
        CHECKERS[instruction_id] = fn
        return fn

    return register


def _compare(count: int, relation: Relation, threshold: int) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


# keywords ----------------------------------------------------------------------------------------
@checker("keywords:existence")
def keywords_existence(response: str, *, keywords: list[str]) -> bool:
    """Every keyword appears somewhere (case-insensitive; inside a longer word counts)."""
    return all(re.search(re.escape(k), response, flags=re.IGNORECASE) for k in keywords)


@checker("keywords:forbidden_words")
def keywords_forbidden_words(response: str, *, forbidden_words: list[str]) -> bool:
    """None of the words appears as a whole word (case-insensitive)."""
    return not any(
        re.search(rf"\b{re.escape(w)}\b", response, flags=re.IGNORECASE) for w in forbidden_words
    )


@checker("keywords:frequency")
def keywords_frequency(response: str, *, keyword: str, frequency: int, relation: Relation) -> bool:
    """How often the keyword occurs (case-insensitive, inside longer words too)."""
    count = len(re.findall(re.escape(keyword), response, flags=re.IGNORECASE))
    return _compare(count, relation, frequency)


@checker("keywords:letter_frequency")
def keywords_letter_frequency(
    response: str, *, letter: str, let_frequency: int, let_relation: Relation
) -> bool:
    """How often one letter occurs, either case, against `let_frequency`."""
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# language ----------------------------------------------------------------------------------------
@cache
def _language_detector_factory():
    # Our own factory, not langdetect's global one: seeding ours leaves other users of langdetect
    # alone. Loading the 55 profiles takes about a second, once.
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.set_seed(0)
    return factory


def detect_language(text: str) -> str | None:
    """langdetect's code for `text` ("en", "de", "zh-cn", ...), or None when the text has nothing
    to go by (no letters)."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _language_detector_factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:
        return None


def supported_languages() -> list[str]:
    """The codes `language:response_language` accepts: langdetect's 55, plus "zh" for either
    Chinese."""
    return sorted({*_language_detector_factory().get_lang_list(), "zh"})


@checker("language:response_language")
def language_response_language(response: str, *, language: str) -> bool:
    """The whole response is in `language`. Undetectable text passes, as in IFEval."""
    detected = detect_language(response)
    return detected is None or language in (detected, detected.split("-")[0])


# length ------------------------------------------------------------------------------------------
def count_words(text: str) -> int:
    """Runs of word characters, as IFEval counts (a run of Chinese characters is one word)."""
    return len(re.findall(r"\w+", text))


# Abbreviations whose period never ends a sentence: they stand before what they qualify.
_NEVER_END = {
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "sgt", "capt", "lt", "gen", "rev", "hon",
    "vs", "e.g", "i.e", "cf", "approx", "ca",
}  # fmt: skip
# Abbreviations that end no sentence when a number follows ("No. 5", "Fig. 2").
_BEFORE_NUMBER = {"no", "nos", "fig", "figs", "vol", "pp", "eq", "ch", "sec"}
# Abbreviations that may end a sentence: a break when the next word starts with a capital.
_MAY_END = {"etc", "inc", "ltd", "co", "corp", "jr", "sr", "a.m", "p.m", "u.s", "u.k", "al"}
# A terminator run, closing quotes or brackets, the whitespace after, and (looking ahead) the
# first character of what follows. Latin terminators need the whitespace (so "3.5" and "e.g.,"
# never split); CJK full stops (。！？) do not, as CJK text has no spaces.
_CLOSERS = "\"'\u201d\u2019)\\]\u300d\u300f"
_BOUNDARY = re.compile(rf"([.!?\u2026]+|[\u3002\uff01\uff1f]+)([{_CLOSERS}]*)(\s*)(?=(\S?))")


def split_sentences(text: str) -> list[str]:
    """Sentences by punctuation, in the spirit of NLTK's punkt (which needs a data download): a
    sentence ends at . ! or ? followed by whitespace, except after an abbreviation ("Dr.",
    "e.g."), an initial before a capital ("J. Smith") or an ellipsis before a lowercase word.
    Decimals ("3.5") have no space after the point and never split. Newlines alone do not end a
    sentence, as in punkt, and a last fragment without a terminator is a sentence too. Fragments
    without a letter or a digit (a stray "***") are not. CJK full stops end a sentence with or
    without a space after them (punkt, being for English, ignores them)."""
    sentences, start = [], 0
    for m in _BOUNDARY.finditer(text):
        terminator, space, following = m.group(1), m.group(3), m.group(4)
        if terminator[0] in ".!?\u2026" and not space and following:
            continue  # "3.5", "e.g.,", "Hello.World"
        if _is_boundary(text[start : m.start()], terminator, following):
            sentences.append(text[start : m.end(2)])
            start = m.end()
    sentences.append(text[start:])
    return [s.strip() for s in sentences if re.search(r"\w", s)]


def _is_boundary(before: str, terminator: str, following: str) -> bool:
    starts_capital = following[:1].isupper()
    if re.fullmatch(r"\.{3,}|\u2026+", terminator):  # an ellipsis: a pause, or an end
        return starts_capital or not following
    if terminator != ".":
        return True  # ! ? 。 and runs such as ?! or ..
    words = before.split()
    word = words[-1].lstrip("(\"'[\u201c\u2018").lower() if words else ""
    if word in _NEVER_END:
        return False
    if word in _BEFORE_NUMBER:
        return not following[:1].isdigit()
    if len(word) == 1 and word.isalpha():  # an initial: "J. R. R. Tolkien"
        return not starts_capital
    if word in _MAY_END or re.fullmatch(r"(?:[a-z]\.)+[a-z]", word):  # "U.S.A." and the like
        return starts_capital or not following
    return True


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


@checker("length_constraints:number_words")
def length_number_words(response: str, *, num_words: int, relation: Relation) -> bool:
    return _compare(count_words(response), relation, num_words)


@checker("length_constraints:number_sentences")
def length_number_sentences(response: str, *, num_sentences: int, relation: Relation) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


@checker("length_constraints:number_paragraphs")
def length_number_paragraphs(response: str, *, num_paragraphs: int) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by the markdown divider `***`. An empty
    paragraph between two dividers fails; a divider at the very start or end is forgiven."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    inner = paragraphs[1:-1]
    if any(not p.strip() for p in inner):
        return False
    return sum(1 for p in paragraphs if p.strip()) == num_paragraphs


@checker("length_constraints:nth_paragraph_first_word")
def length_nth_paragraph_first_word(
    response: str, *, num_paragraphs: int, nth_paragraph: int, first_word: str
) -> bool:
    """Exactly `num_paragraphs` paragraphs separated by blank lines ("\\n\\n"), and paragraph
    `nth_paragraph` (from 1) starts with `first_word` (case-insensitive, quotes and trailing
    punctuation ignored)."""
    paragraphs = response.split("\n\n")
    if sum(1 for p in paragraphs if p.strip()) != num_paragraphs:
        return False
    # IFEval indexes the raw split, blank paragraphs included: so do we.
    if nth_paragraph > len(paragraphs) or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'\"")
    word = re.split(r"[.,?!'\"]", word, maxsplit=1)[0]
    return word.lower() == first_word.lower()


# detectable content ------------------------------------------------------------------------------
@checker("detectable_content:number_placeholders")
def content_number_placeholders(response: str, *, num_placeholders: int) -> bool:
    """At least `num_placeholders` square-bracket placeholders such as [address]."""
    return len(re.findall(r"\[.*?\]", response)) >= num_placeholders


@checker("detectable_content:postscript")
def content_postscript(response: str, *, postscript_marker: str) -> bool:
    """A postscript starting with the marker ("P.S.", "P.P.S" or any other), in any case."""
    if postscript_marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif postscript_marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(postscript_marker.lower()) + r".*$"
    return bool(re.search(pattern, response.lower(), flags=re.MULTILINE))


# detectable format -------------------------------------------------------------------------------
@checker("detectable_format:number_bullet_lists")
def format_number_bullet_lists(response: str, *, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullet lines ("* item" or "- item")."""
    stars = re.findall(r"^\s*\*[^*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


# IFEval's fixed options for a constrained answer.
CONSTRAINED_RESPONSES = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@checker("detectable_format:constrained_response")
def format_constrained_response(response: str) -> bool:
    return any(option in response.strip() for option in CONSTRAINED_RESPONSES)


@checker("detectable_format:number_highlighted_sections")
def format_number_highlighted_sections(response: str, *, num_highlights: int) -> bool:
    """At least `num_highlights` markdown highlights, *like this* (or **this**), not blank."""
    single = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h[2:-2].strip()]
    return len(single) + len(double) >= num_highlights


@checker("detectable_format:multiple_sections")
def format_multiple_sections(response: str, *, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each opened by the splitter and a number ("Section 1")."""
    parts = re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", response)
    return len(parts) - 1 >= num_sections


@checker("detectable_format:json_format")
def format_json_format(response: str) -> bool:
    """The whole response is JSON, optionally in a ``` or ```json code fence."""
    text = response.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        if text.startswith(fence):
            text = text[len(fence) :]
            break
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@checker("detectable_format:title")
def format_title(response: str) -> bool:
    """A title in double angular brackets, <<like this>>, on one line and not blank."""
    return any(t[2:-2].strip() for t in re.findall(r"<<[^\n]+>>", response))


# combination -------------------------------------------------------------------------------------
@checker("combination:two_responses")
def combination_two_responses(response: str) -> bool:
    """Two different answers separated by six asterisks (******)."""
    parts = response.split("******")
    if any(not p.strip() for p in parts[1:-1]):
        return False
    answers = [p.strip() for p in parts if p.strip()]
    return len(answers) == 2 and answers[0] != answers[1]


@checker("combination:repeat_prompt")
def combination_repeat_prompt(response: str, *, prompt_to_repeat: str) -> bool:
    """The response starts by repeating the request word for word (case-insensitive)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


# start and end -----------------------------------------------------------------------------------
@checker("startend:end_checker")
def startend_end_checker(response: str, *, end_phrase: str) -> bool:
    """The response ends with the phrase (case-insensitive; a closing quote is ignored)."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@checker("startend:quotation")
def startend_quotation(response: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# change case -------------------------------------------------------------------------------------
@checker("change_case:english_lowercase")
def case_english_lowercase(response: str) -> bool:
    """All lowercase, and English (undetectable text passes, as in IFEval)."""
    return response.islower() and detect_language(response) in ("en", None)


@checker("change_case:english_capital")
def case_english_capital(response: str) -> bool:
    """All capitals, and English (undetectable text passes, as in IFEval)."""
    return response.isupper() and detect_language(response) in ("en", None)


@checker("change_case:capital_word_frequency")
def case_capital_word_frequency(
    response: str, *, capital_frequency: int, capital_relation: Relation
) -> bool:
    """How many words are written all in capitals ("NASA", "READ-ONLY") against the threshold."""
    words = (w.strip(".,;:!?\"'()[]{}") for w in response.split())
    return _compare(sum(1 for w in words if w.isupper()), capital_relation, capital_frequency)


# punctuation -------------------------------------------------------------------------------------
@checker("punctuation:no_comma")
def punctuation_no_comma(response: str) -> bool:
    return "," not in response


# -- prompts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IFEvalPrompt:
    """One prompt in Google's IFEval format. `kwargs[i]` belongs to `instruction_id_list[i]`.
    `example_answer` (our built-in set only) is a compliant answer the tests check."""

    key: int | str
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict, ...]
    example_answer: str | None = None


def parse_ifeval_row(row: object, where: str = "row") -> IFEvalPrompt:
    """An IFEvalPrompt from one JSON object, or a ValueError of one line that starts with
    `where` (the loader passes file:line) and names what is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: a row must be a JSON object")  # noqa: TRY004
    for field in ("key", "prompt", "instruction_id_list", "kwargs"):
        if field not in row:
            raise ValueError(f"{where}: missing '{field}'")
    key, prompt, ids, kwargs = row["key"], row["prompt"], row["instruction_id_list"], row["kwargs"]
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise ValueError(f"{where}: 'key' must be an integer or a string")  # noqa: TRY004
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: 'instruction_id_list' must be a non-empty list of strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(
            f"{where}: 'kwargs' must be a list with one object per instruction ({len(ids)})"
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: an instruction id is listed twice")
    cleaned = []
    for instruction_id, given in zip(ids, kwargs):
        if instruction_id not in CHECKERS:
            near = difflib.get_close_matches(instruction_id, CHECKERS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ValueError(f"{where}: unknown instruction id '{instruction_id}'{hint}")
        if not isinstance(given, Mapping):
            raise ValueError(f"{where}: {instruction_id}: kwargs must be a JSON object")  # noqa: TRY004
        cleaned.append(
            _check_kwargs(instruction_id, {k: v for k, v in given.items() if v is not None}, where)
        )
    answer = row.get("example_answer")
    if answer is not None and not isinstance(answer, str):
        raise ValueError(f"{where}: 'example_answer' must be a string")
    return IFEvalPrompt(key, prompt, tuple(ids), tuple(cleaned), answer)


@cache
def _parameters(instruction_id: str) -> dict[str, object]:
    """A checker's kwargs and their types, from its signature."""
    fn = CHECKERS[instruction_id]
    hints = typing.get_type_hints(fn)
    return {
        name: hints[name]
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _check_kwargs(instruction_id: str, given: dict, where: str) -> dict:
    expected = _parameters(instruction_id)
    place = f"{where}: {instruction_id}"
    unknown = sorted(set(given) - set(expected))
    if unknown:
        known = ", ".join(expected) or "none"
        raise ValueError(f"{place}: unknown kwarg '{unknown[0]}' (it takes: {known})")
    missing = [name for name in expected if name not in given]
    if missing:
        raise ValueError(f"{place}: missing kwarg '{missing[0]}'")
    for name, kind in expected.items():
        value = given[name]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{place}: '{name}' must be a whole number >= 0")
        elif kind is str:
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{place}: '{name}' must be a non-empty string")
        elif kind == list[str]:
            if not isinstance(value, list) or not value:
                raise ValueError(f"{place}: '{name}' must be a non-empty list of strings")
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{place}: '{name}' must be a non-empty list of strings")
        elif typing.get_origin(kind) is Literal and value not in typing.get_args(kind):
            options = " or ".join(repr(o) for o in typing.get_args(kind))
            raise ValueError(f"{place}: '{name}' must be {options}, not {value!r}")
    if "language" in given and given["language"] not in supported_languages():
        raise ValueError(f"{place}: unsupported language code {given['language']!r}")
    if "letter" in given and not re.fullmatch(r"[A-Za-z]", given["letter"]):
        raise ValueError(f"{place}: 'letter' must be one letter a-z")
    if "nth_paragraph" in given and not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
        raise ValueError(f"{place}: 'nth_paragraph' must be between 1 and 'num_paragraphs'")
    return dict(given)


def load_ifeval_file(path: Path) -> list[IFEvalPrompt]:
    """Prompts in Google's IFEval format (JSON Lines, or a JSON list of the same objects). Any
    problem is a ValueError of one line naming file:line: unknown instruction ids, kwargs of the
    wrong name or type, duplicate keys."""
    prompts, seen = [], {}
    for where, row in read_rows(Path(path)):
        prompt = parse_ifeval_row(row, where)
        if prompt.key in seen:
            raise ValueError(f"{where}: key {prompt.key!r} already used at {seen[prompt.key]}")
        seen[prompt.key] = where
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts in the file")
    return prompts


def builtin_ifeval_prompts() -> list[IFEvalPrompt]:
    """Our own set, written for this project: about 150 short prompts for small models."""
    return load_ifeval_file(BUILTIN_IFEVAL)


def looks_like_ifeval(path: Path) -> bool:
    """Whether a file's first row is an IFEval prompt (has `instruction_id_list`), for telling an
    IFEval set from an instruction set without asking the user. Unreadable files are not."""
    try:
        for _, row in read_rows(Path(path)):
            return isinstance(row, Mapping) and "instruction_id_list" in row
    except ValueError:
        return False
    return False


# -- checking answers -----------------------------------------------------------------------------
def loose_variants(response: str) -> list[str]:
    """IFEval's loose forms of a response: as it is, without its first line, without its last,
    without both; each also with every `*` removed. Forgives a preamble ("Sure, here it is:"), a
    sign-off, or markdown emphasis around otherwise compliant text."""
    lines = response.split("\n")
    cut = [
        response,
        "\n".join(lines[1:]).strip(),
        "\n".join(lines[:-1]).strip(),
        "\n".join(lines[1:-1]).strip(),
    ]
    return cut + [text.replace("*", "") for text in cut]


def check_instruction(instruction_id: str, response: str, kwargs: Mapping) -> bool:
    """Strict: the response as it is follows the instruction. A blank response follows nothing."""
    return bool(response.strip()) and CHECKERS[instruction_id](response, **kwargs)


def check_response(
    row: IFEvalPrompt | Mapping, response: str | None
) -> dict[str, tuple[bool, bool]]:
    """{instruction_id: (strict, loose)} for one answer to one prompt. `row` is an IFEvalPrompt
    or the same fields as a JSON object; None as the response (no answer) fails everything."""
    prompt = row if isinstance(row, IFEvalPrompt) else parse_ifeval_row(row)
    response = response or ""
    variants = loose_variants(response)
    out = {}
    for instruction_id, kwargs in zip(prompt.instruction_id_list, prompt.kwargs):
        strict = check_instruction(instruction_id, response, kwargs)
        loose = strict or any(check_instruction(instruction_id, v, kwargs) for v in variants[1:])
        out[instruction_id] = (strict, loose)
    return out


# -- scores ---------------------------------------------------------------------------------------
def ifeval_scores(
    checks: Sequence[Mapping[str, Sequence[bool]]], n_resamples: int = 1000, seed: int = 0
) -> dict:
    """IFEval's four accuracies over answers to distinct prompts, each `check_response`'s result
    ({instruction_id: (strict, loose)}; JSON lists work too):

    - prompt_strict / prompt_loose: the share of prompts whose every instruction is followed;
    - instruction_strict / instruction_loose: the share of all instructions followed;

    each {"mean", "ci_low", "ci_high", "n"} with a percentile bootstrap 95% interval (`n` counts
    prompts or instructions). Both levels resample prompts: one prompt's instructions share one
    answer and are not independent, so resampling instructions would give too narrow an interval.
    The instruction-level statistic on a resample is followed-over-given (a ratio of sums), so its
    mean is exactly IFEval's flattened instruction accuracy.

    Also `by_kind` (the part of the id before the colon) and `by_instruction`: {"strict",
    "loose", "n"} each, plain shares without intervals (a kind has too few instructions for one to
    say much). With no checks every mean is None."""
    strict_rows, loose_rows = [], []
    counts: dict[str, dict[str, list[bool]]] = {}
    for check in checks:
        verdicts = [(bool(s), bool(lo)) for s, lo in check.values()]
        if not verdicts:
            raise ValueError("ifeval_scores: a prompt without instructions")
        strict_rows.append([sum(s for s, _ in verdicts), len(verdicts)])
        loose_rows.append([sum(lo for _, lo in verdicts), len(verdicts)])
        for instruction_id, (s, lo) in check.items():
            by_id = counts.setdefault(instruction_id, {"strict": [], "loose": []})
            by_id["strict"].append(bool(s))
            by_id["loose"].append(bool(lo))
    n_prompts = len(strict_rows)
    n_instructions = sum(n for _, n in strict_rows)
    out: dict = {"n_prompts": n_prompts, "n_instructions": n_instructions}
    for mode, rows in (("strict", strict_rows), ("loose", loose_rows)):
        if not rows:
            none = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
            out[f"prompt_{mode}"], out[f"instruction_{mode}"] = none, dict(none)
            continue
        all_followed = [float(followed == n) for followed, n in rows]
        mean, low, high = bootstrap_ci(all_followed, n_resamples, seed)
        out[f"prompt_{mode}"] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n_prompts}
        # The same seed and size: both levels see the very same resampled prompts.
        mean, low, high = bootstrap_ci(
            np.arange(n_prompts), n_resamples, seed, stat=_followed_share(rows)
        )
        out[f"instruction_{mode}"] = {
            "mean": mean,
            "ci_low": low,
            "ci_high": high,
            "n": n_instructions,
        }
    by_kind: dict[str, dict[str, list[bool]]] = {}
    for instruction_id, verdicts in counts.items():
        kind = by_kind.setdefault(instruction_id.split(":")[0], {"strict": [], "loose": []})
        kind["strict"] += verdicts["strict"]
        kind["loose"] += verdicts["loose"]
    out["by_kind"] = {k: _shares(v) for k, v in sorted(by_kind.items())}
    out["by_instruction"] = {k: _shares(v) for k, v in sorted(counts.items())}
    return out


def _followed_share(rows: list[list[int]]):
    """A statistic for bootstrap_ci over prompt indices: the share of instructions followed among
    the prompts drawn (a ratio of sums). bootstrap_ci resamples one value per item, so resampling
    the indices of prompts is how whole prompts, each with all its instructions, are drawn."""
    followed, given = np.array(rows, dtype=float).T

    def share(indices, axis=0):
        indices = np.asarray(indices).astype(int)
        return followed[indices].sum(axis=axis) / given[indices].sum(axis=axis)

    return share


def _shares(verdicts: dict[str, list[bool]]) -> dict:
    n = len(verdicts["strict"])
    return {"strict": sum(verdicts["strict"]) / n, "loose": sum(verdicts["loose"]) / n, "n": n}


def ifeval_model_scores(
    prompts: Sequence[IFEvalPrompt],
    answers: Sequence[str | None],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """One model's IFEval result: `answers[i]` answers `prompts[i]` (None: no answer, which
    fails every instruction, as a blank one does). ifeval_scores's figures, plus `checks`, the
    per-prompt verdicts ({instruction_id: [strict, loose]}) in prompt order."""
    if len(prompts) != len(answers):
        raise ValueError(f"ifeval_model_scores: {len(prompts)} prompts but {len(answers)} answers")
    checks = [check_response(p, a) for p, a in zip(prompts, answers)]
    scores = ifeval_scores(checks, n_resamples, seed)
    scores["checks"] = [{k: list(v) for k, v in c.items()} for c in checks]
    return scores
