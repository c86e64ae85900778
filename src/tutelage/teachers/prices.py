"""What a teacher's tokens cost, and the worst case of a request before it is sent.

Local backends cost nothing. Hosted models get a price from `teacher.price` in the configuration,
else from a small table of OpenAI list prices, else zero with a warning: a budget cap cannot protect
a run whose price it does not know.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from ..config import Price
from .base import Request

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
