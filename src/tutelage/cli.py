"""The `tutelage` command: each stage alone, or all of them as `run`."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import __version__
from .config import Config, ConfigError, load_config
from .templating import TEMPLATE_DIR

app = typer.Typer(
    name="tutelage",
    help="Big language models teach small, cheap ones: generate a dataset with a teacher, filter "
    "it, fine-tune a student on it, evaluate and report.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console(stderr=True)
DEFAULT_CONFIG = TEMPLATE_DIR / "tutelage.yaml"
DEBUG = False  # --debug: tracebacks instead of one-line errors

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "-c",
        "--config",
        help="tutelage.yaml (default: the run folder's stored configuration, else the defaults).",
        dir_okay=False,
    ),
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir", "-r", help="The run folder (overrides run_dir in the config).", file_okay=False
    ),
]
TargetOpt = Annotated[int | None, typer.Option("--target", help="Kept tasks to stop at.")]
BudgetOpt = Annotated[
    float | None, typer.Option("--budget-usd", help="Hard cap on teacher spending.")
]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Training steps (overrides epochs).")
]


class Fail(Exception):
    """An error to print as one line, with an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


@contextmanager
def one_line_errors():
    """Bad input and failed stages end in one readable line and a non-zero exit, not a traceback."""
    from .model_files import ModelNotFound
    from .pipeline import RunError
    from .seeds import SeedError

    try:
        yield
    except Fail as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(e.code) from None
    except (ConfigError, SeedError, RunError, ModelNotFound) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print(
            "[yellow]interrupted[/]: everything finished so far is stored; rerun to resume"
        )
        raise typer.Exit(130) from None
    except Exception as e:  # a stage failed: one line, the details with --debug
        from .teachers.base import TeacherError

        if DEBUG or not isinstance(e, (ValueError, TeacherError, OSError, RuntimeError)):
            console.print_exception()
        console.print(f"[bold red]error:[/] {e}", highlight=False)
        raise typer.Exit(1) from None


def resolve_config(config: Path | None, run_dir: Path | None, **overrides) -> Config:
    """-c file if given, else the run folder's stored configuration, else the defaults."""
    from .pipeline import stored_config

    flat = {k: v for k, v in overrides.items() if v is not None}
    stored = stored_config(run_dir) if config is None and run_dir is not None else None
    cfg = load_config(config, flat, base=stored)
    if run_dir is not None:
        cfg.run_dir = run_dir
    return cfg


def _bar() -> Progress:
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


# -- stage runners shared by the stage commands and `run` ---------------------------------------
def do_generate(store, cfg: Config) -> dict:
    from .pipeline import generate_stage, generation_status, staged

    with _bar() as bar:
        task = bar.add_task("generate", total=cfg.generation.target, info="")

        def progress(kept: int, target: int, info: dict) -> None:
            projected = info.get("projected_usd")
            bar.update(
                task,
                completed=min(kept, target),
                info=" ".join(
                    filter(
                        None,
                        (
                            f"requests {info['requests']}  ${info['cost_usd']:.4f}",
                            f"(~${projected:.4f} in all)" if projected is not None else "",
                            f"cached {info['cache_hits']}",
                            info.get("remote"),
                        ),
                    )
                ),
            )

        detail = staged(
            store, "generate", lambda: generate_stage(store, cfg, progress), generation_status
        )
    colour = "green" if detail["stop_reason"] == "target" else "yellow"
    console.print(f"[{colour}]generate:[/] {detail['message']}", highlight=False)
    return detail


def do_filter(store, cfg: Config) -> dict:
    from .pipeline import filter_stage, staged

    detail = staged(store, "filter", lambda: filter_stage(store, cfg))
    f, s = detail["funnel"], detail["splits"]
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(f["rejected"].items(), key=lambda x: -x[1]))
    console.print(
        f"[green]filter:[/] {f['generated']} generated, {f['kept']} kept "
        f"(train {s['train']}, valid {s['valid']}, test {s['test']}); "
        f"rejected: {rejected or 'none'}",
        highlight=False,
    )
    return detail


def do_train(store, cfg: Config) -> dict:
    from .pipeline import staged, train_stage

    with _bar() as bar:
        task = bar.add_task("train", total=None, info="loading the student")

        def progress(step: int, total: int, loss: float, tokens_per_s: float) -> None:
            bar.update(
                task, completed=step, total=total, info=f"loss {loss:.3f}  {tokens_per_s:.0f} tok/s"
            )

        detail = staged(store, "train", lambda: train_stage(store, cfg, progress))
    console.print(
        f"[green]train:[/] {_fmt(detail, 'steps', 'train_loss', 'eval_loss', 'tokens_per_s', 'seconds')}",
        highlight=False,
    )
    if detail.get("gguf_error"):
        console.print(
            f"[yellow]warning:[/] no student.gguf: {detail['gguf_error']}", highlight=False
        )
    return detail


def do_evaluate(store, cfg: Config) -> dict:
    from .pipeline import evaluate_stage, staged

    with _bar() as bar:
        task = bar.add_task("evaluate", total=None, info="")

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, info=label)

        detail = staged(store, "evaluate", lambda: evaluate_stage(store, cfg, progress))
    print_evaluation(detail)
    console.print(f"[green]evaluate:[/] written {Path(cfg.run_dir) / 'evaluation.json'}")
    return detail


def _ci_text(ci: dict | None, percent: bool = False) -> str:
    if not ci or ci.get("mean") is None:
        return "-"
    scale, fmt = (100, "{:.0f}%") if percent else (1, "{:.3f}")
    return (
        f"{fmt.format(ci['mean'] * scale)} "
        f"[{fmt.format(ci['ci_low'] * scale)}, {fmt.format(ci['ci_high'] * scale)}]"
    )


def print_evaluation(summary: dict) -> None:
    """The headline figures, one table per set: answer metrics by model, judged win rates."""
    from rich.table import Table

    for name, s in summary["sets"].items():
        table = Table(title=f"{name} ({s['n_items']} items)", title_justify="left")
        table.add_column("metric")
        table.add_column("model")
        table.add_column("value [95% CI]", justify="right")
        for metric, by_role in s["metrics"].items():
            for role, ci in by_role.items():
                percent = metric in ("win_rate", "lc_win_rate", "rubric_acceptable")
                extra = f" ({ci['n_failed']} failed)" if ci.get("n_failed") else ""
                table.add_row(metric, role, _ci_text(ci, percent) + extra)
        console.print(table)
    for note in summary.get("notes", []):
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def print_comparison(result: dict) -> None:
    from rich.table import Table

    a, b = result["runs"]
    for name, s in result["sets"].items():
        table = Table(title=f"{name}: {s['n_items']} items in both", title_justify="left")
        for col in ("metric", f"A {a}", f"B {b}", "B - A [95% CI]"):
            table.add_column(col, justify="right" if col != "metric" else "left")
        for metric, v in s["metrics"].items():
            table.add_row(metric, _ci_text(v["a"]), _ci_text(v["b"]), _ci_text(v["delta"]))
        for pair, v in s["win_rates"].items():
            table.add_row(f"win_rate {pair}", _ci_text(v["a"], True), _ci_text(v["b"], True), "")
        console.print(table)


def do_report(store, cfg: Config) -> dict:
    from .pipeline import report_stage, staged

    # A spinner: on a large run the analyses (ROUGE-L novelty, the verb parse) take seconds.
    with console.status("report: describing the kept data and drawing the charts"):
        detail = staged(store, "report", lambda: report_stage(store, cfg))
    console.print(f"[green]report:[/] {detail['html']}  {detail['markdown']}")
    return detail


def _fmt(d: dict, *keys: str) -> str:
    parts = []
    for k in keys:
        v = d.get(k)
        if v is not None:
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def _open(cfg: Config):
    from .pipeline import open_run

    return open_run(cfg)


def launched_rank() -> int:
    """This process's rank under `accelerate launch` / `torchrun` (0 alone)."""
    return int(os.environ.get("RANK", "0"))


def run_all(cfg: Config) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Fail(
            "several processes: launch only `tutelage train` under accelerate or torchrun, "
            "and the other stages in one process",
            2,
        )
    store = _open(cfg)
    timings = {}
    try:
        for name, fn in (
            ("generate", do_generate),
            ("filter", do_filter),
            ("train", do_train),
            ("evaluate", do_evaluate),
            ("report", do_report),
        ):
            t = time.perf_counter()
            detail = fn(store, cfg)
            timings[name] = time.perf_counter() - t
            if name == "generate" and detail["kept"] == 0:
                raise Fail("generation kept no task: nothing to train on (see the message above)")
    finally:
        if timings:
            console.print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
        store.close()
    console.print(
        f"[bold green]done:[/] {cfg.run_dir}/report.html, the student in {cfg.run_dir}/student"
    )


# -- commands ----------------------------------------------------------------------------------
@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write tutelage.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    launchers: Annotated[
        bool,
        typer.Option(
            "--launchers",
            help="Also write accelerate configurations for DDP, FSDP and DeepSpeed ZeRO-3 to DIRECTORY/accelerate/.",
        ),
    ] = False,
):
    """Write a commented tutelage.yaml with working defaults.

    Examples: [cyan]tutelage init myproject && tutelage run -c myproject/tutelage.yaml[/];
    [cyan]tutelage init myproject --launchers[/] (then see docs/training.md)
    """
    with one_line_errors():
        files = {directory / "tutelage.yaml": DEFAULT_CONFIG}
        if launchers:
            files |= {
                directory / "accelerate" / f.name: f
                for f in sorted((TEMPLATE_DIR / "accelerate").glob("*.yaml"))
            }
        for target in files:
            if target.exists() and not force:
                raise Fail(f"{target}: already exists (use --force to overwrite)", 2)
        for target, source in files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
            console.print(f"wrote {target}")


@app.command()
def run(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    target: TargetOpt = None,
    budget_usd: BudgetOpt = None,
    max_steps: MaxStepsOpt = None,
):
    """Run every stage: generate, filter, train, evaluate, report. On an existing run folder it
    resumes where it stopped, paying for no stored teacher answer twice.

    Example: [cyan]tutelage run -c tutelage.yaml --run-dir runs/first[/]
    """
    with one_line_errors():
        run_all(
            resolve_config(
                config,
                run_dir,
                **{
                    "generation.target": target,
                    "generation.budget_usd": budget_usd,
                    "training.max_steps": max_steps,
                },
            )
        )


@app.command()
def demo(
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", file_okay=False)] = Path("runs/demo"),
    target: TargetOpt = None,
    max_steps: MaxStepsOpt = None,
):
    """Run everything on the embedded default: SmolLM2-135M-Instruct teaches Gemma-3-270M.

    Example: [cyan]tutelage demo --run-dir runs/demo[/]
    """
    with one_line_errors():
        run_all(
            resolve_config(
                DEFAULT_CONFIG,
                run_dir,
                **{"generation.target": target, "training.max_steps": max_steps},
            )
        )


@app.command()
def generate(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    target: TargetOpt = None,
    budget_usd: BudgetOpt = None,
    explain: Annotated[
        Path | None,
        typer.Option(
            "--explain",
            help="Ask nothing: print where RUN's generated tasks went, by "
            "reason code, with an example of each.",
            metavar="RUN",
            file_okay=False,
        ),
    ] = None,
):
    """Ask the teacher for new tasks until enough pass the filter (or the budget ends).

    Examples: [cyan]tutelage generate -c tutelage.yaml --target 500[/];
    [cyan]tutelage generate --explain runs/first[/]
    """
    with one_line_errors():
        if explain is not None:
            print_explanation(explain)
            return
        cfg = resolve_config(
            config, run_dir, **{"generation.target": target, "generation.budget_usd": budget_usd}
        )
        with _open(cfg) as store:
            do_generate(store, cfg)


def print_explanation(run: Path) -> None:
    from .generate.explain import explain
    from .store import Store

    if not (run / "tutelage.db").exists():
        raise Fail(f"{run}: not a run folder (no tutelage.db)", 2)
    with Store(run) as store:
        for line in explain(store):
            print(line)  # plain: the examples are model text, not rich markup


@app.command("filter")
def filter_cmd(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="ROUGE-L threshold.")
    ] = None,
):
    """Re-decide every generated task with the current filter settings and split the kept ones.

    Example: [cyan]tutelage filter --run-dir runs/first --threshold 0.6[/]
    """
    with one_line_errors():
        cfg = resolve_config(config, run_dir, **{"filter.rouge_threshold": threshold})
        with _open(cfg) as store:
            do_filter(store, cfg)


@app.command()
def train(config: ConfigOpt = None, run_dir: RunDirOpt = None, max_steps: MaxStepsOpt = None):
    """Fine-tune the student on the kept training split (LoRA by default).

    Examples: [cyan]tutelage train --run-dir runs/first --max-steps 100[/];
    on 8 GPUs: [cyan]accelerate launch --config_file configs/accelerate/fsdp.yaml -m tutelage train --run-dir runs/first[/]
    """
    with one_line_errors():
        cfg = resolve_config(config, run_dir, **{"training.max_steps": max_steps})
        if launched_rank() > 0:  # one of several processes: the main one reports and records
            from .pipeline import train_stage
            from .store import Store

            with Store(cfg.run_dir) as store:
                train_stage(store, cfg)
            return
        with _open(cfg) as store:
            do_train(store, cfg)


@app.command()
def evaluate(
    run: Annotated[Path | None, typer.Argument(help="The run folder.", file_okay=False)] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    sets: Annotated[
        list[Path] | None,
        typer.Option(
            "--set",
            help='An evaluation file (repeatable): Self-Instruct JSONL, Alpaca JSON or {"instruction"} rows.',
        ),
    ] = None,
    rubric: Annotated[
        bool | None,
        typer.Option(
            "--rubric/--no-rubric", help="Also grade every answer A-D (Self-Instruct's scale)."
        ),
    ] = None,
    teacher: Annotated[
        bool | None,
        typer.Option(
            "--teacher/--no-teacher",
            help="Have the teacher answer too (and judge tuned vs teacher).",
        ),
    ] = None,
    compare: Annotated[
        tuple[Path, Path] | None,
        typer.Option(
            "--compare",
            help="Compare two evaluated runs item by item instead.",
            metavar="RUN_A RUN_B",
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="With --compare: also write the comparison as JSON."),
    ] = None,
):
    """Answer evaluation sets with the base and the tuned student (and the teacher); score ROUGE-L
    and reference NLL, judge answers in pairs (both orders), all with bootstrap 95% intervals.

    Examples: [cyan]tutelage evaluate runs/first --set ../shared/data/alpaca-eval-805.jsonl[/];
    [cyan]tutelage evaluate --compare runs/first runs/second[/]
    """
    with one_line_errors():
        if compare:
            from .evaluate.compare import compare_runs

            for folder in compare:
                if not (folder / "tutelage.db").exists():
                    raise Fail(f"{folder}: not a run folder (no tutelage.db)", 2)
            result = compare_runs(*compare)
            print_comparison(result)
            if output:
                output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
            return
        cfg = resolve_config(
            config,
            run_dir or run,
            **{"evaluation.rubric": rubric, "evaluation.include_teacher": teacher},
        )
        if sets:
            cfg.evaluation.sets = [*cfg.evaluation.sets, *sets]
        with _open(cfg) as store:
            do_evaluate(store, cfg)


@app.command()
def report(
    run: Annotated[Path | None, typer.Argument(help="The run folder.")] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
):
    """Write RUN/report.html (self-contained) and RUN/report.md.

    Example: [cyan]tutelage report runs/first[/]
    """
    with one_line_errors():
        cfg = resolve_config(config, run_dir or run)
        with _open(cfg) as store:
            do_report(store, cfg)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="The run folder.", file_okay=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="File or folder to write.")],
    format: Annotated[str, typer.Option("--format", "-f", help="alpaca | jsonl | hf")] = "alpaca",
    model: Annotated[
        bool, typer.Option("--model", help="Export the trained student instead.")
    ] = False,
    gguf: Annotated[
        str | None,
        typer.Option(
            "--gguf",
            help="With --model: also write OUTPUT.gguf (f32, f16, bf16 or q8_0) for llama.cpp / Ollama.",
        ),
    ] = None,
):
    """Write the kept dataset (Alpaca JSON, JSONL, or a `datasets` folder) or the trained student
    (a plain HF folder, LoRA merged).

    Examples: [cyan]tutelage export runs/first --format jsonl -o data.jsonl[/];
    [cyan]tutelage export runs/first --model -o student/ --gguf q8_0[/]
    """
    from .export import export_data, export_model
    from .gguf import gguf_path

    with one_line_errors():
        if not (run / "tutelage.db").exists():
            raise Fail(f"{run}: not a run folder (no tutelage.db)", 2)
        if gguf is not None and not model:
            raise Fail("--gguf: only with --model", 2)
        if model:
            from .gguf import OUTTYPES

            if gguf is not None and gguf not in OUTTYPES:
                raise Fail(f"--gguf: {gguf!r} is not one of {', '.join(OUTTYPES)}", 2)
            path = export_model(run, output, gguf=gguf)
            console.print(
                f"wrote the student to {path}" + (f" and {gguf_path(path)}" if gguf else "")
            )
            return
        if format not in ("alpaca", "jsonl", "hf"):
            raise Fail(f"--format: {format!r} is not one of alpaca, jsonl, hf", 2)
        n = export_data(run, format, output)
        console.print(f"wrote {n} examples to {output}")


@app.command()
def dedup(
    input: Annotated[
        Path,
        typer.Argument(
            help='JSONL or JSON: Alpaca, Self-Instruct or {"instruction"} rows.', dir_okay=False
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The kept rows, unchanged, in input order.")
    ],
    threshold: Annotated[
        float, typer.Option("--threshold", help="Keep iff ROUGE-L <= this.")
    ] = 0.7,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="Rows that fill the pool first (e.g. seeds)."),
    ] = None,
    rejected: Annotated[
        Path | None,
        typer.Option("--rejected", help="Write rejected rows with their nearest kept row."),
    ] = None,
    unicode: Annotated[
        bool, typer.Option("--unicode", help="Tokenize non-English text too.")
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Processes to share the work (same output).")
    ] = 1,
):
    """Drop near-duplicate instructions with the exact ROUGE-L novelty filter of Self-Instruct.

    Example: [cyan]tutelage dedup pool.jsonl -o novel.jsonl --against seeds.jsonl --rejected dup.jsonl[/]
    """
    from .filter import dedup_file

    with one_line_errors():
        try:
            s = dedup_file(
                input,
                output,
                threshold=threshold,
                against=against,
                rejected_path=rejected,
                unicode=unicode,
                workers=workers,
            )
        except ValueError as e:
            raise Fail(str(e), 2) from None
        console.print(f"read {s.read}, kept {s.kept}, rejected {s.rejected} in {s.seconds:.2f}s")


@app.callback(invoke_without_command=True)
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    global DEBUG
    DEBUG = debug
    if version:
        print(__version__)
        raise typer.Exit()


if __name__ == "__main__":
    app()
