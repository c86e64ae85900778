"""Multi-turn conversations in the training data: the loss falls on every assistant turn."""

from __future__ import annotations

from tutelage.train.data import IGNORE, tokenize_example, tokenize_examples

CONVERSATION = [
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is the only even prime."},
]
ROW = {
    "instruction": "Name a prime number.",
    "input": "",
    "output": "Seven is prime.",
    "messages": CONVERSATION,
}


def _scored_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE])


def test_a_conversation_trains_on_every_assistant_turn_and_nothing_else(tokenizer):
    example = tokenize_example(tokenizer, ROW, "chat", 512)
    scored = _scored_text(tokenizer, example)
    assert "Seven is prime." in scored and "Two is the only even prime." in scored
    assert "prime number" not in scored and "even one" not in scored  # user turns carry no loss
    assert "user" not in scored  # nor do the headers
    # the whole conversation, in the template's own text
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False
    )
    assert not example.truncated


def test_other_formats_train_on_the_first_exchange_only(tokenizer):
    example = tokenize_example(tokenizer, ROW, "alpaca", 512)
    scored = _scored_text(tokenizer, example)
    assert scored.startswith("Seven is prime.") and "Two is" not in scored


def test_a_long_conversation_is_cut_and_counted_as_truncated(tokenizer):
    full = tokenize_example(tokenizer, ROW, "chat", 512)
    examples, dropped, truncated = tokenize_examples(
        tokenizer, [ROW], "chat", len(full.input_ids) - 3
    )
    assert (dropped, truncated) == (0, 1)
    assert examples[0].input_ids == full.input_ids[:-3]
    # no assistant token fits at all: the example is dropped
    examples, dropped, _ = tokenize_examples(tokenizer, [ROW], "chat", 8)
    assert (examples, dropped) == ([], 1)
