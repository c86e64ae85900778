"""What the `tutelage` command shows on the terminal: progress bars while a stage runs, one line (or
a table) for its outcome, and the comparison of two runs.

When stderr is no terminal (a log file, a pipe, a job scheduler), a bar cannot be redrawn: each
stage prints plain progress lines instead (`PlainLines`), one at every tenth of the way and at
least one every 30 seconds, so a long stage is never silent.

Everything goes to stderr, so a command's stdout holds only what it was asked for (`--version`,
`generate --explain`). Nothing here imports a model library: the CLI must start fast.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from rich.progress import Progress

    from .stage_results import (
        CaptureResult,
        EvaluateResult,
        FilterResult,
        GenerateResult,
        ReportResult,
        TrainResult,
    )
    from .store import Store

console = Console(stderr=True)

# Judged metrics are shares of items, shown as percentages; the others as they are.
PERCENT_METRICS = (
    "win_rate",
    "lc_win_rate",
    "position_bias",
    "rubric_acceptable",
    "refusal",
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_instruction_strict",
    "ifeval_instruction_loose",
)


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


class PlainLines:
    """Progress without a terminal: one plain line when the stage starts, at every tenth of the
    way (`completed` of `total`), at each new phase (a new total), and at least every
    `interval_s` seconds even while nothing moves (loading a model, a slow request)."""

    def __init__(self, name: str, total: int | None = None, info: str = "", interval_s=30.0):
        self.name, self.total, self.info = name, total, info
        self.completed = 0
        self.interval_s = interval_s
        self.started = self.printed_at = time.monotonic()
        self._tenth = 0  # the last tenth of the way a line was printed for
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> PlainLines:  # noqa: PYI034 - a final class, no Self needed
        with self._lock:
            self._print()
        self._beat.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._beat.join()

    def update(
        self, completed: int | None = None, total: int | None = None, info: str | None = None
    ) -> None:
        with self._lock:
            new_phase = (total is not None and total != self.total) or (
                completed is not None and completed < self.completed
            )
            self.total = total if total is not None else self.total
            self.completed = completed if completed is not None else self.completed
            self.info = info if info is not None else self.info
            tenth = self._tenths()
            if new_phase or tenth > self._tenth:
                self._tenth = tenth
                self._print()

    def line(self) -> str:
        """ "name: done/total (pct%) info [elapsed]" with whatever of it is known."""
        count = ""
        if self.total:
            count = f"{self.completed}/{self.total} ({100 * self.completed // self.total}%)"
        elif self.completed:
            count = str(self.completed)
        elapsed = int(time.monotonic() - self.started)
        when = f"[{elapsed // 60}m{elapsed % 60:02d}s]"
        return " ".join(filter(None, (f"{self.name}:", count, self.info, when)))

    def _tenths(self) -> int:
        return 10 * self.completed // self.total if self.total else 0

    def _print(self) -> None:  # under the lock
        # soft_wrap: one line in a log however long; markup off: model text may hold brackets
        console.print(self.line(), markup=False, highlight=False, soft_wrap=True)
        self.printed_at = time.monotonic()

    def _heartbeat(self) -> None:
        while True:
            with self._lock:
                due = self.printed_at + self.interval_s
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            with self._lock:
                if time.monotonic() >= self.printed_at + self.interval_s:
                    self._print()


@contextmanager
def stage_progress(
    name: str, total: int | None = None, info: str = ""
) -> Iterator[Callable[..., None]]:
    """One stage's progress: a rich bar on a terminal, PlainLines otherwise. Yields
    `update(completed=None, total=None, info=None)`; what is left None stays as it was."""
    if not console.is_terminal:
        with PlainLines(name, total, info) as lines:
            yield lines.update
        return
    with progress_bar() as bar:
        task = bar.add_task(name, total=total, info=info)

        def update(
            completed: int | None = None, total: int | None = None, info: str | None = None
        ) -> None:
            given = {"completed": completed, "total": total, "info": info}
            bar.update(task, **{k: v for k, v in given.items() if v is not None})

        yield update


# -- while a stage runs: each yields the progress callback its stage takes ---------------------
@contextmanager
def generate_progress(target: int) -> Iterator[Callable[[int, int, dict], None]]:
    with stage_progress("generate", target) as update:

        def progress(kept: int, target: int, info: dict) -> None:
            projected = info.get("projected_usd")
            parts = (
                f"requests {info['requests']}",
                cost_text(info["cost_usd"], info.get("estimated_usd", 0.0)),
                f"(~${projected:.4f} in all)" if projected is not None else "",
                f"cached {info['cache_hits']}",
                info.get("remote"),
            )
            update(completed=min(kept, target), info=" ".join(filter(None, parts)))

        yield progress


@contextmanager
def filter_progress() -> Iterator[Callable[[int, int], None]]:
    with stage_progress("filter", info="re-deciding the generated tasks") as update:

        def progress(done: int, total: int) -> None:
            update(completed=done, total=total)

        yield progress


@contextmanager
def capture_progress() -> Iterator[Callable[[int, int, str], None]]:
    with stage_progress("capture", info="the teacher scores the kept answers") as update:

        def progress(done: int, total: int, info: str) -> None:
            update(completed=done, total=total, info=info or None)

        yield progress


@contextmanager
def train_progress() -> Iterator[Callable[[int, int, float, float], None]]:
    with stage_progress("train", info="loading the student") as update:

        def progress(step: int, total: int, loss: float, tokens_per_s: float) -> None:
            info = f"loss {loss:.3f}  {tokens_per_s:.0f} tok/s"
            update(completed=step, total=total, info=info)

        yield progress


@contextmanager
def evaluate_progress() -> Iterator[Callable[[int, int, str], None]]:
    with stage_progress("evaluate") as update:

        def progress(done: int, total: int, label: str) -> None:
            update(completed=done, total=total, info=label)

        yield progress


def report_spinner():
    # A spinner, not a bar: on a large run the analyses (ROUGE-L novelty, the verb parse) take
    # seconds, in steps of unknown length.
    what = "describing the kept data and drawing the charts"
    if not console.is_terminal:
        return PlainLines("report", info=what)
    return console.status(f"report: {what}")


# -- a stage's outcome ---------------------------------------------------------------------------
def print_generated(result: GenerateResult) -> None:
    colour = "green" if result.status == "done" else "yellow"
    console.print(f"[{colour}]generate:[/] {result.message}", highlight=False)
    if result.cost_usd:
        cost = cost_text(result.cost_usd, result.estimated_usd)
        console.print(f"teacher cost of the run: {cost}", highlight=False)


def print_filtered(result: FilterResult) -> None:
    f, s = result.funnel, result.splits
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(f["rejected"].items(), key=lambda x: -x[1]))
    console.print(
        f"[green]filter:[/] {f['generated']} generated, {f['kept']} kept "
        f"(train {s['train']}, valid {s['valid']}, test {s['test']}); "
        f"rejected: {rejected or 'none'}",
        highlight=False,
    )


def print_captured(result: CaptureResult) -> None:
    per_token = f"{result.bytes_per_token:.0f}" if result.bytes_per_token else "-"
    figures = format_fields(result, "scored", "tokens_per_s", "seconds")
    console.print(
        f"[green]capture:[/] {result.captured} of {result.examples} examples captured (top "
        f"{result.top_k}, {result.tokens} answer tokens, {per_token} bytes a token)"
        + (f"; {figures}" if figures else ""),
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
    if result.outputs:  # AlpacaEval model_outputs, one file per model
        folder = Path(next(iter(result.outputs.values()))).parent
        console.print(f"[green]evaluate:[/] answers for alpaca_eval in {folder}", highlight=False)


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
def cost_text(cost_usd: float, estimated_usd: float = 0.0) -> str:
    """ "$0.0123", saying how much of it is an estimate (answers without the server's token
    counts, counted here)."""
    text = f"${cost_usd:.4f}"
    if estimated_usd:
        text += f" (${estimated_usd:.4f} of it estimated: answers without usage)"
    return text


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
