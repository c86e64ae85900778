"""The report: both files from a store, every section, and generated text kept inert."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tutelage.report import md_fence, md_inline, write_report
from tutelage.store import Store

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
FENCED_OUTPUT = "Here is the code:\n```python\nprint('|')\n```\nThat closes the fence, or does it?"
REASONS = ("rouge_duplicate", "too_short", "blacklisted_word", "parse_error", "length_truncated")


def kept(text: str, output: str, task_input: str = "") -> dict:
    return {"text": text, "status": "kept", "reason": None,
            "instances": [{"input": task_input, "output": output, "status": "kept",
                           "reason": None}]}


def rejected(text: str, reason: str, output: str = "An answer.", **extra) -> dict:
    return {"text": text, "status": "rejected", "reason": reason, **extra,
            "instances": [{"input": "", "output": output, "status": "rejected", "reason": reason}]}


def unparsed(reason: str, raw: str) -> dict:
    return {"text": "", "status": "rejected", "reason": reason, "raw": raw, "instances": []}


def make_run(run_dir: Path) -> Store:
    """A run with every stage: 8 generated tasks (3 kept), a training run and an evaluation."""
    store = Store(run_dir)
    store.set_meta("config", {
        "seed": 0,
        "teacher": {"backend": "openai", "model": "org|teacher-7b",
                    "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 768}},
        "generation": {"recipe": "alpaca", "tasks_per_request": 20, "demonstrations": 3,
                       "target": 100},
        "student": {"model": "embedded", "method": "lora"},
    })
    store.begin_request("req-0", "openai", "org|teacher-7b", {"prompt": "p"}, "generate")
    store.finish_request("req-0", text="(teacher text)", finish_reason="length", tokens_in=1200,
                         tokens_out=3400, cost_usd=0.0123, latency_s=12.5, attempts=1)
    store.put_batch(0, "req-0", "alpaca", [
        kept("Write a haiku about autumn leaves.", "Crimson leaves descend."),
        kept(f"Explain this HTML: {SCRIPT} {IMG}", FENCED_OUTPUT, task_input=f"a | b {IMG}"),
        kept("Name three primary colours for a child.", "Red, yellow and blue."),
        rejected("Write a haiku about autumn leaf.", "rouge_duplicate", nearest_pos=0,
                 nearest_score=0.875),
        rejected("Hi there.", "too_short"),
        rejected("Draw a picture of a cat.", "blacklisted_word"),
        unparsed("parse_error", f"4. Instrction: garbled {SCRIPT}"),
        unparsed("length_truncated", "8. Instruction: Explain why the sky"),
    ])
    # The filter's split: same decisions, each kept task in its own split.
    splits = iter(("train", "valid", "test"))
    store.set_decisions([
        {"id": r["id"], "status": r["status"], "reason": r["reason"], "nearest_id": r["nearest_id"],
         "nearest_score": r["nearest_score"], "instance_id": r["instance_id"],
         "instance_status": r["instance_status"], "instance_reason": r["instance_reason"],
         "split": next(splits) if r["status"] == "kept" else None}
        for r in store.machine_records()
    ])
    for stage in ("generate", "filter", "train", "evaluate"):
        store.stage_started(stage)
        store.stage_finished(stage, "done", {"message": f"{stage} finished"})

    run_id = store.start_train_run("fp", "gemma-3-270m", "lora", {"epochs": 2}, n_train=1,
                                   n_valid=1)
    for step in range(1, 21):
        eval_loss = 2.0 - step * 0.04 if step % 5 == 0 else None
        store.log_train_step(run_id, step, loss=3.0 - step * 0.05, eval_loss=eval_loss,
                             tokens_per_s=800.0 + step, elapsed_s=step * 4.6)
    store.finish_train_run(run_id, "done", str(run_dir / "student"),
                           {"steps": 20, "seconds": 93.0, "tokens_per_s": 812.5})

    answers = {"base": f"base says {IMG}", "tuned": f"tuned says {SCRIPT}"}
    for role, answer in answers.items():
        store.put_eval_item("held_out", "item-1", role, f"Explain {SCRIPT}", "", "The reference.",
                            answer, {"rouge_l": 0.2 if role == "base" else 0.4, "nll": 2.5})
    ci = {"rouge_l": {"base": (0.231, 0.190, 0.270), "tuned": (0.352, 0.300, 0.401),
                      "delta": (0.121, 0.050, 0.190)},
          "nll": {"base": (2.5, 2.4, 2.6), "tuned": (1.9, 1.8, 2.0), "delta": (-0.6, -0.7, -0.5)}}
    store.put_eval_summary([
        {"set_name": "held_out", "model_role": role, "metric": metric, "value": v, "ci_low": lo,
         "ci_high": hi, "n": 12}
        for metric, by_role in ci.items() for role, (v, lo, hi) in by_role.items()
    ])
    return store


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[str, str]:
    run_dir = tmp_path_factory.mktemp("run")
    with make_run(run_dir) as store:
        md_path, html_path = write_report(store, run_dir)
    assert (md_path, html_path) == (run_dir / "report.md", run_dir / "report.html")
    return md_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")


class Tags(HTMLParser):
    """Every real start tag of a page with its attributes (escaped text is data, not tags)."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append((tag, dict(attrs)))


def fenced_blocks(md: str) -> list[str]:
    """The contents of the fenced code blocks of a Markdown text, read as CommonMark does: a block
    ends at the first line of backticks alone at least as long as its opening fence."""
    blocks, lines, i = [], md.split("\n"), 0
    while i < len(lines):
        opening = re.match(r"(`{3,})[^`]*$", lines[i])
        i += 1
        if opening:
            body = []
            while i < len(lines) and not re.fullmatch(rf"`{{{len(opening[1])},}}\s*", lines[i]):
                body.append(lines[i])
                i += 1
            blocks.append("\n".join(body))
            i += 1
    return blocks


def table_cells(line: str) -> list[str]:
    """A Markdown table row's cells, split at the pipes that are not backslash-escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


# -- the full run -------------------------------------------------------------------------------
def test_funnel_numbers_and_every_reason(report):
    md, html = report
    assert "| **generated** | 8 | 100.0% |" in md and "| **kept** | 3 | 37.5% |" in md
    assert "8 tasks generated from 1 teacher response, 3 kept (37.5%)." in md
    assert "Split: train 1, valid 1, test 1." in md
    for reason in REASONS:
        assert f"| rejected: {md_inline(reason)} | 1 | 12.5% |" in md
        assert html.count(reason) >= 2  # its funnel row and its sample (and the chart's label)
    assert "ROUGE-L 0.875 to a kept instruction" in md and "ROUGE-L 0.875" in html
    # The nearest kept instruction is shown next to the duplicate.
    assert "Nearest kept instruction:\nWrite a haiku about autumn leaves." in md


def test_cost_training_and_evaluation(report):
    md, html = report
    assert "| generate: 1 answered | 1,200 | 3,400 | $0.0123 | 12.5 s |" in md
    assert "| steps | 20 |" in md and "| useful tokens/s | 812.5 |" in md
    assert "| time | 1 min 33 s |" in md
    assert "| first eval loss | 1.800 |" in md and "| final eval loss | 1.200 |" in md
    assert ("| rouge_l (higher is better) | 0.231 [0.190, 0.270] | 0.352 [0.300, 0.401] "
            "| +0.121 [+0.050, +0.190] | better | 12 |").replace("_", r"\_") in md
    assert "| -0.600 [-0.700, -0.500] | better |" in md  # a lower nll is better
    for text in ("0.231 [0.190, 0.270]", "tuned − base", "Answers side by side",
                 "The reference."):
        assert text in html
    assert "No training yet" not in html and "No evaluation yet" not in html


def test_html_is_self_contained_with_inline_charts(report):
    _, html = report
    assert html.count("<svg") == 2  # the funnel and the loss curve
    assert "http://" not in html and "https://" not in html
    tags = Tags(html).tags
    assert not {t for t, _ in tags} & {"script", "img", "link", "iframe", "object", "embed"}
    for tag, attrs in tags:
        for name in ("src", "href", "xlink:href", "srcset", "action"):
            assert attrs.get(name) is None or attrs[name].startswith("#"), (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)


def test_generated_text_is_escaped_in_html(report):
    _, html = report
    assert SCRIPT not in html and IMG not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "a | b &lt;img" in html  # an input, escaped
    assert "org|teacher-7b" in html


def test_markdown_cells_and_fences_hold_generated_text(report):
    md, _ = report
    row = next(line for line in md.splitlines() if line.startswith("| teacher |"))
    assert table_cells(row) == ["teacher", r"openai / org\|teacher-7b"]
    blocks = fenced_blocks(md)
    # The output with its own ``` stays whole inside one block, and nothing after it leaks out.
    assert any(FENCED_OUTPUT in b and "Instruction:\nExplain this HTML" in b for b in blocks)
    outside = re.sub(r"(?ms)^(`{3,}).*?^\1`*$", "", md)
    assert SCRIPT not in outside and IMG not in outside and "print(" not in outside


# -- missing stages -----------------------------------------------------------------------------
def test_empty_store_renders_and_says_what_is_missing(tmp_path):
    with Store(tmp_path) as store:
        md_path, html_path = write_report(store, tmp_path)
    md, html = md_path.read_text(), html_path.read_text()
    for text in (md, html):
        assert "no data yet" in text and f"tutelage generate --run-dir {tmp_path}" in text
        assert "no training yet" in text and "tutelage train --run-dir" in text
        assert "no evaluation yet" in text and "tutelage evaluate --run-dir" in text
        assert "No configuration stored in this run." in text
        assert "not run" in text
    assert "<svg" not in html and "<h2 id=\"evaluation\">" in html


def test_kept_but_untrained_run_asks_for_training(tmp_path):
    with Store(tmp_path) as store:
        store.begin_request("k", "llamacpp", "embedded", {}, "generate")
        store.finish_request("k", text="t", finish_reason="stop", tokens_in=1, tokens_out=2,
                             cost_usd=0.0, latency_s=0.5, attempts=1)
        store.put_batch(0, "k", "alpaca", [kept("Sort these numbers in order.", "1, 2, 3")])
        run_id = store.start_train_run("fp", "m", "lora", {}, n_train=1, n_valid=0)
        store.finish_train_run(run_id, "failed", None)
        md = write_report(store, tmp_path)[0].read_text()
    assert "the kept tasks are not split into train / valid / test yet: run `tutelage filter" in md
    assert "the latest training run failed: run `tutelage train" in md
    assert "no data yet" not in md and "| **kept** | 1 | 100.0% |" in md


# -- Markdown helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["plain", "```", "a\n```\nb", "````\n``` x\n`````", "`tick`", ""])
def test_fence_always_holds_its_text(text):
    assert fenced_blocks(md_fence(text)) == [text]


def test_inline_text_cannot_open_markup():
    assert md_inline("a | b\nc") == r"a \| b c"
    assert md_inline("[x](javascript:alert(1)) <b>") == r"\[x\](javascript:alert(1)) \<b\>"
