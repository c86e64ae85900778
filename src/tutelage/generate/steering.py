"""Steering what the teacher writes: a domain or topic list, and the language of the tasks.

Topics: a domain description (a string) goes into every request; a list of topics is taken in
turn, request i getting topics[i % len], so that every topic is asked for equally often.

Language: the filter's defaults are English ones. For any other language the loop screens with
the Unicode tokenizer (ROUGE-L on letters of every script, one token per CJK character; the ASCII
tokenizer would see no token at all and call every pair novel), without the non-ASCII-start rule
(it exists to drop non-English output), and counts an instruction's length in those tokens, so a
Chinese instruction, written without spaces, is not one "word" long.
"""

from __future__ import annotations

from ..config import FilterConfig, GenerationConfig, is_english
from ..filter.screen import Screen


def topic_for(gen: GenerationConfig, idx: int) -> str | None:
    """The steering text request `idx` carries, if any."""
    if not gen.topics:
        return None
    if isinstance(gen.topics, str):
        return gen.topics
    return gen.topics[idx % len(gen.topics)]


def filter_settings(filter_cfg: FilterConfig, language: str) -> FilterConfig:
    """The filter settings generation screens with for tasks written in `language`."""
    if is_english(language):
        return filter_cfg
    return filter_cfg.model_copy(update={"unicode": True, "check_non_ascii_start": False})


def screen_for(filter_cfg: FilterConfig, language: str) -> Screen:
    """The Screen generation judges new tasks with."""
    return Screen.from_config(filter_settings(filter_cfg, language))
