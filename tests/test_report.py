"""The report: both files from a store, every section, and generated text kept inert."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import open_page, require_chromium

from tutelage.report import md_fence, md_inline, write_report
from tutelage.stage_results import (
    EvaluateResult,
    FilterResult,
    GenerateResult,
    StageFailed,
    TrainResult,
)
from tutelage.store import Store

# Markup a model might write: run, each would set window.pwned (the browser test looks).
SCRIPT = "<script>window.pwned=1</script>"
IMG = "<img src=x onerror=window.pwned=2>"
FENCED_OUTPUT = "Here is the code:\n```python\nprint('|')\n```\nThat closes the fence, or does it?"
REASONS = ("rouge_duplicate", "too_short", "blacklisted_word", "parse_error", "length_truncated")


def kept(text: str, output: str, task_input: str = "") -> dict:
    return {
        "text": text,
        "status": "kept",
        "reason": None,
        "instances": [{"input": task_input, "output": output, "status": "kept", "reason": None}],
    }


def rejected(text: str, reason: str, output: str = "An answer.", **extra) -> dict:
    return {
        "text": text,
        "status": "rejected",
        "reason": reason,
        **extra,
        "instances": [{"input": "", "output": output, "status": "rejected", "reason": reason}],
    }


def unparsed(reason: str, raw: str) -> dict:
    return {"text": "", "status": "rejected", "reason": reason, "raw": raw, "instances": []}


def make_run(run_dir: Path) -> Store:
    """A run with every stage: 8 generated tasks (3 kept), a training run and an evaluation."""
    store = Store(run_dir)
    store.set_meta(
        "config",
        {
            "seed": 0,
            "teacher": {
                "backend": "openai",
                "model": "org|teacher-7b",
                "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 768},
            },
            "generation": {
                "recipe": "alpaca",
                "tasks_per_request": 20,
                "demonstrations": 3,
                "target": 100,
            },
            "student": {"model": "embedded", "method": "lora"},
        },
    )
    store.put_seeds(
        [
            {"instruction": "Write a haiku about the sea.", "instances": []},
            {"instruction": "List three primary colours.", "instances": []},
        ]
    )
    store.begin_request("req-0", "openai", "org|teacher-7b", {"prompt": "p"}, "generate")
    store.finish_request(
        "req-0",
        text="(teacher text)",
        finish_reason="length",
        tokens_in=1200,
        tokens_out=3400,
        cost_usd=0.0123,
        latency_s=12.5,
        attempts=1,
    )
    store.put_batch(
        0,
        "req-0",
        "alpaca",
        [
            kept("Write a haiku about autumn leaves.", "Crimson leaves descend."),
            kept(f"Explain this HTML: {SCRIPT} {IMG}", FENCED_OUTPUT, task_input=f"a | b {IMG}"),
            kept("Name three primary colours for a child.", "Red, yellow and blue."),
            rejected(
                "Write a haiku about autumn leaf.",
                "rouge_duplicate",
                nearest_pos=0,
                nearest_score=0.875,
            ),
            rejected("Hi there.", "too_short"),
            rejected("Draw a picture of a cat.", "blacklisted_word"),
            unparsed("parse_error", f"4. Instrction: garbled {SCRIPT}"),
            unparsed("length_truncated", "8. Instruction: Explain why the sky"),
        ],
    )
    # The filter's split: same decisions, each kept task in its own split.
    splits = iter(("train", "valid", "test"))
    store.set_decisions(
        [
            {
                "id": r["id"],
                "status": r["status"],
                "reason": r["reason"],
                "nearest_id": r["nearest_id"],
                "nearest_score": r["nearest_score"],
                "instance_id": r["instance_id"],
                "instance_status": r["instance_status"],
                "instance_reason": r["instance_reason"],
                "split": next(splits) if r["status"] == "kept" else None,
            }
            for r in store.machine_records()
        ]
    )
    for result in (
        GenerateResult(stop_reason="target", message="generate finished"),
        FilterResult(),
        TrainResult(),
        EvaluateResult(),
    ):
        store.stage_started(result.stage)
        store.stage_finished(result.stage, result)

    run_id = store.start_train_run(
        "fp", "gemma-3-270m", "lora", {"epochs": 2}, n_train=1, n_valid=1
    )
    for step in range(1, 21):
        eval_loss = 2.0 - step * 0.04 if step % 5 == 0 else None
        store.log_train_step(
            run_id,
            step,
            loss=3.0 - step * 0.05,
            eval_loss=eval_loss,
            tokens_per_s=800.0 + step,
            elapsed_s=step * 4.6,
        )
    store.finish_train_run(
        run_id,
        "done",
        str(run_dir / "student"),
        {"steps": 20, "seconds": 93.0, "tokens_per_s": 812.5},
    )

    answers = {
        "base": f"base says {IMG}",
        "tuned": f"tuned says {SCRIPT}",
        "teacher": "the teacher says",
    }
    for role, answer in answers.items():
        store.put_eval_item(
            "held_out",
            "item-1",
            role,
            f"Explain {SCRIPT}",
            "",
            "The reference.",
            answer,
            {"rouge_l": {"base": 0.2, "tuned": 0.4}.get(role, 0.6), "nll": 2.5},
        )
    order = {
        "first_as": "A",
        "verdict": "A",
        "rationale": f"A is better {IMG}",
        "keys": [],
        "attempts": 1,
    }
    store.put_judgement(
        "held_out",
        "item-1",
        "pairwise",
        "tuned:base",
        "done",
        1.0,
        None,
        {
            "score": 1.0,
            "consistent": True,
            "orders": [order, {**order, "first_as": "B", "verdict": "B"}],
        },
    )
    store.put_judgement(
        "held_out",
        "item-1",
        "rubric",
        "tuned",
        "done",
        None,
        "B",
        {"grade": "B", "rationale": f"minor flaws {SCRIPT}"},
    )
    ci = {
        "rouge_l": {
            "base": (0.231, 0.190, 0.270),
            "tuned": (0.352, 0.300, 0.401),
            "delta": (0.121, 0.050, 0.190),
        },
        "nll": {"base": (2.5, 2.4, 2.6), "tuned": (1.9, 1.8, 2.0), "delta": (-0.6, -0.7, -0.5)},
    }
    store.put_eval_summary(
        [
            {
                "set_name": "held_out",
                "model_role": role,
                "metric": metric,
                "value": v,
                "ci_low": lo,
                "ci_high": hi,
                "n": 12,
            }
            for metric, by_role in ci.items()
            for role, (v, lo, hi) in by_role.items()
        ]
        + [
            {
                "set_name": "held_out",
                "model_role": "tuned:base",
                "metric": "win_rate",
                "value": 0.75,
                "ci_low": 0.6,
                "ci_high": 0.9,
                "n": 12,
            },
            {
                "set_name": "held_out",
                "model_role": "tuned:base",
                "metric": "lc_win_rate",
                "value": 0.7,
                "ci_low": 0.45,
                "ci_high": 0.85,
                "n": 12,
            },
            {
                "set_name": "held_out",
                "model_role": "tuned",
                "metric": "rubric_acceptable",
                "value": 0.5,
                "ci_low": 0.25,
                "ci_high": 0.75,
                "n": 12,
            },
        ]
    )
    store.count_cache_hit("req-0")  # a rerun found the answer stored
    return store


@pytest.fixture(scope="module")
def report_files(tmp_path_factory) -> tuple[Path, Path]:
    run_dir = tmp_path_factory.mktemp("run")
    with make_run(run_dir) as store:
        md_path, html_path = write_report(store, run_dir)
    assert (md_path, html_path) == (run_dir / "report.md", run_dir / "report.html")
    return md_path, html_path


@pytest.fixture(scope="module")
def report(report_files) -> tuple[str, str]:
    return tuple(path.read_text(encoding="utf-8") for path in report_files)


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
def page_data(html: str) -> dict:
    """The JSON data block the page's browsers render."""
    block = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL
    )
    return json.loads(block[1])


def test_funnel_numbers_and_every_reason(report):
    md, html = report
    assert "| **generated** | 8 | 100.0% |" in md and "| **kept** | 3 | 37.5% |" in md
    assert "8 tasks generated from 1 teacher response, 3 kept (37.5%)." in md
    assert "Split: train 1, valid 1, test 1." in md
    rejected = page_data(html)["rejected"]
    for reason in REASONS:
        assert f"| rejected: {md_inline(reason)} | 1 | 12.5% |" in md
        assert f'<option value="{reason}">{reason} (1)</option>' in html  # the reason browser
        assert [r["reason"] for r in rejected].count(reason) == 1
    assert "ROUGE-L 0.875 to a kept instruction" in md
    duplicate = next(r for r in rejected if r["reason"] == "rouge_duplicate")
    # The nearest kept instruction is shown next to the duplicate.
    assert "Nearest kept instruction:\nWrite a haiku about autumn leaves." in md
    assert (duplicate["nearest"], duplicate["nearest_score"]) == (
        "Write a haiku about autumn leaves.",
        0.875,
    )
    raw = {r["reason"]: r["raw"] for r in rejected}
    assert raw["parse_error"] == f"4. Instrction: garbled {SCRIPT}"  # unparsed text, as written


def test_data_lengths_novelty_and_verbs(report):
    md, html = report
    assert "| instruction | 3 | 7 | 6.667 | 7 | 7 |" in md
    assert "| input (2 empty, not counted) | 1 | 6 |" in md
    assert "against the closest of the run's 2 seed tasks" in md
    # "Write a haiku about autumn leaves." shares 4 of its 6 tokens, in order, with the seed
    # "Write a haiku about the sea.": F1 = 2 * 4 / (6 + 6).
    kept = {r["instruction"]: r for r in page_data(html)["kept"]}
    assert kept["Write a haiku about autumn leaves."]["to_seed"] == pytest.approx(2 * 4 / 12)
    assert "| 0.6–0.7 | 1 |" in md  # that score in the tenths table
    # spaCy finds each kept instruction's root verb and its object (the paper's Figure 2).
    for verb, noun in (("write", "haiku"), ("name", "colour"), ("explain", "html")):
        assert re.search(rf"\| {verb} \| 1 \| {noun} \(1\) \|", md), (verb, noun)
        assert f">{verb}</text>" in html and f">{noun}</text>" in html  # the sunburst's labels


def test_verbs_without_a_parser_say_how_to_add_one(tmp_path, monkeypatch):
    from tutelage.report import page
    from tutelage.report.analysis import verb_objects

    monkeypatch.setattr(
        page,
        "verb_objects",
        lambda texts, **kw: verb_objects(texts, **kw, model="no_such_model"),
    )
    with make_run(tmp_path) as store:
        md_path, html_path = write_report(store, tmp_path)
    md, html = md_path.read_text(), html_path.read_text()
    assert "No verb chart: the spaCy model no_such_model is not installed" in html
    assert "pip install &#39;tutelage[report]&#39;" in html  # autoescaped quotes
    assert "No verb analysis" in md and r"pip install 'tutelage\[report\]'" in md
    assert 'id="chart-verbs"' not in html and 'id="verbs-missing"' in html
    assert html.count("<svg") == 4  # every other chart is still there


def test_cost_training_and_evaluation(report):
    md, html = report
    assert "| generate: 1 answered | 1,200 | 3,400 | $0.0123 | 1 | 12.5 s |" in md
    assert "($0.0123 not paid again)" in md  # the cache hit, at what the request cost
    assert "| steps | 20 |" in md and "| useful tokens/s | 812.5 |" in md
    assert "| time | 1 min 33 s |" in md
    assert "| first eval loss | 1.800 |" in md and "| final eval loss | 1.200 |" in md
    assert (
        "| rouge_l (higher is better) | 0.231 [0.190, 0.270] | 0.352 [0.300, 0.401] "
        "| +0.121 [+0.050, +0.190] | better | 12 |"
    ).replace("_", r"\_") in md
    assert "| -0.600 [-0.700, -0.500] | better |" in md  # a lower nll is better
    # The judge's win rates have their own table, not columns of the metric table.
    assert (
        "| tuned vs base | 0.750 [0.600, 0.900] | 0.700 [0.450, 0.850] | – | tuned wins | 12 |"
        in md
    )  # no position bias stored for this pair: a dash
    assert "| tuned | 0.500 [0.250, 0.750] | 12 |" in md  # the rubric's acceptable share
    assert "tuned:base" not in md
    for text in (
        "0.231 [0.190, 0.270]",
        "tuned − base",
        "0.750 [0.600, 0.900]",
        "tuned wins",
        "Answers side by side",
    ):
        assert text in html
    assert "No training yet" not in html and "No evaluation yet" not in html


def test_answers_side_by_side_carry_every_role_and_the_judge(report):
    _, html = report
    [item] = page_data(html)["answers"]
    assert [a["role"] for a in item["answers"]] == ["base", "tuned", "teacher"]
    assert item["reference"] == "The reference." and item["instruction"] == f"Explain {SCRIPT}"
    [pair] = item["pairs"]
    assert pair["pair"] == "tuned:base" and pair["score"] == 1.0
    assert [o["first_as"] for o in pair["orders"]] == ["A", "B"]
    assert item["grades"] == [
        {"role": "tuned", "status": "done", "grade": "B", "rationale": f"minor flaws {SCRIPT}"}
    ]


def test_html_is_self_contained_with_inline_charts(report):
    _, html = report
    for chart in ("funnel", "lengths", "novelty", "verbs", "loss"):
        assert re.search(rf'<div class="chart" id="chart-{chart}"><svg', html), chart
    assert html.count("<svg") == 5
    assert "http://" not in html and "https://" not in html
    tags = Tags(html).tags
    assert not {t for t, _ in tags} & {"img", "link", "iframe", "object", "embed", "base"}
    # Two scripts: the JSON data (never run) and the page's own, which the CSP allows by hash.
    scripts = [attrs for tag, attrs in tags if tag == "script"]
    assert scripts == [{"type": "application/json", "id": "report-data"}, {}]
    body = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)[-1]
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    csp = next(a["content"] for t, a in tags if a.get("http-equiv") == "Content-Security-Policy")
    assert f"script-src 'sha256-{digest}'" in csp and "default-src 'none'" in csp
    for tag, attrs in tags:
        for name in ("src", "href", "xlink:href", "srcset", "action"):
            assert attrs.get(name) is None or attrs[name].startswith("#"), (tag, attrs)
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)


def test_generated_text_is_escaped_in_html(report):
    _, html = report
    assert SCRIPT not in html and IMG not in html and "<img" not in html
    # In the data block every <, > and & is a \u escape: no text can close the element.
    assert "\\u003cscript\\u003ewindow.pwned=1\\u003c/script\\u003e" in html
    assert html.count("</script>") == 2
    kept = page_data(html)["kept"]
    assert kept[1]["instruction"] == f"Explain this HTML: {SCRIPT} {IMG}"
    assert kept[1]["input"] == f"a | b {IMG}" and kept[1]["output"] == FENCED_OUTPUT
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
    assert "<svg" not in html and '<h2 id="evaluation">' in html


def test_stage_table_shows_each_stages_note(tmp_path):
    """The stage table: generation's stop message, a failed stage's error, a stage still running
    (or killed), and one never run."""
    with Store(tmp_path) as store:
        store.stage_started("generate")
        store.stage_finished(
            "generate", GenerateResult(stop_reason="budget", message="budget of $1.00 reached")
        )
        store.stage_started("filter")
        store.stage_finished("filter", StageFailed(error="no tasks to filter"))
        store.stage_started("train")
        md_path, _ = write_report(store, tmp_path)
    md = md_path.read_text()
    assert re.search(r"\| generate \| stopped \| [^|]+ \| budget of \$1\.00 reached \|", md)
    assert re.search(r"\| filter \| failed \| [^|]+ \| no tasks to filter \|", md)
    assert re.search(r"\| train \| running \| [^|]+ \| still running, or interrupted \|", md)
    assert "| evaluate | not run | – |  |" in md
    assert "| report |" not in md  # the page itself


def test_report_loads_no_model_library(tmp_path):
    """`tutelage report` reads the store: neither importing it nor writing the page (the verb parse
    included: spaCy's thinc would import torch) may pay for torch or transformers."""
    make_run(tmp_path).close()
    code = "\n".join(
        [
            "import sys",
            "from tutelage.report import write_report",
            "from tutelage.store import Store",
            "loaded = lambda: sorted({'torch', 'transformers'} & set(sys.modules))",
            "print(loaded())",
            f"with Store({str(tmp_path)!r}) as store:",
            f"    write_report(store, {str(tmp_path)!r})",
            "print(loaded())",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "[]"]
    md = (tmp_path / "report.md").read_text()
    assert re.search(r"\| write \| 1 \| haiku \(1\) \|", md)  # the verb parse did run


def test_kept_but_untrained_run_asks_for_training(tmp_path):
    with Store(tmp_path) as store:
        store.begin_request("k", "llamacpp", "embedded", {}, "generate")
        store.finish_request(
            "k",
            text="t",
            finish_reason="stop",
            tokens_in=1,
            tokens_out=2,
            cost_usd=0.0,
            latency_s=0.5,
            attempts=1,
        )
        store.put_batch(0, "k", "alpaca", [kept("Sort these numbers in order.", "1, 2, 3")])
        run_id = store.start_train_run("fp", "m", "lora", {}, n_train=1, n_valid=0)
        store.finish_train_run(run_id, "failed", None)
        md = write_report(store, tmp_path)[0].read_text()
    assert "the kept tasks are not split into train / valid / test yet: run `tutelage filter" in md
    assert "the latest training run failed: run `tutelage train" in md
    assert "no data yet" not in md and "| **kept** | 1 | 100.0% |" in md


# -- the page in headless Chromium -------------------------------------------------------------
CHART_IDS = ["chart-funnel", "chart-lengths", "chart-novelty", "chart-verbs", "chart-loss"]
CARDS = (
    "return Object.fromEntries([...document.querySelectorAll('.browser')].map(b =>"
    " [b.id, b.hidden ? -1 : b.querySelectorAll('.card').length]))"
)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def type_into(page, selector: str, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = page.driver.find_element(By.CSS_SELECTOR, selector)
    box.clear()
    box.send_keys(text)


def choose(page, selector: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(page.driver.find_element(By.CSS_SELECTOR, selector)).select_by_value(value)


def test_page_in_chromium_draws_every_chart_and_runs_no_generated_markup(report_files, tmp_path):
    require_chromium()
    with open_page(report_files[1]) as page:
        charts = page.js(
            "return [...document.querySelectorAll('.chart')].map(c => {"
            " const svg = c.querySelector('svg');"
            " const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};"
            " return [c.id, box.width, box.height]; })"
        )
        assert [c[0] for c in charts] == CHART_IDS
        assert all(width > 300 and height > 150 for _, width, height in charts), charts
        assert page.js(CARDS) == {"kept-browser": 3, "rejected-browser": 5, "answers-browser": 1}

        # Markup a model wrote is on the page as text, and none of it ran.
        texts = page.js(
            "return [...document.querySelectorAll('pre.text, .about')].map(e => e.textContent)"
        )
        for text in (
            f"Explain this HTML: {SCRIPT} {IMG}",
            f"a | b {IMG}",
            f"4. Instrction: garbled {SCRIPT}",
            f"tuned says {SCRIPT}",
            f"minor flaws {SCRIPT}",
        ):
            assert text in texts
        assert any(f"A is better {IMG}" in t for t in texts)  # a judge's rationale
        assert page.js(
            "return [document.querySelectorAll('img').length, document.scripts.length,"
            " typeof window.pwned]"
        ) == [0, 2, "undefined"]

        # The browsers: search, a split, a reason, a set.
        type_into(page, "#kept-browser input", "HAIKU autumn")
        assert page.js(CARDS)["kept-browser"] == 1
        assert (
            page.js("return document.querySelector('#kept-browser .count').textContent")
            == "1 of 3 match"
        )
        type_into(page, "#kept-browser input", "")
        choose(page, "#kept-browser select", "test")
        assert page.js(CARDS)["kept-browser"] == 1
        choose(page, "#rejected-browser select", "parse_error")
        assert page.js(CARDS)["rejected-browser"] == 1
        type_into(page, "#rejected-browser input", "no such words")
        assert page.js(CARDS)["rejected-browser"] == 0
        type_into(page, "#answers-browser input", "pwned")
        assert page.js(CARDS)["answers-browser"] == 1

        shot = page.screenshot(tmp_path / "report.png")
        width, height = png_size(shot)
        assert width > 1000 and height > 3000  # the whole page, not the 900-pixel viewport
        assert page.js("return typeof window.pwned") == "undefined"
        assert page.errors() == []


def test_page_in_chromium_pages_long_lists_and_blocks_stray_scripts(tmp_path):
    """30 kept tasks show 25, then all on "show more". A script that got into the page some other
    way than the report's own is refused by its Content-Security-Policy."""
    require_chromium()
    with Store(tmp_path) as store:
        store.begin_request("k", "llamacpp", "embedded", {}, "generate")
        store.finish_request(
            "k",
            text="t",
            finish_reason="stop",
            tokens_in=1,
            tokens_out=2,
            cost_usd=0.0,
            latency_s=0.5,
            attempts=1,
        )
        store.put_batch(
            0,
            "k",
            "alpaca",
            [kept(f"Describe the number {i} in words.", str(i)) for i in range(30)],
        )
        html_path = write_report(store, tmp_path)[1]
    html = html_path.read_text(encoding="utf-8")
    stray = tmp_path / "stray.html"
    stray.write_text(html.replace("</main>", "</main><script>window.pwned=3</script>"))
    with open_page(html_path) as page:
        assert page.js(CARDS) == {"kept-browser": 25}
        page.js("document.querySelector('#kept-browser button.more').click()")
        assert page.js(CARDS) == {"kept-browser": 30}
        assert page.js("return document.querySelector('#kept-browser button.more').hidden")
        assert page.errors() == []
    with open_page(stray) as page:
        assert page.js("return typeof window.pwned") == "undefined"
        assert page.js(CARDS) == {"kept-browser": 25}  # the report's own script still ran
        assert any("Content Security Policy" in e["message"] for e in page.errors())


def test_empty_run_page_in_chromium_has_no_errors(tmp_path):
    require_chromium()
    with Store(tmp_path) as store:
        html_path = write_report(store, tmp_path)[1]
    with open_page(html_path) as page:
        assert page.js(CARDS) == {}
        assert "no data yet" in page.js("return document.querySelector('.missing').textContent")
        assert page.errors() == []


# -- Markdown helpers ---------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["plain", "```", "a\n```\nb", "````\n``` x\n`````", "`tick`", ""])
def test_fence_always_holds_its_text(text):
    assert fenced_blocks(md_fence(text)) == [text]


def test_inline_text_cannot_open_markup():
    assert md_inline("a | b\nc") == r"a \| b c"
    assert md_inline("[x](javascript:alert(1)) <b>") == r"\[x\](javascript:alert(1)) \<b\>"
