"""What a teacher's tokens cost, the worst case of a request before it is sent, and the tokens of
an answer whose server did not count them.

Local backends cost nothing. Hosted models get a price from `teacher.price` in the configuration,
else from a small table of OpenAI list prices, else zero with a warning: a budget cap cannot protect
a run whose price it does not know, so `require_price` refuses to start one with a budget.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

from ..config import ConfigError, Price
from .base import Request

if TYPE_CHECKING:
    from ..config import Config, TeacherConfig

log = logging.getLogger(__name__)

LOCAL_BACKENDS = {"llamacpp", "transformers", "vllm"}
# The answer length assumed for the budget when a request sets no max_tokens.
UNBOUNDED_MAX_TOKENS = 2048

# USD per 1M tokens (input, output): OpenAI's standard list prices (not batch, not cached input) as
# published in August 2025. See https://openai.com/api/pricing; set `teacher.price` if they moved.
PRICES_AS_OF = "2025-08"
LIST_PRICES: dict[str, tuple[float, float]] = {
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-3.5-turbo": (0.50, 1.50),
}
SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")  # "gpt-4o-mini-2024-07-18" is priced as "gpt-4o-mini"


class PriceQuote(Price):
    """A Price that says where it came from, so a caller can warn about a guessed one."""

    source: Literal["configured", "local", "list", "unknown"]

    @property
    def warning(self) -> str | None:
        if self.source == "unknown":
            return (
                "unknown price for this teacher model: its cost counts as $0, so a budget cap "
                "cannot stop it; set teacher.price (USD per 1M input and output tokens)"
            )
        return None


# OpenAI's Batch API charges half the list price.
BATCH_DISCOUNT = 0.5


def price_for(
    backend: str, model: str, configured: Price | None, batch: bool = False
) -> PriceQuote:
    """The configured price if there is one (as charged), zero for local backends, else the list
    price (halved for the Batch API)."""
    if configured is not None:
        return PriceQuote(**configured.model_dump(), source="configured")
    if backend in LOCAL_BACKENDS:
        return PriceQuote(source="local")
    # "openai/gpt-4o-mini" (routers) and dated snapshots cost what the plain name costs.
    name = SNAPSHOT.sub("", model.rsplit("/", 1)[-1].lower())
    if name in LIST_PRICES:
        inp, out = LIST_PRICES[name]
        factor = BATCH_DISCOUNT if batch else 1.0
        return PriceQuote(input=inp * factor, output=out * factor, source="list")
    return PriceQuote(source="unknown")


def cost_usd(price: Price, tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * price.input + tokens_out * price.output) / 1e6


def estimate_prompt_tokens(request: Request) -> int:
    """An upper-leaning guess without a tokenizer: English runs about 4 characters a token, other
    scripts fewer, so a third of the UTF-8 bytes, plus a few template tokens per chat message."""
    if request.prompt is not None:
        return math.ceil(len(request.prompt.encode("utf-8")) / 3)
    return sum(math.ceil(len(c.encode("utf-8")) / 3) + 8 for _, c in request.messages or ())


def max_output_tokens(request: Request) -> int:
    """The request's max_tokens; without one, the configuration default bounds the guess."""
    return request.params().get("max_tokens") or UNBOUNDED_MAX_TOKENS


def worst_case_cost(request: Request, price: Price) -> float:
    return cost_usd(price, estimate_prompt_tokens(request), max_output_tokens(request))


def require_price(config: Config) -> None:
    """Refuse to start a run with a budget (generation.budget_usd) that one of its hosted models,
    the teacher, the responder or the judge, could spend unseen: no `price` and none in the
    table. Raises ConfigError, one line naming the field to set."""
    if config.generation.budget_usd is None:
        return
    sections: list[tuple[str, TeacherConfig | None]] = [
        ("teacher", config.teacher),
        ("generation.responder", config.generation.responder),
        ("evaluation.judge", config.evaluation.judge),
    ]
    for where, section in sections:
        if section is None:
            continue
        quote = price_for(section.backend, section.model, section.price, batch=section.batch)
        if quote.source == "unknown":
            raise ConfigError(
                f"{where}.price: no known price for {section.model!r}, so generation.budget_usd "
                f"cannot cap it; set {where}.price (USD per 1M input and output tokens)"
            )


# -- counting an answer's tokens when the server did not -------------------------------------------
# tiktoken knows OpenAI's models; its encodings are downloaded the first time and then cached by
# tiktoken (in $TIKTOKEN_CACHE_DIR, else a data-gym-cache folder in the temporary directory).
# Offline without that cache, or for a model tiktoken does not know, the count is an estimate:
# CHARS_PER_TOKEN characters a token (English runs about 4 in OpenAI's encodings).
CHARS_PER_TOKEN = 4
TOKENIZER_WAIT_S = 15.0  # at most this long for a first load (requests has no timeout of its own)
# Per chat message, and once for the answer's start: OpenAI's chat format (its cookbook's counts).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
ESTIMATE = f"estimate: characters/{CHARS_PER_TOKEN}"

_encodings: dict[str, Any] = {}  # encoding name -> tiktoken.Encoding, or None: cannot be loaded
_loaders: dict[str, threading.Thread] = {}


def encoding_name(model: str) -> str | None:
    """tiktoken's encoding for an OpenAI model ("openai/gpt-4o" too); None for other models."""
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        return tiktoken.encoding_name_for_model(model.rsplit("/", 1)[-1])
    except KeyError:
        return None


def _load_encoding(name: str) -> None:
    try:
        import tiktoken

        _encodings[name] = tiktoken.get_encoding(name)
    # Offline: requests' ConnectionError (an OSError); a corrupt download: ValueError.
    except (OSError, ValueError, ImportError) as e:
        log.warning(
            "tiktoken cannot load %s (%s): answers without usage are estimated at %d characters "
            "a token",
            name,
            type(e).__name__,
            CHARS_PER_TOKEN,
        )
        _encodings[name] = None


async def load_tokenizer(model: str, wait_s: float = TOKENIZER_WAIT_S) -> None:
    """Load the model's tiktoken encoding, once per process, in a thread of its own (the first
    load may download it): waits at most `wait_s` (counts are estimated until it is there)."""
    name = encoding_name(model)
    if name is None or name in _encodings:
        return
    loader = _loaders.get(name)
    if loader is None:
        # A daemon thread, not the loop's executor: a download that hangs must not hold up the
        # end of asyncio.run, which waits for the executor's threads.
        loader = _loaders[name] = threading.Thread(
            target=_load_encoding, args=(name,), name=f"tiktoken-{name}", daemon=True
        )
        loader.start()
    deadline = time.monotonic() + wait_s
    while loader.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def _count(model: str, text: str) -> tuple[int, str]:
    name = encoding_name(model)
    encoding = _encodings.get(name) if name else None
    if encoding is None:
        return math.ceil(len(text) / CHARS_PER_TOKEN), ESTIMATE
    return len(encoding.encode(text, disallowed_special=())), f"tiktoken {name}"


def count_answer_tokens(model: str, text: str) -> tuple[int, str]:
    """The tokens of an answer's text, and how they were counted ("tiktoken o200k_base", or the
    estimate). Hidden reasoning tokens are not in the text: they cannot be counted."""
    return _count(model, text)


def count_prompt_tokens(model: str, body: dict) -> tuple[int, str]:
    """The prompt tokens of a request body as sent (chat messages, or a raw prompt)."""
    if "messages" not in body:
        return _count(model, str(body.get("prompt") or ""))
    total, method = TOKENS_PER_REPLY, ESTIMATE
    for message in body["messages"]:
        role, _ = _count(model, str(message.get("role") or ""))
        content, method = _count(model, str(message.get("content") or ""))
        total += role + content + TOKENS_PER_MESSAGE
    return total, method
