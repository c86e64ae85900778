"""Quality rules for generated tasks, after Self-Instruct's and Alpaca's post-processing.

Each rule is a small function returning its reason code or None; a QualityRules chain stops at the
first failure, instruction rules first, then instance rules.
"""

import re
import string
from dataclasses import dataclass
from functools import cache

from .rouge import tokenize

QUALITY_CODES = (
    "too_short",
    "too_long",
    "blacklisted_word",
    "write_a_program",
    "starts_with_punctuation",
    "non_ascii_start",
    "empty_output",
    "input_equals_output",
    "output_ends_with_colon",
    "leaked_list_marker",
    "control_characters",
)

# Words a text-only model cannot act on (Alpaca's list, plus plurals and media).
DEFAULT_BLACKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip

# The teacher continues its numbered prompt ("18. Instruction: ...") or repeats its field labels:
# a bare label at the start of a line, or a numbered one anywhere (parsers split only at line
# starts).
_LIST_MARKER = re.compile(
    r"^\s*(?:instruction|input|output)\s*:|\b\d+\s*[.)]\s*(?:instruction|input|output)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
# C0/C1 control characters; newline and tab are ordinary in instructions and outputs
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# What a teacher writes when a field has no content
_PLACEHOLDERS = {"n/a", "<noinput>", "<no input>", "no input", "<nooutput>", "<no output>"}


@cache
def _blacklist_pattern(blacklist: tuple[str, ...]) -> re.Pattern[str] | None:
    """Whole words, case-insensitive; a phrase ("go to") matches across any whitespace."""
    if not blacklist:
        return None
    phrases = (r"\s+".join(map(re.escape, word.split())) for word in blacklist)
    return re.compile(r"\b(?:" + "|".join(phrases) + r")\b", re.IGNORECASE)


def word_count(text: str, unicode: bool = False) -> int:
    """Words between spaces; with unicode, the filter's Unicode tokens, so that a sentence in a
    script written without spaces (Chinese, Japanese, Thai) is not a single "word"."""
    return len(tokenize(text, unicode=True)) if unicode else len(text.split())


def too_short(text: str, min_words: int, unicode: bool = False) -> str | None:
    return "too_short" if word_count(text, unicode) < min_words else None


def too_long(text: str, max_words: int, unicode: bool = False) -> str | None:
    return "too_long" if word_count(text, unicode) > max_words else None


def blacklisted_word(text: str, blacklist: tuple[str, ...]) -> str | None:
    pattern = _blacklist_pattern(tuple(blacklist))
    return "blacklisted_word" if pattern and pattern.search(text) else None


def write_a_program(text: str) -> str | None:
    # Self-Instruct drops these: it cannot tell a good program from a bad one
    return "write_a_program" if text.lstrip().lower().startswith("write a program") else None


def starts_with_punctuation(text: str) -> str | None:
    text = text.lstrip()
    return "starts_with_punctuation" if text and text[0] in string.punctuation else None


def non_ascii_start(text: str) -> str | None:
    text = text.lstrip()
    return "non_ascii_start" if text and not text[0].isascii() else None


def leaked_list_marker(*texts: str) -> str | None:
    return "leaked_list_marker" if any(_LIST_MARKER.search(t) for t in texts) else None


def control_characters(*texts: str) -> str | None:
    return "control_characters" if any(_CONTROL.search(t) for t in texts) else None


def empty_output(output: str) -> str | None:
    text = output.strip()
    return "empty_output" if not text or text.lower().rstrip(".") in _PLACEHOLDERS else None


def input_equals_output(input: str, output: str) -> str | None:
    same = input.strip() and input.strip().casefold() == output.strip().casefold()
    return "input_equals_output" if same else None


def output_ends_with_colon(output: str) -> str | None:
    # an output ending in ':' announces content that never came
    return "output_ends_with_colon" if output.rstrip().endswith(":") else None


@dataclass
class QualityRules:
    """Which rules run, with their parameters. Defaults follow Self-Instruct/Alpaca."""

    min_words: int = 4  # an instruction needs more than 3 words
    max_words: int = 150
    blacklist: tuple[str, ...] = DEFAULT_BLACKLIST
    check_write_a_program: bool = True
    check_punctuation_start: bool = True
    check_non_ascii_start: bool = True
    check_output: bool = True
    check_list_markers: bool = True
    check_control_chars: bool = True
    check_output_colon: bool = False  # Self-Instruct drops these; Alpaca keeps them
    unicode: bool = False  # count lengths in Unicode tokens (filter.unicode)

    def check_instruction(self, text: str) -> str | None:
        """The reason code of the first instruction rule text fails, or None."""
        return (
            too_short(text, self.min_words, self.unicode)
            or too_long(text, self.max_words, self.unicode)
            or blacklisted_word(text, self.blacklist)
            or (self.check_write_a_program and write_a_program(text))
            or (self.check_punctuation_start and starts_with_punctuation(text))
            or (self.check_non_ascii_start and non_ascii_start(text))
            or (self.check_list_markers and leaked_list_marker(text))
            or (self.check_control_chars and control_characters(text))
            or None
        )

    def check_instance(self, instruction: str, input: str, output: str) -> str | None:
        """The reason code of the first rule an example fails (instruction rules first), or None."""
        return (
            self.check_instruction(instruction)
            or (self.check_output and empty_output(output))
            or (self.check_output and input_equals_output(input, output))
            or (self.check_output_colon and output_ends_with_colon(output))
            or (self.check_list_markers and leaked_list_marker(input, output))
            or (self.check_control_chars and control_characters(input, output))
            or None
        )
