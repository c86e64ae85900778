"""One candidate task at a time through the whole filter: quality rules first, then ROUGE-L novelty.

Used by the generation loop as answers arrive and by the filter stage when it re-decides a stored
run, so both reach the same decisions. Only tasks that pass the rules enter the novelty pool.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, fields

from .quality import QualityRules
from .rouge import RougeNoveltyIndex


@dataclass
class Verdict:
    status: str  # "kept" or "rejected"
    reason: str | None  # a reason code when rejected
    nearest_key: Hashable | None = None
    nearest_score: float | None = None


class Screen:
    def __init__(self, rules: QualityRules, index: RougeNoveltyIndex):
        self.rules = rules
        self.index = index
        self._alias: dict[Hashable, Hashable] = {}

    @classmethod
    def from_config(cls, cfg) -> Screen:
        """Build from a `FilterConfig`-shaped object (duck-typed: filter knows no config module)."""
        rules = QualityRules(**{f.name: getattr(cfg, f.name) for f in fields(QualityRules)})
        rules.blacklist = tuple(rules.blacklist)
        return cls(rules, RougeNoveltyIndex(threshold=cfg.rouge_threshold, unicode=cfg.unicode))

    def add_reference(self, text: str, key: Hashable) -> None:
        self.index.add_reference(text, key)

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """Name a pool entry by its final key (a store id known only after it was written)."""
        self._alias[old] = new

    def check(self, instruction: str, input: str, output: str, key: Hashable) -> Verdict:
        reason = self.rules.check_instance(instruction, input, output)  # instruction rules first
        if reason:
            return Verdict("rejected", reason)
        decision = self.index.add(instruction, key)
        nearest = self._alias.get(decision.nearest_key, decision.nearest_key)
        if decision.kept:
            return Verdict("kept", None, nearest, decision.score)
        return Verdict("rejected", "rouge_duplicate", nearest, decision.score)
