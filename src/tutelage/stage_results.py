"""What each stage returns, declared once: the CLI prints these fields, the store keeps them as the
stage's detail (`stages.detail_json`), and the report reads them back.

Every field has a default, so a detail row written by an older tutelage (keys missing, or keys
since dropped) still loads: unknown keys are ignored, missing ones take their default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The stages of `tutelage run`, in order.
PIPELINE = ("generate", "filter", "capture", "train", "evaluate", "report")


@dataclass
class StageResult:
    stage: ClassVar[str] = ""

    @property
    def status(self) -> str:
        """The stage's outcome as the store records it."""
        return "done"

    @property
    def note(self) -> str:
        """One line for a table of stages."""
        return ""

    def to_detail(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_detail(cls, detail: dict[str, Any]) -> StageResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in detail.items() if k in names})


@dataclass
class GenerateResult(StageResult):
    stage: ClassVar[str] = "generate"
    kept: int = 0
    target: int = 0
    requests: int = 0  # main requests ingested in total, this run and earlier ones
    new_requests: int = 0  # main requests ingested by this call
    # target, exhausted (nothing more to ask), budget, stalled, max_requests
    stop_reason: str = ""
    message: str = ""
    cost_usd: float = 0.0
    # Of cost_usd, what answers without the server's token counts cost (counted here: estimated).
    estimated_usd: float = 0.0
    funnel: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "done" if self.stop_reason in ("target", "exhausted") else "stopped"

    @property
    def note(self) -> str:
        return self.message


@dataclass
class FilterResult(StageResult):
    stage: ClassVar[str] = "filter"
    funnel: dict = field(default_factory=dict)  # Store.funnel(): generated, kept, rejected
    splits: dict = field(default_factory=dict)  # train, valid, test: kept tasks in each


@dataclass
class CaptureResult(StageResult):
    """The teacher's top-k distributions over the kept answers (training.distill only)."""

    stage: ClassVar[str] = "capture"
    teacher: str = ""  # backend and model
    top_k: int = 0
    examples: int = 0  # kept examples (train, valid and test)
    captured: int = 0  # of them, with a capture stored
    scored: int = 0  # scored by this call (the others were stored already)
    tokens: int = 0  # answer tokens stored
    bytes: int = 0  # of arrays stored
    bytes_per_token: float | None = None
    scored_tokens: int = 0  # answer tokens scored by this call
    tokens_per_s: float | None = None  # answer tokens scored a second, this call
    seconds: float | None = None
    cost_usd: float = 0.0  # spent on scoring by this call

    @property
    def note(self) -> str:
        return f"{self.captured} of {self.examples} examples, top {self.top_k}"


@dataclass
class TrainResult(StageResult):
    stage: ClassVar[str] = "train"
    run_id: int | None = None
    output_dir: str | None = None
    reused: bool = False  # a finished identical run was returned as it was
    steps: int | None = None
    useful_tokens: int | None = None  # response tokens that carried the loss
    tokens_per_s: float | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    packed: bool | None = None
    train_loss: float | None = None
    train_loss_avg: float | None = None
    eval_loss: float | None = None
    eval_loss_first: float | None = None
    train_examples: int | None = None
    valid_examples: int | None = None
    dropped_examples: int | None = None
    truncated_examples: int | None = None
    processes: int | None = None
    engine: str | None = None
    gguf_type: str | None = None
    gguf: str | None = None  # RUN/student.gguf, when written
    gguf_error: str | None = None  # why it was not

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], **extra: Any) -> TrainResult:
        return cls.from_detail({**metrics, **extra})  # type: ignore[return-value]


@dataclass
class EvaluateResult(StageResult):
    stage: ClassVar[str] = "evaluate"
    models: dict = field(default_factory=dict)  # role -> model path or label
    notes: list = field(default_factory=list)
    judge: str | None = None
    judge_mode: str | None = None  # "logprobs" or "text" (evaluation.judge_mode, resolved)
    pairs: list = field(default_factory=list)  # judged pairs, e.g. ["tuned", "base"]
    # set name -> {"n_items", "metrics": {metric: {role: ci}}, ...}
    sets: dict = field(default_factory=dict)
    # role -> RUN/eval/ROLE.json, the answers as AlpacaEval model_outputs
    outputs: dict = field(default_factory=dict)


@dataclass
class ReportResult(StageResult):
    stage: ClassVar[str] = "report"
    markdown: str = ""
    html: str = ""


@dataclass
class StageFailed(StageResult):
    """What a failed or interrupted stage leaves: its error, as one line."""

    error: str = ""

    @property
    def status(self) -> str:
        return "failed"

    @property
    def note(self) -> str:
        return self.error


RESULTS: dict[str, type[StageResult]] = {
    cls.stage: cls
    for cls in (
        GenerateResult,
        FilterResult,
        CaptureResult,
        TrainResult,
        EvaluateResult,
        ReportResult,
    )
}


def result_from_detail(stage: str, status: str, detail: dict[str, Any]) -> StageResult:
    """The declared result of a stored stage row (`status` is the row's own)."""
    if status == "failed" or (set(detail) == {"error"}):
        return StageFailed(error=str(detail.get("error", "")))
    cls = RESULTS.get(stage)
    return cls.from_detail(detail) if cls else StageResult()
