"""The `tutelage` command: each stage alone, or all of them as `run`.

Only the commands and their options live here; what they show is in `display`. Anything that pulls
in a model library (torch, transformers, matplotlib) is imported inside the command that needs it,
so `tutelage --help` and a mistyped option answer at once.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from . import __version__
from .display import (
    capture_progress,
    console,
    evaluate_progress,
    filter_progress,
    generate_progress,
    print_captured,
    print_comparison,
    print_evaluated,
    print_explanation,
    print_filtered,
    print_generated,
    print_reported,
    print_trained,
    report_spinner,
    train_progress,
)
from .templating import TEMPLATE_DIR

if TYPE_CHECKING:
    from .config import Config
    from .stage_results import (
        CaptureResult,
        EvaluateResult,
        FilterResult,
        GenerateResult,
        ReportResult,
        TrainResult,
    )
    from .store import Store

app = typer.Typer(
    name="tutelage",
    help="Big language models teach small, cheap ones: generate a dataset with a teacher, filter "
    "it, fine-tune a student on it, evaluate and report.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
DEFAULT_CONFIG = TEMPLATE_DIR / "tutelage.yaml"
DEBUG_KEY = "tutelage.debug"  # ctx.meta key of --debug: tracebacks instead of one-line errors

# -- options shared by several commands ----------------------------------------------------------
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
RunArg = Annotated[Path | None, typer.Argument(help="The run folder.", file_okay=False)]
TargetOpt = Annotated[int | None, typer.Option("--target", help="Kept tasks to stop at.")]
BudgetOpt = Annotated[
    float | None, typer.Option("--budget-usd", help="Hard cap on teacher spending.")
]
MaxStepsOpt = Annotated[
    int | None, typer.Option("--max-steps", help="Training steps (overrides epochs).")
]
ReportToOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--report-to",
        help="Log training to this tracker (repeatable): tensorboard, wandb, mlflow, trackio.",
    ),
]


class Fail(Exception):
    """An error to print as one line, with an exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# A decorator on every command rather than the app callback: the callback returns before the
# command runs, so the command's exceptions never pass through it.
# Commands that load no configuration, run or model: they import only what they use (`tutelage
# dedup` is a plain file filter, and its whole run is timed).
PLAIN_COMMANDS = frozenset({"dedup"})
# Bad input, reported as one line with exit code 2: each module's own error, by module.
BAD_INPUT = {
    "config": "ConfigError",
    "seeds": "SeedError",
    "pipeline": "RunError",
    "model_files": "ModelNotFound",
}


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The bad-input errors of the modules imported so far: one never imported raised none."""
    modules = (sys.modules.get(f"{__package__}.{name}") for name in BAD_INPUT)
    return tuple(
        getattr(module, error)
        for module, error in zip(modules, BAD_INPUT.values(), strict=True)
        if module is not None
    )


def one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Bad input and failed stages end in one readable line and a non-zero exit, not a traceback."""

    @functools.wraps(command)
    def run_command(*args, ctx: typer.Context, **kwargs) -> None:
        if command.__name__ not in PLAIN_COMMANDS:
            # Here, not at the top: `--help` does without it. Its import quiets the model
            # libraries' progress bars and warnings before any stage loads one.
            from . import pipeline  # noqa: F401

        try:
            command(*args, **kwargs)
        except Fail as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(e.code) from None
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted[/]: everything finished so far is stored; rerun to resume"
            )
            raise typer.Exit(130) from None
        # The command's outermost boundary, so every error must end here.
        except Exception as e:  # noqa: BLE001 - one line, the details with --debug
            if isinstance(e, bad_input_errors()):
                console.print(f"[bold red]error:[/] {e}", highlight=False)
                raise typer.Exit(2) from None
            from .teachers.base import TeacherError

            debug = ctx.meta.get(DEBUG_KEY, False)
            if debug or not isinstance(e, (ValueError, TeacherError, OSError, RuntimeError)):
                console.print_exception()
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(1) from None

    # typer reads the options from this signature, and passes the context (which holds --debug)
    # to a parameter annotated typer.Context: the command's own parameters, plus `ctx`.
    options = inspect.signature(command, eval_str=True)
    context = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    run_command.__signature__ = options.replace(parameters=[*options.parameters.values(), context])
    return run_command


def resolve_config(config: Path | None, run_dir: Path | None, **overrides) -> Config:
    """-c file if given, else the run folder's stored configuration, else the defaults."""
    from .config import load_config
    from .pipeline import stored_config

    flat = {k: v for k, v in overrides.items() if v is not None}
    stored = stored_config(run_dir) if config is None and run_dir is not None else None
    cfg = load_config(config, flat, base=stored)
    if run_dir is not None:
        cfg.run_dir = run_dir
    return cfg


def open_run(cfg: Config) -> Store:
    from .pipeline import open_run

    return open_run(cfg)


def require_run_folder(folder: Path) -> None:
    """One line and exit 2, creating nothing, unless `folder` holds a run."""
    from .pipeline import require_run

    require_run(folder)


def require_price(cfg: Config) -> None:
    """A budget with a hosted model of unknown price refuses to start (one line, exit 2)."""
    from .teachers.prices import require_price

    require_price(cfg)


def launched_rank() -> int:
    """This process's rank under `accelerate launch` / `torchrun` (0 alone)."""
    return int(os.environ.get("RANK", "0"))


# -- stage runners shared by the stage commands and `run` ---------------------------------------
def do_generate(store: Store, cfg: Config) -> GenerateResult:
    from .pipeline import generate_stage, staged

    with generate_progress(cfg.generation.target) as progress:
        result = staged(store, "generate", lambda: generate_stage(store, cfg, progress))
    print_generated(result)
    return result


def do_filter(store: Store, cfg: Config) -> FilterResult:
    from .pipeline import filter_stage, staged

    with filter_progress() as progress:
        result = staged(store, "filter", lambda: filter_stage(store, cfg, progress))
    print_filtered(result)
    return result


def do_capture(store: Store, cfg: Config) -> CaptureResult:
    from .pipeline import capture_stage, staged

    with capture_progress() as progress:
        result = staged(store, "capture", lambda: capture_stage(store, cfg, progress))
    print_captured(result)
    return result


def do_train(store: Store, cfg: Config) -> TrainResult:
    from .pipeline import staged, train_stage

    with train_progress() as progress:
        result = staged(store, "train", lambda: train_stage(store, cfg, progress))
    print_trained(result)
    return result


def do_evaluate(store: Store, cfg: Config) -> EvaluateResult:
    from .pipeline import evaluate_stage, staged, trained_student

    if trained_student(cfg.run_dir) is None:  # said at once: the stage takes minutes
        who = "the base model" + (" and the teacher" if cfg.evaluation.include_teacher else "")
        console.print(
            f"[yellow]note:[/] no trained student in {cfg.run_dir}/student yet: evaluating {who} "
            "only (train first to compare the tuned student)",
            highlight=False,
        )
    with evaluate_progress() as progress:
        result = staged(store, "evaluate", lambda: evaluate_stage(store, cfg, progress))
    print_evaluated(result, Path(cfg.run_dir) / "evaluation.json")
    return result


def do_report(store: Store, cfg: Config) -> ReportResult:
    from .pipeline import report_stage, staged

    with report_spinner():
        result = staged(store, "report", lambda: report_stage(store, cfg))
    print_reported(result)
    return result


def run_all(cfg: Config) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Fail(
            "several processes: launch only `tutelage train` under accelerate or torchrun, "
            "and the other stages in one process",
            2,
        )
    require_price(cfg)
    store = open_run(cfg)
    timings = {}
    try:
        # The teacher's distributions are captured only for distillation (training.distill).
        capture = [("capture", do_capture)] if cfg.training.distill is not None else []
        for name, fn in (
            ("generate", do_generate),
            ("filter", do_filter),
            *capture,
            ("train", do_train),
            ("evaluate", do_evaluate),
            ("report", do_report),
        ):
            t = time.perf_counter()
            result = fn(store, cfg)
            timings[name] = time.perf_counter() - t
            if name == "generate" and result.kept == 0:
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
@one_line_errors
def init(
    directory: Annotated[Path, typer.Argument(help="Where to write tutelage.yaml.")] = Path("."),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    launchers: Annotated[
        bool,
        typer.Option(
            "--launchers",
            help="Also write accelerate configurations for DDP, FSDP and DeepSpeed ZeRO-3 to "
            "DIRECTORY/accelerate/.",
        ),
    ] = False,
):
    """Write a commented tutelage.yaml with working defaults.

    Examples: [cyan]tutelage init myproject && tutelage run -c myproject/tutelage.yaml[/];
    [cyan]tutelage init myproject --launchers[/] (then see docs/training.md)
    """
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
@one_line_errors
def run(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    target: TargetOpt = None,
    budget_usd: BudgetOpt = None,
    max_steps: MaxStepsOpt = None,
    report_to: ReportToOpt = None,
):
    """Run every stage: generate, filter, capture (only with training.distill), train, evaluate,
    report. On an existing run folder it resumes where it stopped, paying for no stored teacher
    answer twice.

    Example: [cyan]tutelage run -c tutelage.yaml --run-dir runs/first[/]
    """
    overrides = {
        "generation.target": target,
        "generation.budget_usd": budget_usd,
        "training.max_steps": max_steps,
        "training.report_to": report_to,
    }
    run_all(resolve_config(config, run_dir, **overrides))


@app.command()
@one_line_errors
def demo(
    run_dir: Annotated[Path, typer.Option("--run-dir", "-r", file_okay=False)] = Path("runs/demo"),
    target: TargetOpt = None,
    max_steps: MaxStepsOpt = None,
):
    """Run everything on the embedded default: SmolLM2-135M-Instruct teaches Gemma-3-270M.

    Example: [cyan]tutelage demo --run-dir runs/demo[/]
    """
    overrides = {"generation.target": target, "training.max_steps": max_steps}
    run_all(resolve_config(DEFAULT_CONFIG, run_dir, **overrides))


@app.command()
@one_line_errors
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
    if explain is not None:
        from .store import Store

        require_run_folder(explain)
        with Store(explain) as store:
            print_explanation(store)
        return
    overrides = {"generation.target": target, "generation.budget_usd": budget_usd}
    cfg = resolve_config(config, run_dir, **overrides)
    require_price(cfg)
    with open_run(cfg) as store:
        do_generate(store, cfg)


@app.command("filter")
@one_line_errors
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
    cfg = resolve_config(config, run_dir, **{"filter.rouge_threshold": threshold})
    with open_run(cfg) as store:
        do_filter(store, cfg)


@app.command()
@one_line_errors
def capture(run: RunArg = None, config: ConfigOpt = None, run_dir: RunDirOpt = None):
    """Have the teacher score every kept answer and store its top-k next-token log-probs, for
    distillation (training.distill). Scores only what is not stored yet.

    Example: [cyan]tutelage capture runs/first[/]
    """
    cfg = resolve_config(config, run_dir or run)
    if cfg.training.distill is None:
        raise Fail(
            "training.distill is not set: there is nothing to capture (set training.distill, "
            "e.g. {loss: forward_kl}, in the configuration)",
            2,
        )
    require_price(cfg)
    with open_run(cfg) as store:
        do_capture(store, cfg)


@app.command()
@one_line_errors
def train(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    max_steps: MaxStepsOpt = None,
    report_to: ReportToOpt = None,
):
    """Fine-tune the student on the kept training split (LoRA by default).

    Examples: [cyan]tutelage train --run-dir runs/first --max-steps 100[/];
    on 8 GPUs: [cyan]accelerate launch --config_file configs/accelerate/fsdp.yaml -m tutelage \\
    train --run-dir runs/first[/]
    """
    overrides = {"training.max_steps": max_steps, "training.report_to": report_to}
    cfg = resolve_config(config, run_dir, **overrides)
    if launched_rank() > 0:  # one of several processes: the main one reports and records
        from .pipeline import train_stage
        from .store import Store

        with Store(cfg.run_dir) as store:
            train_stage(store, cfg)
        return
    with open_run(cfg) as store:
        do_train(store, cfg)


@app.command()
@one_line_errors
def evaluate(
    run: RunArg = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    sets: Annotated[
        list[Path] | None,
        typer.Option(
            "--set",
            help="An evaluation file (repeatable): Self-Instruct JSONL, Alpaca JSON, "
            '{"instruction"} rows, or IFEval JSONL (key, prompt, instruction_id_list, kwargs).',
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
    if compare:
        from .evaluate.compare import compare_runs

        for folder in compare:
            require_run_folder(folder)
        comparison = compare_runs(*compare)
        print_comparison(comparison)
        if output:
            output.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
        return
    overrides = {"evaluation.rubric": rubric, "evaluation.include_teacher": teacher}
    cfg = resolve_config(config, run_dir or run, **overrides)
    require_run_folder(Path(cfg.run_dir))
    if sets:
        cfg.evaluation.sets = [*cfg.evaluation.sets, *sets]
    require_price(cfg)
    with open_run(cfg) as store:
        do_evaluate(store, cfg)


@app.command()
@one_line_errors
def report(
    run: Annotated[Path | None, typer.Argument(help="The run folder.")] = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
):
    """Write RUN/report.html (self-contained) and RUN/report.md.

    Example: [cyan]tutelage report runs/first[/]
    """
    cfg = resolve_config(config, run_dir or run)
    require_run_folder(Path(cfg.run_dir))
    with open_run(cfg) as store:
        do_report(store, cfg)


@app.command()
@one_line_errors
def export(
    run: Annotated[Path, typer.Argument(help="The run folder.", file_okay=False)],
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="File or folder to write (with --push-to-hub: the folder prepared for upload, "
            "default RUN/hub).",
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="alpaca | jsonl | hf")] = "alpaca",
    model: Annotated[
        bool, typer.Option("--model", help="Export the trained student instead.")
    ] = False,
    gguf: Annotated[
        str | None,
        typer.Option(
            "--gguf",
            help="With --model: also write OUTPUT.gguf (f32, f16, bf16 or q8_0) for llama.cpp / "
            "Ollama.",
        ),
    ] = None,
    push_to_hub: Annotated[
        str | None,
        typer.Option(
            "--push-to-hub",
            help="Publish the student (with a model card written from the run) as the Hub model "
            "REPO and the kept dataset as the Hub dataset REPO; the token is huggingface_hub's "
            "(HF_TOKEN or `hf auth login`).",
            metavar="REPO",
        ),
    ] = None,
    private: Annotated[
        bool, typer.Option("--private", help="With --push-to-hub: private repositories.")
    ] = False,
):
    """Write the kept dataset (Alpaca JSON, JSONL, or a `datasets` folder) or the trained student
    (a plain HF folder, LoRA merged).

    Examples: [cyan]tutelage export runs/first --format jsonl -o data.jsonl[/];
    [cyan]tutelage export runs/first --model -o student/ --gguf q8_0[/];
    [cyan]tutelage export runs/first --push-to-hub me/my-student --private[/]
    """
    from .export import export_data, export_model
    from .gguf import OUTTYPES, gguf_path

    require_run_folder(run)
    if push_to_hub is not None:
        from .hub import check_repo_id, prepare_upload, upload

        if model or gguf is not None:
            raise Fail("--push-to-hub: publishes both the student and the dataset; drop --model", 2)
        try:
            check_repo_id(push_to_hub)
        except ValueError as e:
            raise Fail(str(e), 2) from None
        folder = prepare_upload(run, push_to_hub, output)
        visibility = "private" if private else "public"
        console.print(f"prepared {folder}; uploading to {push_to_hub} ({visibility})")
        urls = upload(folder, push_to_hub, private)
        console.print(f"published the student at {urls['model']} and the data at {urls['dataset']}")
        return
    if private:
        raise Fail("--private: only with --push-to-hub", 2)
    if output is None:
        raise Fail("-o/--output: required (the file or folder to write)", 2)
    if gguf is not None and not model:
        raise Fail("--gguf: only with --model", 2)
    if model:
        if gguf is not None and gguf not in OUTTYPES:
            raise Fail(f"--gguf: {gguf!r} is not one of {', '.join(OUTTYPES)}", 2)
        path = export_model(run, output, gguf=gguf)
        console.print(f"wrote the student to {path}" + (f" and {gguf_path(path)}" if gguf else ""))
        return
    if format not in ("alpaca", "jsonl", "hf"):
        raise Fail(f"--format: {format!r} is not one of alpaca, jsonl, hf", 2)
    n = export_data(run, format, output)
    console.print(f"wrote {n} examples to {output}")


@app.command()
@one_line_errors
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

    Example: [cyan]tutelage dedup pool.jsonl -o novel.jsonl --against seeds.jsonl \\
    --rejected dup.jsonl[/]
    """
    from .filter import dedup_file

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


def collect_less_often() -> None:
    """Run the cycle collector after 50,000 new objects, not Python's 700. The teacher client
    keeps thousands of requests alive at once, and at 700 the collector walks them over and over:
    at 256 in flight it took a tenth of the time, and each of its full passes held the event loop
    up to 0.1 s, every answer waiting meanwhile (docs/benchmarks.md, "Teachers"). Reference
    counting still frees everything without cycles at once."""
    gc.set_threshold(50_000, 10, 10)


@app.callback(invoke_without_command=True)
def main(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    ctx.meta[DEBUG_KEY] = debug  # meta is shared with the command's own context
    collect_less_often()
    if version:
        print(__version__)
        raise typer.Exit()


if __name__ == "__main__":
    app()
