"""The filter stage: it re-decides a generated run with the current settings and splits what it
keeps, with the scripted teachers of `test_generate`."""

from __future__ import annotations

import pytest
from test_generate import (
    INSTANCE_ANSWERS,
    ScriptedTeacher,
    SelfInstructTeacher,
    dataset,
    si_lists,
    unique_blocks,
)

from tutelage.config import load_config
from tutelage.filter.stage import filter_stage
from tutelage.generate import generate
from tutelage.pipeline import open_run


@pytest.fixture
def cfg(tmp_path):
    c = load_config(None)
    c.run_dir = tmp_path / "run"
    c.teacher.chat = False
    c.generation.target = 12
    c.generation.max_requests = 30
    return c


@pytest.fixture
def si_cfg(cfg):
    cfg.generation.recipe = "self-instruct"
    return cfg


def test_filter_stage_redecides_and_splits(cfg):
    store = open_run(cfg)
    cfg.generation.target = 30
    generate(store, cfg, ScriptedTeacher([unique_blocks(i) for i in range(30)]))
    before = store.funnel()
    result = filter_stage(store, cfg)
    assert store.funnel() == before  # same settings, same decisions
    assert result.funnel == before
    s = result.splits
    assert s["test"] == 3 and s["valid"] == 2 and s["train"] == before["kept"] - 5
    assert {e["split"] for e in store.examples()} == {"train", "valid", "test"}
    cfg.filter.rouge_threshold = 0.3  # stricter: fewer kept, reasons recorded
    filter_stage(store, cfg)
    assert store.funnel()["kept"] < before["kept"]
    assert store.funnel()["rejected"]["rouge_duplicate"] > 0


def test_filter_stage_keeps_self_instruct_decisions_and_splits_by_instruction(si_cfg):
    si_cfg.generation.target = 8
    store = open_run(si_cfg)
    generate(store, si_cfg, SelfInstructTeacher(si_lists(), INSTANCE_ANSWERS))
    before, examples = store.funnel(), dataset(store)
    assert before["rejected"] == {"no_valid_instances": 1, "rouge_duplicate": 1}
    filter_stage(store, si_cfg)
    assert store.funnel() == before and dataset(store) == examples  # same settings, same data
    splits: dict[str, set] = {}
    for e in store.examples():
        splits.setdefault(e["instruction"], set()).add(e["split"])
    assert all(len(s) == 1 and None not in s for s in splits.values())  # every instance, one split


# -- recipes that answer in chat: the filter stage keeps the answers' verdicts ------------------
def test_the_filter_stage_keeps_magpies_decisions_and_re_decides_the_screens(tmp_path):
    import test_magpie

    cfg = test_magpie.cfg.__wrapped__(tmp_path)
    store = open_run(cfg)
    generate(store, cfg, test_magpie.MagpieTeacher(test_magpie.QUERIES, test_magpie.ANSWERS))

    def kept():  # the dataset, without the split the filter stage assigns
        return [{k: v for k, v in r.items() if k != "split"} for r in store.examples()]

    before, examples = store.funnel(), kept()
    result = filter_stage(store, cfg)
    # refusals, loops and the rest stay rejected; the same two tasks are kept
    assert result.funnel == before and kept() == examples
    # a stricter threshold re-decides the screen's part only: answered tasks can become
    # duplicates, while the answers' own rejections stay as they were
    cfg.filter.rouge_threshold = 0.05
    result = filter_stage(store, cfg)
    assert result.funnel["kept"] < before["kept"]
    assert {r["instruction"] for r in kept()} < {r["instruction"] for r in examples}
    # (a task the screen rejected at generation was never answered: no threshold brings it back)
    cfg.filter.rouge_threshold = None
    assert filter_stage(store, cfg).funnel == before


def test_the_filter_stage_keeps_the_answer_recipes_decisions(tmp_path):
    import test_answer_recipe as t

    rows = [{"instruction": text} for text in [*t.RULE_REPLIES, t.GOOD]]
    cfg = t.answer_config(tmp_path, t.write_jsonl(tmp_path / "p.jsonl", rows))
    store = open_run(cfg)
    generate(store, cfg, t.rule_teacher())
    before = store.funnel()
    assert filter_stage(store, cfg).funnel == before
    assert [r[0] for r in t.dataset(store)] == [t.GOOD]
