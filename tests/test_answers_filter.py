"""The rules for chat answers (`filter.answers`), each with passing and failing texts, and the
prompt sources (`prompt_sources.load_prompts`) in every shape."""

from __future__ import annotations

import json

import pytest

from tutelage.config import load_config
from tutelage.filter import REASON_CODES
from tutelage.filter.answers import (
    ANSWER_CODES,
    NOT_BEST,
    AnswerRules,
    content_words,
    is_off_topic,
    is_refusal,
    is_repetitive,
)
from tutelage.prompt_sources import Prompt, load_prompts

RULES = AnswerRules()
QUESTION = "Explain how tides work on planet Earth."
FINE = "Tides on Earth rise and fall twice a day because the moon pulls on the oceans."

FAILING = {  # reason -> (question, answer, finish_reason)
    "empty_output": (QUESTION, " \n\t ", "stop"),
    "unfinished": (QUESTION, "Tides on Earth rise and fall because", "length"),
    "refusal": (QUESTION, "I'm sorry, but I can't help with that request.", "stop"),
    "repetition": (QUESTION, "Tides rise. The moon pulls the sea. " * 20, "stop"),
    "off_topic": (
        QUESTION,
        "The stock market closed higher today as investors cheered strong quarterly earnings.",
        "stop",
    ),
}


def test_every_answer_code_has_a_failing_example_and_is_registered():
    assert set(FAILING) == set(ANSWER_CODES)
    for code, example in FAILING.items():
        assert RULES.check(*example) == code, code
    assert RULES.check(QUESTION, FINE, "stop") is None
    assert set(ANSWER_CODES) | {NOT_BEST} <= set(REASON_CODES)
    assert len(REASON_CODES) == len(set(REASON_CODES))  # empty_output once


def test_rules_run_in_order_empty_first():
    assert RULES.check(QUESTION, "", "length") == "empty_output"
    assert RULES.check(QUESTION, "I'm sorry, I", "length") == "unfinished"
    assert RULES.check(QUESTION, "Sorry. " * 50, "stop") == "refusal"


@pytest.mark.parametrize(
    ("switch", "code"),
    [
        ("check_refusal", "refusal"),
        ("check_unfinished", "unfinished"),
        ("check_repetition", "repetition"),
        ("check_off_topic", "off_topic"),
    ],
)
def test_each_rule_can_be_switched_off(switch, code):
    rules = AnswerRules(**{switch: False})
    assert rules.check(*FAILING[code]) is None
    assert rules.check(*FAILING["empty_output"]) == "empty_output"  # never off


def test_rules_from_the_filter_configuration():
    cfg = load_config(None, {"filter.check_refusal": False, "filter.check_off_topic": False})
    assert AnswerRules.from_config(cfg.filter) == AnswerRules(
        check_refusal=False, check_off_topic=False
    )


@pytest.mark.parametrize(
    "answer",
    [
        "I'm sorry, but I cannot do that.",
        "I’m sorry, I can’t help with that.",  # typographic apostrophes
        "Sorry, that is not something I can do.",
        "I apologize, but this is outside my scope.",
        "My apologies: I am unable to answer.",
        "Unfortunately, I do not know.",
        "I cannot provide medical advice.",
        "I am not able to browse the web.",
        "As an AI, I have no opinions.",
        "As a language model, I lack feelings.",
        "Great question! As an AI language model I don't have personal experiences, but...",
        "Sure. I'm just an AI, so take this with care.",
        "Here is a thought. I'm not designed to give legal advice.",
        "I don't have the ability to see images.",
        "  \n**I'm sorry**, no.",
    ],
)
def test_refusals(answer):
    assert is_refusal(answer), answer


@pytest.mark.parametrize(
    "answer",
    [
        FINE,
        "Sorrow is a deep sadness, often after a loss.",
        "I can help: first, preheat the oven to 200 degrees.",
        "The AI revolution changed how we search for information.",
        "Artificial intelligence (AI) is the study of machines that learn.",
        "x" * 400 + " As an AI, I cannot.",  # past the window where a refusal shows itself
        "Je suis désolé de l'apprendre.",  # other languages are not checked
    ],
)
def test_not_refusals(answer):
    assert not is_refusal(answer), answer


def test_repetition():
    assert is_repetitive("The same line goes here.\n" * 4)
    assert not is_repetitive("The same line goes here.\n" * 3)  # up to 3 repeats pass
    assert is_repetitive("one two three four five six " * 4)  # a 6-word loop
    assert not is_repetitive("one two three four five six " * 3)
    assert is_repetitive("abcdefghij" * 100)  # compresses far better than prose
    assert not is_repetitive("- eggs\n- milk\n- bread\n- eggs\n- tea")  # short lines do not count
    assert not is_repetitive(FINE)
    assert not is_repetitive("")
    prose = (
        "Tides are the regular rise and fall of the sea. The moon's gravity pulls hardest on the "
        "water nearest to it, raising a bulge; a second bulge forms on the far side, where the "
        "moon pulls least. As Earth turns, each coast passes through both bulges, so most places "
        "see two high tides a day. The sun adds its own, weaker pull: when it lines up with the "
        "moon, at new and full moon, spring tides run high, and at the quarters neap tides stay "
        "low. Coastlines, the depth of the seabed and the shape of bays bend all of this, which "
        "is why the Bay of Fundy sees a range of sixteen metres while the Mediterranean barely "
        "moves."
    )
    assert len(prose) > 600 and not is_repetitive(prose)


def test_off_topic():
    long_unrelated = FAILING["off_topic"][1]
    assert is_off_topic(QUESTION, long_unrelated)
    assert not is_off_topic(QUESTION, FINE)  # shares "tides" and "Earth"
    assert not is_off_topic("What is 12 times 7?", "84")  # a short exact answer
    assert not is_off_topic("Tell me a joke.", long_unrelated)  # too few words to judge
    assert not is_off_topic(
        "Translate the sentence below into French: the cat sleeps on the warm mat.",
        "Le chat dort sur le tapis chaud, et la maison reste calme toute la nuit.",
    )
    # plurals and case fold together
    assert not is_off_topic(
        "Explain how PLANETS orbit stars.",
        "Every planet follows an elliptical path around its star, pulled by gravity along "
        "the whole way round.",
    )
    assert content_words("The planets, and their Moons!") == {"planet", "moon"}


def test_unicode_text():
    german_q = "Erkläre kurz die Geschichte der Berliner Mauer."
    german_a = "Die Berliner Mauer trennte von 1961 bis 1989 Ost- und West-Berlin."
    assert RULES.check(german_q, german_a, "stop") is None
    unrelated = (
        "Aktienkurse stiegen heute kräftig, weil Anleger starke Quartalszahlen großer "
        "Technologiekonzerne feierten."
    )
    assert RULES.check(german_q, unrelated, "stop") == "off_topic"
    # Chinese is written without spaces: a whole clause is one "word", too few to judge
    assert (
        RULES.check("请用三句话介绍长城的历史。", "长城是中国古代的军事防御工程。", "stop") is None
    )
    assert RULES.check("请介绍长城。", "", "stop") == "empty_output"
    assert RULES.check(QUESTION, "😀 " * 300, "stop") == "repetition"


# -- prompt sources --------------------------------------------------------------------------
ROWS = [
    {"instruction": "Name three rivers.", "input": "", "output": "ignored"},
    {"instruction": "Summarise this.", "input": "A long text."},
]
EXPECTED = [Prompt("Name three rivers."), Prompt("Summarise this.", "A long text.")]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_and_json_lists(tmp_path):
    assert load_prompts(jsonl(tmp_path / "a.jsonl", ROWS)) == EXPECTED
    (tmp_path / "a.json").write_text(json.dumps(ROWS, indent=2))
    assert load_prompts(tmp_path / "a.json") == EXPECTED
    (tmp_path / "s.json").write_text(json.dumps(["  Name three rivers. ", "Summarise this."]))
    assert load_prompts(tmp_path / "s.json") == [
        Prompt("Name three rivers."),
        Prompt("Summarise this."),
    ]


def test_prompt_rows_null_inputs_and_duplicates(tmp_path):
    rows = [
        {"prompt": "Name three rivers."},
        {"instruction": "Summarise this.", "input": None},
        {"instruction": "Name three rivers."},  # an exact repeat: dropped
        {"instruction": "Summarise this.", "input": "A long text."},  # another input: kept
    ]
    assert load_prompts(jsonl(tmp_path / "p.jsonl", rows)) == [
        Prompt("Name three rivers."),
        Prompt("Summarise this."),
        Prompt("Summarise this.", "A long text."),
    ]


def test_self_instruct_rows_give_one_prompt_per_instance(tmp_path):
    rows = [
        {
            "instruction": "Sort the numbers.",
            "instances": [
                {"input": "3, 1, 2", "output": "1, 2, 3"},
                {"input": "9, 8", "output": ""},
            ],
        }
    ]
    assert load_prompts(jsonl(tmp_path / "si.jsonl", rows)) == [
        Prompt("Sort the numbers.", "3, 1, 2"),
        Prompt("Sort the numbers.", "9, 8"),
    ]


def test_conversations_give_their_first_user_turn(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name three rivers."}]},
                {"role": "assistant", "content": "Nile, Amazon, Yangtze."},
                {"role": "user", "content": "And lakes?"},
            ]
        },
        {
            "conversations": [
                {"from": "human", "value": "Summarise this."},
                {"from": "gpt", "value": "x"},
            ]
        },
    ]
    assert load_prompts(jsonl(tmp_path / "c.jsonl", rows)) == [
        Prompt("Name three rivers."),
        Prompt("Summarise this."),
    ]


def test_datasets_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    data = Dataset.from_list([{"instruction": r["instruction"], "input": r["input"]} for r in ROWS])
    data.save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(tmp_path / "ds") == EXPECTED
    DatasetDict({"train": data}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(tmp_path / "dd") == EXPECTED
    DatasetDict({"test": data}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(ValueError, match="nt: a DatasetDict without a 'train' split"):
        load_prompts(tmp_path / "nt")
    bad = Dataset.from_list([{"text": "no instruction"}])
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad: row 1: needs an 'instruction'"):
        load_prompts(tmp_path / "bad")


def test_a_run_folder_gives_its_kept_examples(tmp_path):
    from helpers import add_examples

    from tutelage.store import Store

    with Store(tmp_path / "run") as store:
        add_examples(
            store, [("Name three rivers.", "", "Nile."), ("Sort.", "3, 1", "1, 3")], "train"
        )
    assert load_prompts(tmp_path / "run") == [Prompt("Name three rivers."), Prompt("Sort.", "3, 1")]
    Store(tmp_path / "empty").close()
    with pytest.raises(ValueError, match="empty: no instructions in it"):
        load_prompts(tmp_path / "empty")
