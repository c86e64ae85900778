"""Verifiable instruction following (IFEval's method): the checkers, strict and loose checking, the
built-in prompt set, the loader's errors and the scores with their intervals."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tutelage.evaluate import ifeval
from tutelage.evaluate.ifeval import (
    CHECKERS,
    IFEvalPrompt,
    builtin_ifeval_prompts,
    check_instruction,
    check_response,
    count_words,
    detect_language,
    ifeval_model_scores,
    ifeval_scores,
    load_ifeval_file,
    looks_like_ifeval,
    loose_variants,
    split_sentences,
)

# -- each checker: (instruction id, kwargs, a text that follows it, a text that does not) ---------
CASES = [
    ("keywords:existence", {"keywords": ["tea", "Cup"]}, "A cup of TEA, please.", "A cup of soup."),
    ("keywords:existence", {"keywords": ["café"]}, "Le CAFÉ est chaud.", "Le cafe est chaud."),
    ("keywords:existence", {"keywords": ["C++"]}, "I write C++ daily.", "I write C daily."),
    ("keywords:forbidden_words", {"forbidden_words": ["sun"]}, "Sunny days.", "The Sun is up."),
    ("keywords:forbidden_words", {"forbidden_words": ["straße"]}, "Der Weg.", "Die Straße."),
    (
        "keywords:frequency",
        {"keyword": "wheel", "frequency": 2, "relation": "at least"},
        "A wheel and a Wheelbarrow.",
        "One wheel only.",
    ),
    (
        "keywords:frequency",
        {"keyword": "key", "frequency": 2, "relation": "less than"},
        "One key.",
        "A key, a KEY.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "z", "let_frequency": 3, "let_relation": "at least"},
        "Zebras dazzle.",
        "Zebras run.",
    ),
    (
        "keywords:letter_frequency",
        {"letter": "Q", "let_frequency": 1, "let_relation": "less than"},
        "No such letter here.",
        "A quiet answer.",
    ),
    (
        "language:response_language",
        {"language": "de"},
        "Der Hund läuft schnell über die Straße und bellt laut.",
        "The dog runs quickly across the road and barks loudly.",
    ),
    (
        "language:response_language",
        {"language": "ru"},
        "Привет, как у тебя дела сегодня?",
        "Bonjour, comment allez-vous aujourd'hui ?",
    ),
    (
        "language:response_language",
        {"language": "zh"},
        "今天天气很好，我们去公园散步吧。",
        "こんにちは、今日はいい天気ですね。私は公園に行きます。",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 4, "relation": "less than"},
        "Three short words.",
        "These are four words.",
    ),
    (
        "length_constraints:number_words",
        {"num_words": 3, "relation": "at least"},
        "naïve déjà vu",
        "naïve café",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 3, "relation": "less than"},
        "Dr. Smith paid 3.5 dollars. Then he left.",
        "One. Two. Three.",
    ),
    (
        "length_constraints:number_sentences",
        {"num_sentences": 2, "relation": "at least"},
        "It rained. We stayed in.",
        "It rained, so we stayed in.",
    ),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "A.\n***\nB.", "A.\n\nB."),
    (
        "length_constraints:number_paragraphs",
        {"num_paragraphs": 2},
        "***\nOne.\n***\nTwo.\n***",
        "One.\n***\n***\nTwo.",
    ),
    (
        "length_constraints:nth_paragraph_first_word",
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "unlike"},
        'Owls hunt.\n\n"Unlike, most birds, they…',
        "Owls hunt.\n\nMost birds do not.",
    ),
    (
        "detectable_content:number_placeholders",
        {"num_placeholders": 2},
        "Dear [имя], see you at [место].",
        "Dear [name], see you soon.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.S."},
        "Thanks!\n\np.s. bring cake.",
        "Thanks! PS bring cake.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "P.P.S"},
        "Thanks!\nP.P.S Bring cake.",
        "Thanks!\nP.S. Bring cake.",
    ),
    (
        "detectable_content:postscript",
        {"postscript_marker": "Note:"},
        "Thanks!\nNOTE: bring cake.",
        "Thanks! Bring cake.",
    ),
    (
        "detectable_format:number_bullet_lists",
        {"num_bullets": 2},
        "Two:\n* one\n- two",
        "Three:\n* one\n* two\n* three",
    ),
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.", "My answer: yes."),
    (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": 2},
        "A *first* and **second** part.",
        "A *first* and * * nothing.",
    ),
    (
        "detectable_format:multiple_sections",
        {"section_spliter": "Section", "num_sections": 2},
        "Section 1\nIntro.\nSection 2\nEnd.",
        "Section 1\nIntro and end.",
    ),
    ("detectable_format:json_format", {}, '```json\n{"a": [1, "ü"]}\n```', '{"a": 1} and more'),
    ("detectable_format:title", {}, "<<Über den Regen>>\nIt rains.", "<< >>\nIt rains."),
    ("combination:two_responses", {}, "Red.\n******\nBlue.", "Red.\n******\nRed."),
    (
        "combination:repeat_prompt",
        {"prompt_to_repeat": "What is rain?"},
        "what is rain? Water falling from clouds.",
        "Rain is water falling from clouds.",
    ),
    (
        "startend:end_checker",
        {"end_phrase": "Any other questions?"},
        'Done. any other questions?"',
        "Any other questions? Bye.",
    ),
    ("startend:quotation", {}, '  "Wrapped in quotes."  ', '"Only opened.'),
    (
        "change_case:english_lowercase",
        {},
        "the quick brown fox jumps over the lazy dog.",
        "The quick brown fox jumps over the lazy dog.",
    ),
    (
        "change_case:english_lowercase",
        {},
        "the quick brown fox jumps over the lazy dog.",
        "der schnelle braune fuchs springt über den faulen hund.",  # lowercase, not English
    ),
    (
        "change_case:english_capital",
        {},
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG.",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY dog.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 2, "capital_relation": "at least"},
        "NEVER run, (ALWAYS) walk.",
        "Never run, ALWAYS walk.",
    ),
    (
        "change_case:capital_word_frequency",
        {"capital_frequency": 1, "capital_relation": "less than"},
        "All quiet here.",
        "All QUIET here.",
    ),
    ("punctuation:no_comma", {}, "No comma here; none at all.", "One, here."),
]  # fmt: skip


@pytest.mark.parametrize(("instruction_id", "kwargs", "follows", "breaks"), CASES)
def test_checker_tells_a_following_text_from_a_breaking_one(
    instruction_id, kwargs, follows, breaks
):
    assert check_instruction(instruction_id, follows, kwargs)
    assert not check_instruction(instruction_id, breaks, kwargs)


def test_every_checker_has_a_case_and_an_ifeval_id():
    assert {case[0] for case in CASES} == set(CHECKERS)
    # IFEval's 25 instruction ids, no more and no fewer
    assert len(CHECKERS) == 25
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+", i) for i in CHECKERS)


@pytest.mark.parametrize(("instruction_id", "kwargs"), [(c[0], c[1]) for c in CASES])
@pytest.mark.parametrize("blank", ["", "   \n\t "])
def test_a_blank_answer_follows_nothing(instruction_id, kwargs, blank):
    assert not check_instruction(instruction_id, blank, kwargs)
    assert check_response(_prompt([instruction_id], [kwargs]), blank) == {
        instruction_id: (False, False)
    }
    assert check_response(_prompt([instruction_id], [kwargs]), None) == {
        instruction_id: (False, False)
    }


def test_undetectable_language_passes_as_in_ifeval():
    # Digits and punctuation give langdetect nothing: IFEval counts that as following.
    assert detect_language("12345 ... 678") is None
    assert check_instruction("language:response_language", "12345 ... 678", {"language": "fr"})
    # ...but "all capitals" needs at least one cased letter, in IFEval too (str.isupper)
    assert not check_instruction("change_case:english_capital", "2024 - 42!", {})


def test_language_detection_is_deterministic():
    text = "ok sure"  # short and ambiguous: unseeded langdetect can answer differently each time
    assert len({detect_language(text) for _ in range(20)}) == 1


def test_supported_languages_cover_ifeval_codes():
    ifeval_codes = "en es pt ar hi fr ru de ja it bn uk th ur ta te bg ko pl he fa vi ne sw kn mr"
    ifeval_codes += " gu pa ml fi"
    assert set(ifeval_codes.split()) <= set(ifeval.supported_languages())


# -- sentences and words --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        (
            "Dr. Smith paid 3.5 dollars. Then he left.",
            ["Dr. Smith paid 3.5 dollars.", "Then he left."],
        ),
        (
            "We met J. R. R. Tolkien once. It was fun!",
            ["We met J. R. R. Tolkien once.", "It was fun!"],
        ),
        ("Apples, pears, etc. are fruit. Fine.", ["Apples, pears, etc. are fruit.", "Fine."]),
        ("Nuts etc. Then tea.", ["Nuts etc.", "Then tea."]),
        ("My answer is no. See No. 5 first.", ["My answer is no.", "See No. 5 first."]),
        ("See e.g. the U.S. census. It helps.", ["See e.g. the U.S. census.", "It helps."]),
        ('He said "Stop." Then he ran.', ['He said "Stop."', "Then he ran."]),
        ("Is it? Yes!! Well... maybe. Sure.", ["Is it?", "Yes!!", "Well... maybe.", "Sure."]),
        ("i like cats. they are soft.", ["i like cats.", "they are soft."]),
        ("A title\nand a line without an end", ["A title\nand a line without an end"]),
        ("今天很好。我们去公园！好吗？", ["今天很好。", "我们去公园！", "好吗？"]),
        ("Version 2.0 is out.Really.", ["Version 2.0 is out.Really."]),
        ("", []),
        ("***\n---", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_count_words_counts_runs_of_word_characters():
    assert count_words("Hello, world! It's 3.5 km.") == 7  # Hello world It s 3 5 km
    assert count_words("naïve café, déjà-vu") == 4
    assert count_words("") == 0


# -- strict and loose ----------------------------------------------------------------------------
def test_loose_variants_are_ifevals_eight():
    variants = loose_variants("Sure:\n*body*\nBye")
    assert variants == [
        "Sure:\n*body*\nBye",
        "*body*\nBye",
        "Sure:\n*body*",
        "*body*",
        "Sure:\nbody\nBye",
        "body\nBye",
        "Sure:\nbody",
        "body",
    ]


@pytest.mark.parametrize(
    ("instruction_id", "kwargs", "response"),
    [
        # a preamble line before otherwise valid JSON
        ("detectable_format:json_format", {}, 'Here is the JSON:\n{"a": 1}'),
        # a sign-off after the quoted answer
        ("startend:quotation", {}, '"All wrapped."\nHope this helps'),
        # a sign-off after the end phrase
        ("startend:end_checker", {"end_phrase": "Thank you."}, "Done. Thank you.\n-- Bot"),
        # a capitalised preamble line before a lowercase answer
        ("change_case:english_lowercase", {}, "Answer:\nthe rain falls on the quiet town."),
        # a dash sign-off line counts as a third bullet
        (
            "detectable_format:number_bullet_lists",
            {"num_bullets": 2},
            "* one\n* two\n- your assistant",
        ),
    ],
)
def test_loose_forgives_what_strict_does_not(instruction_id, kwargs, response):
    strict, loose = check_response(_prompt([instruction_id], [kwargs]), response)[instruction_id]
    assert (strict, loose) == (False, True)


def test_loose_still_fails_a_response_no_variant_saves():
    response = "Here it is:\nnot json at all\nBye"
    assert check_response(_prompt(["detectable_format:json_format"], [{}]), response) == {
        "detectable_format:json_format": (False, False)
    }


def test_strict_implies_loose():
    for instruction_id, kwargs, follows, breaks in CASES:
        for text in (follows, breaks):
            strict, loose = check_response(_prompt([instruction_id], [kwargs]), text)[
                instruction_id
            ]
            assert loose or not strict


def test_check_response_takes_a_json_row_and_returns_each_instruction():
    row = {
        "key": 7,
        "prompt": "Describe rain in lowercase without commas.",
        "instruction_id_list": ["change_case:english_lowercase", "punctuation:no_comma"],
        "kwargs": [{}, {}],
    }
    assert check_response(row, "rain falls softly on the roofs and the quiet streets.") == {
        "change_case:english_lowercase": (True, True),
        "punctuation:no_comma": (True, True),
    }
    assert check_response(row, "Rain falls, softly.") == {
        "change_case:english_lowercase": (False, False),
        "punctuation:no_comma": (False, False),
    }


# -- the built-in set -----------------------------------------------------------------------------
BUILTIN = builtin_ifeval_prompts()


def test_builtin_set_shape():
    assert 140 <= len(BUILTIN) <= 160
    assert len({p.key for p in BUILTIN}) == len(BUILTIN)
    assert len({p.prompt for p in BUILTIN}) == len(BUILTIN)
    assert all(1 <= len(p.instruction_id_list) <= 3 for p in BUILTIN)
    used = {i for p in BUILTIN for i in p.instruction_id_list}
    assert used == set(CHECKERS)  # every kind of instruction is asked for
    # short enough for a small model answering in 256 new tokens
    assert max(count_words(p.example_answer) for p in BUILTIN) < 150


def test_builtin_set_stays_in_googles_format():
    lines = ifeval.BUILTIN_IFEVAL.read_text(encoding="utf-8").splitlines()
    for line in lines:
        row = json.loads(line)
        assert set(row) == {"key", "prompt", "instruction_id_list", "kwargs", "example_answer"}
        assert isinstance(row["key"], int)
        langs = [k["language"] for k in row["kwargs"] if "language" in k]
        assert all(code in ifeval.supported_languages() and code != "zh" for code in langs)


@pytest.mark.parametrize("prompt", BUILTIN, ids=lambda p: str(p.key))
def test_builtin_example_answer_follows_every_instruction(prompt):
    verdicts = check_response(prompt, prompt.example_answer)
    assert all(strict for strict, _ in verdicts.values()), verdicts


# For each instruction id, a way to spoil a compliant answer for that instruction alone.
def _spoil(instruction_id: str, answer: str, kw: dict) -> str:
    relation = kw.get("relation") or kw.get("let_relation") or kw.get("capital_relation")
    match instruction_id.split(":")[1]:
        case "existence":
            for keyword in kw["keywords"]:
                answer = re.sub(re.escape(keyword), "", answer, flags=re.IGNORECASE)
            return answer
        case "forbidden_words":
            return f"{answer} {kw['forbidden_words'][0]}"
        case "frequency":
            if relation == "less than":
                return answer + f" {kw['keyword']}" * kw["frequency"]
            return re.sub(re.escape(kw["keyword"]), "", answer, flags=re.IGNORECASE)
        case "letter_frequency":
            if relation == "less than":
                return answer + " " + kw["letter"] * kw["let_frequency"]
            return re.sub(kw["letter"], "", answer, flags=re.IGNORECASE)
        case "response_language":
            return "The whole of this answer is written in plain English, not the language asked."
        case "number_words":
            return answer + " word" * kw["num_words"] if relation == "less than" else "Too short."
        case "number_sentences":
            return answer + " More." * kw["num_sentences"] if relation == "less than" else "Only."
        case "number_paragraphs":
            return answer + "\n***\nOne paragraph too many."
        case "nth_paragraph_first_word":
            return answer + "\n\nOne paragraph too many."
        case "number_placeholders":
            return answer.replace("[", "(").replace("]", ")")
        case "postscript":
            return re.sub(r"p\.\s?p\.\s?s\.?|p\.\s?s\.", "Also", answer, flags=re.IGNORECASE)
        case "number_bullet_lists":
            return answer + "\n* one bullet too many"
        case "constrained_response":
            return "I would rather not say."
        case "number_highlighted_sections":
            return answer.replace("*", "")
        case "multiple_sections":
            return re.sub(re.escape(kw["section_spliter"]) + r"\s?\d+", "", answer)
        case "json_format":
            return answer + "\nThat is all."
        case "title":
            return answer.replace("<<", "").replace(">>", "")
        case "two_responses":
            return answer.replace("******", "")
        case "repeat_prompt":
            return "Answer: " + answer
        case "end_checker":
            return answer + " Bye."
        case "quotation":
            return answer.strip().strip('"')
        case "english_lowercase":
            return "Hello " + answer
        case "english_capital":
            return answer + " and more"
        case "capital_word_frequency":
            if relation == "less than":
                return answer + " WORD" * kw["capital_frequency"]
            return answer.lower()
        case "no_comma":
            return answer + ", indeed"
    raise AssertionError(f"no way to spoil {instruction_id}")


@pytest.mark.parametrize("prompt", BUILTIN, ids=lambda p: str(p.key))
def test_a_spoiled_answer_fails_the_spoiled_instruction(prompt):
    for instruction_id, kwargs in zip(prompt.instruction_id_list, prompt.kwargs):
        wrong = _spoil(instruction_id, prompt.example_answer, kwargs)
        strict, _ = check_response(prompt, wrong)[instruction_id]
        assert not strict, (instruction_id, wrong)


def test_a_wrong_answer_fails_a_builtin_prompt():
    prompt = next(p for p in BUILTIN if p.prompt.startswith("Explain why leaves change colour"))
    assert check_response(prompt, "Because of the weather.") == {
        "length_constraints:number_words": (False, False)
    }
    assert check_response(prompt, "") == {"length_constraints:number_words": (False, False)}


# -- the loader -----------------------------------------------------------------------------------
def _row(**changes) -> dict:
    row = {
        "key": 1,
        "prompt": "Say hi in fewer than 5 words.",
        "instruction_id_list": ["length_constraints:number_words"],
        "kwargs": [{"num_words": 5, "relation": "less than"}],
    }
    return {**row, **changes}


def _write(tmp_path, rows, name="set.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loader_reads_googles_format_and_drops_null_kwargs(tmp_path):
    hf_style = _row(
        key=2,
        instruction_id_list=["length_constraints:number_words", "punctuation:no_comma"],
        kwargs=[
            {"num_words": 5, "relation": "less than", "keywords": None, "language": None},
            {"num_words": None},
        ],
    )
    path = _write(tmp_path, [_row(), hf_style])
    prompts = load_ifeval_file(path)
    assert [p.key for p in prompts] == [1, 2]
    assert prompts[1].kwargs == ({"num_words": 5, "relation": "less than"}, {})
    assert prompts[1].example_answer is None
    assert looks_like_ifeval(path)


def test_loader_reads_a_json_list_too(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([_row(), _row(key=2)]), encoding="utf-8")
    assert len(load_ifeval_file(path)) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            _row(instruction_id_list=["keywords:existance"], kwargs=[{"keywords": ["a"]}]),
            (
                "set.jsonl:2: unknown instruction id 'keywords:existance' "
                "(did you mean 'keywords:existence'?)"
            ),
        ),
        (
            _row(instruction_id_list=["made:up"], kwargs=[{}]),
            "set.jsonl:2: unknown instruction id 'made:up'",
        ),
        (
            _row(kwargs=[{"num_word": 5, "relation": "less than"}]),
            (
                "set.jsonl:2: length_constraints:number_words: unknown kwarg 'num_word' "
                "(it takes: num_words, relation)"
            ),
        ),
        (
            _row(kwargs=[{"relation": "less than"}]),
            "set.jsonl:2: length_constraints:number_words: missing kwarg 'num_words'",
        ),
        (
            _row(kwargs=[{"num_words": 5, "relation": "at most"}]),
            (
                "set.jsonl:2: length_constraints:number_words: 'relation' must be 'less than' or "
                "'at least', not 'at most'"
            ),
        ),
        (
            _row(kwargs=[{"num_words": "5", "relation": "less than"}]),
            "set.jsonl:2: length_constraints:number_words: 'num_words' must be a whole number >= 0",
        ),
        (
            _row(instruction_id_list=["language:response_language"], kwargs=[{"language": "xx"}]),
            "set.jsonl:2: language:response_language: unsupported language code 'xx'",
        ),
        (
            _row(instruction_id_list=["keywords:existence"], kwargs=[{"keywords": "tea"}]),
            "set.jsonl:2: keywords:existence: 'keywords' must be a non-empty list of strings",
        ),
        (_row(kwargs=[]), "set.jsonl:2: 'kwargs' must be a list with one object per instruction"),
        (_row(key=1), "set.jsonl:2: key 1 already used at "),
        ({"prompt": "x"}, "set.jsonl:2: missing 'key'"),
        (_row(prompt="  "), "set.jsonl:2: 'prompt' must be a non-empty string"),
        (
            _row(
                instruction_id_list=["punctuation:no_comma", "punctuation:no_comma"],
                kwargs=[{}, {}],
            ),
            "set.jsonl:2: an instruction id is listed twice",
        ),
    ],
)
def test_loader_errors_are_one_line_naming_file_and_line(tmp_path, row, message):
    path = _write(tmp_path, [_row(), row])
    with pytest.raises(ValueError) as error:
        load_ifeval_file(path)
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(str(tmp_path / "set.jsonl")[: -len("set.jsonl")])
    assert message in text


def test_loader_reports_bad_json_and_empty_files(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text(json.dumps(_row()) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"set\.jsonl:2: not valid JSON"):
        load_ifeval_file(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts in the file"):
        load_ifeval_file(path)


def test_looks_like_ifeval_tells_sets_apart(tmp_path):
    alpaca = _write(tmp_path, [{"instruction": "Say hi.", "input": "", "output": "Hi."}], "a.jsonl")
    assert not looks_like_ifeval(alpaca)
    assert not looks_like_ifeval(tmp_path / "missing.jsonl")
    assert looks_like_ifeval(ifeval.BUILTIN_IFEVAL)


# -- scores ---------------------------------------------------------------------------------------
T, F = True, False
# Four answers: "x:a", "x:b" are kind x; "y:c" is kind y.
CHECKS = [
    {"x:a": (T, T), "x:b": (T, T)},  # all followed, strict and loose
    {"x:a": (F, T)},  # followed only loosely
    {"x:a": (T, T), "x:b": (F, F), "y:c": (T, T)},  # one of three missed
    {"y:c": (F, F)},  # missed
]


def test_scores_on_a_hand_made_example():
    scores = ifeval_scores(CHECKS, n_resamples=2000, seed=3)
    assert (scores["n_prompts"], scores["n_instructions"]) == (4, 7)
    assert scores["prompt_strict"]["mean"] == pytest.approx(1 / 4)
    assert scores["prompt_loose"]["mean"] == pytest.approx(2 / 4)
    assert scores["instruction_strict"]["mean"] == pytest.approx(4 / 7)
    assert scores["instruction_loose"]["mean"] == pytest.approx(5 / 7)
    assert scores["prompt_strict"]["n"] == 4 and scores["instruction_strict"]["n"] == 7
    assert scores["by_kind"] == {
        "x": {"strict": 3 / 5, "loose": 4 / 5, "n": 5},
        "y": {"strict": 1 / 2, "loose": 1 / 2, "n": 2},
    }
    assert scores["by_instruction"]["x:a"] == {"strict": 2 / 3, "loose": 1.0, "n": 3}
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        s = scores[name]
        assert 0 <= s["ci_low"] <= s["mean"] <= s["ci_high"] <= 1
    # JSON lists (as stored) work as well as tuples, and the same seed gives the same intervals
    as_json = json.loads(json.dumps(CHECKS))
    assert ifeval_scores(as_json, n_resamples=2000, seed=3) == scores


def test_instruction_level_interval_resamples_prompts_not_instructions():
    n_resamples, seed = 500, 11
    scores = ifeval_scores(CHECKS, n_resamples=n_resamples, seed=seed)
    # The same draw bootstrap_ci makes: whole prompts, each bringing all its instructions.
    followed = np.array([2, 0, 2, 0])
    given = np.array([2, 1, 3, 1])
    idx = np.random.default_rng(seed).integers(0, 4, size=(n_resamples, 4))
    ratios = followed[idx].sum(axis=1) / given[idx].sum(axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    assert scores["instruction_strict"]["ci_low"] == pytest.approx(low)
    assert scores["instruction_strict"]["ci_high"] == pytest.approx(high)
    # the prompt-level interval uses the very same resamples
    all_followed = np.array([1.0, 0.0, 0.0, 0.0])
    low, high = np.percentile(all_followed[idx].mean(axis=1), [2.5, 97.5])
    assert scores["prompt_strict"]["ci_low"] == pytest.approx(low)
    assert scores["prompt_strict"]["ci_high"] == pytest.approx(high)


def test_scores_when_everything_or_nothing_is_followed():
    perfect = ifeval_scores([{"x:a": (T, T)}] * 5, n_resamples=100, seed=0)
    assert perfect["instruction_loose"] == {"mean": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 5}
    empty = ifeval_scores([], n_resamples=100, seed=0)
    assert empty["prompt_strict"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    assert empty["by_kind"] == {}


def test_model_scores_check_each_answer_against_its_prompt():
    prompts = [
        _prompt(["punctuation:no_comma"], [{}], key=1),
        _prompt(["startend:quotation", "punctuation:no_comma"], [{}, {}], key=2),
        _prompt(["detectable_format:title"], [{}], key=3),
    ]
    answers = ["No commas here.", '"Quoted, but with a comma."', None]
    scores = ifeval_model_scores(prompts, answers, n_resamples=200, seed=0)
    assert scores["checks"] == [
        {"punctuation:no_comma": [True, True]},
        {"startend:quotation": [True, True], "punctuation:no_comma": [False, False]},
        {"detectable_format:title": [False, False]},
    ]
    assert scores["prompt_strict"]["mean"] == pytest.approx(1 / 3)
    assert scores["instruction_strict"]["mean"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="3 prompts but 2 answers"):
        ifeval_model_scores(prompts, answers[:2])


def test_builtin_example_answers_score_perfectly():
    scores = ifeval_model_scores(BUILTIN, [p.example_answer for p in BUILTIN], 100, 0)
    assert scores["prompt_strict"]["mean"] == 1.0
    assert scores["instruction_loose"]["mean"] == 1.0
    assert set(scores["by_kind"]) == {i.split(":")[0] for i in CHECKERS}


def _prompt(ids: list[str], kwargs: list[dict], key: int = 1) -> IFEvalPrompt:
    return IFEvalPrompt(key, "A prompt.", tuple(ids), tuple(kwargs))
