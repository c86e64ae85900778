"""Evol-Instruct: the prompt of every operator, the parsing of every answer shape, each elimination
rule and its reason code, the pool over rounds (from a file, the seeds or a run folder), its
limits, concurrency and resume, with a scripted teacher; one end-to-end run on the embedded
teacher."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter

import pytest
from helpers import add_examples

from tutelage.config import ConfigError, load_config
from tutelage.filter.screen import screen_for
from tutelage.generate import evol_instruct, generate
from tutelage.generate.recipe import Context
from tutelage.pipeline import open_run
from tutelage.store import Store
from tutelage.teachers.base import Completion, TeacherError

OPERATORS = ["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]
POOL = [
    "Name three rivers in Europe and say where each one rises.",
    "Suggest a name for a small bakery by the sea.",
    "Explain why leaves change colour in autumn.",
]


# -- the prompts, word for word --------------------------------------------------------------------
DEPTH_INTRO = (
    "Rewrite a task given to an AI assistant into a harder version, one that takes more skill to "
    "answer well. The harder version must still make sense: a person must be able to read it, "
    "understand it and answer it.\n\nMake it harder this way: "
)
METHODS = {
    "constraints": "add one more requirement or constraint that a good answer has to meet.",
    "deepen": "if the task asks about something, ask about it more deeply or more widely: more "
    "aspects of it, finer detail, or the reasons behind it.",
    "concretize": "replace general ideas in the task with more specific ones: a particular case, "
    "place, quantity, audience or example.",
    "reasoning": "if a little thought is enough to solve the task, rewrite it so that its answer "
    "has to work through several explicit steps of reasoning.",
    "complicate_input": "give the task a concrete input to work on that makes it harder, such as "
    "a small table, a code snippet, a JSON object, a formula or a passage of text, written out in "
    "the task itself.",
}
SHORT = {
    "complicate_input": "Apart from that input, add only 10 to 20 words to the starting task.",
}
KEEP = (
    "Keep everything in the starting task that is not plain prose, such as a table, a piece of "
    "code or some data, and keep any input that comes with it. "
)
STANDALONE = (
    " Write it in English, as a task that stands on its own: it must not mention the starting "
    "task, a rewrite or a prompt."
)
BREADTH_INTRO = (
    "Invent a new task for an AI assistant, taking the starting task below as inspiration. The "
    "new task belongs to the same domain as the starting task but is a rarer kind of task, one "
    "that people ask for less often. Make it about as long and as hard as the starting task. It "
    "must make sense: a person must be able to read it, understand it and answer it."
)


def expected_prompt(operator: str, task: str, chat: bool) -> str:
    if operator == "breadth":
        head, label = BREADTH_INTRO + STANDALONE, "created task"
    else:
        short = SHORT.get(
            operator, "Keep the rewrite short: add only 10 to 20 words to the starting task."
        )
        head = DEPTH_INTRO + METHODS[operator] + "\n\n" + KEEP + short + STANDALONE
        label = "rewritten task"
    body = f"{head}\n\nStarting task:\n<<<\n{task}\n>>>\n\n"
    if chat:
        return body + f"Reply with the {label} between <<< and >>>, and nothing else."
    return body + f"{label.capitalize()}:\n<<<\n"


def context(cfg, seeds=(), chat=False, window=1) -> Context:
    return Context(
        cfg, chat, list(seeds), screen_for(cfg.filter, cfg.generation.language), window=window
    )


def write_pool(path, prompts) -> object:
    path.write_text("".join(json.dumps({"instruction": p}) + "\n" for p in prompts))
    return path


@pytest.fixture
def cfg(tmp_path):
    c = load_config(None)
    c.run_dir = tmp_path / "run"
    c.teacher.chat = False
    c.generation.recipe = "evol-instruct"
    c.generation.pool = write_pool(tmp_path / "pool.jsonl", POOL)
    c.generation.rounds = 2
    c.generation.target = 100
    c.generation.max_requests = 50  # more than 2 rounds over the pool of 3
    c.generation.stall_requests = 50
    return c


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("operator", OPERATORS)
def test_each_operator_sends_its_own_prompt(cfg, operator, chat):
    cfg.generation.operators = [operator]
    request = evol_instruct.build_request(1, context(cfg, chat=chat))
    sent = request.messages[0][1] if chat else request.prompt
    assert request.is_chat == chat
    assert sent == expected_prompt(operator, POOL[1], chat)
    assert request.params() == {
        "temperature": 1.0,
        "top_p": 0.95,
        "max_tokens": 2048,
        "stop": [">>>"],
    }
    assert request.sample_index == 1


def test_teacher_sampling_overrides_the_defaults_and_a_user_template_serves_every_operator(
    cfg, tmp_path
):
    cfg.teacher.sampling.temperature = 0.7
    cfg.teacher.sampling.stop = ["END"]
    own = tmp_path / "own.jinja"
    own.write_text("{{ operator }} | {{ task }} | {{ language }} | {{ chat }}")
    cfg.generation.prompt_template = own
    evol_instruct.check(cfg)
    request = evol_instruct.build_request(2, context(cfg))
    assert request.params()["temperature"] == 0.7 and request.params()["stop"] == ["END", ">>>"]
    operator = evol_instruct.draw_operator(cfg.seed, 0, 2, cfg.generation.operators)
    assert request.prompt == f"{operator} | {POOL[2]} | English | False"

    own.write_text("{% if %}")
    with pytest.raises(ConfigError, match=r"generation.prompt_template: .*own.jinja:1"):
        evol_instruct.check(cfg)


def test_operators_are_drawn_uniformly_and_the_same_on_every_run():
    draws = [evol_instruct.draw_operator(0, r, j, OPERATORS) for r in range(4) for j in range(1500)]
    counts = Counter(draws)
    assert set(counts) == set(OPERATORS)
    assert all(850 < n < 1150 for n in counts.values()), counts  # 1,000 each expected
    assert draws == [
        evol_instruct.draw_operator(0, r, j, OPERATORS) for r in range(4) for j in range(1500)
    ]
    other_seed = [
        evol_instruct.draw_operator(1, r, j, OPERATORS) for r in range(4) for j in range(1500)
    ]
    assert other_seed != draws
    assert {evol_instruct.draw_operator(0, r, 0, ["deepen"]) for r in range(9)} == {"deepen"}


# -- parsing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("answer", "finish", "expected"),
    [
        (
            "Write a haiku about a red maple leaf.",
            "stop",
            ("Write a haiku about a red maple leaf.", None),
        ),
        # a completion teacher continues after "<<<" and may write the closing delimiter
        (" Write a haiku.\n>>>\nMore text", "stop", ("Write a haiku.", None)),
        # a leaked label in front of the rewrite is stripped, on its own line or not
        ("#Rewritten Prompt#:\nWrite a haiku.", "stop", ("Write a haiku.", None)),
        ("#Rewritten Prompt#: Write a haiku.", "stop", ("Write a haiku.", None)),
        ("**Rewritten task:** Write a haiku.", "stop", ("Write a haiku.", None)),
        ("Created task:\n<<<\nWrite a haiku.\n>>>", "stop", ("Write a haiku.", None)),
        ("Rewritten Prompt\nWrite a haiku.", "stop", ("Write a haiku.", None)),
        # the starting task repeated, then a label line: the rewrite follows the label
        (
            "<<<\nWrite a poem.\n\n**Rewrite:**\nWrite a haiku about frost.",
            "stop",
            ("Write a haiku about frost.", None),
        ),
        # words that only look like a label are the task
        (
            "New task management apps abound: compare three.",
            "stop",
            ("New task management apps abound: compare three.", None),
        ),
        # a chat preamble goes, delimiters or not; the task keeps its lines
        (
            (
                "Sure! Here is the rewritten task:\n\n<<<\nSum the column.\n\n\n| a |\n| 1 |\n"
                ">>>\nHope it helps"
            ),
            "stop",
            ("Sum the column.\n\n| a |\n| 1 |", None),
        ),
        ("Certainly, here it is:\nWrite a haiku.", "stop", ("Write a haiku.", None)),
        ("", "stop", ("", "parse_error")),
        ("  \n>>>", "stop", ("", "parse_error")),
        ("#Rewritten Prompt#:", "stop", ("", "parse_error")),
        ("Write a haiku about a red", "length", ("Write a haiku about a red", "length_truncated")),
    ],
)
def test_parse_every_answer_shape(answer, finish, expected):
    parsed = evol_instruct.parse(answer, finish)
    assert (parsed.text, parsed.error) == expected
    if parsed.error:
        assert parsed.raw == answer.strip()


def test_information_gain_counts_the_new_tokens():
    parent = "Explain why leaves change colour in autumn."
    assert evol_instruct.information_gain(parent, parent) == (0, 1.0)
    assert (
        evol_instruct.information_gain(parent, "explain why LEAVES change colour in autumn!")[0]
        == 0
    )
    assert evol_instruct.information_gain(parent, "Explain why leaves change colour.")[0] == 0
    assert (
        evol_instruct.information_gain(parent, "Explain why leaves turn colour in autumn.")[0] == 1
    )
    longer = parent[:-1] + ", in two paragraphs for a child."
    new, f1 = evol_instruct.information_gain(parent, longer)
    assert new == 6 and f1 == pytest.approx(2 * 7 / (7 + 13))


@pytest.mark.parametrize(
    ("text", "leaks"),
    [
        ("Rewrite the #Given Prompt# so that it rhymes.", True),
        ("Following the rewritten prompt, list three rivers.", True),
        ("As in the starting task, list three rivers.", True),
        ("List three rivers.\n>>>", True),
        ("List three rivers and the seas they flow into.", False),
    ],
)
def test_scaffolding_leaks(text, leaks):
    assert evol_instruct.leaks_scaffolding(text) == leaks


# -- a scripted teacher ----------------------------------------------------------------------------
MARK = "Starting task:\n<<<\n"


def fresh(parent: str, idx: int | None = None) -> str:
    """A new task that shares only "Explain ... in detail" with any other: novel at 0.7. What
    the scripted teacher writes for request idx on `parent` (a sampling teacher varies too)."""
    h = hashlib.sha1(f"{parent}#{idx}".encode()).hexdigest()[:8]
    return f"Explain {' '.join(f'x{h}{c}' for c in 'abcd')} in detail."


def good_answer(question: str) -> str:
    return f"A careful answer about {question.rstrip('.')}, with one example and a conclusion."


class EvolTeacher:
    """Evol-Instruct answers chosen by what a request asks, never by call order. An evolution
    request (its prompt has "Starting task:") gets evolve[parent], else `fresh(parent, its
    sample_index)`, in delimiters after a preamble when asked in chat; an answer request gets
    answers[question], else `good_answer`. Either may be (text, finish). `fail_at`: the call
    that raises. Records the evolution prompts and the questions it got."""

    backend = "scripted"
    model = "scripted-evol"

    def __init__(self, evolve=None, answers=None, fail_at=None, delay=lambda text: 0.01):
        self.evolve, self.answers = evolve or {}, answers or {}
        self.fail_at, self.delay = fail_at, delay
        self.calls = 0
        self.prompts: list[str] = []
        self.questions: list[str] = []
        self.max_in_flight = self._in_flight = 0

    def reply(self, request):
        text = request.prompt if request.prompt is not None else request.messages[-1][1]
        if MARK in text:
            self.prompts.append(text)
            parent = parent_of(text)
            reply = self.evolve.get(parent, fresh(parent, request.sample_index))
            if request.is_chat and isinstance(reply, str):
                reply = f"Here is the rewritten task:\n<<<\n{reply}\n>>>"
            return reply
        assert request.is_chat, "answers are asked in chat"
        self.questions.append(text)
        return self.answers.get(text, good_answer(text))

    async def complete(self, requests):
        out = []
        for r in requests:
            if self.fail_at is not None and self.calls == self.fail_at:
                raise TeacherError("scripted failure")
            self.calls += 1
            reply = self.reply(r)
            text, finish = reply if isinstance(reply, tuple) else (reply, "stop")
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            await asyncio.sleep(self.delay(text))
            self._in_flight -= 1
            out.append(Completion(text=text, finish_reason=finish, tokens_in=10, tokens_out=20))
        return out

    async def aclose(self):
        pass


def parent_of(prompt: str) -> str:
    return prompt.split(MARK, 1)[1].split("\n>>>", 1)[0]


def capture_records(store: Store) -> list[dict]:
    """Every record the loop stores, as the recipe gave it (with its `evolution`)."""
    captured: list[dict] = []
    put_batch = store.put_batch

    def spy(idx, request_key, recipe, records):
        captured.extend(records)
        return put_batch(idx, request_key, recipe, records)

    store.put_batch = spy
    return captured


def dataset(store) -> list[tuple]:
    return [(e["instruction"], e["input"], e["output"]) for e in store.examples()]


# -- each elimination rule -------------------------------------------------------------------------
def rule_pool() -> tuple[list[str], dict, dict, dict]:
    """One pool member per rule: (pool, evolutions, answers, {member: expected reason})."""
    kept = fresh("kept")
    rules = {  # reason: (evolution, answer or None when no answer is asked)
        "kept": (kept, None),
        "parse_error": (">>>", None),
        "length_truncated": (("Explain the tides of the", "length"), None),
        "prompt_leak": ("#Given Prompt#: describe the rainy season in Kerala to a tourist.", None),
        "no_information_gain": ("Describe the wet season in Kerala.", None),
        "too_short": ("Summarise it now.", None),
        "rouge_duplicate": (kept[:-1] + " in detail!", None),
        "short_apology": (fresh("a"), "I'm sorry, but I cannot help with that request."),
        "refusal": (fresh("b"), "I'm sorry, but " + " ".join(f"reason{i}" for i in range(90))),
        "no_content": (fresh("c"), "It is what it is, and that is all there is to it..."),
        "unfinished": (fresh("d"), ("The first part of the answer", "length")),
        "repetition": (fresh("e"), "The river flows to the sea.\n" * 5),
        "off_topic": (
            fresh("f"),
            "Bananas grow in warm tropical climates almost everywhere on the planet.",
        ),
        "empty_output": (fresh("g"), "   "),
    }
    pool = [f"Describe the rainy season in Kerala, member {i}." for i in range(len(rules))]
    pool[4] = "Describe the rainy season in Kerala."  # the no-gain member: one word reworded
    evolve = {p: evo for p, (evo, _) in zip(pool, rules.values())}
    answers = {
        (evo if isinstance(evo, str) else evo[0]): ans
        for evo, ans in rules.values()
        if ans is not None
    }
    expected = dict(zip(pool, rules))
    return pool, evolve, answers, expected


@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
def test_every_elimination_rule_stores_its_reason_code(cfg, tmp_path, chat):
    pool, evolve, answers, expected = rule_pool()
    cfg.teacher.chat = chat
    cfg.generation.pool = write_pool(tmp_path / "rules.jsonl", pool)
    cfg.generation.rounds = 1
    cfg.generation.max_requests = len(pool)
    store = open_run(cfg)
    records = capture_records(store)
    teacher = EvolTeacher(evolve, answers)
    result = generate(store, cfg, teacher)
    assert result.stop_reason == "exhausted" and result.kept == 1

    funnel = store.funnel()
    assert funnel["kept"] == 1
    assert funnel["rejected"] == {reason: 1 for reason in list(expected.values())[1:]}
    rows = store.machine_records()
    assert [r["status"] if r["status"] == "kept" else r["reason"] for r in rows] == list(
        expected.values()
    )
    # every request evolved its own member, in order, in round 0
    assert [parent_of(p) for p in teacher.prompts] == pool
    assert [r["detail"]["evolution"]["parent"] for r in records] == pool
    assert all(
        r["detail"]["evolution"]["round"] == 0 and "parent_id" not in r["detail"]["evolution"]
        for r in records
    )
    assert [r["detail"]["evolution"]["operator"] for r in records] == [
        evol_instruct.draw_operator(cfg.seed, 0, j, cfg.generation.operators)
        for j in range(len(pool))
    ]
    # a rewrite is answered (in chat) only once it passed the instruction filter
    answered = [r["instruction"] for r in rows if evol_instruct.in_pool(r)]
    assert teacher.questions == answered and len(answered) == 8
    by_reason = {r["reason"]: r for r in store.rejected_samples()}
    assert by_reason["no_information_gain"]["nearest"] is None  # a file prompt has no id
    assert by_reason["no_information_gain"]["nearest_score"] == pytest.approx(5 / 6)
    assert by_reason["rouge_duplicate"]["nearest"] == fresh("kept")
    assert by_reason["parse_error"]["raw"].endswith(">>>")
    assert by_reason["short_apology"]["output"].startswith("I'm sorry")
    [kept] = store.examples()
    assert kept["instruction"] == fresh("kept") and kept["input"] == ""
    assert kept["output"] == good_answer(fresh("kept"))
    purposes = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert purposes == {"generate": len(pool), "answer": 8}


def test_a_short_apology_is_the_papers_rule_and_a_long_one_the_refusal_rule():
    apology = "Sorry, I cannot do that."
    assert evol_instruct.answer_elimination(apology) == "short_apology"
    long = "Sorry, " + " ".join(f"w{i}" for i in range(80))
    assert evol_instruct.answer_elimination(long) is None  # left to the answer rules
    assert evol_instruct.answer_elimination("?! ... , and the.") == "no_content"
    assert evol_instruct.answer_elimination("") is None  # empty_output, from the answer rules
    assert evol_instruct.answer_elimination("Paris is the capital of France.") is None


# -- the pool over rounds --------------------------------------------------------------------------
def test_survivors_evolve_further_and_an_eliminated_evolution_keeps_its_parent(cfg):
    evo0, evo2 = fresh(POOL[0], 0), fresh(POOL[2], 2)
    evolve = {POOL[1]: "Suggest a name for a small bakery by the sea!"}  # no information gain
    answers = {evo2: "Sorry, I cannot answer that."}  # eliminated on its answer
    store = open_run(cfg)
    records = capture_records(store)
    teacher = EvolTeacher(evolve, answers)
    result = generate(store, cfg, teacher)
    assert result.stop_reason == "exhausted" and result.requests == 6

    # round 1 rewrites the survivors: member 0's evolution, and the parents of the other two
    assert [parent_of(p) for p in teacher.prompts] == [*POOL, evo0, POOL[1], POOL[2]]
    assert [
        (r["detail"]["evolution"]["round"], r["detail"]["evolution"]["parent"]) for r in records
    ] == [
        (0, POOL[0]),
        (0, POOL[1]),
        (0, POOL[2]),
        (1, evo0),
        (1, POOL[1]),
        (1, POOL[2]),
    ]
    # the stored parent: request 0's task, or none for a file prompt
    first_task = store.examples()[0]["id"]
    assert [r["detail"]["evolution"].get("parent_id") for r in records] == [None] * 3 + [
        first_task
    ] + [None] * 2
    assert [r["reason"] for r in records] == [
        None,
        "no_information_gain",
        "short_apology",
        None,
        "no_information_gain",
        None,
    ]
    assert [e["instruction"] for e in store.examples()] == [evo0, fresh(evo0, 3), fresh(POOL[2], 5)]


def test_the_pool_from_the_seeds_holds_their_inputs(cfg, tmp_path):
    seed_file = tmp_path / "seeds.json"
    seed_file.write_text(
        json.dumps(
            [
                {"instruction": "Sort the numbers.", "input": "3, 1, 2", "output": "1, 2, 3"},
                {"instruction": "Name a primary colour.", "input": "", "output": "Red."},
            ]
        )
    )
    cfg.seeds.path = seed_file
    cfg.generation.pool = None
    store = open_run(cfg)
    records = capture_records(store)
    teacher = EvolTeacher()
    assert generate(store, cfg, teacher).requests == 4  # 2 rounds over the 2 seeds
    assert [parent_of(p) for p in teacher.prompts[:2]] == [
        "Sort the numbers.\n\n3, 1, 2",
        "Name a primary colour.",
    ]
    seed_ids = [s["id"] for s in store.seeds()]
    assert [r["detail"]["evolution"]["parent_id"] for r in records[:2]] == seed_ids


def test_the_pool_from_a_run_folder_is_its_kept_tasks(cfg, tmp_path):
    with Store(tmp_path / "earlier") as earlier:
        add_examples(
            earlier,
            [
                ("Translate the sentence into French.", "Good morning.", "Bonjour."),
                ("Name the largest planet.", "", "Jupiter."),
            ],
            "train",
        )
    cfg.generation.pool = tmp_path / "earlier"
    cfg.generation.rounds = 1
    cfg.generation.max_requests = 2
    store = open_run(cfg)
    teacher = EvolTeacher()
    generate(store, cfg, teacher)
    assert [parent_of(p) for p in teacher.prompts] == [
        "Translate the sentence into French.\n\nGood morning.",
        "Name the largest planet.",
    ]


def test_in_pool_holds_what_passed_the_instruction_filter():
    row = {"status": "kept", "reason": None}
    assert evol_instruct.in_pool(row)
    for reason in ("refusal", "short_apology", "no_content", "unfinished", "empty_output"):
        assert evol_instruct.in_pool({"status": "rejected", "reason": reason})
    for reason in ("rouge_duplicate", "no_information_gain", "prompt_leak", "parse_error"):
        assert not evol_instruct.in_pool({"status": "rejected", "reason": reason})


# -- limits and errors -----------------------------------------------------------------------------
def test_a_bad_pool_fails_before_the_first_request(cfg, tmp_path):
    cfg.generation.pool = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=r"^generation.pool: .*missing.jsonl: no such file"):
        evol_instruct.check(cfg)
    (tmp_path / "bad.jsonl").write_text('{"text": "no instruction"}\n')
    cfg.generation.pool = tmp_path / "bad.jsonl"
    with pytest.raises(
        ConfigError, match=r"^generation.pool: .*bad.jsonl:1: needs an 'instruction'"
    ):
        generate(open_run(cfg), cfg, EvolTeacher())


def test_more_requests_in_flight_than_the_pool_holds_is_refused(cfg):
    cfg.generation.concurrency = 4
    teacher = EvolTeacher()
    with pytest.raises(
        ConfigError, match=r"^generation.concurrency: 4 requests in flight, .*holds 3"
    ):
        generate(open_run(cfg), cfg, teacher)
    assert teacher.calls == 0


def test_the_last_round_ends_the_requests(cfg):
    cfg.generation.max_requests = 10
    store = open_run(cfg)
    result = generate(store, cfg, EvolTeacher())
    assert result.stop_reason == "exhausted" and result.requests == 6  # 2 rounds over 3
    assert "all 6 requests the evol-instruct recipe had to make" in result.message
    assert evol_instruct.build_request(6, context(cfg)) is None
    assert evol_instruct.build_request(5, context(cfg)) is not None
    # a rerun has nothing to ask
    teacher = EvolTeacher()
    assert generate(store, cfg, teacher).stop_reason == "exhausted" and teacher.calls == 0


def test_a_changed_pool_or_another_recipe_in_the_run_is_refused(cfg, tmp_path):
    store = open_run(cfg)
    cfg.generation.max_requests = 2
    generate(store, cfg, EvolTeacher())
    cfg.generation.pool = write_pool(tmp_path / "other.jsonl", POOL[:2])
    cfg.generation.max_requests = 6
    with pytest.raises(ConfigError, match=r"^generation.pool: not the starting pool"):
        generate(store, cfg, EvolTeacher())

    cfg.generation.pool = tmp_path / "pool.jsonl"
    cfg.run_dir = tmp_path / "mixed"
    mixed = open_run(cfg)
    add_examples(mixed, [("Name the largest planet.", "", "Jupiter.")], "train")
    with pytest.raises(ConfigError, match=r"^generation.recipe: this run folder holds alpaca"):
        generate(mixed, cfg, EvolTeacher())


# -- concurrency and resume ------------------------------------------------------------------------
def resume_script() -> tuple[dict, dict]:
    """Three rounds in which each member's chain has an eliminated link: member 1 never gains,
    member 2's first answer apologises, member 0's second answer is cut off."""
    evolve = {POOL[1]: "Suggest a name for a small bakery by the sea!"}
    answers = {fresh(POOL[2], 2): "Sorry, I cannot answer that."}
    answers[fresh(fresh(POOL[0], 0), 3)] = ("It was the best of", "length")
    return evolve, answers


def reference_run(cfg, folder, teacher) -> Store:
    twin = cfg.model_copy(deep=True)
    twin.run_dir = folder
    store = open_run(twin)
    generate(store, twin, teacher)
    return store


def test_killed_run_resumes_to_the_same_dataset(cfg, tmp_path):
    cfg.generation.rounds = 3
    cfg.generation.max_requests = 9
    reference = reference_run(cfg, tmp_path / "reference", EvolTeacher(*resume_script()))
    total = reference.request_totals()["requests"]
    assert [e["instruction"] for e in reference.examples()] == [
        fresh(POOL[0], 0),
        fresh(POOL[2], 5),
        fresh(fresh(POOL[0], 0), 6),
        fresh(fresh(POOL[2], 5), 8),
    ]

    store = open_run(cfg)
    # Calls: round 0 is 0-4 (member 1 needs no answer); dies on request 3's answer, in round 1.
    with pytest.raises(TeacherError):
        generate(store, cfg, EvolTeacher(*resume_script(), fail_at=6))
    done = store.request_totals()["done"]
    assert store.batch_stats()["batches"] == 3 and done == 6
    teacher = EvolTeacher(*resume_script())
    result = generate(store, cfg, teacher)
    assert result.stop_reason == "exhausted"
    assert teacher.calls == total - done  # nothing stored was asked again
    # the chains were rebuilt from the store: request 3 (member 0's evolution, its evolution
    # asked before the kill) came from the ledger, and the rest evolve the survivors
    assert [parent_of(p) for p in teacher.prompts] == [
        POOL[1],
        POOL[2],
        fresh(POOL[0], 0),  # request 3's answer was cut off: its parent stays
        POOL[1],
        fresh(POOL[2], 5),
    ]
    assert dataset(store) == dataset(reference)
    assert [(r["instruction"], r["reason"]) for r in store.machine_records()] == [
        (r["instruction"], r["reason"]) for r in reference.machine_records()
    ]


def test_concurrency_up_to_the_pool_size_is_deterministic(cfg, tmp_path):
    cfg.generation.rounds = 3
    cfg.generation.max_requests = 9
    serial = reference_run(cfg, tmp_path / "serial", EvolTeacher(*resume_script()))
    cfg.generation.concurrency = 3
    runs = []
    for name, seed in [("a", 1), ("b", 2)]:
        rng = random.Random(seed)
        teacher = EvolTeacher(*resume_script(), delay=lambda text, rng=rng: rng.random() / 50)
        store = reference_run(cfg, tmp_path / name, teacher)
        runs.append((dataset(store), sorted(teacher.prompts), teacher.max_in_flight))
    assert runs[0][0] == runs[1][0] == dataset(serial)
    assert runs[0][1] == runs[1][1]
    assert min(r[2] for r in runs) > 1


# -- end to end on the embedded teacher ------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e
def test_evol_instruct_on_the_embedded_teacher(tmp_path):
    """One round of two evolutions on SmolLM2-135M through llama.cpp, every step stored. In chat:
    continuing a completion prompt, the 135M model runs on past the task to the token limit."""
    from tutelage.generate.explain import explain
    from tutelage.teachers import make_teacher  # loads llama.cpp

    c = load_config(
        None,
        {
            "generation.recipe": "evol-instruct",
            "generation.target": 2,
            "generation.rounds": 1,
            "generation.max_requests": 2,
            "generation.answer_sampling.max_tokens": 64,
            "teacher.chat": True,
            "teacher.threads": 2,
            "teacher.sampling.max_tokens": 64,
        },
    )
    c.run_dir = tmp_path / "run"
    store = open_run(c)
    result = generate(store, c, make_teacher(c.teacher))
    assert result.requests == 2 and result.stop_reason in ("target", "max_requests")
    records = store.machine_records()
    assert len(records) == 2  # one evolution a request, kept or not
    assert all(r["reason"] for r in records if r["status"] == "rejected")
    steps = {r["purpose"]: r["requests"] for r in store.request_totals_by_purpose()}
    assert steps["generate"] == 2
    assert steps.get("answer", 0) == sum(evol_instruct.in_pool(r) for r in records)
    assert result.kept == len(store.examples())
    assert any(line.startswith("instructions:") for line in explain(store))
