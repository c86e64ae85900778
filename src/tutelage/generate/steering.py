"""Steering what the teacher writes: a domain or topic list, and the language of the tasks.

Topics: a domain description (a string) goes into every request; a list of topics is taken in
turn, request i getting topics[i % len], so that every topic is asked for equally often.

Language: see `filter.screen.filter_settings`, which gives the filter's settings for tasks
written in another language than English.
"""

from __future__ import annotations

from ..config import GenerationConfig


def topic_for(gen: GenerationConfig, idx: int) -> str | None:
    """The steering text request `idx` carries, if any."""
    if not gen.topics:
        return None
    if isinstance(gen.topics, str):
        return gen.topics
    return gen.topics[idx % len(gen.topics)]
