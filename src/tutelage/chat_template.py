"""A model's own chat template: where to find it, and the raw text of a conversation in it.

Magpie writes raw prompts in the teacher's own format: the conversation so far, up to the point
where the user's words begin, for the teacher to continue as if it were the user. The template
comes from, in order:
1. `teacher.chat_template`: a Jinja file, or the template text itself;
2. the model: a GGUF file's metadata `tokenizer.chat_template` (the embedded teacher's too), or an
   HF folder's `chat_template.jinja` or `tokenizer_config.json` "chat_template".

Templates are rendered as transformers renders them (a sandboxed Jinja environment, trim_blocks and
lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`), with the model's BOS and EOS tokens
where they are known. Only `strftime_now` differs: it gives a fixed date, so a template that dates
its system turn (Llama 3.2) writes the same prompt on every run, and a resumed run finds its
requests in the ledger.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import EMBEDDED, ConfigError, TeacherConfig

# Where a user's words go in a rendered conversation: text no template writes by itself.
SENTINEL = "TUTELAGE-USER-TURN-7F3A"
# Llama 3.1's own default date ("26 Jul 2024"): what `strftime_now` formats.
FIXED_DATE = datetime(2024, 7, 26)
# A control token as templates write them: <|im_start|>, <start_of_turn>, </s>, [INST], [/INST].
MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|</?[A-Za-z_][A-Za-z0-9_.\-]{0,39}>|\[/?[A-Z_]{2,20}\]")
TEMPLATE_FILES = ("chat_template.jinja",)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template's text, the special tokens it may write, and where it was found."""

    text: str
    bos_token: str = ""
    eos_token: str = ""
    source: str = "teacher.chat_template"

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return _compile(self.text).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:  # raise_exception(...) in the template, or a bad one
            raise ConfigError(f"{self.source}: the chat template fails: {e}") from None


# -- rendering ----------------------------------------------------------------------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): the
    body, as it is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters, which no model was trained on.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return FIXED_DATE.strftime(fmt)


@cache
def _compile(text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(text)


def _render_with_sentinel(
    template: ChatTemplate,
    system: str | None,
    history: Sequence[dict],
    add_generation_prompt: bool = False,
) -> tuple[str, str]:
    """The conversation with a sentinel user turn last, split at the sentinel: (before, after)."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages += [*history, {"role": "user", "content": SENTINEL}]
    text = template.render(messages, add_generation_prompt=add_generation_prompt)
    if text.count(SENTINEL) != 1:
        raise ConfigError(
            f"{template.source}: the chat template does not write the user's message as it is"
        )
    before, after = text.split(SENTINEL)
    return before, after


def user_prefix(
    template: ChatTemplate, system: str | None = None, history: Sequence[dict] = ()
) -> str:
    """The raw text of a conversation up to where the next user message starts: an optional
    system turn (None keeps the template's default system turn, if it writes one), the earlier
    turns, and the user's header."""
    return _render_with_sentinel(template, system, history)[0]


def user_turn_end(template: ChatTemplate) -> list[str]:
    """The stop strings that end a user turn: the control token the template writes right after
    the user's words (<|im_end|>, <|eot_id|>, <end_of_turn>, [/INST]), then the EOS token."""
    _, after = _render_with_sentinel(template, None, (), add_generation_prompt=True)
    head = after.lstrip()
    found = MARKER.match(head)
    if found:
        stops = [found.group()]
    elif head:  # a template of plain words ("ASSISTANT:"): its next line
        stops = [head.split("\n", 1)[0].rstrip()]
    else:
        stops = []
    if template.eos_token and template.eos_token not in stops:
        stops.append(template.eos_token)
    if not stops:
        raise ConfigError(f"{template.source}: cannot tell where a user turn ends in the template")
    return stops


def template_markers(template: ChatTemplate) -> list[str]:
    """Every control token the template writes around a short conversation, BOS and EOS too:
    text a user's message never holds."""
    history = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},
    ]
    before, after = _render_with_sentinel(template, None, history, add_generation_prompt=True)
    found = MARKER.findall(before + "\n" + after)
    found += [t for t in (template.bos_token, template.eos_token) if t]
    return sorted(set(found), key=lambda m: (-len(m), m))


# -- finding a model's template ---------------------------------------------------------------
def load_chat_template(teacher: TeacherConfig) -> ChatTemplate:
    """The chat template of the teacher section `teacher` (see the module docstring). Raises a
    one-line ConfigError when there is none."""
    # A hosted model's name may read like a Hub id ("openai/gpt-4o"): only local backends load one.
    return _load(teacher.chat_template, teacher.model, teacher.backend != "openai")


@cache
def _load(chat_template: str | None, model: str, local: bool = True) -> ChatTemplate:
    found = _from_model(model, local)
    if chat_template:
        text, source = _given_template(chat_template)
        bos, eos = (found.bos_token, found.eos_token) if found else ("", "")
        return ChatTemplate(text, bos, eos, source)
    if found is None or not found.text:
        raise ConfigError(
            f"teacher.model: {model}: no chat template found (GGUF tokenizer.chat_template, "
            "chat_template.jinja or tokenizer_config.json); set teacher.chat_template to the "
            "template file or its text"
        )
    return found


def _given_template(value: str) -> tuple[str, str]:
    """teacher.chat_template: the text itself, or a file holding it."""
    if "{{" in value or "{%" in value:
        return value, "teacher.chat_template"
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8"), f"teacher.chat_template: {path}"
    except OSError as e:
        raise ConfigError(
            f"teacher.chat_template: {path}: cannot read ({e.strerror}); give a Jinja file "
            "or the template text"
        ) from None


def _from_model(model: str, local: bool = True) -> ChatTemplate | None:
    """The template a model carries, or None (a hosted model's name, a folder without one).
    `local`: the model runs here, so a Hub id is its snapshot in the Hub cache."""
    from .model_files import embedded_teacher_gguf, hub_snapshot, is_hub_id

    if model == EMBEDDED:
        return from_gguf(embedded_teacher_gguf())
    if local and is_hub_id(model):
        return from_folder(hub_snapshot(model, "teacher.model"))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return from_gguf(path)
    if path.is_dir():
        return from_folder(path)
    return None


def from_gguf(path: Path) -> ChatTemplate:
    """A GGUF file's template and special tokens (from its metadata; no weights are read)."""
    return _from_gguf(str(path), path.stat().st_mtime_ns)


@cache
def _from_gguf(path: str, mtime_ns: int) -> ChatTemplate:
    from gguf import GGUFReader  # reads the header: seconds for a large vocabulary

    reader = GGUFReader(path)

    def value(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    tokens = reader.get_field("tokenizer.ggml.tokens")

    def token(key: str) -> str:
        token_id = value(key)
        if token_id is None or tokens is None:
            return ""
        return tokens.contents(int(token_id))

    return ChatTemplate(
        value("tokenizer.chat_template") or "",
        token("tokenizer.ggml.bos_token_id"),
        token("tokenizer.ggml.eos_token_id"),
        f"{path} (GGUF tokenizer.chat_template)",
    )


def from_folder(folder: Path) -> ChatTemplate | None:
    """An HF folder's template (chat_template.jinja, else tokenizer_config.json's, where a list
    of named templates gives its "default") and special tokens."""
    config = _read_json(folder / "tokenizer_config.json")
    tokens = {**_read_json(folder / "special_tokens_map.json"), **config}
    bos, eos = _token_text(tokens.get("bos_token")), _token_text(tokens.get("eos_token"))
    for name in TEMPLATE_FILES:
        if (folder / name).is_file():
            text = (folder / name).read_text(encoding="utf-8")
            return ChatTemplate(text, bos, eos, str(folder / name))
    text = config.get("chat_template")
    if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
        text = named.get("default")
    if not isinstance(text, str) or not text:
        return None
    return ChatTemplate(text, bos, eos, f"{folder / 'tokenizer_config.json'} (chat_template)")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the tokenizer configuration ({e})") from None
    return data if isinstance(data, dict) else {}


def _token_text(token) -> str:
    """A special token as tokenizer files write it: a string, or {"content": ...}."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""
