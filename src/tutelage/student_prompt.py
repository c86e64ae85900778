"""How an (instruction, input) pair becomes the student's prompt, shared by training and evaluation.

Both stages must format identically, or the evaluation measures a prompt the student never saw.
`alpaca` is the Stanford Alpaca template (for base models); `chat` is the student's own chat
template; a path to a Jinja file is a user template with `instruction` and `input` variables.
"""

from __future__ import annotations

from pathlib import Path

from .templating import TEMPLATE_DIR, render_template


def student_prompt(instruction: str, input: str = "", style: str = "alpaca", tokenizer=None) -> str:
    """The text the student sees before its answer."""
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("training.prompt_format: chat, but the student has no chat template")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    path = TEMPLATE_DIR / "student" / f"{style}.jinja" if style == "alpaca" else Path(style)
    return render_template(path, instruction=instruction, input=input)


def prompt_ids(tokenizer, prompt: str, style: str) -> list[int]:
    """Token ids of a rendered prompt: a chat template writes its own BOS, the others need the
    tokenizer to add it. Training and evaluation must agree on this token for token."""
    return tokenizer(prompt, add_special_tokens=style != "chat")["input_ids"]
