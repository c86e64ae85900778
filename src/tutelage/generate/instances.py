"""Self-Instruct's instances: reading them out of the teacher's answer, and their filters.

Two answer formats, as the paper asks for them: input-first ("Example 1 / <input> / Output: ..."
or a lone "Output: ..." when the task takes no input) and output-first for classification tasks
("Class label: ..." then the input that has that label).

The filters (the paper's step d), each leaving a reason code on what it rejects:
parse_error, length_truncated (the teacher stopped mid-instance: the last one is cut),
the quality rules' instance codes (empty_output, input_equals_output, ...), output_ends_with_colon
and input_ends_with_colon (such text announces content that never came), conflicting_outputs (the
same input with different outputs: every instance of the task goes, as in the paper),
duplicate_instance, over_instance_limit (the paper keeps at most 5 a task; we keep the first 5,
where it samples 5 at random).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..filter.quality import QualityRules, output_ends_with_colon

# Reason codes the instance step adds to the shared vocabulary.
INSTANCE_CODES = (
    "input_ends_with_colon",
    "conflicting_outputs",
    "duplicate_instance",
    "over_instance_limit",
    "no_valid_instances",
)

_EXAMPLE = re.compile(r"^[ \t*#]*example[ \t]*\d*[ \t]*[.:)]?[ \t*]*", re.IGNORECASE | re.MULTILINE)
_OUTPUT = re.compile(
    r"^[ \t*#]*output[ \t]*\d*[ \t]*\**[ \t]*:[ \t*]*", re.IGNORECASE | re.MULTILINE
)
_INPUT_LABEL = re.compile(r"^[ \t*#]*input[ \t]*\d*[ \t]*\**[ \t]*:[ \t*]*", re.IGNORECASE)
_CLASS_LABEL = re.compile(
    r"^[ \t*#]*class[ \t]*label[ \t]*\**[ \t]*:[ \t*]*", re.IGNORECASE | re.MULTILINE
)
_NEXT_TASK = re.compile(r"^[ \t*#]*task[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass
class Instance:
    input: str
    output: str
    status: str = "kept"
    reason: str | None = None

    def reject(self, reason: str) -> None:
        self.status, self.reason = "rejected", reason

    def as_record(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "status": self.status,
            "reason": self.reason,
        }


def _own_part(text: str) -> str:
    """The answer up to the next task the teacher starts on its own (a chat teacher may first
    repeat the task it was given: that line is not an instance)."""
    text = text.strip()
    if _NEXT_TASK.match(text):
        text = text.split("\n", 1)[1] if "\n" in text else ""
    nxt = _NEXT_TASK.search(text)
    return text[: nxt.start()] if nxt else text


def parse_input_first(text: str, finish_reason: str | None) -> list[Instance]:
    body = _own_part(text)
    starts = [m.start() for m in _EXAMPLE.finditer(body)]
    if starts:
        chunks = [body[a:b] for a, b in zip(starts, [*starts[1:], len(body)])]
        chunks = [_EXAMPLE.sub("", c, count=1) for c in chunks]
    else:
        chunks = [body]  # one instance, without an "Example" header
    out = []
    for chunk in chunks:
        marker = _OUTPUT.search(chunk)
        if not marker:
            out.append(Instance("", chunk.strip(), "rejected", "parse_error"))
            continue
        task_input = _INPUT_LABEL.sub("", chunk[: marker.start()].strip(), count=1).strip()
        task_output = chunk[marker.end() :]
        # A second input inside the output: the teacher ran two examples together.
        task_output = re.split(
            r"^[ \t*#]*input[ \t]*\d*[ \t]*:",
            task_output,
            maxsplit=1,
            flags=re.IGNORECASE | re.MULTILINE,
        )[0]
        out.append(Instance(task_input, task_output.strip()))
    return _truncated(out, finish_reason)


def parse_output_first(text: str, finish_reason: str | None) -> list[Instance]:
    body = _own_part(text)
    marks = list(_CLASS_LABEL.finditer(body))
    if not marks:
        return [Instance("", body.strip(), "rejected", "parse_error")]
    out = []
    for m, nxt in zip(marks, [*marks[1:], None]):
        chunk = body[m.end() : nxt.start() if nxt else len(body)].strip()
        label, _, rest = chunk.partition("\n")
        task_input = _INPUT_LABEL.sub("", rest.strip(), count=1).strip()
        out.append(Instance(task_input, label.strip()))
    return _truncated(out, finish_reason)


def _truncated(instances: list[Instance], finish_reason: str | None) -> list[Instance]:
    if instances and finish_reason == "length" and instances[-1].status == "kept":
        instances[-1].reject("length_truncated")
    return instances


def filter_instances(
    instruction: str, instances: list[Instance], rules: QualityRules, max_instances: int
) -> list[Instance]:
    """Judge every parsed instance in place, then order them kept first (each group in answer
    order): the store's first instance of a kept task is then always a kept one."""
    for inst in instances:
        if inst.status != "kept":
            continue
        reason = (
            rules.check_instance(instruction, inst.input, inst.output)
            or output_ends_with_colon(inst.output)
            or ("input_ends_with_colon" if inst.input.rstrip().endswith(":") else None)
        )
        if reason:
            inst.reject(reason)
    valid = [i for i in instances if i.status == "kept"]
    outputs: dict[str, str] = {}
    for inst in valid:
        key, output = inst.input.strip(), inst.output.strip()
        if key and outputs.setdefault(key, output) != output:
            for other in valid:
                other.reject("conflicting_outputs")
            break
    seen: set[tuple[str, str]] = set()
    kept = 0
    for inst in instances:
        if inst.status != "kept":
            continue
        pair = (inst.input.strip(), inst.output.strip())
        if pair in seen:
            inst.reject("duplicate_instance")
            continue
        seen.add(pair)
        if kept >= max_instances:
            inst.reject("over_instance_limit")
            continue
        kept += 1
    return sorted(instances, key=lambda i: i.status != "kept")
