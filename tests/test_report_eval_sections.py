"""The report's evaluation sections for IFEval (accuracies by model, shares by constraint kind) and
for log-prob verdicts (win rates with intervals, position bias), from a store written as the
evaluation stage writes it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser import open_page, require_chromium

from tutelage.report import write_report
from tutelage.store import Store

IFEVAL = {  # role -> (prompt strict, prompt loose, instruction strict, instruction loose)
    "base": (0.2, 0.3, 0.35, 0.4),
    "tuned": (0.5, 0.6, 0.65, 0.7),
    "teacher": (0.8, 0.9, 0.85, 0.95),
}
KINDS = {  # role -> kind -> (strict, loose, n)
    "base": {"change_case": (0.0, 0.5, 4), "punctuation": (0.25, 0.25, 4)},
    "tuned": {"change_case": (0.75, 1.0, 4), "punctuation": (0.5, 0.75, 4)},
    "teacher": {"change_case": (1.0, 1.0, 4)},
}


def summary_row(set_name, role, metric, value, low=None, high=None, n=10) -> dict:
    return {
        "set_name": set_name,
        "model_role": role,
        "metric": metric,
        "value": value,
        "ci_low": low,
        "ci_high": high,
        "n": n,
    }


@pytest.fixture(scope="module")
def report_files(tmp_path_factory) -> tuple[Path, Path]:
    run_dir = tmp_path_factory.mktemp("run")
    with Store(run_dir) as store:
        rows = []
        levels = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
        for role, values in IFEVAL.items():
            for level, value in zip(levels, values):
                rows.append(
                    summary_row("ifeval", role, f"ifeval_{level}", value, value - 0.1, value + 0.1)
                )
        rows.append(summary_row("ifeval", "delta", "ifeval_prompt_strict", 0.3, 0.1, 0.5))
        for role, kinds in KINDS.items():
            for kind, (strict, loose, n) in kinds.items():
                rows.append(summary_row("ifeval", role, f"ifeval_kind_strict:{kind}", strict, n=n))
                rows.append(summary_row("ifeval", role, f"ifeval_kind_loose:{kind}", loose, n=n))
        rows += [
            summary_row("held_out", "tuned:base", "win_rate", 0.55, 0.42, 0.68, 12),
            summary_row("held_out", "tuned:base", "lc_win_rate", 0.52, 0.40, 0.66, 12),
            summary_row("held_out", "tuned:base", "position_bias", 0.75, 0.5, 1.0, 12),
            summary_row("held_out", "tuned", "rouge_l", 0.3, 0.2, 0.4, 12),
        ]
        store.put_eval_summary(rows)
        store.set_meta("eval_judge_mode", "logprobs")
        for role, answer in (("base", "Tea, a drink."), ("tuned", "tea is a drink")):
            store.put_eval_item(
                "ifeval",
                "item-1",
                role,
                "Describe tea in lowercase, without commas.",
                "",
                None,
                answer,
                {
                    "rouge_l": None,
                    "refusal": 0.0,
                    "ifeval": {
                        "change_case:english_lowercase": [role == "tuned"] * 2,
                        "punctuation:no_comma": [role == "tuned"] * 2,
                    },
                },
            )
        for role in ("base", "tuned"):
            store.put_eval_item(
                "held_out", "item-2", role, "Name a colour.", "", "Red.", f"{role}: blue", {}
            )
        orders = [
            {"first_as": "A", "p_a": 0.62, "p_b": 0.08, "keys": ["k1"], "verdict": "A"},
            {"first_as": "B", "p_a": 0.55, "p_b": 0.15, "keys": ["k2"], "verdict": "A"},
        ]
        store.put_judgement(
            "held_out",
            "item-2",
            "pairwise",
            "tuned:base",
            "done",
            0.55,
            None,
            {"mode": "logprobs", "score": 0.55, "consistent": False, "orders": orders},
        )
        return write_report(store, run_dir)


@pytest.fixture(scope="module")
def report(report_files) -> tuple[str, str]:
    return tuple(path.read_text(encoding="utf-8") for path in report_files)


def md(text: str) -> str:
    return text.replace("_", r"\_")


def page_data(html: str) -> dict:
    block = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', html, re.DOTALL
    )
    return json.loads(block[1])


def test_ifeval_accuracies_for_every_model_with_intervals(report):
    md_text, html = report
    assert (
        md(
            "| ifeval_prompt_strict (higher is better) | 0.200 [0.100, 0.300] "
            "| 0.500 [0.400, 0.600] | 0.800 [0.700, 0.900] | +0.300 [+0.100, +0.500] "
            "| better | 10 |"
        )
        in md_text
    )
    assert md("| ifeval_instruction_loose (higher is better) | 0.400 [0.300, 0.500]") in md_text
    for text in ("ifeval_prompt_strict", "0.800 [0.700, 0.900]", "share of all IFEval"):
        assert text in html
    # The headline: prompts followed by each model.
    assert md("IFEval prompts followed (strict), base / tuned / teacher") in md_text
    assert "20.0% / 50.0% / 80.0%" in md_text


def test_ifeval_shares_per_constraint_kind(report):
    md_text, html = report
    assert "| IFEval constraint kind (strict / loose) | base | tuned | teacher | n |" in md_text
    assert md("| change_case | 0.0% / 50.0% | 75.0% / 100.0% | 100.0% / 100.0% | 4 |") in md_text
    # A kind the teacher never met has no cell for it.
    assert "| punctuation | 25.0% / 25.0% | 50.0% / 75.0% | – | 4 |" in md_text
    assert md("ifeval_kind") not in md_text and "ifeval_kind" not in html
    assert '<table class="ifeval-kinds">' in html and "<code>change_case</code>" in html
    assert "75.0% / 100.0%" in html


def test_logprob_verdicts_with_intervals_and_position_bias(report):
    md_text, html = report
    assert "| judge: first vs second | win rate | length-controlled | position bias |" in md_text
    assert (
        "| tuned vs base | 0.550 [0.420, 0.680] | 0.520 [0.400, 0.660] | 0.750 [0.500, 1.000] "
        "| no clear winner | 12 |"
    ) in md_text
    assert "Verdicts from log-probs" in md_text and "Verdicts from log-probs" in html
    assert "position bias is the share of items whose two orders" in md_text
    assert '<th class="n">position bias</th>' in html and "0.750 [0.500, 1.000]" in html
    # The browser's rows carry each order's probabilities, and each answer's constraints met.
    answers = {a["set"]: a for a in page_data(html)["answers"]}
    [pair] = answers["held_out"]["pairs"]
    assert [(o["p_a"], o["p_b"]) for o in pair["orders"]] == [(0.62, 0.08), (0.55, 0.15)]
    met = {a["role"]: a["ifeval"] for a in answers["ifeval"]["answers"]}
    assert met == {"base": {"strict": 0, "n": 2}, "tuned": {"strict": 2, "n": 2}}


def test_a_text_judge_gets_no_log_prob_note(tmp_path):
    with Store(tmp_path) as store:
        store.put_eval_summary([summary_row("held_out", "tuned:base", "win_rate", 0.6, 0.5, 0.7)])
        store.set_meta("eval_judge_mode", "text")
        md_path, _ = write_report(store, Path(tmp_path))
    text = md_path.read_text(encoding="utf-8")
    assert "| tuned vs base | 0.600 [0.500, 0.700] | – | – |" in text
    assert "Verdicts from log-probs" not in text and "IFEval:" not in text


def test_page_in_chromium_shows_probabilities_and_constraints_met(report_files):
    require_chromium()
    with open_page(report_files[1]) as page:
        labels = page.js(
            "return [...document.querySelectorAll('#answers-browser .label, "
            "#answers-browser .about')].map(e => e.textContent)"
        )
        assert any("tuned · constraints met 2 of 2" in t for t in labels), labels
        assert any("base · constraints met 0 of 2" in t for t in labels), labels
        assert any("tuned as A, base as B: P(A) 0.620, P(B) 0.080." in t for t in labels), labels
        assert page.errors() == []
