"""ROUGE-L novelty filter of Self-Instruct / Stanford Alpaca: exact decisions, fast.

The published loop scores every new instruction against every kept one with rouge_score
(pure-Python O(n*m) LCS) and keeps it iff no score exceeds 0.7. We give the same decisions and
scores, bit for bit, but
- tokens become single private characters, so a token list is a str and the LCS runs in
  rapidfuzz's bit-parallel C++ code;
- a bag-of-tokens bound (LCS <= multiset overlap) rules out almost every pool text with a few
  vectorised numpy operations, so only a handful of LCS computations remain per new text;
- new texts are taken in chunks: the bounds and LCSs of a whole chunk against the pool as it was
  at the chunk's start are computed together (a few numpy and rapidfuzz calls per chunk, not per
  text), then the chunk is decided in order against the texts it kept itself. That split also lets
  worker processes, each with a replica of the pool, share the first part (`workers=N`).
"""

from __future__ import annotations

import math
import multiprocessing
import re
import sys
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, pairwise

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


def _f1_array(lcs: np.ndarray, n: np.ndarray, m: np.ndarray) -> np.ndarray:
    """_f1 elementwise: the same IEEE operations in the same order, so the same floats."""
    lcs = lcs.astype(np.float64)
    precision = lcs / np.maximum(m, 1)  # lengths are >= 1 wherever lcs > 0
    recall = lcs / np.maximum(n, 1)
    total = precision + recall
    total[total == 0] = 1.0  # lcs 0: F1 0
    return 2 * precision * recall / total


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


# Slack for comparing the float32 bounds with rouge_score's floats (float32 rounding is below
# 1e-7 here); it only makes pruning slightly more conservative.
_EPS = 1e-6
# Levels per token in the vectorised feature space: the k-th occurrence of token t in a text is
# feature t*_LEVELS + k-1 for k <= _LEVELS (rarer deeper occurrences live in a dict). The
# multiset overlap of two texts is then the number of features they share.
_LEVELS = 8
# A feature's postings (the pool texts having it) become a dense 0/1 row over the pool once it is
# in this many texts and in 1/_DENSE_SHARE of the pool: summing a few dense rows is then cheaper
# than scattering long posting lists.
_DENSE_MIN_DF = 32
_DENSE_SHARE = 24
# New texts per chunk: a chunk's bound matrix has chunk x pool entries, at most _CELLS of them.
_CHUNK = 128
_MIN_CHUNK = 16
_CELLS = 1 << 22
# Each text first scores the _FIRST pool texts with its best bounds, to set its bar
# (_FEW_FIRST when fewer than _MIN_CHUNK texts come together: the pass over the pool is cheap).
_FIRST = 8
_FEW_FIRST = 2
_UNKNOWN = "\x00"  # stands for a query token absent from the pool: it matches nothing
# Workers only for inputs this long, and only against a pool this large (below, one process is
# faster than shipping chunks around).
_PARALLEL_MIN_TEXTS = 2000
_PARALLEL_MIN_POOL = 500
_WAIT_FOR_WORKERS = False  # tests: wait for them to start, rather than going on without them

_Features = tuple[np.ndarray, np.ndarray, list[tuple[int, tuple[int, int]]]]


def _features(codes: Sequence[str]) -> _Features:
    """Every token occurrence of codes as (text index, feature id), sorted by text index, and the
    occurrences beyond level _LEVELS as (text index, (token, level)) pairs."""
    if len(codes) == 1 and len(codes[0]) < 64:  # one short text (add()): plain Python is faster
        seen: dict[str, int] = {}
        fid, deep = [], []
        for ch in codes[0]:
            level = seen[ch] = seen.get(ch, -1) + 1
            if level < _LEVELS:
                fid.append(ord(ch) * _LEVELS + level)
            else:
                deep.append((0, (ord(ch), level)))
        fid.sort()
        return np.zeros(len(fid), np.int64), np.array(fid, np.int64), deep
    lengths = np.fromiter(map(len, codes), np.int64, len(codes))
    joined = "".join(codes).encode("utf-32-le", "surrogatepass")
    tokens = np.frombuffer(joined, np.uint32).astype(np.int64)
    if not tokens.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    owner = np.repeat(np.arange(len(codes), dtype=np.int64), lengths)
    key = owner * (int(tokens.max()) + 1) + tokens
    order = np.argsort(key, kind="stable")
    key = key[order]
    owner, tokens = owner[order], tokens[order]
    run_start = np.empty(key.size, bool)
    run_start[0] = True
    np.not_equal(key[1:], key[:-1], out=run_start[1:])
    starts = np.flatnonzero(run_start)
    level = np.arange(key.size) - np.repeat(starts, np.diff(np.append(starts, key.size)))
    deep: list[tuple[int, tuple[int, int]]] = []
    shallow = level < _LEVELS
    if not shallow.all():
        d = ~shallow
        deep = [
            (o, (t, k)) for o, t, k in zip(owner[d].tolist(), tokens[d].tolist(), level[d].tolist())
        ]
        owner, tokens, level = owner[shallow], tokens[shallow], level[shallow]
    return owner, tokens * _LEVELS + level, deep


def _subset(feats: _Features, keep: np.ndarray) -> _Features:
    """The features of the texts keep (a bool mask over texts), renumbered 0, 1, ..."""
    owner, fid, deep = feats
    if keep.all():
        return feats
    new_index = np.cumsum(keep) - 1
    sel = keep[owner]
    deep = [(int(new_index[o]), f) for o, f in deep if keep[o]]
    return new_index[owner[sel]], fid[sel], deep


def _ragged(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The positions start, start+1, ..., start+count-1 of every (start, count), concatenated."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, np.int64)
    shift = starts - (np.cumsum(counts) - counts)
    return np.arange(total, dtype=np.int64) + np.repeat(shift, counts)


def _inner_lcs(codes: list[str]) -> np.ndarray:
    """lcs[j, i]: the LCS of codes j and i for i < j (the upper triangle partly left at 0)."""
    count = len(codes)
    lcs = np.zeros((count, count), np.int32)
    cuts = [count * k // 4 for k in range(5)]
    for a, b in pairwise(cuts):
        if a < b:
            lcs[a:b, :b] = process.cdist(
                codes[a:b], codes[:b], scorer=LCSseq.similarity, dtype=np.int32
            )
    return lcs


def _best_per_row(
    r: np.ndarray,
    p: np.ndarray,
    f1: np.ndarray,
    scores: np.ndarray,
    ids: np.ndarray,
    where: np.ndarray,
) -> None:
    """From scored (row, pool id, F1): each row's highest F1 and the earliest pool id among
    equal ones, into scores[where[row]], ids[where[row]] (no nearest text for a 0.0)."""
    order = np.lexsort((p, -f1, r))
    r, p, f1 = r[order], p[order], f1[order]
    if r.size:
        first = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
        scores[where[r[first]]] = f1[first]
        ids[where[r[first]]] = p[first]
    ids[scores == 0.0] = -1


class _Pool:
    """The pool's codes and its overlap index; answers a chunk's exact best matches.

    Each feature (see _features) is either sparse, its postings (the ids of the pool texts having
    it) a block of one shared array (`slab`, blocks move to its end with double the room when
    full), or dense: a 0/1 row over the pool. Occurrences deeper than _LEVELS are in a dict.
    """

    def __init__(self) -> None:
        self.codes: list[str] = []
        self.first_with_code: dict[str, int] = {}  # exact token-sequence duplicates -> 1.0
        self.lengths = np.zeros(1024, np.int32)
        features = 1024 * _LEVELS
        self.dense_of = np.full(features, -1, np.int32)  # feature -> dense row, or -1
        self.start = np.zeros(features, np.int64)  # feature -> its block in the slab
        self.count = np.zeros(features, np.int64)
        self.room = np.zeros(features, np.int64)
        self.slab = np.zeros(1 << 16, np.int32)
        self.slab_end = 0
        self.deep: dict[tuple[int, int], list[int]] = {}
        self.dense = np.zeros((64, 1024), np.uint8)  # dense row x pool text: has the feature
        self.n_dense = 0

    def __len__(self) -> int:
        return len(self.codes)

    # -- building ---------------------------------------------------------------------------

    def _cover(self, fid: int) -> None:
        """Room for features up to fid."""
        if fid >= self.dense_of.size:
            extra = max(fid + 1, 2 * self.dense_of.size) - self.dense_of.size
            self.dense_of = np.concatenate([self.dense_of, np.full(extra, -1, np.int32)])
            self.start, self.count, self.room = (
                np.concatenate([a, np.zeros(extra, np.int64)])
                for a in (self.start, self.count, self.room)
            )

    def insert(self, codes: Sequence[str], feats: _Features) -> None:
        base, k = len(self.codes), len(codes)
        size = base + k
        if size > self.lengths.size:
            cap = max(size, 2 * self.lengths.size)
            self.lengths = np.concatenate(
                [self.lengths, np.zeros(cap - self.lengths.size, np.int32)]
            )
            grown = np.zeros((self.dense.shape[0], cap), np.uint8)
            grown[:, :base] = self.dense[:, :base]
            self.dense = grown
        self.lengths[base:size] = np.fromiter(map(len, codes), np.int32, k)
        for j, code in enumerate(codes):
            self.first_with_code.setdefault(code, base + j)
        self.codes.extend(codes)
        owner, fid, deep = feats
        for o, f in deep:  # deep occurrences always stay sparse
            self.deep.setdefault(f, []).append(o + base)
        if not fid.size:
            return
        self._cover(int(fid.max()))
        ids = owner + base
        rows = self.dense_of[fid]
        is_dense = rows >= 0
        self.dense[rows[is_dense], ids[is_dense]] = 1
        fid, ids = fid[~is_dense], ids[~is_dense]
        order = np.argsort(fid, kind="stable")  # ids stay ascending within a feature
        fid, ids = fid[order], ids[order]
        features, first, added = np.unique(fid, return_index=True, return_counts=True)
        need = self.count[features] + added
        full = need > self.room[features]
        if full.any():  # move those blocks to the end of the slab, with room to grow
            moved = features[full]
            room = np.maximum(np.maximum(2 * self.room[moved], need[full]), 4)
            starts = self.slab_end + np.cumsum(room) - room
            end = self.slab_end + int(room.sum())
            if end > self.slab.size:
                self.slab = np.concatenate(
                    [self.slab, np.zeros(max(end, 2 * self.slab.size) - self.slab.size, np.int32)]
                )
            counts = self.count[moved]
            self.slab[_ragged(starts, counts)] = self.slab[_ragged(self.start[moved], counts)]
            self.start[moved], self.room[moved] = starts, room
            self.slab_end = end
        rank = np.arange(fid.size) - np.repeat(first, added)
        self.slab[self.start[fid] + self.count[fid] + rank] = ids
        self.count[features] = need
        promote_at = max(_DENSE_MIN_DF, size // _DENSE_SHARE)
        for f in features[need >= promote_at].tolist():
            self._promote(f)

    def _promote(self, f: int) -> None:
        """Move a feature that became common from its postings to a dense row."""
        row = self.n_dense
        if row == self.dense.shape[0]:
            self.dense = np.concatenate([self.dense, np.zeros_like(self.dense)], axis=0)
        start = self.start[f]
        self.dense[row, self.slab[start : start + self.count[f]]] = 1
        self.dense_of[f] = row
        self.count[f] = self.room[f] = 0  # its block is abandoned
        self.n_dense += 1

    # -- querying ---------------------------------------------------------------------------

    def best(self, codes: Sequence[str], feats: _Features) -> tuple[np.ndarray, np.ndarray]:
        """For each code: the exact max F1 against the pool and the earliest pool id reaching it
        (-1 when it shares no token with any pool text: score 0.0)."""
        count = len(codes)
        scores = np.zeros(count)
        ids = np.full(count, -1, np.int64)
        size = len(self.codes)
        if not size or not count:
            return scores, ids
        _, fid, _ = feats
        if fid.size:
            self._cover(int(fid.max()))
        active = np.fromiter(map(len, codes), np.int64, count) > 0
        for j, code in enumerate(codes):
            if code and (i := self.first_with_code.get(code)) is not None:
                scores[j], ids[j] = 1.0, i  # nothing can beat an identical token sequence
                active[j] = False
        rows = np.flatnonzero(active)
        step = max(_MIN_CHUNK, _CELLS // size)
        for at in range(0, rows.size, step):
            part = rows[at : at + step]
            mask = np.zeros(count, bool)
            mask[part] = True
            part_scores, part_ids = self._best_block(
                [codes[j] for j in part.tolist()], _subset(feats, mask)
            )
            scores[part], ids[part] = part_scores, part_ids
        return scores, ids

    def _overlap(self, count: int, feats: _Features) -> tuple[np.ndarray, np.ndarray]:
        """The multiset overlap of count texts with every pool text (a count x pool matrix whose
        rows are in the order perm: texts with more dense features first), and perm."""
        size = len(self.codes)
        owner, fid, deep = feats
        rows = self.dense_of[fid]
        is_dense = rows >= 0
        if count == 1:  # one text: a plain sum and a bincount
            s_fid = fid[~is_dense]
            counts = self.count[s_fid]
            found = [self.slab[_ragged(self.start[s_fid], counts)]]
            found += [np.array(self.deep[f], np.int64) for _, f in deep if f in self.deep]
            overlap = np.bincount(np.concatenate(found), minlength=size)
            dense = self.dense[rows[is_dense], :size]
            if dense.shape[0]:
                overlap += dense.sum(axis=0, dtype=np.uint8 if dense.shape[0] < 256 else None)
            return overlap[None, :], np.zeros(1, np.int64)
        d_owner, d_rows = owner[is_dense], rows[is_dense]
        perm = np.argsort(-np.bincount(d_owner, minlength=count), kind="stable")
        position = np.empty(count, np.int64)
        position[perm] = np.arange(count)
        most = (int(np.bincount(owner).max()) if owner.size else 0) + len(deep)
        dtype = np.uint8 if most < 1 << 8 else np.uint16 if most < 1 << 16 else np.uint32
        overlap = np.zeros((count, size), dtype)
        # For rank k, the texts having a k-th dense feature are the first rows of the matrix
        # (perm order): one gather-add per rank.
        if d_rows.size:
            rank = np.arange(d_owner.size) - np.searchsorted(d_owner, d_owner)  # owner sorted
            order = np.lexsort((position[d_owner], rank))
            d_rows = d_rows[order]
            bounds = np.cumsum(np.bincount(rank)).tolist()
            dense = self.dense
            overlap[: bounds[0]] = dense[d_rows[: bounds[0]], :size]
            for a, b in pairwise(bounds):
                overlap[: b - a] += dense[d_rows[a:b], :size]
        # Sparse features: their postings, one fancy increment per rank (no repeated index).
        sparse = ~is_dense
        s_owner, s_fid = owner[sparse], fid[sparse]
        counts = self.count[s_fid]
        has = counts > 0
        s_owner, s_fid, counts = s_owner[has], s_fid[has], counts[has]
        flat = overlap.reshape(-1)
        if s_fid.size:
            rank = np.arange(s_owner.size) - np.searchsorted(s_owner, s_owner)
            order = np.lexsort((position[s_owner], rank))
            s_fid, counts = s_fid[order], counts[order]
            index = self.slab[_ragged(self.start[s_fid], counts)].astype(np.int64)
            index += np.repeat(position[s_owner[order]] * size, counts)
            ends = np.cumsum(counts)[np.cumsum(np.bincount(rank)) - 1].tolist()
            for a, b in zip([0] + ends, ends):
                flat[index[a:b]] += 1
        for o, f in deep:
            if (ids := self.deep.get(f)) is not None:
                flat[int(position[o]) * size + np.array(ids, np.int64)] += 1
        return overlap, perm

    def _best_block(self, codes: list[str], feats: _Features) -> tuple[np.ndarray, np.ndarray]:
        count, size = len(codes), len(self.codes)
        overlap, perm = self._overlap(count, feats)
        codes = [codes[j] for j in perm.tolist()]
        n = np.fromiter(map(len, codes), np.int64, count)
        m = self.lengths[:size]
        # F1 <= 2*overlap/(n+m): half of that bound, for every (text, pool text)
        half = np.add.outer(n.astype(np.float32), m.astype(np.float32))
        np.divide(overlap, half, out=half)
        rows = np.arange(count)
        # the texts with the best bounds first, to set each row's bar (its best F1 so far)
        scored_r, scored_p, scored_l = [], [], []
        best = np.zeros(count)
        live = rows
        for round_ in range(_FIRST if count >= _MIN_CHUNK else _FEW_FIRST):
            top = half[live].argmax(axis=1) if round_ else half.argmax(axis=1)
            if not round_:
                live = rows[half[rows, top] > 0]  # else no shared token: score 0 to all
                top = top[live]
            self._score(codes, live, top, n, m, best, scored_r, scored_p, scored_l)
            half[live, top] = -1.0
        bar = np.full(count, np.inf)
        bar[live] = best[live] / 2 - _EPS
        candidates = half >= bar[:, None]
        r, p = np.nonzero(candidates)
        self._score(codes, r, p, n, m, None, scored_r, scored_p, scored_l)
        r, p, f1 = (np.concatenate(x) for x in (scored_r, scored_p, scored_l))
        scores = np.zeros(count)
        ids = np.full(count, -1, np.int64)
        _best_per_row(r, p, f1, scores, ids, perm)
        return scores, ids

    def _score(
        self,
        codes: list[str],
        rows: np.ndarray,
        pool_ids: np.ndarray,
        n: np.ndarray,
        m: np.ndarray,
        best: np.ndarray | None,
        *scored: list,
    ) -> None:
        """Exact F1 of the (row, pool text) pairs: record them, raise best."""
        if not rows.size:
            for store, values in zip(scored, (rows, pool_ids, np.zeros(0))):
                store.append(values)
            return
        choices = list(map(self.codes.__getitem__, pool_ids.tolist()))
        if len(codes) == 1:  # one text against many: cdist prepares it once
            lcs = process.cdist(codes, choices, scorer=LCSseq.similarity, dtype=np.int64)[0]
        else:
            queries = list(map(codes.__getitem__, rows.tolist()))
            lcs = process.cpdist(queries, choices, scorer=LCSseq.similarity, dtype=np.int64)
        f1 = _f1_array(lcs, n[rows], m[pool_ids])
        for store, values in zip(scored, (rows, pool_ids, f1)):
            store.append(values)
        if best is not None:
            np.maximum.at(best, rows, f1)


def _encode_into(chars: dict[str, str], token_lists: list[list[str]]) -> list[str]:
    """Each token list as a string of one private character per token; tokens new to `chars`
    (the vocabulary, shared by everything compared) are added to it."""
    counts = Counter(chain.from_iterable(token_lists))  # in order of first appearance
    new = [t for t in counts if t not in chars]
    # Most frequent first: rapidfuzz looks characters below 256 up in a flat table and the
    # rest in a hash map, so LCS runs several times faster when common tokens get small ones.
    # Code points from 1 (0 is _UNKNOWN); rapidfuzz compares code points, surrogates included.
    for t in sorted(new, key=counts.__getitem__, reverse=True):
        chars[t] = chr(len(chars) + 1)
    joined = "".join(map(chars.__getitem__, chain.from_iterable(token_lists)))
    ends = list(accumulate(map(len, token_lists)))
    return [joined[a:b] for a, b in zip([0] + ends, ends)]


class RougeNoveltyIndex:
    """A pool of kept texts answering "is this new text novel enough?" exactly as the
    Self-Instruct/Alpaca loop: keep iff max ROUGE-L F1 against the pool <= threshold.

    A text with no tokens (empty, punctuation only, or non-ASCII with unicode=False) scores 0.0
    against everything, as rouge_score gives 0 for an empty token list: it is always kept, like in
    the published loop, and joins the pool, where it never matches anything.

    threshold None: no novelty filter; every text is kept (and still scored against the pool).
    """

    def __init__(self, threshold: float | None = 0.7, unicode: bool = False):
        self.threshold = threshold
        self.unicode = unicode
        self._chars: dict[str, str] = {}  # token -> private character, shared by the pool
        self._keys: list[Hashable] = []
        self._texts: list[str] = []
        self._pool = _Pool()
        self._offered = 0  # texts seen by add/add_reference: the default key

    def __len__(self) -> int:
        return len(self._pool)

    def add_reference(self, text: str, key: Hashable | None = None) -> None:
        """Put a text (a seed, an earlier run's output) into the pool unconditionally."""
        self.add_references([text], None if key is None else [key])

    def add_references(self, texts: Iterable[str], keys: Iterable[Hashable] | None = None) -> None:
        """add_reference() for each text in order."""
        texts, keys = self._keyed(texts, keys)
        codes = self._encode(texts)
        self._insert(texts, codes, keys, _features(codes))

    def nearest(self, text: str) -> tuple[float, Hashable | None]:
        """The best ROUGE-L F1 of text against the pool, and that pool text's key."""
        # a token the pool has never seen matches nothing: _UNKNOWN stands for all of them
        code = "".join(self._chars.get(t, _UNKNOWN) for t in tokenize(text, self.unicode))
        scores, ids = self._pool.best([code], _features([code]))
        return float(scores[0]), None if ids[0] < 0 else self._keys[ids[0]]

    def add(self, text: str, key: Hashable | None = None) -> Decision:
        """Score text against the pool; keep it (and pool it) iff the best score <= threshold."""
        return self.add_many([text], None if key is None else [key])[0]

    def add_many(
        self, texts: Iterable[str], keys: Iterable[Hashable] | None = None, workers: int = 1
    ) -> list[Decision]:
        """add() for each text in order (keys default to the running index).

        workers > 1 shares the bound and LCS work of long inputs among that many processes (this
        one included); the decisions and nearest records are the same as with one.
        """
        texts, keys = self._keyed(texts, keys)
        codes = self._encode(texts)
        decisions: list[Decision] = []
        helpers = None
        if workers > 1 and len(texts) >= _PARALLEL_MIN_TEXTS:
            try:
                helpers = _Helpers(workers - 1)
            except (OSError, AssertionError, ValueError):  # e.g. in a daemonic process: alone
                helpers = None
        try:
            start = 0
            while start < len(texts):
                size = len(self._pool)
                ways = 1
                if helpers and size >= _PARALLEL_MIN_POOL:
                    ways += helpers.ready()
                # a chunk's bound matrix has chunk x pool cells; each process takes a part
                end = min(
                    len(texts), start + max(_MIN_CHUNK * ways, min(_CHUNK, _CELLS // max(size, 1)))
                )
                chunk = codes[start:end]
                feats = _features(chunk)
                lcs = None
                if ways > 1:
                    scores, ids, lcs = helpers.best(self._pool, chunk, feats, ways)
                else:
                    scores, ids = self._pool.best(chunk, feats)
                decisions += self._decide(
                    texts[start:end], chunk, keys[start:end], feats, scores, ids, lcs
                )
                start = end
        finally:
            if helpers:
                helpers.close()
        return decisions

    # -- internals --------------------------------------------------------------------------

    def _keyed(
        self, texts: Iterable[str], keys: Iterable[Hashable] | None
    ) -> tuple[list[str], list[Hashable]]:
        texts = list(texts)
        if keys is None:
            keys = list(range(self._offered, self._offered + len(texts)))
        else:
            keys = list(keys)
            if len(keys) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(keys)} keys")
        return texts, keys

    def _encode(self, texts: list[str]) -> list[str]:
        """Each text as a string of one private character per token, growing the vocabulary."""
        return _encode_into(self._chars, [tokenize(text, self.unicode) for text in texts])

    def _insert(
        self, texts: list[str], codes: list[str], keys: list[Hashable], feats: _Features
    ) -> None:
        self._offered += len(texts)
        self._keys += keys
        self._texts += texts
        self._pool.insert(codes, feats)

    def _decide(
        self,
        texts: list[str],
        codes: list[str],
        keys: list[Hashable],
        feats: _Features,
        scores: np.ndarray,
        ids: np.ndarray,
        lcs: np.ndarray | None = None,
    ) -> list[Decision]:
        """Decide a chunk in order, given each text's best match in the pool as it was at the
        chunk's start: only the texts kept earlier in the chunk remain to be compared (lcs:
        _inner_lcs(codes) when already computed)."""
        count = len(codes)
        base = len(self._pool)
        if count == 1:  # add(): nothing else in the chunk
            score, i = float(scores[0]), int(ids[0])
            kept = self.threshold is None or score <= self.threshold
            offered = self._offered + 1
            if kept:
                self._insert(texts, codes, keys, feats)
            self._offered = offered
            if i < 0:
                return [Decision(kept, score, None, None)]
            return [Decision(kept, score, self._keys[i], self._texts[i])]
        if lcs is None:
            lcs = _inner_lcs(codes)
        n = np.fromiter(map(len, codes), np.int64, count)
        inner = _f1_array(lcs, n[:, None], n[None, :])  # inner[j, i]: text j against text i
        in_best = np.full(count, -1.0)  # best F1 against texts kept earlier in the chunk
        in_arg = np.zeros(count, np.int64)
        threshold = math.inf if self.threshold is None else self.threshold
        scores, ids = scores.tolist(), ids.tolist()
        kept_rank = np.zeros(count, np.int64)  # chunk index -> its pool id - base, when kept
        kept = []
        results = []  # (kept, score, pool id or -1)
        for j in range(count):
            score, nearest = scores[j], ids[j]
            if (inner_score := in_best[j]) > score:  # ties go to the older pool text
                score, nearest = float(inner_score), base + int(kept_rank[in_arg[j]])
            if score <= threshold:
                kept_rank[j] = len(kept)
                kept.append(j)
                if j + 1 < count:
                    column = inner[j + 1 :, j]
                    later = in_best[j + 1 :]
                    better = column > later
                    later[better] = column[better]
                    in_arg[j + 1 :][better] = j
                results.append((True, score, nearest))
            else:
                results.append((False, score, nearest))
        keep = np.zeros(count, bool)
        keep[kept] = True
        offered = self._offered + count
        self._insert(
            [texts[j] for j in kept],
            [codes[j] for j in kept],
            [keys[j] for j in kept],
            _subset(feats, keep),
        )
        self._offered = offered
        pool_keys, pool_texts = self._keys, self._texts
        return [
            Decision(k, s, None, None) if i < 0 else Decision(k, s, pool_keys[i], pool_texts[i])
            for k, s, i in results
        ]


# -- worker processes ------------------------------------------------------------------------


def _serve(conn) -> None:
    """A worker: keep a replica of the pool, answer chunks against it."""
    pool = _Pool()
    conn.send("ready")
    while (message := conn.recv()) is not None:
        start = time.perf_counter()
        new_codes, codes, chunk = message
        pool.insert(new_codes, _features(new_codes))
        scores, ids = pool.best(codes, _features(codes))
        lcs = None if chunk is None else _inner_lcs(chunk)
        conn.send((scores, ids, lcs, time.perf_counter() - start))


def _context():
    # fork starts in milliseconds, but is unsafe in a process with threads (and deprecated there
    # from Python 3.12); elsewhere start a fresh interpreter
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1 and sys.version_info < (3, 12):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def _ema(average: float | None, value: float) -> float:
    return value if average is None else 0.8 * average + 0.2 * value


class _Helpers:
    """Worker processes that take parts of each chunk. They may take a while to start: chunks go
    to those that said they are ready; the pool texts they lack travel with their next part."""

    def __init__(self, count: int):
        context = _context()
        self.conns, self.procs = [], []
        try:
            for _ in range(count):
                parent, child = context.Pipe()
                proc = context.Process(target=_serve, args=(child,), daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise
        self.state = ["starting"] * count
        self.synced = [0] * count  # pool texts each worker has
        # this process's seconds per row of best(), and between two chunks: to size its part
        self.row_s: float | None = None
        self.worker_row_s: float | None = None  # a worker's, its pooling included
        self.serial_s: float | None = None
        self.last_end: float | None = None

    def ready(self) -> int:
        """How many workers can take a part now (a worker that failed is left out)."""
        for w, conn in enumerate(self.conns):
            if self.state[w] == "starting" and conn.poll(None if _WAIT_FOR_WORKERS else 0):
                try:
                    self.state[w] = "ready" if conn.recv() == "ready" else "failed"
                except (EOFError, OSError):
                    self.state[w] = "failed"
        return self.state.count("ready")

    def best(
        self, pool: _Pool, codes: list[str], feats: _Features, ways: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Split the chunk in ways contiguous parts: this process takes the first one, sized so
        that it finishes with the workers although it also decides and pools between chunks.
        Also returns _inner_lcs of the chunk, which the first worker computes (None if lost)."""
        begin = time.perf_counter()
        if self.last_end is not None:
            self.serial_s = _ema(self.serial_s, begin - self.last_end)
        count = len(codes)
        mine = count // ways
        if self.row_s and self.worker_row_s and self.serial_s is not None:
            # both sides finish together: mine*row_s + serial_s = (count - mine) / speed, the
            # workers' speed being their rows per second together
            speed = (ways - 1) / self.worker_row_s
            lighter = (count - self.serial_s * speed) / (1 + self.row_s * speed)
            # the workers keep a part, so that their speed stays measured
            mine = int(min(max(lighter, 0), count - (ways - 1) * max(1, count // (4 * ways))))
        cuts = [mine + (count - mine) * k // (ways - 1) for k in range(ways)]
        parts = [(cuts[k], cuts[k + 1]) for k in range(ways - 1)]
        busy = []
        for w, (a, b) in zip([w for w, state in enumerate(self.state) if state == "ready"], parts):
            chunk = None if busy else codes  # the first worker also compares the chunk's texts
            try:
                self.conns[w].send((pool.codes[self.synced[w] :], codes[a:b], chunk))
            except OSError:
                self.state[w] = "failed"
                continue
            self.synced[w] = len(pool)
            busy.append((w, a, b))
        start = time.perf_counter()
        keep = np.zeros(count, bool)
        keep[:mine] = True
        pieces = {(0, mine): pool.best(codes[:mine], _subset(feats, keep))}
        if mine:
            self.row_s = _ema(self.row_s, (time.perf_counter() - start) / mine)
        lcs = None
        for w, a, b in busy:
            try:
                scores, ids, inner, seconds = self.conns[w].recv()
                pieces[a, b] = scores, ids
                lcs = inner if inner is not None else lcs
                if b > a:
                    self.worker_row_s = _ema(self.worker_row_s, seconds / (b - a))
            except (EOFError, OSError):  # a worker died: its part is done here, then without it
                self.state[w] = "failed"
        for a, b in parts:
            if (a, b) not in pieces:
                keep = np.zeros(count, bool)
                keep[a:b] = True
                pieces[a, b] = pool.best(codes[a:b], _subset(feats, keep))
        self.last_end = time.perf_counter()
        results = [pieces[k] for k in sorted(pieces)]
        return (
            np.concatenate([r[0] for r in results]),
            np.concatenate([r[1] for r in results]),
            lcs,
        )

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self.conns:
            conn.close()


# -- all-pairs nearest scores (the report) -----------------------------------------------------


def nearest_scores(
    queries: Sequence[str],
    pool: Sequence[str],
    *,
    exclude_self: bool = False,
    self_index: Sequence[int] | None = None,
    unicode: bool = False,
    chunk: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query, its best ROUGE-L F1 against the pool and the index of that pool text.

    Scores are rouge_l_f1(tokenize(query), tokenize(pool text)) exactly (0.0 when either has no
    token); the index is the earliest pool text reaching the score, -1 when there is no pool text
    to compare with. exclude_self: queries and pool are the same list and query i is not compared
    with pool text i; self_index does the same for queries taken from the pool: query i is pool
    text self_index[i]. Every pair is compared (no pruning), chunk queries at a time, and at most
    _CELLS pairs at a time so memory stays bounded whatever the pool's size.
    """
    count, size = len(queries), len(pool)
    if exclude_self:
        if count != size:
            raise ValueError(f"exclude_self needs queries equal to the pool: {count} vs {size}")
        self_index = range(count)
    skip = None if self_index is None else np.asarray(self_index, np.int64)
    if skip is not None and skip.shape != (count,):
        raise ValueError(f"self_index needs one pool index per query: {skip.shape} vs {count}")
    scores = np.zeros(count)
    ids = np.full(count, -1, np.int64)
    if not count or not size or (skip is not None and size == 1):
        return scores, ids
    codes = _encode_into({}, [tokenize(t, unicode) for t in (*queries, *pool)])
    query_codes, pool_codes = codes[:count], codes[count:]
    n = np.fromiter(map(len, query_codes), np.int64, count)
    m = np.fromiter(map(len, pool_codes), np.int64, size)
    rows = max(1, min(chunk, _CELLS // size))
    for start in range(0, count, rows):
        end = min(count, start + rows)
        lcs = process.cdist(
            query_codes[start:end], pool_codes, scorer=LCSseq.similarity, dtype=np.int32, workers=-1
        )
        # the file's own F1 (same float operations as rouge_score), not 2*lcs/(n+m)
        f1 = _f1_array(lcs, n[start:end, None], m[None, :])
        if skip is not None:
            f1[np.arange(end - start), skip[start:end]] = -1.0  # below any real score
        best = f1.argmax(axis=1)  # the earliest among equals
        scores[start:end] = f1[np.arange(end - start), best]
        ids[start:end] = best
    return scores, ids
