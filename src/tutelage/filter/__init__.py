"""The filter stage's plain components: quality rules, the ROUGE-L novelty filter, and optional
MinHash and embedding near-duplicate filters (`semantic`, imported only when asked for).

Knows nothing else of tutelage, so `tutelage dedup` and the benchmarks use it on any file.
"""

from .dedup import DedupSummary, dedup_file
from .quality import QUALITY_CODES, QualityRules
from .rouge import Decision, RougeNoveltyIndex, nearest_scores, rouge_l_f1, tokenize

# every reason a task can be rejected for, as stored with it
REASON_CODES = QUALITY_CODES + ("rouge_duplicate", "minhash_duplicate", "embedding_duplicate")

__all__ = [
    "REASON_CODES",
    "Decision",
    "DedupSummary",
    "QualityRules",
    "RougeNoveltyIndex",
    "dedup_file",
    "nearest_scores",
    "rouge_l_f1",
    "tokenize",
]
