"""The filter: tokenizer and ROUGE-L identical to rouge_score, the novelty index identical to the
Self-Instruct/Alpaca loop, the quality rules, and `dedup_file`."""

import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from tutelage.filter import (
    REASON_CODES,
    QualityRules,
    RougeNoveltyIndex,
    dedup_file,
    rouge_l_f1,
    tokenize,
)
from tutelage.filter.answers import ANSWER_CODES, NOT_BEST

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POOL_FILE = SHARED / "instructions-19k.jsonl"


def reference_tokenize(text: str) -> list[str]:
    return rouge_tokenize.tokenize(text, None)


def reference_f1(a: list[str], b: list[str]) -> float:
    return rouge_scorer._score_lcs(a, b).fmeasure


@pytest.fixture(scope="module")
def pool_rows() -> list[str]:
    if not POOL_FILE.exists():
        pytest.skip(f"{POOL_FILE} is absent")
    return [json.loads(line)["instruction"] for line in POOL_FILE.read_text().splitlines()]


# --- tokenizer and ROUGE-L against rouge_score --------------------------------------------------

# ASCII, punctuation and whitespace, plus characters whose lower() is ASCII or grows (Kelvin sign,
# dotted capital I), accents, Cyrillic and CJK
MIXED = st.text(
    alphabet=st.sampled_from("abcXYZ019 .,;:!?-_'\"\n\t/()ÀéßİKдЖ中文😀\u00a0\u2028"),
    max_size=80,
)


@settings(max_examples=300)
@given(st.one_of(MIXED, st.text(max_size=80)))
def test_tokenize_is_rouge_score_tokenizer(text):
    assert tokenize(text) == reference_tokenize(text)


@settings(max_examples=300)
@given(MIXED, MIXED)
def test_rouge_l_f1_is_rouge_score_on_text(a, b):
    ta, tb = reference_tokenize(a), reference_tokenize(b)
    assert rouge_l_f1(ta, tb) == reference_f1(ta, tb)


@settings(max_examples=300)
@given(*[st.lists(st.sampled_from("abcde"), max_size=40)] * 2)
def test_rouge_l_f1_is_rouge_score_on_tokens(a, b):
    # a five-word vocabulary: long common subsequences, ties and every lcs/length mix
    assert rouge_l_f1(a, b) == reference_f1(a, b)
    assert rouge_l_f1(a, b) == rouge_l_f1(b, a)


def test_rouge_l_f1_edge_cases():
    words = ("lorem ipsum dolor sit amet " * 120).split()
    shuffled = words[::2] + words[1::2]
    for a, b in [
        ([], []),
        ([], ["a"]),
        (["a"], []),
        (["x"], ["y"]),
        (["a"], ["a"]),
        (words, words),
        (words, shuffled),
        (words[:7], words[:13]),
    ]:
        assert rouge_l_f1(a, b) == reference_f1(a, b)
    assert rouge_l_f1(words, words) == 1.0
    assert tokenize("Привет, 世界! ¿Qué?") == reference_tokenize("Привет, 世界! ¿Qué?") == ["qu"]
    assert tokenize("") == tokenize("—…“”") == []


def test_rouge_on_real_instructions(pool_rows):
    assert all(tokenize(text) == reference_tokenize(text) for text in pool_rows[:5000])
    pairs = list(itertools.pairwise(pool_rows[:401]))
    # near-duplicates, scoring 0.64 to 0.89: the interesting pairs for the threshold
    pairs += [(pool_rows[i], pool_rows[j]) for i, j in [(8, 12), (9, 13), (12, 19), (17, 33)]]
    for a, b in pairs:
        ta, tb = tokenize(a), tokenize(b)
        assert rouge_l_f1(ta, tb) == reference_f1(ta, tb)


def test_unicode_tokenize_splits_other_scripts():
    assert tokenize("Привет, МИР!", unicode=True) == ["привет", "мир"]
    assert tokenize("Café NAÏVE Straße", unicode=True) == ["café", "naïve", "strasse"]
    assert tokenize("我喜欢学习中文。カタカナ", unicode=True) == list("我喜欢学习中文カタカナ")
    assert tokenize("abc中文def x_y", unicode=True) == ["abc", "中", "文", "def", "x", "y"]
    assert tokenize("हिन्दी भाषा", unicode=True) == ["हिन्दी", "भाषा"]  # vowel signs stay inside
    # the default tokenizer sees none of it
    assert tokenize("Привет 中文") == []
    index = RougeNoveltyIndex(unicode=True)
    assert index.add("Напишите короткое стихотворение о море").kept
    assert not index.add("Напишите короткое стихотворение о море!").kept


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=80))
def test_unicode_tokenize_agrees_on_ascii(text):
    assert tokenize(text, unicode=True) == tokenize(text)


# --- the novelty index --------------------------------------------------------------------------


def reference_novelty(texts: list[str], threshold: float = 0.7) -> list[bool]:
    """The published loop: keep iff rouge_score's F1 against every kept text is <= threshold.

    Pairs that cannot exceed the threshold are skipped without rouge_score: F1 <= 2*k/(n+m) for
    any k >= LCS, and both min(n, m) and the shared token count (with multiplicity) are >= LCS.
    The 1e-9 keeps pairs whose bound is the threshold itself, where floats decide.
    """
    kept: list[tuple[list[str], Counter]] = []
    decisions = []
    for text in texts:
        tokens = reference_tokenize(text)
        bag, n = Counter(tokens), len(tokens)
        novel = True
        for other, other_bag in kept:
            m = len(other)
            if not n or not m or 2 * min(n, m) / (n + m) < threshold - 1e-9:
                continue
            if 2 * sum((bag & other_bag).values()) / (n + m) < threshold - 1e-9:
                continue
            if reference_f1(tokens, other) > threshold:
                novel = False
                break
        decisions.append(novel)
        if novel:
            kept.append((tokens, bag))
    return decisions


def test_decisions_equal_the_published_loop(pool_rows):
    texts = pool_rows[:2000]
    expected = reference_novelty(texts)
    decisions = RougeNoveltyIndex(0.7).add_many(texts)
    assert [d.kept for d in decisions] == expected
    assert sum(d.kept for d in decisions[:1000]) == 607  # data README
    kept_before = set()
    for i, d in enumerate(decisions):
        if not d.kept:  # the recorded nearest is a kept text and explains the rejection
            assert d.nearest_key in kept_before and d.nearest_text == texts[d.nearest_key]
            assert d.score == reference_f1(tokenize(texts[i]), tokenize(d.nearest_text)) > 0.7
        else:
            kept_before.add(i)


def test_whole_pool_keeps_what_the_readme_says(pool_rows):
    assert sum(d.kept for d in RougeNoveltyIndex(0.7).add_many(pool_rows)) == 11457


def brute_nearest(pool: list[str], text: str) -> tuple[float, int | None]:
    """max over the pool of rouge_score's F1, the earliest pool index on ties; None if 0."""
    tokens = reference_tokenize(text)
    best, best_i = 0.0, None
    for i, other in enumerate(pool):
        score = reference_f1(tokens, reference_tokenize(other))
        if score > best:
            best, best_i = score, i
    return best, best_i


# sentences over a six-word vocabulary: overlaps and exact ties everywhere, and with 40+ pool texts
# every word becomes common enough to take the dense path
SENTENCE = st.lists(st.sampled_from(["the", "cat", "sat", "on", "a", "mat"]), max_size=12).map(
    " ".join
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(SENTENCE, min_size=1, max_size=70), st.lists(SENTENCE, min_size=1, max_size=5))
def test_nearest_is_the_exact_maximum(pool, queries):
    index = RougeNoveltyIndex()
    for text in pool:
        index.add_reference(text)
    for query in queries:
        assert index.nearest(query) == brute_nearest(pool, query)


def test_nearest_on_a_large_pool_with_many_ties():
    rng = random.Random(7)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    pool, queries = (
        [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(k)] for k in (400, 40)
    )
    index = RougeNoveltyIndex()
    for text in pool:
        index.add_reference(text)
    for query in queries:
        assert index.nearest(query) == brute_nearest(pool, query)


def test_nearest_breaks_ties_by_the_earliest_text_behind_many_decoys():
    # decoys share every word but in reverse (bound 1.0, F1 0.25); the ties score their bound
    pool = ["d c b a"] * 40 + ["a b", "c d", "b c", "a d"] * 50
    pool = pool[40:] + pool[:40]  # the earliest tie first, the decoys last: scored first
    index = RougeNoveltyIndex()
    for text in pool:
        index.add_reference(text)
    assert index.nearest("a b c d") == brute_nearest(pool, "a b c d") == (2 / 3, 0)


def test_nearest_handles_counts_beyond_255():
    pool = ["go " * 300 + "stop", "go " * 40, "stop go " * 130, "other words here"]
    pool += [f"go stop filler{i}" for i in range(40)]  # make "go" and "stop" dense tokens
    index = RougeNoveltyIndex()
    for text in pool:
        index.add_reference(text)
    for query in [
        "go " * 280,
        "go " * 500 + "stop",
        "stop " * 300,
        "stop go " * 140,
        "stop go " * 300,
    ]:
        assert index.nearest(query) == brute_nearest(pool, query)


@settings(max_examples=40, deadline=None)
@given(st.lists(SENTENCE, max_size=60), st.sampled_from([0.3, 0.5, 0.7]))
def test_batch_equals_incremental_equals_reference(texts, threshold):
    batch = RougeNoveltyIndex(threshold).add_many(texts)
    one_by_one = RougeNoveltyIndex(threshold)
    assert [one_by_one.add(text) for text in texts] == batch
    assert [d.kept for d in batch] == reference_novelty(texts, threshold)


def test_decision_records_nearest_key_and_text():
    index = RougeNoveltyIndex(0.7)
    index.add_reference("Give three tips for staying healthy.", key="seed-1")
    index.add_reference("Translate the sentence into French.", key="seed-2")
    d = index.add("Give three tips for staying healthy and happy.", key="new-1")
    tokens = tokenize("Give three tips for staying healthy and happy.")
    assert not d.kept and d.nearest_key == "seed-1"
    assert d.nearest_text == "Give three tips for staying healthy."
    assert d.score == reference_f1(tokens, tokenize(d.nearest_text))
    d = index.add("Write a haiku about autumn leaves.")
    assert d.kept and d.score == 0.0 and d.nearest_key is None and d.nearest_text is None
    # default keys count every text offered: seeds 0-1, the rejected one 2, this one 3
    assert index.nearest("write a haiku about autumn leaves") == (1.0, 3)
    assert index.nearest("zebras quietly juggle") == (0.0, None)  # words the pool never saw
    assert len(index) == 3
    # a rejected text never joins the pool
    assert index.nearest("Give three tips for staying healthy and happy.")[1] == "seed-1"


def test_empty_texts_score_zero_and_are_kept():
    index = RougeNoveltyIndex(0.0)  # the strictest threshold: any shared token rejects
    assert index.add("").kept and index.add("!!! ...").kept
    assert index.add("hello world").kept
    assert not index.add("hello there").kept
    assert index.nearest("") == (0.0, None)
    assert [d.kept for d in index.add_many(["", "unseen words only"])] == [True, True]


def test_keys_must_match_texts():
    with pytest.raises(ValueError):
        RougeNoveltyIndex().add_many(["a b c"], keys=[1, 2])


# --- quality rules ------------------------------------------------------------------------------

CLEAN = ("Give three tips for staying healthy.", "", "Eat well, sleep enough and move daily.")

FAILING = {
    "too_short": ("Summarize this text.", "", "Fine."),
    "too_long": ("Explain " + "this " * 150, "", "Fine."),
    "blacklisted_word": ("Describe the image of a sunset over water.", "", "Fine."),
    "write_a_program": ("write a Program that sorts a list of numbers.", "", "Fine."),
    "starts_with_punctuation": ('"Explain why the sky is blue.', "", "Fine."),
    "non_ascii_start": ("Éxplain why the sky is blue today.", "", "Fine."),
    "leaked_list_marker": ("Explain the sky's color.\n18. Instruction: Name a color.", "", "Blue"),
    "control_characters": ("Explain why the sky\x07 is blue today.", "", "Fine."),
    "empty_output": (CLEAN[0], "", "  "),
    "input_equals_output": ("Correct the grammar of the sentence.", "He go home.", " he go home. "),
    "output_ends_with_colon": ("List three colors that you like.", "", "Here are three colors:"),
}


def test_every_reason_code_has_a_failing_example():
    duplicate_codes = {"rouge_duplicate", "minhash_duplicate", "embedding_duplicate"}
    # the answer rules' codes have their failing examples in test_answers_filter.py
    answer_codes = {*ANSWER_CODES, NOT_BEST}
    assert set(FAILING) | duplicate_codes | answer_codes == set(REASON_CODES)
    rules = QualityRules(check_output_colon=True)
    for code, example in FAILING.items():
        assert rules.check_instance(*example) == code, code
    assert rules.check_instance(*CLEAN) is None
    assert rules.check_instruction(CLEAN[0]) is None


@pytest.mark.parametrize(
    "instruction,input,output,code",
    [
        ("Go to the store and buy milk today.", "", "OK", "blacklisted_word"),  # a phrase
        ("Please go   to bed early tonight, kid.", "", "OK", "blacklisted_word"),
        ("Describe how DIAGRAMS help students.", "", "OK", None),  # whole words only: not "diagram"
        ("Explain the mapping between two sets.", "", "OK", None),  # "map" inside a word
        ("Give a short answer to the question.", "", "N/A", "empty_output"),
        ("Give a short answer to the question.", "", "<noinput>", "empty_output"),
        ("Give a short answer to the question.", "Input: 2 + 2", "4", "leaked_list_marker"),
        ("Give a short answer to the question.", "", "4\nOutput: 5", "leaked_list_marker"),
        ("Give a short answer to the question.", "", "4\r\n", "control_characters"),
        ("Give a short answer to the question.", "2\t+\n2", "4", None),  # tab and newline are fine
        ("Give a short answer to the question.", "", "Four:", None),  # colon check off by default
        ("Summarize the text below in one line.", "", "The output: a summary.", None),
    ],
)
def test_quality_rule_cases(instruction, input, output, code):
    assert QualityRules().check_instance(instruction, input, output) == code


def test_rules_can_be_switched_off():
    rules = QualityRules(
        min_words=1,
        max_words=10_000,
        blacklist=(),
        check_write_a_program=False,
        check_punctuation_start=False,
        check_non_ascii_start=False,
        check_output=False,
        check_list_markers=False,
        check_control_chars=False,
    )
    for code, example in FAILING.items():
        assert rules.check_instance(*example) is None, code
    assert QualityRules(min_words=2).check_instruction("Summarize this.") is None


# --- dedup_file ---------------------------------------------------------------------------------

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Sleep."},
    {"instruction": "Give three tips for staying healthy!", "input": "", "output": "Eat."},
    {"output": "Paris", "instruction": "What is the capital of France?", "input": ""},
    {
        "instruction": "Translate the sentence into Spanish.",
        "input": "I like tea.",
        "output": "Me gusta el té.",
    },
    {"instruction": "Give 3 tips for staying healthy.", "input": "", "output": "Move."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path


def test_dedup_jsonl_keeps_rows_unchanged_and_writes_rejects(tmp_path):
    src = write_jsonl(tmp_path / "pool.jsonl", ROWS)
    src.write_text(src.read_text().replace("té", "t\\u00e9") + "\n\n")  # escapes, blank lines
    summary = dedup_file(src, tmp_path / "out.jsonl", rejected_path=tmp_path / "rejected.jsonl")
    assert (summary.read, summary.kept, summary.rejected) == (5, 3, 2) and summary.seconds >= 0
    lines = src.read_text().splitlines()
    assert (tmp_path / "out.jsonl").read_text() == "".join(lines[i] + "\n" for i in (0, 2, 3))
    rejected = [json.loads(line) for line in (tmp_path / "rejected.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejected] == [ROWS[1], ROWS[4]]
    assert [r["line"] for r in rejected] == [2, 5]
    assert all(r["nearest"] == ROWS[0]["instruction"] for r in rejected)
    a, b = tokenize(ROWS[4]["instruction"]), tokenize(ROWS[0]["instruction"])
    assert rejected[1]["score"] == reference_f1(a, b) and rejected[0]["score"] == 1.0


def test_dedup_json_list_keeps_format_and_key_order(tmp_path):
    src = tmp_path / "pool.json"
    src.write_text(json.dumps(ROWS, indent=4))
    summary = dedup_file(src, tmp_path / "out.json", threshold=0.99)
    assert (summary.kept, summary.rejected) == (4, 1)
    text = (tmp_path / "out.json").read_text()
    assert text == json.dumps([ROWS[i] for i in (0, 2, 3, 4)], indent=2, ensure_ascii=False) + "\n"
    assert list(json.loads(text)[1]) == ["output", "instruction", "input"] and "té" in text


def test_dedup_self_instruct_rows_against_seeds(tmp_path):
    seeds = write_jsonl(
        tmp_path / "seeds.jsonl",
        [
            {
                "id": "seed_task_0",
                "name": "tips",
                "instruction": "Give three tips for staying healthy.",
                "instances": [{"input": "", "output": "Sleep."}],
                "is_classification": False,
            },
        ],
    )
    generated = [
        {
            "instruction": "Give three tips for staying healthy.",
            "instances": [{"input": "", "output": "x"}],
        },
        {"instruction": "Name a river in Africa.", "instances": [{"input": "", "output": "Nile"}]},
        {"instruction": "Name a river in Africa, please.", "instances": []},
    ]
    src = write_jsonl(tmp_path / "generated.jsonl", generated)
    summary = dedup_file(
        src, tmp_path / "out.jsonl", against=seeds, rejected_path=tmp_path / "r.jsonl"
    )
    assert (summary.read, summary.kept, summary.rejected) == (3, 1, 2)
    out = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in out] == [generated[1]]
    rejected = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["nearest"] for r in rejected] == [
        "Give three tips for staying healthy.",
        "Name a river in Africa.",
    ]
    # without the seeds the first row is new
    assert dedup_file(src, tmp_path / "out2.jsonl").kept == 2


def test_dedup_bad_input_names_file_and_line(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_text('{"instruction": "Fine row here."}\n\n{"instruction": "broken" "x"}\n')
    with pytest.raises(ValueError, match=r"^\S*data\.jsonl:3: not valid JSON \(Expecting"):
        dedup_file(src, tmp_path / "out.jsonl")
    src.write_text('{"instruction": "Fine row here."}\n{"prompt": "no instruction"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: row has no 'instruction' string"):
        dedup_file(src, tmp_path / "out.jsonl")
    src.write_text('[{"instruction": "ok row"}, ["not", "a", "row"]]')
    with pytest.raises(ValueError, match=r"data\.jsonl:item 2: row has no 'instruction'"):
        dedup_file(src, tmp_path / "out.jsonl")
    src.write_text('[{"instruction": "ok row"},\n {"instruction": 3,]')
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not valid JSON"):
        dedup_file(src, tmp_path / "out.jsonl")
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"data\.jsonl:2: not valid JSON"):
        dedup_file(good, tmp_path / "out.jsonl", against=src)
    assert not (tmp_path / "out.jsonl").exists()  # nothing written on bad input


def test_numbered_marker_leaked_mid_line_is_caught():
    rules = QualityRules()
    assert (
        rules.check_instance(
            "Explain the rules of chess.", "", "Pieces move. 18. Instruction: next"
        )
        == "leaked_list_marker"
    )
    assert (
        rules.check_instance("Explain the rules of chess.", "", "Input: stray label")
        == "leaked_list_marker"
    )
    assert (
        rules.check_instance("Explain the rules of chess.", "", "The output: pieces move.") is None
    )


# --- chunks and workers: the same decisions and nearest records ---------------------------------

from tutelage.filter import rouge as rouge_module


def brute_decisions(
    texts: list[str], threshold: float = 0.7, pool: list[str] = ()
) -> list[tuple[bool, float, int | None]]:
    """The published loop with nearest records: (kept, best F1, index in pool + texts of the
    earliest kept text reaching it, None when 0.0); rouge_l_f1 is rouge_score's F1 (tested
    above)."""
    kept = [(i, tokenize(t)) for i, t in enumerate(pool)]
    out = []
    for j, text in enumerate(texts, len(pool)):
        tokens = tokenize(text)
        best, best_i = 0.0, None
        for i, other in kept:
            score = rouge_l_f1(tokens, other)
            if score > best:
                best, best_i = score, i
        out.append((best <= threshold, best, best_i))
        if best <= threshold:
            kept.append((j, tokens))
    return out


def near_duplicates(count: int, seed: int) -> list[str]:
    """Adversarial rows: short sentences over a small vocabulary, each often a small edit of one
    a few rows back (so chunks are full of near-duplicates of their own rows), plus exact
    duplicates, reversed copies (many equal bounds, low F1) and empty rows."""
    rng = random.Random(seed)
    words = [
        "write",
        "a",
        "short",
        "poem",
        "about",
        "the",
        "sea",
        "and",
        "sky",
        "list",
        "three",
        "facts",
        "on",
        "cats",
        "dogs",
    ]
    rows: list[str] = []
    for _ in range(count):
        roll = rng.random()
        if rows and roll < 0.55:
            base = rng.choice(rows[-12:]).split()
            edit = rng.randrange(3)
            if edit == 0 and len(base) > 1:
                i = rng.randrange(len(base) - 1)
                base[i], base[i + 1] = base[i + 1], base[i]
            elif edit == 1:
                base.insert(rng.randrange(len(base) + 1), rng.choice(words))
            elif base:
                base.pop(rng.randrange(len(base)))
            rows.append(" ".join(base))
        elif rows and roll < 0.65:
            rows.append(rng.choice(rows))
        elif rows and roll < 0.72:
            rows.append(" ".join(reversed(rng.choice(rows).split())))
        elif roll < 0.75:
            rows.append(rng.choice(["", "?!"]))
        else:
            rows.append(" ".join(rng.choices(words, k=rng.randint(1, 10))))
    return rows


@pytest.fixture
def small_chunks(monkeypatch):
    """Tiny chunks (many chunk boundaries) and workers for any input, started before use."""
    monkeypatch.setattr(rouge_module, "_CHUNK", 24)
    monkeypatch.setattr(rouge_module, "_MIN_CHUNK", 4)
    monkeypatch.setattr(rouge_module, "_PARALLEL_MIN_TEXTS", 0)
    monkeypatch.setattr(rouge_module, "_PARALLEL_MIN_POOL", 0)
    monkeypatch.setattr(rouge_module, "_WAIT_FOR_WORKERS", True)
    calls = []
    best = rouge_module._Helpers.best
    monkeypatch.setattr(
        rouge_module._Helpers, "best", lambda self, *a: calls.append(a[-1]) or best(self, *a)
    )
    return calls


def as_tuples(decisions: list) -> list[tuple]:
    return [(d.kept, d.score, d.nearest_key, d.nearest_text) for d in decisions]


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_chunked_decisions_are_the_published_loop_with_nearest(small_chunks, threshold):
    texts = near_duplicates(700, seed=1)
    pool = ["write a short poem about the sea", "list three facts on cats", "sky sea sky"]
    index = RougeNoveltyIndex(threshold)
    index.add_references(pool)
    decisions = index.add_many(texts)
    expected = brute_decisions(texts, threshold, pool)
    everything = pool + texts
    assert [(d.kept, d.score, d.nearest_key) for d in decisions] == expected
    assert all(
        d.nearest_text == (None if i is None else everything[i])
        for d, (_, _, i) in zip(decisions, expected)
    )
    assert not small_chunks  # workers=1: no helpers


@pytest.mark.parametrize("seed", [2, 3])
def test_workers_decide_exactly_as_one_process_on_near_duplicates(small_chunks, seed):
    texts = near_duplicates(900, seed)
    one = RougeNoveltyIndex(0.7)
    one.add_reference("write a short poem about the sea", key="seed")
    two = RougeNoveltyIndex(0.7)
    two.add_reference("write a short poem about the sea", key="seed")
    single, parallel = one.add_many(texts), two.add_many(texts, workers=3)
    assert as_tuples(parallel) == as_tuples(single)
    assert [(d.kept, d.score) for d in single] == [
        x[:2] for x in brute_decisions(texts, 0.7, ["write a short poem about the sea"])
    ]
    assert small_chunks and set(small_chunks) == {3}  # every chunk was split three ways
    assert len(two) == len(one)
    assert two.nearest("the sea poem short") == one.nearest("the sea poem short")


def test_workers_decide_exactly_as_one_process_on_real_rows(pool_rows, small_chunks, monkeypatch):
    monkeypatch.setattr(rouge_module, "_CHUNK", 128)
    texts = pool_rows[:2000]
    single = RougeNoveltyIndex().add_many(texts)
    parallel = RougeNoveltyIndex().add_many(texts, workers=2)
    assert as_tuples(parallel) == as_tuples(single)
    assert sum(d.kept for d in parallel[:1000]) == 607 and len(small_chunks) > 10


def test_incremental_adds_match_a_batch(pool_rows):
    texts = pool_rows[:300]
    index = RougeNoveltyIndex()
    assert as_tuples(index.add(t) for t in texts) == as_tuples(RougeNoveltyIndex().add_many(texts))


def test_dedup_file_with_workers_writes_the_same_files(tmp_path, small_chunks):
    rows = [{"instruction": t, "output": str(i)} for i, t in enumerate(near_duplicates(400, 5))]
    src = write_jsonl(tmp_path / "pool.jsonl", rows)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "list three facts on cats"}])
    outputs = []
    for workers in (1, 2):
        out, rejected = tmp_path / f"out{workers}.jsonl", tmp_path / f"rejected{workers}.jsonl"
        summary = dedup_file(src, out, against=seeds, rejected_path=rejected, workers=workers)
        outputs.append((summary.kept, out.read_text(), rejected.read_text()))
    assert outputs[0] == outputs[1] and small_chunks
    with pytest.raises(ValueError, match="workers"):
        dedup_file(src, tmp_path / "x.jsonl", workers=0)


def test_every_nearest_record_on_real_rows_is_the_exact_maximum(pool_rows):
    # all pairs at once (rapidfuzz LCS over one character per token), then the published loop
    texts = pool_rows[:1500]
    vocab: dict[str, str] = {}
    codes = ["".join(vocab.setdefault(t, chr(len(vocab) + 1)) for t in tokenize(x)) for x in texts]
    lcs = process.cdist(codes, codes, scorer=LCSseq.similarity, dtype=np.int64)
    n = np.array([len(c) for c in codes])
    decisions = RougeNoveltyIndex().add_many(texts)
    kept: list[int] = []
    for j, d in enumerate(decisions):
        scores = [rouge_module._f1(int(lcs[j, i]), int(n[j]), int(n[i])) for i in kept]
        best = max(scores, default=0.0)
        nearest = kept[scores.index(best)] if best > 0 else None  # index(): the earliest
        assert (d.kept, d.score, d.nearest_key) == (best <= 0.7, best, nearest), j
        if d.kept:
            kept.append(j)


def test_a_worker_that_dies_is_replaced_by_this_process(small_chunks, monkeypatch):
    import os
    import signal

    texts = near_duplicates(600, seed=4)
    best = rouge_module._Helpers.best
    calls = []

    def kill_one(self, *args):
        calls.append(1)
        if len(calls) == 5:
            os.kill(self.procs[0].pid, signal.SIGKILL)
        return best(self, *args)

    monkeypatch.setattr(rouge_module._Helpers, "best", kill_one)
    parallel = RougeNoveltyIndex().add_many(texts, workers=3)
    assert as_tuples(parallel) == as_tuples(RougeNoveltyIndex().add_many(texts))
    assert len(calls) > 5


def test_dedup_command_with_workers(tmp_path):
    import subprocess
    import sys

    rows = [{"instruction": t} for t in near_duplicates(2500, seed=6)]  # enough for workers
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out{workers}.jsonl"
        rejected = tmp_path / f"rejected{workers}.jsonl"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "tutelage.cli",
                "dedup",
                str(src),
                "-o",
                str(out),
                "--rejected",
                str(rejected),
                "--workers",
                workers,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert "read 2500, kept" in r.stderr + r.stdout
        outputs.append((out.read_text(), rejected.read_text()))
    assert outputs[0] == outputs[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "tutelage.cli",
            "dedup",
            str(src),
            "-o",
            str(tmp_path / "x.jsonl"),
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2


def test_workers_that_cannot_start_leave_this_process_alone(small_chunks, monkeypatch):
    def refuse(self, count):
        raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(rouge_module._Helpers, "__init__", refuse)
    texts = near_duplicates(200, seed=7)
    assert as_tuples(RougeNoveltyIndex().add_many(texts, workers=2)) == as_tuples(
        RougeNoveltyIndex().add_many(texts)
    )


def test_word_counts_follow_the_unicode_tokenizer_when_asked():
    chinese = "请解释光合作用的过程"  # ten characters, no spaces
    assert QualityRules().check_instruction(chinese) == "too_short"
    rules = QualityRules(unicode=True, check_non_ascii_start=False)
    assert rules.check_instruction(chinese) is None
    assert QualityRules(unicode=True, max_words=5).check_instruction(chinese) == "too_long"
