"""What the `tutelage` command shows on the terminal: progress bars while a stage runs, one line (or
a table) for its outcome, and the comparison of two runs.

Everything goes to stderr, so a command's stdout holds only what it was asked for (`--version`,
`generate --explain`). Nothing here imports a model library: the CLI must start fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

    from .stage_results import (
        EvaluateResult,
        FilterResult,
        GenerateResult,
        ReportResult,
        TrainResult,
    )
    from .store import Store

console = Console(stderr=True)

# Judged metrics are shares of items, shown as percentages; the others as they are.
PERCENT_METRICS = ("win_rate", "lc_win_rate", "rubric_acceptable")


def progress_bar() -> Progress:
    from rich.progress import (  # here: `--help` draws no bar
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


# -- while a stage runs: each yields the progress callback its stage takes ---------------------
@contextmanager
def generate_progress(target: int) -> Iterator[Callable[[int, int, dict], None]]:
    with progress_bar() as bar:
        task = bar.add_task("generate", total=target, info="")

        def progress(kept: int, target: int, info: dict) -> None:
            projected = info.get("projected_usd")
            parts = (
                f"requests {info['requests']}  ${info['cost_usd']:.4f}",
                f"(~${projected:.4f} in all)" if projected is not None else "",
                f"cached {info['cache_hits']}",
                info.get("remote"),
            )
            bar.update(task, completed=min(kept, target), info=" ".join(filter(None, parts)))

        yield progress


@contextmanager
def train_progress() -> Iterator[Callable[[int, int, float, float], None]]:
    with progress_bar() as bar:
        task = bar.add_task("train", total=None, info="loading the student")

        def progress(step: int, total: int, loss: float, tokens_per_s: float) -> None:
            info = f"loss {loss:.3f}  {tokens_per_s:.0f} tok/s"
            bar.update(task, completed=step, total=total, info=info)

        yield progress


@contextmanager
def evaluate_progress() -> Iterator[Callable[[int, int, str], None]]:
    with progress_bar() as bar:
        task = bar.add_task("evaluate", total=None, info="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, info=label)

        yield progress


def report_spinner():
    # A spinner, not a bar: on a large run the analyses (ROUGE-L novelty, the verb parse) take
    # seconds, in steps of unknown length.
    return console.status("report: describing the kept data and drawing the charts")


# -- a stage's outcome ---------------------------------------------------------------------------
def print_generated(result: GenerateResult) -> None:
    colour = "green" if result.status == "done" else "yellow"
    console.print(f"[{colour}]generate:[/] {result.message}", highlight=False)


def print_filtered(result: FilterResult) -> None:
    f, s = result.funnel, result.splits
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(f["rejected"].items(), key=lambda x: -x[1]))
    console.print(
        f"[green]filter:[/] {f['generated']} generated, {f['kept']} kept "
        f"(train {s['train']}, valid {s['valid']}, test {s['test']}); "
        f"rejected: {rejected or 'none'}",
        highlight=False,
    )


def print_trained(result: TrainResult) -> None:
    figures = format_fields(result, "steps", "train_loss", "eval_loss", "tokens_per_s", "seconds")
    console.print(f"[green]train:[/] {figures}", highlight=False)
    if result.gguf_error:
        console.print(f"[yellow]warning:[/] no student.gguf: {result.gguf_error}", highlight=False)


def print_evaluated(result: EvaluateResult, written: Path) -> None:
    print_evaluation(result)
    console.print(f"[green]evaluate:[/] written {written}")


def print_reported(result: ReportResult) -> None:
    console.print(f"[green]report:[/] {result.html}  {result.markdown}")


def print_evaluation(result: EvaluateResult) -> None:
    """The headline figures, one table per set: answer metrics by model, judged win rates."""
    from rich.table import Table

    for name, s in result.sets.items():
        table = Table(title=f"{name} ({s['n_items']} items)", title_justify="left")
        table.add_column("metric")
        table.add_column("model")
        table.add_column("value [95% CI]", justify="right")
        for metric, by_role in s["metrics"].items():
            for role, ci in by_role.items():
                extra = f" ({ci['n_failed']} failed)" if ci.get("n_failed") else ""
                table.add_row(metric, role, ci_text(ci, metric in PERCENT_METRICS) + extra)
        console.print(table)
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def print_comparison(comparison: dict) -> None:
    """`compare_runs`'s result: one table per set, run A, run B and the paired difference."""
    from rich.table import Table

    a, b = comparison["runs"]
    for name, s in comparison["sets"].items():
        table = Table(title=f"{name}: {s['n_items']} items in both", title_justify="left")
        for col in ("metric", f"A {a}", f"B {b}", "B - A [95% CI]"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for metric, v in s["metrics"].items():
            table.add_row(metric, ci_text(v["a"]), ci_text(v["b"]), ci_text(v["delta"]))
        for pair, v in s["win_rates"].items():
            table.add_row(f"win_rate {pair}", ci_text(v["a"], True), ci_text(v["b"], True), "")
        console.print(table)


def print_explanation(store: Store) -> None:
    """Where a run's generated tasks went, by reason code, with an example of each."""
    from .generate.explain import explain

    for line in explain(store):
        print(line)  # plain, on stdout: the examples are model text, not rich markup


# -- formatting ----------------------------------------------------------------------------------
def ci_text(ci: dict | None, percent: bool = False) -> str:
    """ "mean [low, high]" of a bootstrap interval, or "-" when there is none."""
    if not ci or ci.get("mean") is None:
        return "-"
    scale, fmt = (100, "{:.0f}%") if percent else (1, "{:.3f}")
    return (
        f"{fmt.format(ci['mean'] * scale)} "
        f"[{fmt.format(ci['ci_low'] * scale)}, {fmt.format(ci['ci_high'] * scale)}]"
    )


def format_fields(result: Any, *names: str) -> str:
    """ "name value, ..." for the named fields that are set (floats to 4 significant digits)."""
    parts = []
    for name in names:
        value = getattr(result, name)
        if value is not None:
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)
