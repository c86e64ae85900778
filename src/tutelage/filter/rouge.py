"""ROUGE-L novelty filter of Self-Instruct / Stanford Alpaca: exact decisions, fast.

The published loop scores every new instruction against every kept one with rouge_score
(pure-Python O(n*m) LCS) and keeps it iff no score exceeds 0.7. We give the same decisions and
scores, bit for bit, but
- tokens become single private characters, so a token list is a str and the LCS runs in
  rapidfuzz's bit-parallel C++ code;
- a bag-of-tokens bound (LCS <= multiset overlap) rules out almost every pool text with a few
  vectorised numpy operations, so only a handful of LCS computations remain per new text.
"""

import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np
import regex
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

_ASCII_TOKEN = re.compile(r"[a-z0-9]+")
# CJK ideographs and kana stand alone (those scripts use no spaces); elsewhere a token is a run
# of letters, combining marks (Devanagari vowel signs, decomposed accents) and digits.
_CJK = r"\p{Han}\p{Hiragana}\p{Katakana}"
_UNICODE_TOKEN = regex.compile(rf"[{_CJK}]|[[\p{{L}}\p{{M}}\p{{N}}]--[{_CJK}]]+", regex.V1)


def tokenize(text: str, unicode: bool = False) -> list[str]:
    """rouge_score's default tokenizer (no stemming), or a Unicode-aware variant.

    rouge_score lower-cases, turns every run outside [a-z0-9] into a space and splits, so what
    remains is exactly the [a-z0-9] runs of the lower-cased text (non-ASCII text yields nothing).
    With unicode=True: NFKC, casefold, then letter/mark/digit runs, one token per CJK character.
    """
    if unicode:
        return _UNICODE_TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())
    return _ASCII_TOKEN.findall(text.lower())


def _f1(lcs: int, n: int, m: int) -> float:
    """rouge_score's _score_lcs(target of n tokens, prediction of m tokens).fmeasure.

    Same operations in the same order, so the float is identical and comparisons with the
    threshold decide alike (2*lcs/(n+m) is equal in exact arithmetic, not always in floats).
    """
    if lcs == 0:
        return 0.0
    precision = lcs / m
    recall = lcs / n
    return 2 * precision * recall / (precision + recall)


def rouge_l_f1(a_tokens: Sequence[str], b_tokens: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists: rouge_score's _score_lcs(a, b).fmeasure, exactly."""
    if not a_tokens or not b_tokens:
        return 0.0
    chars: dict[str, str] = {}
    a = "".join(chars.setdefault(t, chr(len(chars))) for t in a_tokens)
    b = "".join(chars.setdefault(t, chr(len(chars))) for t in b_tokens)
    return _f1(LCSseq.similarity(a, b), len(a), len(b))


@dataclass(frozen=True)
class Decision:
    """The verdict on one text: kept iff score <= threshold; nearest is the pool text scoring
    highest (earliest one on ties), None when nothing shares a token with it (score 0.0)."""

    kept: bool
    score: float
    nearest_key: Hashable | None
    nearest_text: str | None


# Float slack for comparing exact bounds with rouge_score's floats (a few ulps apart at most);
# it only makes pruning slightly more conservative.
_EPS = 1e-9
# A token's pool counts move from a posting list to a dense numpy row once it is this common:
# then one vectorised pass over the pool is cheaper than scattering its postings.
_DENSE_MIN_DF = 32
# Candidates scored in one rapidfuzz call before pruning the rest with the result.
_BATCH = 32
_UNKNOWN = "\x00"  # stands for a query token absent from the pool: it matches nothing


class RougeNoveltyIndex:
    """A pool of kept texts answering "is this new text novel enough?" exactly as the
    Self-Instruct/Alpaca loop: keep iff max ROUGE-L F1 against the pool <= threshold.

    A text with no tokens (empty, punctuation only, or non-ASCII with unicode=False) scores 0.0
    against everything, as rouge_score gives 0 for an empty token list: it is always kept, like in
    the published loop, and joins the pool, where it never matches anything.
    """

    def __init__(self, threshold: float = 0.7, unicode: bool = False):
        self.threshold = threshold
        self.unicode = unicode
        self._chars: dict[str, str] = {}  # token -> private character, shared by the pool
        self._keys: list[Hashable] = []
        self._texts: list[str] = []
        self._codes: list[str] = []  # each pool text as one character per token
        self._first_with_code: dict[str, int] = {}  # exact token-sequence duplicates -> 1.0
        self._offered = 0  # texts seen by add/add_reference: the default key
        # Per-token counts in each pool text, for the multiset-overlap bound: a rare token as
        # posting lists per occurrence level (ids of texts with >= 1, >= 2, ... of it), a common
        # one as a dense uint8 row (saturating at 255).
        self._postings: dict[str, list[list[int]]] = {}
        self._dense_row: dict[str, int] = {}
        self._dense = np.zeros((64, 1024), np.uint8)
        self._lengths = np.zeros(1024, np.int64)

    def __len__(self) -> int:
        return len(self._codes)

    def add_reference(self, text: str, key: Hashable | None = None) -> None:
        """Put a text (a seed, an earlier run's output) into the pool unconditionally."""
        code = self._encode([text])[0]
        self._insert(text, code, Counter(code), key)

    def nearest(self, text: str) -> tuple[float, Hashable | None]:
        """The best ROUGE-L F1 of text against the pool, and that pool text's key."""
        # a token the pool has never seen matches nothing: _UNKNOWN stands for all of them
        code = "".join(self._chars.get(t, _UNKNOWN) for t in tokenize(text, self.unicode))
        score, i = self._best(code, Counter(code))
        return score, None if i is None else self._keys[i]

    def add(self, text: str, key: Hashable | None = None) -> Decision:
        """Score text against the pool; keep it (and pool it) iff the best score <= threshold."""
        return self._add(text, self._encode([text])[0], key)

    def add_many(
        self, texts: Iterable[str], keys: Iterable[Hashable] | None = None
    ) -> list[Decision]:
        """add() for each text in order (keys default to the running index)."""
        texts = list(texts)
        keys = [None] * len(texts) if keys is None else list(keys)
        if len(keys) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(keys)} keys")
        codes = self._encode(texts)
        return [self._add(text, code, key) for text, code, key in zip(texts, codes, keys)]

    def _add(self, text: str, code: str, key: Hashable | None) -> Decision:
        counts = Counter(code)
        score, i = self._best(code, counts)
        kept = score <= self.threshold
        if kept:
            self._insert(text, code, counts, key)
        else:
            self._offered += 1
        if i is None:
            return Decision(kept, score, None, None)
        return Decision(kept, score, self._keys[i], self._texts[i])

    def _encode(self, texts: list[str]) -> list[str]:
        """Each text as a string of one private character per token, growing the vocabulary."""
        token_lists = [tokenize(text, self.unicode) for text in texts]
        chars = self._chars
        new = Counter(t for tokens in token_lists for t in tokens if t not in chars)
        # Most frequent first: rapidfuzz looks characters below 256 up in a flat table and the
        # rest in a hash map, so LCS runs several times faster when common tokens get small ones.
        # Code points from 1 (0 is _UNKNOWN); rapidfuzz compares code points, surrogates included.
        for t, _ in new.most_common():
            chars[t] = chr(len(chars) + 1)
        return ["".join(map(chars.__getitem__, tokens)) for tokens in token_lists]

    def _insert(self, text: str, code: str, counts: Counter[str], key: Hashable | None) -> None:
        i = len(self._codes)
        if i == self._lengths.size:  # grow storage by doubling
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
            self._dense = np.concatenate([self._dense, np.zeros_like(self._dense)], axis=1)
        self._keys.append(self._offered if key is None else key)
        self._offered += 1
        self._texts.append(text)
        self._codes.append(code)
        self._lengths[i] = len(code)
        self._first_with_code.setdefault(code, i)
        rows, caps = [], []
        for ch, count in counts.items():
            row = self._dense_row.get(ch)
            if row is not None:
                rows.append(row)
                caps.append(min(count, 255))
            elif (levels := self._postings.get(ch)) is None:
                self._postings[ch] = [[i] for _ in range(count)]
            else:
                while len(levels) < count:
                    levels.append([])
                for k in range(count):
                    levels[k].append(i)
                if len(levels[0]) >= _DENSE_MIN_DF:
                    self._promote(ch)
        self._dense[rows, i] = caps

    def _promote(self, ch: str) -> None:
        """Move a token that became common from its posting lists to a dense row."""
        row = len(self._dense_row)
        if row == self._dense.shape[0]:
            self._dense = np.concatenate([self._dense, np.zeros_like(self._dense)], axis=0)
        for level in self._postings.pop(ch):
            self._dense[row, level] += self._dense[row, level] < 255
        self._dense_row[ch] = row

    def _overlap(self, counts: Counter[str]) -> np.ndarray:
        """Multiset overlap of a text (its token counts) with every pool text: LCS <= overlap."""
        size = len(self._codes)
        rows, caps, sparse_ids = [], [], []
        for ch, count in counts.items():
            row = self._dense_row.get(ch)
            if row is not None:
                rows.append(row)
                caps.append(count)
            elif levels := self._postings.get(ch):
                for level in levels[:count]:  # a text with k of ch is listed in levels 1..k
                    sparse_ids += level
        overlap = np.bincount(np.array(sparse_ids, np.intp), minlength=size)
        if rows:
            dense = self._dense[np.array(rows)][:, :size]  # 3x faster than [rows, :size]
            # array-array minimum is vectorised in numpy, array-scalar is not (10x slower)
            limits = np.empty_like(dense)
            limits[:] = np.minimum(caps, 255).astype(np.uint8)[:, None]
            np.minimum(dense, limits, out=dense)
            overlap += dense.sum(axis=0, dtype=np.uint8 if sum(caps) < 256 else np.int64)
            for row, cap in zip(rows, caps):
                if cap > 255:  # a saturated 255 stands for "255 or more": bound it by cap
                    overlap += (cap - 255) * (self._dense[row, :size] == 255)
        return overlap

    def _best(self, code: str, counts: Counter[str]) -> tuple[float, int | None]:
        """The exact max F1 of code against the pool and the earliest pool id reaching it."""
        n = len(code)
        if n == 0 or not self._codes:
            return 0.0, None
        if (i := self._first_with_code.get(code)) is not None:
            return 1.0, i  # nothing can beat an identical token sequence
        lengths = self._lengths[: len(self._codes)]
        # F1 <= 2*overlap/(n+m): half of that bound, for every pool text
        half_bounds = self._overlap(counts) / (n + lengths)
        top = int(half_bounds.argmax())
        if half_bounds[top] == 0:
            return 0.0, None  # no shared token: LCS 0 against everything
        # Only texts whose bound reaches the best score so far can beat or tie it (the slack
        # keeps ulp differences from dropping a tie). The text with the best bound sets the first
        # bar; while many remain, the most promising batch is scored first to raise it.
        best = _f1(LCSseq.similarity(code, self._codes[top]), n, int(lengths[top])), top
        half_bounds[top] = -1.0  # scored
        ids = np.flatnonzero(half_bounds >= best[0] / 2 - _EPS)
        while ids.size > _BATCH:
            batch = ids[np.argpartition(half_bounds[ids], -_BATCH)[-_BATCH:]]
            best = _better(best, self._score(code, batch))
            half_bounds[batch] = -1.0
            ids = ids[half_bounds[ids] >= best[0] / 2 - _EPS]
        if ids.size:
            best = _better(best, self._score(code, ids))
        return best

    def _score(self, code: str, ids: np.ndarray) -> tuple[float, int]:
        """The max F1 of code against the pool texts ids, and the earliest id reaching it."""
        n = len(code)
        lengths = self._lengths[ids]
        choices = [self._codes[i] for i in ids.tolist()]
        lcs = process.cdist([code], choices, scorer=LCSseq.similarity, dtype=np.int64)[0]
        # lcs/(n+m) ranks texts as F1 = 2*lcs/(n+m) does (distinct fractions with small
        # denominators never round to one float); rouge_score's float only for the tied best
        ratios = lcs / (n + lengths)
        tied = np.flatnonzero(ratios == ratios.max()).tolist()
        return reduce(_better, ((_f1(int(lcs[k]), n, int(lengths[k])), int(ids[k])) for k in tied))


def _better(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    """The higher (score, id) pair; the earlier id on equal scores."""
    return a if a[0] > b[0] or (a[0] == b[0] and a[1] < b[1]) else b
