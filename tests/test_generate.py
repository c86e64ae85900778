"""The Alpaca recipe's parser and the generation loop, with a scripted teacher."""

from __future__ import annotations

import asyncio

import pytest

from tutelage.config import load_config
from tutelage.generate import alpaca, generate
from tutelage.pipeline import filter_stage, open_run
from tutelage.teachers.base import Completion, TeacherError


def block(n: int, instruction: str, task_input: str = "<noinput>", output: str = "An answer.") -> str:
    return f"###\n{n}. Instruction: {instruction}\n{n}. Input:\n{task_input}\n{n}. Output:\n{output}\n"


# -- parser -------------------------------------------------------------------------------------
def test_parse_continued_completion_with_drifting_numbers():
    text = ("Name three rivers in Africa.\n4. Input:\n<noinput>\n4. Output:\nNile, Congo, Niger.\n"
            "###\n6. Instruction: Sort these numbers.\n7. Input:\n3, 1, 2\n8. Output:\n1, 2, 3\n")
    tasks = alpaca.parse(text, "stop", continued=True, first_number=4)
    assert [(t.instruction, t.input, t.output, t.error) for t in tasks] == [
        ("Name three rivers in Africa.", "", "Nile, Congo, Niger.", None),
        ("Sort these numbers.", "3, 1, 2", "1, 2, 3", None),
    ]


def test_parse_chat_answer_without_separators_or_input():
    text = ("Sure! Here are the tasks.\n1. Instruction: Define entropy.\n1. Output: A measure of disorder.\n"
            "2. Instruction: Translate 'cat' to French.\n2. Input: cat\n2. Output: chat\n")
    tasks = alpaca.parse(text, "stop", continued=False, first_number=4)
    assert [(t.instruction, t.input, t.output) for t in tasks] == [
        ("Define entropy.", "", "A measure of disorder."),
        ("Translate 'cat' to French.", "cat", "chat"),
    ]


def test_parse_errors_and_truncation_are_returned_not_dropped():
    text = (block(4, "Give a synonym for happy.", output="Joyful.")
            + "###\n5. Instruction: An instruction with no output at all\n"
            + "###\n6. Instruction: Answer twice.\n6. Output: a\n6. Output: b\n"
            + block(7, "List two prime numbers.", output="2 and 3, and then"))
    tasks = alpaca.parse(text, "length", continued=False, first_number=4)
    assert [t.error for t in tasks] == [None, "parse_error", "parse_error", "length_truncated"]
    assert "no output at all" in tasks[1].raw
    assert tasks[3].raw.startswith("7. Instruction: List two prime numbers.")


def test_request_depends_only_on_seed_and_index():
    cfg = load_config(None)
    seeds = [{"instruction": f"Seed task number {i}.", "instances": [{"input": "", "output": "o"}]}
             for i in range(10)]
    a = alpaca.build_request(3, seeds, cfg, chat=False, seed=0)
    assert a == alpaca.build_request(3, seeds, cfg, chat=False, seed=0)
    assert a != alpaca.build_request(4, seeds, cfg, chat=False, seed=0)
    assert a.prompt.rstrip().endswith("4. Instruction:")
    assert a.params()["temperature"] == 1.0  # Alpaca's default when the config sets none
    chat = alpaca.build_request(3, seeds, cfg, chat=True, seed=0)
    assert chat.is_chat and chat.messages[0][1] == a.prompt


# -- the loop, with a scripted teacher ----------------------------------------------------------
REASON_BLOCKS = {
    "too_short": block(4, "Summarise it."),
    "too_long": block(4, " ".join(["word"] * 160)),
    "blacklisted_word": block(4, "Describe the image shown above in detail."),
    "write_a_program": block(4, "Write a program that sorts a list of names."),
    "starts_with_punctuation": block(4, "- Explain how rainbows form in the sky."),
    "non_ascii_start": block(4, "É explain how a bill becomes law briefly."),
    "empty_output": block(4, "Explain why the sky looks blue at noon.", output=""),
    "input_equals_output": block(4, "Repeat the following sentence back exactly.", "Hello there", "Hello there"),
    "leaked_list_marker": block(4, "Explain the rules of chess to a beginner.",
                                output="Pieces move. 18. Instruction: something"),
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


def test_every_reason_code_is_stored_with_a_record(cfg):
    script = ["".join(REASON_BLOCKS.values()) + unique_blocks(0, 2)
              + block(6, "Describe w0 w1 w2 w3 carefully!")  # a near-duplicate of the first
              + "###\n7. Instruction: no output here\n"]
    cfg.generation.target = 2
    store = open_run(cfg)
    result = generate(store, cfg, ScriptedTeacher(script))
    assert result.stop_reason == "target" and result.kept == 2
    funnel = store.funnel()
    for reason in [*REASON_BLOCKS, "rouge_duplicate", "parse_error"]:
        assert funnel["rejected"].get(reason) == 1, (reason, funnel)
    dup = [r for r in store.examples(status="rejected") if r["reason"] == "rouge_duplicate"][0]
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


def test_killed_run_resumes_to_the_same_dataset(cfg, tmp_path):
    script = [unique_blocks(i) for i in range(30)]
    reference_cfg = cfg.model_copy(deep=True)
    reference_cfg.run_dir = tmp_path / "reference"
    ref_store = open_run(reference_cfg)
    generate(ref_store, reference_cfg, ScriptedTeacher(script))
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
    serial_cfg = cfg.model_copy(deep=True)
    serial_cfg.run_dir = tmp_path / "serial"
    serial = open_run(serial_cfg)
    generate(serial, serial_cfg, ScriptedTeacher(script))

    cfg.generation.concurrency = 4
    store = open_run(cfg)
    teacher = ScriptedTeacher(script)
    generate(store, cfg, teacher)
    assert teacher.max_in_flight > 1
    assert [e["instruction"] for e in store.examples()] == [e["instruction"] for e in serial.examples()]


def test_stall_stops_with_a_clear_message(cfg):
    store = open_run(cfg)
    cfg.generation.stall_requests = 3
    result = generate(store, cfg, ScriptedTeacher(["nothing useful here"]))
    assert result.stop_reason == "stalled" and "3 requests in a row" in result.message
    assert store.batch_stats()["batches"] == 3


def test_filter_stage_redecides_and_splits(cfg):
    store = open_run(cfg)
    cfg.generation.target = 30
    generate(store, cfg, ScriptedTeacher([unique_blocks(i) for i in range(30)]))
    before = store.funnel()
    detail = filter_stage(store, cfg)
    assert store.funnel() == before  # same settings, same decisions
    s = detail["splits"]
    assert s["test"] == 3 and s["valid"] == 2 and s["train"] == before["kept"] - 5
    assert {e["split"] for e in store.examples()} == {"train", "valid", "test"}
    cfg.filter.rouge_threshold = 0.3  # stricter: fewer kept, reasons recorded
    filter_stage(store, cfg)
    assert store.funnel()["kept"] < before["kept"]
    assert store.funnel()["rejected"]["rouge_duplicate"] > 0


def test_parse_tolerates_markdown_bold_and_repeated_numbers():
    text = "**5. Instruction:** 5. Name a primary colour.\n**5. Input:** <noinput>\n**5. Output:** Red.\n"
    (task,) = alpaca.parse(text, "stop", continued=False, first_number=4)
    assert (task.instruction, task.input, task.output, task.error) == ("Name a primary colour.", "", "Red.", None)


def test_budget_stops_generation_before_the_cap_and_a_raised_cap_goes_on(cfg, tmp_path):
    from tutelage.config import Price

    script = [unique_blocks(i) for i in range(30)]
    cfg.generation.target = 24  # 8 requests of 3 tasks
    reference_cfg = cfg.model_copy(deep=True)
    reference_cfg.run_dir = tmp_path / "reference"
    reference = open_run(reference_cfg)
    generate(reference, reference_cfg, ScriptedTeacher(script))

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
        e["instruction"] for e in reference.examples()]
