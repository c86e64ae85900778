"""The filter stage's plain components: quality rules, rules for chat answers, the ROUGE-L
novelty filter, and optional MinHash and embedding near-duplicate filters (`semantic`, imported
only when asked for).

Knows nothing else of tutelage, so `tutelage dedup` and the benchmarks use it on any file.
"""

from .answers import ANSWER_CODES, NOT_BEST, AnswerRules
from .dedup import DedupSummary, dedup_file
from .quality import QUALITY_CODES, QualityRules
from .rouge import Decision, RougeNoveltyIndex, nearest_scores, rouge_l_f1, tokenize

# every reason a task can be rejected for, as stored with it: the quality rules, the novelty
# filters, and the rules for answers written in chat mode (empty_output is already a quality code)
REASON_CODES = (
    QUALITY_CODES
    + ("rouge_duplicate", "minhash_duplicate", "embedding_duplicate")
    + tuple(code for code in ANSWER_CODES if code not in QUALITY_CODES)
    + (NOT_BEST,)
)

__all__ = [
    "ANSWER_CODES",
    "NOT_BEST",
    "REASON_CODES",
    "AnswerRules",
    "Decision",
    "DedupSummary",
    "QualityRules",
    "RougeNoveltyIndex",
    "dedup_file",
    "nearest_scores",
    "rouge_l_f1",
    "tokenize",
]
