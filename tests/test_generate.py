"""Both recipes (Alpaca, Self-Instruct), their parsers and filters, the loop, steering and
`generate --explain`, with scripted teachers; one end-to-end run on the embedded teacher."""

from __future__ import annotations

import asyncio
import inspect
import json
import random
from typing import get_args

import pytest

from tutelage.config import ConfigError, GenerationConfig, load_config
from tutelage.filter.quality import QualityRules
from tutelage.filter.screen import screen_for
from tutelage.generate import RECIPES, Recipe, alpaca, generate, self_instruct
from tutelage.generate.instances import (
    Instance,
    filter_instances,
    parse_input_first,
    parse_output_first,
)
from tutelage.generate.recipe import Context
from tutelage.pipeline import open_run
from tutelage.teachers.base import Completion, TeacherError


def block(
    n: int, instruction: str, task_input: str = "<noinput>", output: str = "An answer."
) -> str:
    return (
        f"###\n{n}. Instruction: {instruction}\n{n}. Input:\n{task_input}\n{n}. Output:\n{output}\n"
    )


def context(cfg, seeds, chat=False, **kw) -> Context:
    return Context(cfg, chat, seeds, screen_for(cfg.filter, cfg.generation.language), **kw)


# -- parser -------------------------------------------------------------------------------------
def test_parse_continued_completion_with_drifting_numbers():
    text = (
        "Name three rivers in Africa.\n4. Input:\n<noinput>\n4. Output:\nNile, Congo, Niger.\n"
        "###\n6. Instruction: Sort these numbers.\n7. Input:\n3, 1, 2\n8. Output:\n1, 2, 3\n"
    )
    tasks = alpaca.parse(text, "stop", continued=True, first_number=4)
    assert [(t.instruction, t.input, t.output, t.error) for t in tasks] == [
        ("Name three rivers in Africa.", "", "Nile, Congo, Niger.", None),
        ("Sort these numbers.", "3, 1, 2", "1, 2, 3", None),
    ]


def test_parse_chat_answer_without_separators_or_input():
    text = (
        "Sure! Here are the tasks.\n"
        "1. Instruction: Define entropy.\n1. Output: A measure of disorder.\n"
        "2. Instruction: Translate 'cat' to French.\n2. Input: cat\n2. Output: chat\n"
    )
    tasks = alpaca.parse(text, "stop", continued=False, first_number=4)
    assert [(t.instruction, t.input, t.output) for t in tasks] == [
        ("Define entropy.", "", "A measure of disorder."),
        ("Translate 'cat' to French.", "cat", "chat"),
    ]


def test_parse_errors_and_truncation_are_returned_not_dropped():
    text = (
        block(4, "Give a synonym for happy.", output="Joyful.")
        + "###\n5. Instruction: An instruction with no output at all\n"
        + "###\n6. Instruction: Answer twice.\n6. Output: a\n6. Output: b\n"
        + block(7, "List two prime numbers.", output="2 and 3, and then")
    )
    tasks = alpaca.parse(text, "length", continued=False, first_number=4)
    assert [t.error for t in tasks] == [None, "parse_error", "parse_error", "length_truncated"]
    assert "no output at all" in tasks[1].raw
    assert tasks[3].raw.startswith("7. Instruction: List two prime numbers.")


def test_request_depends_only_on_seed_and_index():
    cfg = load_config(None)
    seeds = [
        {"instruction": f"Seed task number {i}.", "instances": [{"input": "", "output": "o"}]}
        for i in range(10)
    ]
    a = alpaca.build_request(3, context(cfg, seeds))
    assert a == alpaca.build_request(3, context(cfg, seeds))
    assert a != alpaca.build_request(4, context(cfg, seeds))
    assert a.prompt.rstrip().endswith("4. Instruction:")
    assert a.params()["temperature"] == 1.0  # Alpaca's default when the config sets none
    chat = alpaca.build_request(3, context(cfg, seeds, chat=True))
    assert chat.is_chat and chat.messages[0][1] == a.prompt


def test_every_recipe_provides_the_whole_protocol():
    """Checked against `Recipe` itself: a member added to the protocol fails a recipe without it."""
    members = {name for name in [*Recipe.__annotations__, *vars(Recipe)] if name[0] != "_"}
    assert {"NAME", "check", "build_request", "screen", "finish", "in_pool"} <= members
    # every recipe name the configuration accepts is registered
    assert set(RECIPES) == set(get_args(GenerationConfig.model_fields["recipe"].annotation))
    for name, recipe in RECIPES.items():
        assert recipe.NAME == name
        for member in sorted(members):
            assert hasattr(recipe, member), f"recipe {name} lacks {member}"
            declared = getattr(Recipe, member, None)
            if not callable(declared):
                continue
            own = getattr(recipe, member)
            assert inspect.iscoroutinefunction(own) == inspect.iscoroutinefunction(declared), (
                name,
                member,
            )
            expected = list(inspect.signature(declared).parameters)[1:]  # less `self`
            assert list(inspect.signature(own).parameters) == expected, (name, member)


# -- the loop, with a scripted teacher ----------------------------------------------------------
REASON_BLOCKS = {
    "too_short": block(4, "Summarise it."),
    "too_long": block(4, " ".join(["word"] * 160)),
    "blacklisted_word": block(4, "Describe the image shown above in detail."),
    "write_a_program": block(4, "Write a program that sorts a list of names."),
    "starts_with_punctuation": block(4, "- Explain how rainbows form in the sky."),
    "non_ascii_start": block(4, "É explain how a bill becomes law briefly."),
    "empty_output": block(4, "Explain why the sky looks blue at noon.", output=""),
    "input_equals_output": block(
        4, "Repeat the following sentence back exactly.", "Hello there", "Hello there"
    ),
    "leaked_list_marker": block(
        4,
        "Explain the rules of chess to a beginner.",
        output="Pieces move. 18. Instruction: something",
    ),
    "control_characters": block(4, "Explain how vaccines train the immune\x07 system."),
}


class ScriptedTeacher:
    """Answers request i with script[i % len(script)]; counts calls; can fail on demand."""

    backend = "scripted"
    model = "scripted-1"

    def __init__(self, script: list[str], fail_at: int | None = None):
        self.script = script
        self.calls = 0
        self.fail_at = fail_at
        self.max_in_flight = 0
        self._in_flight = 0

    async def complete(self, requests):
        out = []
        for r in requests:
            if self.fail_at is not None and self.calls == self.fail_at:
                raise TeacherError("scripted failure")
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            await asyncio.sleep(0.01)
            self._in_flight -= 1
            text = self.script[r.sample_index % len(self.script)]
            self.calls += 1
            out.append(Completion(text=text, finish_reason="stop", tokens_in=10, tokens_out=20))
        return out

    async def aclose(self):
        pass


def unique_blocks(i: int, n: int = 3) -> str:
    """n tasks that share only two words with any other: all novel at ROUGE-L 0.7."""

    def words(k: int) -> str:
        return " ".join(f"w{4 * (i * n + k) + m}" for m in range(4))

    return "".join(block(4 + k, f"Describe {words(k)} carefully.") for k in range(n))


@pytest.fixture
def cfg(tmp_path):
    c = load_config(None)
    c.run_dir = tmp_path / "run"
    c.teacher.chat = False
    c.generation.target = 12
    c.generation.max_requests = 30
    return c


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_every_reason_code_is_stored_with_a_record(cfg, chat):
    script = [
        "".join(REASON_BLOCKS.values())
        + unique_blocks(0, 2)
        + block(6, "Describe w0 w1 w2 w3 carefully!")  # a near-duplicate of the first
        + "###\n7. Instruction: no output here\n"
    ]
    cfg.generation.target = 2
    cfg.teacher.chat = chat
    store = open_run(cfg)
    result = generate(store, cfg, ScriptedTeacher(script))
    body = json.loads(store.get_request(store.recent_batches(1)[0]["request_key"])["body_json"])
    assert (body["messages"] is not None) == chat  # the interface asked for
    assert result.stop_reason == "target" and result.kept == 2
    funnel = store.funnel()
    for reason in [*REASON_BLOCKS, "rouge_duplicate", "parse_error"]:
        assert funnel["rejected"].get(reason) == 1, (reason, funnel)
    dup = next(r for r in store.examples(status="rejected") if r["reason"] == "rouge_duplicate")
    assert dup["nearest"] == "Describe w0 w1 w2 w3 carefully." and dup["nearest_score"] == 1.0


def test_stops_at_target_and_resumes_without_asking_twice(cfg):
    store = open_run(cfg)
    teacher = ScriptedTeacher([unique_blocks(i) for i in range(30)])
    first = generate(store, cfg, teacher)
    assert first.stop_reason == "target" and first.kept >= 12
    calls = teacher.calls
    # The same target again: nothing to do, nothing asked.
    again = generate(store, cfg, teacher)
    assert again.new_requests == 0 and teacher.calls == calls
    # A higher target goes on from the next request.
    cfg.generation.target = 18
    more = generate(store, cfg, teacher)
    assert more.kept >= 18 and teacher.calls > calls


def reference_run(cfg, folder, teacher):
    """The same run, uninterrupted, in `folder`: what a resumed or capped run must end with."""
    twin = cfg.model_copy(deep=True)
    twin.run_dir = folder
    store = open_run(twin)
    generate(store, twin, teacher)
    return store


def test_killed_run_resumes_to_the_same_dataset(cfg, tmp_path):
    script = [unique_blocks(i) for i in range(30)]
    ref_store = reference_run(cfg, tmp_path / "reference", ScriptedTeacher(script))
    reference = [(e["instruction"], e["output"]) for e in ref_store.examples()]

    store = open_run(cfg)
    with pytest.raises(TeacherError):
        generate(store, cfg, ScriptedTeacher(script, fail_at=2))  # dies after two answers
    assert store.batch_stats()["batches"] == 2
    teacher = ScriptedTeacher(script)
    generate(store, cfg, teacher)
    assert teacher.calls == len(reference) // 3 - 2  # the two stored answers were not asked again
    assert [(e["instruction"], e["output"]) for e in store.examples()] == reference


def test_concurrency_keeps_requests_in_flight_and_order(cfg, tmp_path):
    script = [unique_blocks(i) for i in range(30)]
    serial = reference_run(cfg, tmp_path / "serial", ScriptedTeacher(script))

    cfg.generation.concurrency = 4
    store = open_run(cfg)
    teacher = ScriptedTeacher(script)
    generate(store, cfg, teacher)
    assert teacher.max_in_flight > 1
    assert [e["instruction"] for e in store.examples()] == [
        e["instruction"] for e in serial.examples()
    ]


def test_stall_stops_with_a_clear_message(cfg):
    store = open_run(cfg)
    cfg.generation.stall_requests = 3
    result = generate(store, cfg, ScriptedTeacher(["nothing useful here"]))
    assert result.stop_reason == "stalled" and "3 requests in a row" in result.message
    assert store.batch_stats()["batches"] == 3


def test_parse_tolerates_markdown_bold_and_repeated_numbers():
    text = (
        "**5. Instruction:** 5. Name a primary colour.\n"
        "**5. Input:** <noinput>\n**5. Output:** Red.\n"
    )
    (task,) = alpaca.parse(text, "stop", continued=False, first_number=4)
    assert (task.instruction, task.input, task.output, task.error) == (
        "Name a primary colour.",
        "",
        "Red.",
        None,
    )


def test_budget_stops_generation_before_the_cap_and_a_raised_cap_goes_on(cfg, tmp_path):
    from tutelage.config import Price

    script = [unique_blocks(i) for i in range(30)]
    cfg.generation.target = 24  # 8 requests of 3 tasks
    reference = reference_run(cfg, tmp_path / "reference", ScriptedTeacher(script))

    # 20 answer tokens at $1,000 per million: $0.02 a request, and at worst $0.02 too.
    cfg.teacher.price = Price(input=0.0, output=1000.0)
    cfg.teacher.sampling.max_tokens = 20
    cfg.generation.budget_usd = 0.11
    store = open_run(cfg)
    teacher = ScriptedTeacher(script)
    stopped = generate(store, cfg, teacher)
    assert stopped.stop_reason == "budget" and "budget_usd=0.11" in stopped.message
    assert teacher.calls == 5 and stopped.cost_usd == pytest.approx(0.10)
    assert stopped.kept < cfg.generation.target

    cfg.generation.budget_usd = 1.0
    more = generate(store, cfg, teacher)
    assert more.stop_reason == "target" and more.cost_usd <= 1.0
    assert teacher.calls == reference.batch_stats()["batches"]  # none asked twice
    assert [e["instruction"] for e in store.examples()] == [
        e["instruction"] for e in reference.examples()
    ]


def test_stall_message_names_the_commonest_reason(cfg):
    store = open_run(cfg)
    cfg.generation.stall_requests = 2
    result = generate(store, cfg, ScriptedTeacher(["nothing useful here"]))
    assert "Most were parse_error (2)" in result.message and "prompt_template" in result.message


# -- Self-Instruct: parsing and instance filters -------------------------------------------------


def test_bootstrap_parse_continued_and_chat():
    text = " Name a river in Peru.\n10. Sort the words by length.\n11.   \n12. Plan a picnic for"
    items = self_instruct.parse(text, "length", continued=True, first_number=9)
    assert [(i.instruction, i.error) for i in items] == [
        ("Name a river in Peru.", None),
        ("Sort the words by length.", None),
        ("", "parse_error"),
        ("Plan a picnic for", "length_truncated"),
    ]
    chat = (
        "Sure! Here are new tasks:\n\n9. **give** a synonym for quick.\n"
        "Task 10: Explain tides\n   to a child.\n\nI hope these help!"
    )
    items = self_instruct.parse(chat, "stop", continued=False, first_number=9)
    assert [i.instruction for i in items] == [
        "Give** a synonym for quick.",
        "Explain tides to a child.",
    ]
    assert [
        (i.error, i.raw) for i in self_instruct.parse("I cannot do that.", "stop", False, 9)
    ] == [("parse_error", "I cannot do that.")]


def test_classification_answer():
    assert self_instruct.is_yes(" Yes") and self_instruct.is_yes("**yes**, it is")
    assert (
        not self_instruct.is_yes(" No")
        and not self_instruct.is_yes("Maybe")
        and not self_instruct.is_yes("yesterday")
    )


def test_instance_parsers():
    text = (
        "Example 1\nInput: 3, 1, 2\nOutput: 1, 2, 3\nExample 2\nList: b, a\nOutput: a, b\n"
        "Input: stray second input\nExample 3\nno output label here\n"
    )
    got = [(i.input, i.output, i.reason) for i in parse_input_first(text, "stop")]
    assert got == [
        ("3, 1, 2", "1, 2, 3", None),
        ("List: b, a", "a, b", None),
        ("", "no output label here", "parse_error"),
    ]
    # a chat teacher repeating the task; no Example header; a next task it started itself
    text = "Task: Name a colour.\nOutput: Blue\n\nTask: Something else\nOutput: x"
    assert [(i.input, i.output) for i in parse_input_first(text, "stop")] == [("", "Blue")]
    text = (
        "Class label: Spam\nInput: WIN NOW\nClass label: Not spam\nEmail: lunch at 1?\n"
        "Class label: Sp"
    )
    got = [(i.input, i.output, i.reason) for i in parse_output_first(text, "length")]
    assert got == [
        ("WIN NOW", "Spam", None),
        ("Email: lunch at 1?", "Not spam", None),
        ("", "Sp", "length_truncated"),
    ]
    assert [i.reason for i in parse_output_first("Spam, obviously.", "stop")] == ["parse_error"]


def test_instance_filters_give_every_reason_and_keep_kept_first():
    def judged(pairs, limit=5):
        out = filter_instances(
            "Do the task well.", [Instance(i, o) for i, o in pairs], QualityRules(), limit
        )
        return [(i.input, i.output, i.reason) for i in out]

    got = judged(
        [
            ("a", ""),
            ("same", "same"),
            ("x", "Here it is:"),
            ("Text:", "y"),
            ("q1", "r1"),
            ("q1", "r1"),
            ("q2", "r2"),
            ("q3", "r3"),
            ("", "r4"),
            ("", "r5"),
            ("", "r6"),
        ]
    )
    assert got == [
        ("q1", "r1", None),
        ("q2", "r2", None),
        ("q3", "r3", None),
        ("", "r4", None),
        ("", "r5", None),
        ("a", "", "empty_output"),
        ("same", "same", "input_equals_output"),
        ("x", "Here it is:", "output_ends_with_colon"),
        ("Text:", "y", "input_ends_with_colon"),
        ("q1", "r1", "duplicate_instance"),
        ("", "r6", "over_instance_limit"),
    ]
    # one input with two different outputs: the whole task goes, as in the paper
    assert {r for *_, r in judged([("q", "1"), ("q", "2"), ("p", "3")])} == {"conflicting_outputs"}


def test_bootstrap_request_mixes_seed_and_machine_instructions():
    cfg = load_config(None)
    cfg.generation.recipe = "self-instruct"
    seeds = [{"instruction": f"Seed task number {i}."} for i in range(20)]
    ctx = context(cfg, seeds, window=2)
    ctx.pool = [(0, "Machine task alpha."), (0, "Machine task beta."), (3, "Machine task gamma.")]
    request = self_instruct.build_request(3, ctx)
    assert request == self_instruct.build_request(3, ctx)
    listed = [
        line.split(". ", 1)[1]
        for line in request.prompt.splitlines()
        if line[:1].isdigit() and ". " in line
    ]
    assert len(listed) == 8 and request.prompt.endswith("\n9.")
    # request 3 with 2 in flight sees the pool of requests <= 1 only: never gamma
    assert sorted(t for t in listed if t.startswith("Machine")) == [
        "Machine task alpha.",
        "Machine task beta.",
    ]
    p = request.params()
    assert (p["temperature"], p["top_p"], p["presence_penalty"], p["max_tokens"]) == (
        0.7,
        0.5,
        2.0,
        1024,
    )
    assert "\n16." in p["stop"] and "\n\n" in p["stop"]
    early = self_instruct.build_request(0, ctx)  # nothing in the pool yet: eight seeds
    assert sum("Seed task" in line for line in early.prompt.splitlines()) == 8
    chat = self_instruct.build_request(3, context(cfg, seeds, chat=True, window=2))
    assert "numbered 9 to 15" in chat.messages[0][1] and "\n\n" not in chat.params()["stop"]
    cfg.teacher.sampling.top_p = 0.9  # a field changed in the file overrides the recipe's
    assert self_instruct.build_request(3, ctx).params()["top_p"] == 0.9
    cfg.teacher.sampling.presence_penalty = 0.0  # set to OpenAI's default: still an override
    assert self_instruct.build_request(3, ctx).params()["presence_penalty"] == 0.0


def test_a_stored_configuration_keeps_the_recipe_sampling_defaults(tmp_path):
    """A rerun by --run-dir reloads the whole stored configuration: unset sampling fields must stay
    unset, or they would override the recipe's defaults on the rerun."""
    cfg = load_config(None, {"generation.recipe": "self-instruct", "teacher.sampling.top_p": 0.9})
    stored = load_config(None, base=cfg.model_dump(mode="json"))
    seeds = [{"instruction": f"Seed task number {i}."} for i in range(20)]
    p = self_instruct.build_request(0, context(stored, seeds, window=1)).params()
    assert (p["temperature"], p["top_p"], p["presence_penalty"]) == (0.7, 0.9, 2.0)


# -- Self-Instruct: the loop with a scripted teacher --------------------------------------------
class SelfInstructTeacher:
    """Deterministic Self-Instruct answers, chosen by what a request asks (never by call order):
    request i of the list continuation gets lists[i % len]; a classification says Yes iff the
    instruction contains "label"; instances come from `instances` (default: two good ones).
    An answer may be (text, finish_reason). `fail_at`: the call that raises."""

    backend = "scripted"
    model = "scripted-si"

    def __init__(self, lists, instances=None, fail_at=None, delay=lambda text: 0.01):
        self.lists, self.instances = lists, instances or {}
        self.fail_at, self.delay = fail_at, delay
        self.calls = 0
        self.prompts: list[str] = []
        self.max_in_flight = self._in_flight = 0

    def answer(self, request):
        prompt = request.prompt if request.prompt is not None else request.messages[-1][1]
        self.prompts.append(prompt)
        task = prompt.rsplit("Task: ", 1)[-1].split("\n")[0].strip()
        if "Classification: Yes" in prompt:
            return " Yes" if "label" in task else " No"
        if "Class label: Positive" in prompt:
            return self.instances.get(
                task, "Class label: Good\nInput: fine\nClass label: Bad\nInput: awful\n"
            )
        if "Example 1" in prompt:
            return self.instances.get(
                task, "Example 1\nInput: one\nOutput: uno\nExample 2\nInput: two\nOutput: dos\n"
            )
        return self.lists[request.sample_index % len(self.lists)]

    async def complete(self, requests):
        out = []
        for r in requests:
            if self.fail_at is not None and self.calls == self.fail_at:
                raise TeacherError("scripted failure")
            self.calls += 1
            answer = self.answer(r)
            text, finish = answer if isinstance(answer, tuple) else (answer, "stop")
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            await asyncio.sleep(self.delay(text))
            self._in_flight -= 1
            out.append(Completion(text=text, finish_reason=finish, tokens_in=10, tokens_out=20))
        return out

    async def aclose(self):
        pass


def novel(i: int, n: int = 3) -> list[str]:
    """n instructions sharing at most two words with any other: novel at ROUGE-L 0.7."""
    return [
        f"Describe {' '.join(f'v{4 * (i * n + k) + m}' for m in range(4))} carefully."
        for k in range(n)
    ]


def as_list(instructions: list[str], chat: bool, first: int = 9) -> str:
    lines = [f"{first + k}. {text}" for k, text in enumerate(instructions)]
    if chat:
        return "Here you go:\n" + "\n".join(lines) + "\n\nEnjoy!"
    return " " + "\n".join(lines)[len(f"{first}. ") :]  # continues the prompt's open "9."


@pytest.fixture
def si_cfg(cfg):
    cfg.generation.recipe = "self-instruct"
    return cfg


INSTRUCTION_REASONS = {
    "too_short": "Summarise it.",
    "too_long": " ".join(["word"] * 160),
    "blacklisted_word": "Describe the image shown above in detail.",
    "write_a_program": "Write a program that sorts a list of names.",
    "starts_with_punctuation": "- Explain how rainbows form in the sky.",
    "non_ascii_start": "É explain how a bill becomes law briefly.",
    "control_characters": "Explain how vaccines train the immune\x07 system.",
}
INSTANCE_ANSWERS = {  # instruction -> instance answer, and the reasons it must produce
    "Translate this sentence into plain English.": (
        "Example 1\nInput: a\nOutput:\nExample 2\nInput: same\nOutput: same\nExample 3\n"
        "Input: x\nOutput: Here it is:\nExample 4\nInput: Text:\nOutput: y\nExample 5\n"
        "Input: q1\nOutput: r1\nExample 6\nInput: q1\nOutput: r1\nExample 7\nno label\n"
    ),
    "Count the vowels in the given word.": (
        "Example 1\nInput: q\nOutput: 1\nExample 2\nInput: q\nOutput: 2\n"
    ),
    "Give the answer and label it as correct or wrong.": (
        "Class label: Correct\nInput: 2+2=4\nClass label: Wrong\nInput: 2+2=5\nClass label: Cor",
        "length",
    ),
    "List six famous bridges of Europe.": "".join(
        f"Example {k}\nOutput: bridge {k}\n" for k in range(1, 7)
    ),
}


def run_every_reason(cfg, chat: bool):
    """A Self-Instruct run whose two answers hold every reason code once (or so)."""
    cfg.teacher.chat = chat
    cfg.generation.target = 5
    first = [*INSTRUCTION_REASONS.values(), *INSTANCE_ANSWERS, "Describe w0 w1 w2 w3 carefully."]
    lists = [
        as_list(first, chat) + ("" if chat else "\n17.  \n"),
        as_list(["Describe w0 w1 w2 w3 carefully!", "Describe the rivers of Spain to me."], chat),
    ]
    store = open_run(cfg)
    return store, generate(store, cfg, SelfInstructTeacher(lists, instances=INSTANCE_ANSWERS))


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_self_instruct_stores_every_piece_with_a_reason(si_cfg, chat):
    store, result = run_every_reason(si_cfg, chat)
    assert result.stop_reason == "target" and result.kept == 5, result.message

    funnel = store.funnel()
    for reason in INSTRUCTION_REASONS:
        assert funnel["rejected"].get(reason) == 1, (reason, funnel)
    assert funnel["rejected"]["rouge_duplicate"] == 1
    assert funnel["rejected"]["no_valid_instances"] == 1  # the counting task: conflicting outputs
    if not chat:  # an empty item "17." after the list
        assert funnel["rejected"]["parse_error"] == 1
    dup = next(r for r in store.rejected_samples() if r["reason"] == "rouge_duplicate")
    assert dup["nearest"] == "Describe w0 w1 w2 w3 carefully." and dup["nearest_score"] == 1.0

    instances = store.instance_funnel()["rejected"]
    assert instances == {
        "empty_output": 1,
        "input_equals_output": 1,
        "output_ends_with_colon": 1,
        "input_ends_with_colon": 1,
        "duplicate_instance": 1,
        "parse_error": 1,
        "conflicting_outputs": 2,
        "length_truncated": 1,
        "over_instance_limit": 1,
    }
    kept = {e["instruction"]: [] for e in store.examples()}
    for e in store.examples():
        kept[e["instruction"]].append((e["input"], e["output"]))
    assert kept["Translate this sentence into plain English."] == [("q1", "r1")]
    assert kept["Give the answer and label it as correct or wrong."] == [
        ("2+2=4", "Correct"),
        ("2+2=5", "Wrong"),
    ]
    assert len(kept["List six famous bridges of Europe."]) == 5  # at most 5 a task
    assert kept["Describe the rivers of Spain to me."] == [("one", "uno"), ("two", "dos")]
    classified = {r["instruction"]: r["is_classification"] for r in store.machine_records()}
    assert classified["Give the answer and label it as correct or wrong."] == 1
    assert classified["Describe the rivers of Spain to me."] == 0
    purposes = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert purposes == {"generate": 2, "classify": 6, "instances": 6}


def test_an_instruction_without_instances_stays_in_the_pool(si_cfg):
    si_cfg.generation.target = 2
    lists = [
        as_list(
            ["Count the vowels in the given word.", "Describe w0 w1 w2 w3 carefully."], chat=False
        ),
        as_list(
            ["Count the vowels in the given word!", "Describe v1 v2 v3 v4 carefully."], chat=False
        ),
    ]
    teacher = SelfInstructTeacher(lists, instances=INSTANCE_ANSWERS)
    store = open_run(si_cfg)
    generate(store, si_cfg, teacher)
    assert store.funnel()["rejected"] == {"no_valid_instances": 1, "rouge_duplicate": 1}
    [dup] = [r for r in store.rejected_samples() if r["reason"] == "rouge_duplicate"]
    assert dup["nearest"] == "Count the vowels in the given word."
    # and request 1 showed it to the teacher as one of its two machine demonstrations
    second_list = [p for p in teacher.prompts if "numbered list" in p][1]
    assert "Count the vowels in the given word." in second_list
    assert "Describe w0 w1 w2 w3 carefully." in second_list


def si_lists(n: int = 12, chat: bool = False) -> list[str]:
    extra = {
        0: ["Assign a label to the given colour.", "Count the vowels in the given word."],
        2: ["Count the vowels in the given word!"],
    }  # a repeat of an instruction of request 0
    return [as_list(novel(i) + extra.get(i, []), chat) for i in range(n)]


def dataset(store) -> list[tuple]:
    return [(e["instruction"], e["input"], e["output"]) for e in store.examples()]


def test_self_instruct_killed_mid_run_resumes_to_the_same_dataset(si_cfg, tmp_path):
    si_cfg.generation.target = 10
    reference = reference_run(
        si_cfg, tmp_path / "reference", SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS)
    )
    total = reference.request_totals()["requests"]
    # request 0 left "Count the vowels ..." without instances; request 2 repeats it
    assert reference.funnel()["rejected"] == {"no_valid_instances": 1, "rouge_duplicate": 1}

    store = open_run(si_cfg)
    with pytest.raises(TeacherError):  # dies among request 1's classification and instances
        generate(store, si_cfg, SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS, fail_at=14))
    done = store.request_totals()["done"]
    assert store.batch_stats()["batches"] == 1 and done == 14
    teacher = SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS)
    result = generate(store, si_cfg, teacher)
    assert result.stop_reason == "target"
    assert teacher.calls == total - done  # nothing stored was asked again
    assert dataset(store) == dataset(reference)
    assert [r["instruction"] for r in store.rejected_samples(per_reason=99)] == [
        r["instruction"] for r in reference.rejected_samples(per_reason=99)
    ]


def test_self_instruct_concurrency_is_deterministic(si_cfg, tmp_path):
    si_cfg.generation.target = 12
    si_cfg.generation.concurrency = 4
    runs = []
    for name, delay in [
        ("fast-first", lambda t: 0.001 * (len(t) % 7)),
        ("slow-first", lambda t: 0.001 * (7 - len(t) % 7)),
    ]:
        c = si_cfg.model_copy(deep=True)
        c.run_dir = tmp_path / name
        store = open_run(c)
        teacher = SelfInstructTeacher(si_lists(), delay=delay)
        generate(store, c, teacher)
        bootstrap_prompts = sorted(p for p in teacher.prompts if "numbered list" in p)
        runs.append((dataset(store), bootstrap_prompts, teacher.max_in_flight))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) >= 12
    assert runs[0][1] == runs[1][1]  # the same machine demonstrations, whatever the timing
    assert any("Describe v" in p.split("\n9.")[0] for p in runs[0][1])  # and some were shown
    assert min(r[2] for r in runs) > 1


def test_self_instruct_chat_teacher(si_cfg):
    si_cfg.teacher.chat = True
    si_cfg.generation.target = 6
    store = open_run(si_cfg)
    teacher = SelfInstructTeacher(si_lists(chat=True))
    assert generate(store, si_cfg, teacher).stop_reason == "target"
    assert all(
        "Is this last task a classification task?" in p
        for p in teacher.prompts
        if "Classification: Yes" in p
    )
    assert {e["instruction"] for e in store.examples()} >= set(novel(0))


def test_user_templates_and_their_errors(si_cfg, tmp_path):
    own = tmp_path / "bootstrap.jinja"
    own.write_text(
        "MY OWN PROMPT about {{ topics }}\n{% for d in demonstrations %}{{ loop.index }}. "
        "{{ d }}\n{% endfor %}{{ first_new }}."
    )
    si_cfg.generation.prompt_template = own
    si_cfg.generation.topics = "astronomy"
    si_cfg.generation.target = 3
    store = open_run(si_cfg)
    teacher = SelfInstructTeacher(si_lists())
    generate(store, si_cfg, teacher)
    assert teacher.prompts[0].startswith("MY OWN PROMPT about astronomy")
    si_cfg.generation.classify_template = tmp_path / "missing.jinja"
    with pytest.raises(ConfigError, match=r"generation.classify_template: .*missing.jinja"):
        generate(store, si_cfg, teacher)
    broken = tmp_path / "broken.jinja"
    broken.write_text("line one\n{% for x in %}\n")
    si_cfg.generation.classify_template = broken
    with pytest.raises(ConfigError, match=r"broken.jinja:2: template error"):
        generate(store, si_cfg, teacher)


def test_explain_prints_the_funnel_with_examples(si_cfg):
    from typer.testing import CliRunner

    from tutelage.cli import app

    store, _ = run_every_reason(si_cfg, chat=False)
    store.close()
    out = CliRunner().invoke(app, ["generate", "--explain", str(si_cfg.run_dir)])
    assert out.exit_code == 0, out.output
    text = out.output
    assert "recipe self-instruct" in text and "classify 6" in text
    for reason in [
        *INSTRUCTION_REASONS,
        "rouge_duplicate",
        "no_valid_instances",
        "duplicate_instance",
        "conflicting_outputs",
        "over_instance_limit",
    ]:
        line = next(line for line in text.splitlines() if line.strip().startswith(reason + " "))
        assert "e.g." in line, line
    assert "(ROUGE-L 1.00)" in text


# -- steering -----------------------------------------------------------------------------------
DOMAINS = {
    "cooking": [
        "Suggest a {} recipe using leftover rice",
        "Explain how to bake {} bread at home",
        "Give a {} marinade for grilled vegetables",
    ],
    "law": ["Explain the {} rules of a rental contract", "Summarise the {} rights of a tenant"],
    "sports": ["Describe a {} training plan for a marathon", "Explain the {} offside rule"],
    "music": ["Describe the {} structure of a sonata", "Suggest {} chords for a folk song"],
    "travel": ["Plan a {} weekend in Lisbon", "List {} tips for a long train journey"],
}
COOKING_WORDS = {"recipe", "bake", "marinade", "bread", "rice", "vegetables"}


def on_domain(instruction: str) -> bool:
    """The keyword classifier the steering rate is measured with."""
    return bool(COOKING_WORDS & set(instruction.lower().split()))


class DomainTeacher(SelfInstructTeacher):
    """Writes cooking tasks 4 times in 5 when the prompt asks for cooking, else a random domain."""

    def answer(self, request):
        prompt = request.prompt if request.prompt is not None else request.messages[-1][1]
        if "Instruction:" not in prompt and "numbered list" not in prompt:
            return super().answer(request)  # Self-Instruct's follow-up steps
        self.prompts.append(prompt)
        rng = random.Random(request.sample_index)
        tasks = []
        for k in range(4):
            domain = (
                "cooking"
                if "cooking" in prompt and rng.random() < 0.8
                else rng.choice(sorted(DOMAINS))
            )
            template = rng.choice(DOMAINS[domain])
            i = request.sample_index  # words of its own, so that tasks are novel
            tasks.append(template.format(" ".join(f"{a}{i}x{k}" for a in "pqrstu")))
        if "Instruction:" in prompt:  # Alpaca's blocks
            return "".join(block(4 + k, t, output="An answer.") for k, t in enumerate(tasks))
        return as_list(tasks, chat=False)


@pytest.mark.parametrize("recipe", ["alpaca", "self-instruct"])
def test_topics_steer_generation_towards_the_domain(cfg, tmp_path, recipe):
    rates = {}
    for topics in (None, "cooking and baking"):
        c = cfg.model_copy(deep=True)
        c.run_dir = tmp_path / f"{topics}"
        c.generation.recipe = recipe
        c.generation.topics = topics
        c.generation.target = 40
        store = open_run(c)
        generate(store, c, DomainTeacher([""]))
        kept = [e["instruction"] for e in store.examples()]
        rates[topics] = sum(map(on_domain, set(kept))) / len(set(kept))
    assert rates[None] < 0.4 and rates["cooking and baking"] > 0.65, rates


def test_a_topic_list_is_taken_in_turn(cfg):
    cfg.generation.topics = ["astronomy", "gardening", "chess"]
    cfg.generation.target = 1
    ctx = context(
        cfg, [{"instruction": "A seed task.", "instances": [{"input": "", "output": "o"}]}]
    )
    prompts = [alpaca.build_request(i, ctx).prompt for i in range(6)]
    assert ["astronomy" in p for p in prompts] == [True, False, False, True, False, False]
    assert ["chess" in p for p in prompts] == [False, False, True, False, False, True]


CHINESE = [
    "请用三句话介绍长城的历史。",
    "把下面的句子翻译成英文。",
    "写一首关于秋天的短诗。",
    "解释什么是光合作用。",
]


@pytest.mark.parametrize("recipe", ["alpaca", "self-instruct"])
def test_another_language_uses_the_unicode_filter(cfg, recipe):
    cfg.generation.recipe = recipe
    cfg.generation.language = "Chinese"
    cfg.generation.target = 4
    texts = [*CHINESE, CHINESE[0]]  # four different tasks, then an exact repeat
    if recipe == "alpaca":
        answer = "".join(block(4 + k, t, output="好的。") for k, t in enumerate(texts))
    else:
        answer = as_list(texts, chat=False)
    store = open_run(cfg)
    teacher = SelfInstructTeacher([answer])
    result = generate(store, cfg, teacher)
    assert "Chinese" in teacher.prompts[0]
    assert result.kept == 4 and {e["instruction"] for e in store.examples()} == set(CHINESE)
    assert store.funnel()["rejected"] == {"rouge_duplicate": 1}
    [dup] = store.rejected_samples()
    assert dup["nearest"] == CHINESE[0] and dup["nearest_score"] == 1.0
    # and a one-character "task" is still too short, counted in Unicode tokens
    assert screen_for(cfg.filter, "Chinese").check("写。", "", "好", key=1).reason == "too_short"


# -- end to end on the embedded teacher ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e
def test_self_instruct_on_the_embedded_teacher(tmp_path):
    """Every step on SmolLM2-135M through llama.cpp, twice: the same dataset both times."""
    from tutelage.generate.explain import explain
    from tutelage.teachers import make_teacher  # loads llama.cpp

    c = load_config(
        None,
        {
            "generation.recipe": "self-instruct",
            "generation.target": 2,
            "generation.max_requests": 2,
            "teacher.threads": 2,
            "teacher.sampling.max_tokens": 256,
        },
    )
    c.run_dir = tmp_path / "run"
    store = open_run(c)
    teacher = make_teacher(c.teacher)
    first = generate(store, c, teacher)
    assert first.requests >= 1 and first.stop_reason in ("target", "max_requests")
    records = store.machine_records()
    assert records and all(r["status"] in ("kept", "rejected") for r in records)
    assert all(r["reason"] for r in records if r["status"] == "rejected")
    passed = sum(self_instruct.in_pool(r) for r in records)
    steps = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert steps.get("classify", 0) == steps.get("instances", 0) == passed
    assert first.kept == len({e["instruction"] for e in store.examples()})
    assert any(line.startswith("instructions:") for line in explain(store))

    # The same configuration in a fresh folder: llama.cpp seeds each request by its key, so the
    # teacher is deterministic and the dataset comes out the same.
    twin_store = reference_run(c, tmp_path / "twin", teacher)
    assert dataset(twin_store) == dataset(store) != []


def test_self_instruct_budget_stops_before_the_cap_and_a_raised_cap_goes_on(si_cfg, tmp_path):
    from tutelage.config import Price

    si_cfg.generation.target = 10
    reference = reference_run(
        si_cfg, tmp_path / "reference", SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS)
    )
    total = reference.request_totals()["requests"]

    # Every request answers 20 tokens; at $1,000 per million output tokens each costs $0.02, and
    # the worst case is its max_tokens at that price (1,024 for a bootstrap): the cap falls mid-run.
    si_cfg.teacher.price = Price(input=0.0, output=1000.0)
    si_cfg.generation.budget_usd = 1.3
    store = open_run(si_cfg)
    teacher = SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS)
    stopped = generate(store, si_cfg, teacher)
    assert stopped.stop_reason == "budget" and stopped.cost_usd <= 1.3
    assert 0 < teacher.calls < total

    si_cfg.generation.budget_usd = 100.0
    more = generate(store, si_cfg, teacher)
    assert more.stop_reason == "target"
    assert teacher.calls == total  # nothing paid for was asked again
    assert dataset(store) == dataset(reference)


# -- answers in chat mode (generation.answer: chat), the responder, one budget ------------------
def chat_reply(user: str):
    """A re-answer by what the user asked: refusals and cut answers on demand."""
    if "tennis" in user or "offside" in user:
        return "I'm sorry, but I can't help with that."
    if user.endswith("\n\ntwo"):
        return ("The rivers of Spain are", "length")
    return f"A chat answer to: {user}"


class ReAnsweringTeacher(ScriptedTeacher):
    """ScriptedTeacher for the list prompts; a chat request (a re-answer) gets reply(user turn).
    Records the chat requests; `closed` says whether the loop closed it."""

    def __init__(self, script, reply=chat_reply, model="scripted-1", **kw):
        super().__init__(script, **kw)
        self.reply, self.model = reply, model
        self.chat_requests: list = []
        self.closed = False

    async def complete(self, requests):
        out = []
        for r in requests:
            if not r.is_chat:
                out += await super().complete([r])
                continue
            self.calls += 1
            self.chat_requests.append(r)
            answer = self.reply(r.messages[-1][1])
            text, finish = answer if isinstance(answer, tuple) else (answer, "stop")
            await asyncio.sleep(0.001)
            out.append(Completion(text=text, finish_reason=finish, tokens_in=10, tokens_out=20))
        return out

    async def aclose(self):
        self.closed = True


def chat_request(user: str):
    from tutelage.teachers.base import Request

    return Request.make(
        messages=[{"role": "user", "content": user}],
        sampling={"temperature": 0.0, "max_tokens": 1024},  # generation.answer_sampling
    )


ALPACA_CHAT = [
    block(4, "Describe w0 w1 w2 w3 carefully.")
    + block(5, "Explain the rules of tennis to a child.", output="")  # no list output: fine now
    + block(6, "Summarise the story of Hamlet in two lines.", "Act one: a ghost.", "list output")
    + block(7, "Explain the rules of tennis to a child!")  # repeats the refused one
    + block(8, "Summarise it."),  # too_short: the instruction rules still apply
    unique_blocks(5, 1) + block(5, "Explain the rules of tennis to a child?"),
]


def test_alpaca_chat_answers_replace_the_list_outputs(cfg):
    cfg.generation.answer = "chat"
    cfg.generation.target = 2
    store = open_run(cfg)
    teacher = ReAnsweringTeacher(ALPACA_CHAT)
    result = generate(store, cfg, teacher)
    assert result.stop_reason == "target" and result.kept == 2
    hamlet = "Summarise the story of Hamlet in two lines.\n\nAct one: a ghost."
    users = ["Describe w0 w1 w2 w3 carefully.", "Explain the rules of tennis to a child.", hamlet]
    assert teacher.chat_requests == [chat_request(u) for u in users]  # the tasks that passed
    assert {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()} == {
        "generate": 1,
        "answer": 3,
    }
    assert dataset(store) == [
        (
            "Describe w0 w1 w2 w3 carefully.",
            "",
            "A chat answer to: Describe w0 w1 w2 w3 carefully.",
        ),
        (
            "Summarise the story of Hamlet in two lines.",
            "Act one: a ghost.",
            f"A chat answer to: {hamlet}",
        ),
    ]
    assert store.funnel()["rejected"] == {"refusal": 1, "rouge_duplicate": 1, "too_short": 1}
    refused = next(r for r in store.rejected_samples() if r["reason"] == "refusal")
    assert refused["output"] == "I'm sorry, but I can't help with that."

    # The refused task's instruction passed the filter: after a resume it is still in the pool.
    cfg.generation.target = 3
    generate(store, cfg, ReAnsweringTeacher(ALPACA_CHAT))
    dups = [r for r in store.rejected_samples(per_reason=9) if r["reason"] == "rouge_duplicate"]
    assert [d["nearest"] for d in dups] == ["Explain the rules of tennis to a child."] * 2


def test_the_list_answer_mode_asks_nothing_in_chat(cfg):
    cfg.generation.target = 2
    store = open_run(cfg)
    teacher = ReAnsweringTeacher(ALPACA_CHAT)
    generate(store, cfg, teacher)
    assert teacher.chat_requests == []
    assert store.funnel()["rejected"]["empty_output"] == 1  # the list's empty output counts


class SelfInstructReAnswering(SelfInstructTeacher):
    """SelfInstructTeacher whose chat requests (the re-answers) get chat_reply."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.chat_users: list[str] = []

    def answer(self, request):
        if request.is_chat:
            self.chat_users.append(request.messages[-1][1])
            return chat_reply(request.messages[-1][1])
        return super().answer(request)


def test_self_instruct_chat_answers_replace_each_kept_instance_output(si_cfg):
    si_cfg.generation.answer = "chat"
    si_cfg.generation.target = 2
    tasks = [
        "Describe the rivers of Spain to me.",
        "Assign a label to the given colour.",  # a classification task: output first
        "Explain the offside rule in football.",
    ]
    store = open_run(si_cfg)
    teacher = SelfInstructReAnswering([as_list(tasks, chat=False)])
    result = generate(store, si_cfg, teacher)
    assert result.stop_reason == "target" and result.kept == 2
    pairs = {"Describe the rivers of Spain to me.": ["one", "two"]}
    pairs["Assign a label to the given colour."] = ["fine", "awful"]
    pairs["Explain the offside rule in football."] = ["one", "two"]
    assert sorted(teacher.chat_users) == sorted(
        f"{t}\n\n{i}" for t, ins in pairs.items() for i in ins
    )
    rivers, label = tasks[0], tasks[1]
    assert dataset(store) == [
        (rivers, "one", f"A chat answer to: {rivers}\n\none"),
        (label, "fine", f"A chat answer to: {label}\n\nfine"),
        (label, "awful", f"A chat answer to: {label}\n\nawful"),
    ]
    assert store.funnel()["rejected"] == {"no_valid_instances": 1}
    assert store.instance_funnel()["rejected"] == {"unfinished": 1, "refusal": 2}
    purposes = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert purposes == {"generate": 1, "classify": 3, "instances": 3, "answer": 6}


@pytest.mark.parametrize(
    ("reply", "reason", "advice"),
    [
        (lambda user: "Sorry, I cannot do that.", "refusal", "generation.system_prompt"),
        (lambda user: ("Here is the start", "length"), "unfinished", "answer_sampling.max_tokens"),
    ],
)
def test_stalled_chat_answers_get_their_own_advice(cfg, reply, reason, advice):
    cfg.generation.answer = "chat"
    cfg.generation.stall_requests = 2
    store = open_run(cfg)
    result = generate(store, cfg, ReAnsweringTeacher([unique_blocks(i) for i in range(9)], reply))
    assert result.stop_reason == "stalled"
    assert f"Most were {reason} (6)" in result.message and advice in result.message
    # and a resumed run counts the same stretch as idle: it stops at once
    again = generate(store, cfg, ReAnsweringTeacher([unique_blocks(i) for i in range(9)], reply))
    assert again.stop_reason == "stalled" and again.new_requests == 0


@pytest.fixture
def responder_cfg(cfg):
    from tutelage.config import Price, TeacherConfig

    cfg.generation.answer = "chat"
    cfg.generation.responder = TeacherConfig(
        backend="openai", model="responder-1", price=Price(input=0.0, output=500.0)
    )
    cfg.teacher.price = Price(input=0.0, output=1000.0)
    cfg.teacher.sampling.max_tokens = 20  # at worst $0.02 a list request, as it costs
    cfg.generation.answer_sampling.max_tokens = 20  # at worst $0.01 an answer, as it costs
    return cfg


def request_rows(store) -> list[dict]:
    return store._all("SELECT model, purpose, cost_usd FROM requests ORDER BY created_at")


def test_the_responder_writes_the_answers_through_its_own_ledger(responder_cfg):
    store = open_run(responder_cfg)
    teacher = ReAnsweringTeacher([unique_blocks(i) for i in range(9)])
    responder = ReAnsweringTeacher([], model="responder-1")
    result = generate(store, responder_cfg, teacher, responder=responder)
    assert result.stop_reason == "target" and result.kept == 12
    assert teacher.chat_requests == [] and len(responder.chat_requests) == 12
    first = responder.chat_requests[0]
    assert first.messages == (("user", "Describe w0 w1 w2 w3 carefully."),)
    assert first.params() == {"temperature": 0.0, "max_tokens": 20}  # answer_sampling
    rows = request_rows(store)
    answers = [r for r in rows if r["purpose"] == "answer"]
    assert {r["model"] for r in answers} == {"responder-1"} and len(answers) == 12
    assert all(r["cost_usd"] == pytest.approx(0.01) for r in answers)  # its own price
    mains = [r for r in rows if r["purpose"] == "generate"]
    assert {r["model"] for r in mains} == {"scripted-1"}
    assert all(r["cost_usd"] == pytest.approx(0.02) for r in mains)
    assert result.cost_usd == pytest.approx(4 * 0.02 + 12 * 0.01)
    assert teacher.closed and responder.closed


def test_one_budget_caps_the_teacher_and_the_responder_together(responder_cfg, tmp_path):
    twin = responder_cfg.model_copy(deep=True)
    twin.run_dir = tmp_path / "reference"
    reference = open_run(twin)
    teacher = ReAnsweringTeacher([unique_blocks(i) for i in range(9)])
    generate(reference, twin, teacher, responder=ReAnsweringTeacher([], model="responder-1"))
    responder_cfg.generation.budget_usd = 0.135
    store = open_run(responder_cfg)
    teacher = ReAnsweringTeacher([unique_blocks(i) for i in range(9)])
    responder = ReAnsweringTeacher([], model="responder-1")
    stopped = generate(store, responder_cfg, teacher, responder=responder)
    assert stopped.stop_reason == "budget", stopped.message
    rows = request_rows(store)
    spent = {
        m: sum(r["cost_usd"] for r in rows if r["model"] == m)
        for m in ("scripted-1", "responder-1")
    }
    # the teacher alone spent $0.06, far below the cap: the responder's $0.07 counted too
    assert spent == pytest.approx({"scripted-1": 0.06, "responder-1": 0.07})
    assert stopped.cost_usd == pytest.approx(0.13) and stopped.cost_usd <= 0.135

    responder_cfg.generation.budget_usd = 10.0
    more = generate(store, responder_cfg, teacher, responder=responder)
    assert more.stop_reason == "target"
    assert teacher.calls + responder.calls == reference.request_totals()["requests"]
    assert dataset(store) == dataset(reference)


def test_ledgers_on_one_account_share_its_cap(tmp_path):
    from tutelage.config import Price
    from tutelage.store import Store
    from tutelage.teachers.base import Request
    from tutelage.teachers.ledger import Account, BudgetExceeded, Ledger

    async def spend():
        with Store(tmp_path / "run") as store:
            account = Account(store, budget_usd=0.05)
            price = Price(input=0.0, output=1000.0)
            a = Ledger(ScriptedTeacher(["x"]), store, price=price, account=account)
            b = Ledger(
                ReAnsweringTeacher(["y"], model="other"), store, price=price, account=account
            )
            ask = Request.make(prompt="q", sampling={"max_tokens": 20})
            await a.complete(ask)
            await b.complete(ask)  # another model: another request, on the same account
            assert a.spent_usd == b.spent_usd == pytest.approx(0.04)
            with pytest.raises(BudgetExceeded):  # $0.04 spent + $0.02 at worst > $0.05
                await b.complete(Request.make(prompt="q2", sampling={"max_tokens": 20}))
            with pytest.raises(ValueError, match="shared account carries the budget"):
                Ledger(ScriptedTeacher([]), store, account=account, budget_usd=1.0)

    asyncio.run(spend())


def test_list_answers_never_make_the_responder(responder_cfg, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # making it would fail
    responder_cfg.generation.answer = "list"
    store = open_run(responder_cfg)
    teacher = ReAnsweringTeacher([unique_blocks(i) for i in range(9)])
    assert generate(store, responder_cfg, teacher).stop_reason == "target"
    assert teacher.chat_requests == []
    assert {r["purpose"] for r in request_rows(store)} == {"generate"}


@pytest.mark.parametrize("reason", sorted(Completion.EMPTY_REASONS))
@pytest.mark.parametrize("continued", [True, False])
def test_empty_answers_keep_their_reason_in_both_list_recipes(reason, continued):
    # A filtered, refused or cut-off answer with no text is one rejected piece under its reason,
    # never an empty list (lost) nor a parse error (the teacher's fault, not the format's).
    for parse in (alpaca.parse, self_instruct.parse):
        (piece,) = parse("", reason, continued=continued, first_number=4)
        assert piece.error == reason
