"""Rules for answers a teacher wrote in chat mode, each with its reason code.

A student learns its teacher's habits all too well: when 32% of the embedded teacher's chat answers
were refusals ("I'm sorry ... as a chatbot designed to ..."), a student trained on them refused 110
of 252 unseen tasks. So an answer is dropped, with its reason, when it
- refuses or apologises instead of answering (`refusal`),
- stopped at the token limit instead of ending (`unfinished`),
- loops, repeating itself (`repetition`),
- shares no content word with its question (`off_topic`),
- or is empty (`empty_output`).
When several answers to one prompt pass (`generation.samples`), all but the best are dropped as
`not_best`.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass

ANSWER_CODES = ("empty_output", "unfinished", "refusal", "repetition", "off_topic")
NOT_BEST = "not_best"  # passed every rule, but another answer to the same prompt was better

# A refusal opens with an apology or an inability, or speaks of itself as an AI, early on.
_REFUSAL_OPENING = re.compile(
    r"^\W*(?:i(?:'|’)?m sorry|i am sorry|sorry\b|i apologi[sz]e|my apologies|unfortunately,? i"
    r"|i(?:'|’)?m (?:not able|unable)|i am (?:not able|unable)|i can(?:'|’)?t\b|i cannot\b"
    r"|as an ai\b|as a (?:language model|chatbot|virtual assistant|text-based))",
    re.IGNORECASE,
)
_SELF_AS_MACHINE = re.compile(
    r"\bas an? (?:ai|artificial intelligence|language model|large language model|chatbot"
    r"|virtual assistant|text-based (?:ai|model|assistant))\b"
    r"|\bi(?:'|’)?m (?:just )?an? (?:ai|language model|chatbot)\b"
    r"|\bi(?:'|’)?m not (?:equipped|designed|programmed|able) to\b"
    r"|\bi (?:do not|don't|don’t) have (?:the ability|access|personal)\b",
    re.IGNORECASE,
)
REFUSAL_WINDOW = 300  # characters: where a refusal shows itself
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Words that carry no topic: a question and its answer share these whatever they are about.
_STOPWORD_TEXT = """
a an the and or but if then else of to in on at by for with from about as into over under is are
was were be been being do does did done have has had having it its it's this that these those
there here what which who whom whose when where why how all any each every some such no not nor
only own same so than too very can could will would shall should may might must i me my we our
you your he him his she her they them their one two also just please write give make tell explain
describe list provide create use using following answer question task text example
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


@dataclass
class AnswerRules:
    check_refusal: bool = True
    check_unfinished: bool = True
    check_repetition: bool = True
    check_off_topic: bool = True

    @classmethod
    def from_config(cls, cfg) -> AnswerRules:
        """From a `FilterConfig` (or any object with these fields)."""
        return cls(
            check_refusal=cfg.check_refusal,
            check_unfinished=cfg.check_unfinished,
            check_repetition=cfg.check_repetition,
            check_off_topic=cfg.check_off_topic,
        )

    def check(self, question: str, answer: str, finish_reason: str | None) -> str | None:
        """The first rule the answer fails, as its reason code; None when it passes them all."""
        if not answer.strip():
            return "empty_output"
        if self.check_unfinished and finish_reason == "length":
            return "unfinished"
        if self.check_refusal and is_refusal(answer):
            return "refusal"
        if self.check_repetition and is_repetitive(answer):
            return "repetition"
        if self.check_off_topic and is_off_topic(question, answer):
            return "off_topic"
        return None


def is_refusal(answer: str) -> bool:
    """An apology or inability at the start, or the model speaking of itself as a machine."""
    head = answer.strip()[:REFUSAL_WINDOW]
    return bool(_REFUSAL_OPENING.search(head) or _SELF_AS_MACHINE.search(head))


def is_repetitive(answer: str, ngram: int = 6, max_repeats: int = 3) -> bool:
    """A loop: the same line (of 3 words or more) or the same run of `ngram` words more than
    `max_repeats` times, or a long text that compresses far better than prose does."""
    lines = [line.strip().lower() for line in answer.splitlines() if len(line.split()) >= 3]
    if lines and Counter(lines).most_common(1)[0][1] > max_repeats:
        return True
    words = [w.lower() for w in _WORD.findall(answer)]
    grams = Counter(tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1))
    if grams and grams.most_common(1)[0][1] > max_repeats:
        return True
    raw = answer.encode("utf-8")
    # Prose compresses to about 35-50% of its size; a loop to far less.
    return len(raw) > 600 and len(zlib.compress(raw)) / len(raw) < 0.2


def content_words(text: str) -> set[str]:
    """Lower-cased words that carry a topic, with a plural 's' dropped."""
    words = (w.lower() for w in _WORD.findall(text))
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words} - _STOPWORDS


# A translation shares no word with its question by design.
_TRANSLATION = re.compile(r"\btranslat", re.IGNORECASE)


def is_off_topic(
    question: str, answer: str, min_question_words: int = 3, min_answer_words: int = 8
) -> bool:
    """A long answer that shares not one content word with a question that has a few of them.
    Short or open questions ("Tell me a joke.") have too few words to judge, short answers ("84",
    "Bonjour.") are often exact ones, and translations share no words: they always pass."""
    asked = content_words(question)
    if len(asked) < min_question_words or _TRANSLATION.search(question):
        return False
    said = content_words(answer)
    return len(said) >= min_answer_words and not asked & said
