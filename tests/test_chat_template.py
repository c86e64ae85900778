"""Chat templates: where a model's template is found, and the raw user prefix and end-of-turn stop
derived from it, for the embedded SmolLM2 and for the formats of Llama 3, Qwen2.5, Gemma and
Mistral (short templates written here after their public formats: the system turn, the user's
header and the end of a turn as each family writes them)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tutelage.chat_template import (
    ChatTemplate,
    from_folder,
    load_chat_template,
    template_markers,
    user_prefix,
    user_turn_end,
)
from tutelage.config import ConfigError, TeacherConfig

# Llama 3 Instruct: a BOS, then every turn as a header, its trimmed content, and <|eot_id|>.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Qwen2.5: ChatML, with a default system turn when the conversation has none.
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501
# Gemma 3: no system role; a system message opens the first user turn. The assistant is "model".
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
# Gemma 2 refuses a system turn outright.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'assistant') %}"
    "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# Mistral 7B Instruct v0.3: [INST] ... [/INST]; the system message goes into the last user turn.
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] + eos_token}}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501

HISTORY = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}]


@dataclass
class Family:
    template: str
    bos: str | None
    eos: str
    prefix: str  # no system turn of ours
    with_system: str  # system "Be brief."
    after_history: str  # after HISTORY
    with_both: str  # system "Be brief." and HISTORY
    stops: list[str]


LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
FAMILIES = {
    "llama3": Family(
        LLAMA3,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        prefix="<|begin_of_text|>" + LLAMA3_USER,
        with_system=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            + LLAMA3_USER
        ),
        after_history=(
            "<|begin_of_text|>" + LLAMA3_USER + "Hi there.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>" + LLAMA3_USER
        ),
        with_both=(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            + LLAMA3_USER
            + "Hi there.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!"
            "<|eot_id|>" + LLAMA3_USER
        ),
        stops=["<|eot_id|>"],
    ),
    "qwen2.5": Family(
        QWEN25,
        bos=None,  # Qwen has no BOS token
        eos="<|im_end|>",
        prefix=f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        with_system="<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n",
        after_history=(
            f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there.<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
        ),
        with_both=(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there.<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n"
        ),
        stops=["<|im_end|>"],
    ),
    "gemma3": Family(
        GEMMA3,
        bos="<bos>",
        eos="<eos>",
        prefix="<bos><start_of_turn>user\n",
        with_system="<bos><start_of_turn>user\nBe brief.\n\n",  # inside the first user turn
        after_history=(
            "<bos><start_of_turn>user\nHi there.<end_of_turn>\n<start_of_turn>model\nHello!"
            "<end_of_turn>\n<start_of_turn>user\n"
        ),
        with_both=(
            "<bos><start_of_turn>user\nBe brief.\n\nHi there.<end_of_turn>\n"
            "<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\n"
        ),
        stops=["<end_of_turn>", "<eos>"],
    ),
    "mistral": Family(
        MISTRAL,
        bos="<s>",
        eos="</s>",
        prefix="<s>[INST] ",
        with_system="<s>[INST] Be brief.\n\n",
        after_history="<s>[INST] Hi there.[/INST] Hello!</s>[INST] ",
        with_both="<s>[INST] Hi there.[/INST] Hello!</s>[INST] Be brief.\n\n",  # the last turn
        stops=["[/INST]", "</s>"],
    ),
}


def hf_folder(tmp_path, template, bos, eos, name="model"):
    """A model folder whose tokenizer_config.json holds the template, as the Hub ships them."""
    folder = tmp_path / name
    folder.mkdir()
    config = {"chat_template": template, "bos_token": bos, "eos_token": eos}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_prefixes_and_stops_of_model_families(tmp_path, family):
    f = FAMILIES[family]
    folder = hf_folder(tmp_path, f.template, f.bos, f.eos)
    template = load_chat_template(TeacherConfig(backend="transformers", model=str(folder)))
    assert (template.bos_token, template.eos_token) == (f.bos or "", f.eos)
    assert user_prefix(template) == f.prefix
    assert user_prefix(template, system="Be brief.") == f.with_system
    assert user_prefix(template, history=HISTORY) == f.after_history
    # Gemma writes the system message into the first user turn, Mistral into the last one.
    assert user_prefix(template, system="Be brief.", history=HISTORY) == f.with_both
    assert user_turn_end(template) == f.stops
    # Every control token the template writes, and no text of a message.
    markers = template_markers(template)
    assert f.stops[0] in markers and not any("Hello" in m or "Hi" in m for m in markers)


def test_the_embedded_teachers_template_from_its_gguf():
    """The probe text that gave 12 usable user requests of 12 on SmolLM2-135M-Instruct."""
    template = load_chat_template(TeacherConfig())
    assert user_prefix(template) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\n"
    )
    assert user_prefix(template, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    )
    assert user_turn_end(template) == ["<|im_end|>"]
    assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert "GGUF" in template.source


def test_teacher_chat_template_overrides_the_models(tmp_path):
    folder = hf_folder(tmp_path, QWEN25, None, "<|im_end|>")
    as_text = load_chat_template(
        TeacherConfig(backend="transformers", model=str(folder), chat_template=LLAMA3)
    )
    assert user_prefix(as_text) == "<|start_header_id|>user<|end_header_id|>\n\n"  # no BOS known
    assert user_turn_end(as_text) == ["<|eot_id|>", "<|im_end|>"]  # the folder's EOS, too
    path = tmp_path / "gemma.jinja"
    path.write_text(GEMMA3, encoding="utf-8")
    from_file = load_chat_template(
        TeacherConfig(
            backend="openai", model="some/open-model", chat=False, chat_template=str(path)
        )
    )
    assert user_prefix(from_file) == "<start_of_turn>user\n"
    assert user_turn_end(from_file) == ["<end_of_turn>"]
    assert str(path) in from_file.source


def test_where_a_folders_template_is_read(tmp_path):
    folder = hf_folder(tmp_path, [{"name": "tool_use", "template": GEMMA3}], "<s>", "</s>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"].append({"name": "default", "template": MISTRAL})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert user_prefix(from_folder(folder)) == "<s>[INST] "  # the "default" of a named list
    (folder / "chat_template.jinja").write_text(QWEN25, encoding="utf-8")
    assert from_folder(folder).text == QWEN25  # the .jinja file comes first
    # special tokens as {"content": ...} objects, from special_tokens_map.json
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    (other / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"})
    )
    assert user_prefix(from_folder(other)).startswith("<|begin_of_text|><|start_header_id|>")


def test_a_missing_template_is_one_line_naming_the_model(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer_config.json").write_text("{}")
    for model in (str(bare), "gpt-4o-mini"):
        with pytest.raises(ConfigError) as e:
            load_chat_template(TeacherConfig(backend="openai", model=model, chat=False))
        assert str(e.value).startswith(f"teacher.model: {model}: no chat template found")
        assert "teacher.chat_template" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^teacher.chat_template: .*nowhere.jinja: cannot read"):
        load_chat_template(
            TeacherConfig(
                backend="openai", model="m", chat_template=str(tmp_path / "nowhere.jinja")
            )
        )


def test_template_errors_are_one_line_config_errors():
    gemma2 = ChatTemplate(GEMMA2, "<bos>", "<eos>", "gemma-2")
    assert user_prefix(gemma2) == "<bos><start_of_turn>user\n"
    with pytest.raises(ConfigError, match="^gemma-2: the chat template fails: System role"):
        user_prefix(gemma2, system="Be brief.")
    dropping = ChatTemplate("{% for m in messages %}<{{ m.role }}>{% endfor %}", source="t")
    with pytest.raises(ConfigError, match="does not write the user's message"):
        user_prefix(dropping)


def test_rendering_is_sandboxed_and_dated_the_same_every_day():
    dated = ChatTemplate(
        "{{ strftime_now('%d %b %Y') }}|{{ {'tag': '<b>'} | tojson }}|"
        "{% for m in messages %}{% generation %}<|u|>{{ m.content }}{% endgeneration %}"
        "{% endfor %}"
    )
    assert user_prefix(dated) == '26 Jul 2024|{"tag": "<b>"}|<|u|>'
    loop = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for unsafe in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):
        with pytest.raises(ConfigError, match="the chat template fails: .*unsafe"):
            user_prefix(ChatTemplate(unsafe + loop))
