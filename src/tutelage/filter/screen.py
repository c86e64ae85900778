"""One candidate task at a time through the whole filter: quality rules first, then ROUGE-L novelty,
then the optional near-duplicate filters (MinHash, then embeddings), cheapest first.

Used by the generation loop as answers arrive and by the filter stage when it re-decides a stored
run, so both reach the same decisions. Only a task that passes every filter enters the pools.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, fields

from ..config import FilterConfig, is_english
from .quality import QualityRules
from .rouge import RougeNoveltyIndex


@dataclass
class Verdict:
    status: str  # "kept" or "rejected"
    reason: str | None  # a reason code when rejected
    nearest_key: Hashable | None = None
    nearest_score: float | None = None


class Screen:
    def __init__(
        self,
        rules: QualityRules,
        index: RougeNoveltyIndex,
        extra: list[tuple[str, object]] | None = None,
    ):
        self.rules = rules
        self.index = index
        # (reason code, index) of the optional near-duplicate filters, in the order they run
        self.extra = extra or []
        self._alias: dict[Hashable, Hashable] = {}

    @classmethod
    def from_config(cls, cfg) -> Screen:
        """Build from a `FilterConfig` (or any object with its fields)."""
        rules = QualityRules(**{f.name: getattr(cfg, f.name) for f in fields(QualityRules)})
        rules.blacklist = tuple(rules.blacklist)
        extra: list[tuple[str, object]] = []
        if getattr(cfg, "minhash_threshold", None) is not None:
            from .semantic import MinHashNoveltyIndex

            extra.append(
                (
                    "minhash_duplicate",
                    MinHashNoveltyIndex(cfg.minhash_threshold, unicode=cfg.unicode),
                )
            )
        if getattr(cfg, "embedding_threshold", None) is not None:
            from .semantic import EmbeddingNoveltyIndex

            extra.append(("embedding_duplicate", EmbeddingNoveltyIndex(cfg.embedding_threshold)))
        return cls(
            rules, RougeNoveltyIndex(threshold=cfg.rouge_threshold, unicode=cfg.unicode), extra
        )

    def prepare(self, texts: list[str]) -> None:
        """Embed texts about to be checked in batches (much faster than one at a time)."""
        for _, index in self.extra:
            if hasattr(index, "prepare"):
                index.prepare(texts)

    def add_reference(self, text: str, key: Hashable) -> None:
        self.index.add_reference(text, key)
        for _, index in self.extra:
            index.add_reference(text, key)

    def add_references(self, texts: list[str], keys: list[Hashable]) -> None:
        """add_reference() for each text in order, the ROUGE-L pool in one go (a resumed run
        pools every task it kept before: one at a time, 50,000 take minutes)."""
        self.index.add_references(texts, keys)
        for _, index in self.extra:
            for text, key in zip(texts, keys, strict=True):
                index.add_reference(text, key)

    def rekey(self, old: Hashable, new: Hashable) -> None:
        """Name a pool entry by its final key (a store id known only after it was written)."""
        self._alias[old] = new

    def check(self, instruction: str, input: str, output: str, key: Hashable) -> Verdict:
        """A whole task (Alpaca): instruction and instance rules, then novelty."""
        reason = self.rules.check_instance(instruction, input, output)  # instruction rules first
        if reason:
            return Verdict("rejected", reason)
        return self._novelty(instruction, key)

    def check_instruction(self, instruction: str, key: Hashable) -> Verdict:
        """An instruction alone (Self-Instruct judges its instances later): its rules, then
        novelty."""
        reason = self.rules.check_instruction(instruction)
        if reason:
            return Verdict("rejected", reason)
        return self._novelty(instruction, key)

    def _novelty(self, instruction: str, key: Hashable) -> Verdict:
        rouge_off = self.index.threshold is None  # filter.rouge_threshold null
        if rouge_off and not self.extra:
            return Verdict("kept", None)  # no novelty filter at all
        if not self.extra:
            decision = self.index.add(instruction, key)
            nearest = self._alias.get(decision.nearest_key, decision.nearest_key)
            if decision.kept:
                return Verdict("kept", None, nearest, decision.score)
            return Verdict("rejected", "rouge_duplicate", nearest, decision.score)
        # Several pools: a task joins them all only if no filter rejects it.
        pools = [*([] if rouge_off else [("rouge_duplicate", self.index)]), *self.extra]
        found = []
        for code, index in pools:
            score, near = index.nearest(instruction)
            near = self._alias.get(near, near)
            if score > index.threshold:
                return Verdict("rejected", code, near, score)
            found.append((near, score))
        for _, index in pools:
            index.add_reference(instruction, key)
        # A kept task's nearest_score is its ROUGE-L score: none without ROUGE-L.
        return Verdict("kept", None) if rouge_off else Verdict("kept", None, *found[0])


def filter_settings(filter_cfg: FilterConfig, language: str) -> FilterConfig:
    """The filter settings for tasks written in `language`.

    The defaults are English ones. For any other language the screen uses the Unicode tokenizer
    (ROUGE-L on letters of every script, one token per CJK character; the ASCII tokenizer would
    see no token at all and call every pair novel), without the non-ASCII-start rule (it exists
    to drop non-English output), and counts an instruction's length in those tokens, so a Chinese
    instruction, written without spaces, is not one "word" long."""
    if is_english(language):
        return filter_cfg
    return filter_cfg.model_copy(update={"unicode": True, "check_non_ascii_start": False})


def screen_for(filter_cfg: FilterConfig, language: str) -> Screen:
    """The Screen that generation and the filter stage judge tasks with."""
    return Screen.from_config(filter_settings(filter_cfg, language))
