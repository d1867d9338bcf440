"""The user's training data: demonstrations, preference pairs and documents.

Every malformed input raises DatasetError naming the file, the line and what is
wrong; nothing is silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Union

from engine.errors import PrtError

if TYPE_CHECKING:
    from engine.store import Store

DOCUMENT_SUFFIXES = (".txt", ".md")
DOCUMENT_WINDOW_CHARS = 1200  # about 250 tokens of English
DOCUMENT_PROMPT_SHARE = 0.25  # the start of each window is the prompt, the rest is what to write
DOCUMENT_INSTRUCTION = "Continue this text in the same style:\n\n"


class DatasetError(PrtError):
    """Training or evaluation data is missing, empty or malformed."""


@dataclass(frozen=True)
class Demonstration:
    prompt: str
    response: str
    system: str | None = None
    teacher_system: str | None = None  # distilled data: the system prompt the response was generated under
    teacher_temperature: float = 1.0  # ... and the temperature it was sampled at


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    system: str | None = None


Example = Union[Demonstration, PreferencePair]


def load_jsonl(path: Path) -> list[Example]:
    """One JSON object per line: {"prompt", "response"} or {"prompt", "chosen", "rejected"}, optional "system"."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Data file not found: {path}.")
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, f"{path}:{number}"))
    if not examples:
        raise DatasetError(f"{path} has no examples; each line should be a JSON object with a prompt and a response.")
    return examples


def _parse_line(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error.msg}).") from error
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "response" in record and ("chosen" in record or "rejected" in record):
        raise DatasetError(f"{where}: has both 'response' and 'chosen'/'rejected'; a line is one kind of example.")
    fields = ("prompt", "response") if "response" in record else ("prompt", "chosen", "rejected")
    optional = ("system", "teacher_system") if "response" in record else ("system",)
    temperature = record.get("teacher_temperature", 1.0)
    if "teacher_temperature" in record and ("teacher_system" not in record or not _is_positive_number(temperature)):
        raise DatasetError(f"{where}: 'teacher_temperature' must be a positive number and needs 'teacher_system'.")
    for field in fields + optional:
        value = record.get(field)
        if field in optional and value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            missing = "missing" if value is None else "empty or not a string"
            raise DatasetError(f"{where}: '{field}' is {missing}; expected {_shape_hint()}.")
    unknown = set(record) - set(fields) - set(optional) - {"teacher_temperature"}
    if unknown:
        raise DatasetError(f"{where}: unknown field(s) {sorted(unknown)}; expected {_shape_hint()}.")
    if "response" in record:
        return Demonstration(record["prompt"], record["response"], record.get("system"), record.get("teacher_system"),
                             float(temperature))
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], record.get("system"))


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _shape_hint() -> str:
    return ('{"prompt": ..., "response": ...} (optional "teacher_system", "teacher_temperature") or '
            '{"prompt": ..., "chosen": ..., '
            '"rejected": ...}, optional "system"')


def load_documents(folder: Path) -> list[Demonstration]:
    """Cut a folder of .txt/.md files into windows: the start of each is the prompt, the rest the response."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Documents folder not found: {folder}.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES and p.is_file())
    examples = [example for path in files for example in _windows(_read_text(path))]
    if not examples:
        raise DatasetError(f"{folder} has no usable .txt or .md text (need at least a few sentences per file).")
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8 or remove it.") from error


def _windows(text: str) -> Iterable[Demonstration]:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    window = ""
    for paragraph in paragraphs + [None]:
        if paragraph is not None and len(window) + len(paragraph) < DOCUMENT_WINDOW_CHARS:
            window = f"{window}\n\n{paragraph}" if window else paragraph
            continue
        if len(window) >= 200:
            cut = _sentence_boundary(window, int(len(window) * DOCUMENT_PROMPT_SHARE))
            yield Demonstration(DOCUMENT_INSTRUCTION + window[:cut].strip(), window[cut:].strip())
        window = (paragraph or "")[:DOCUMENT_WINDOW_CHARS]


def _sentence_boundary(text: str, near: int) -> int:
    ends = [i + 1 for i, char in enumerate(text) if char in ".!?\n" and 0 < i + 1 < len(text) - 20]
    return min(ends, key=lambda i: abs(i - near)) if ends else near


def counts(examples: list[Example]) -> dict[str, int]:
    return {"demonstrations": sum(isinstance(e, Demonstration) for e in examples),
            "preference_pairs": sum(isinstance(e, PreferencePair) for e in examples)}


def examples_from_store(store: "Store") -> tuple[list[Example], dict[str, int]]:
    """Training data from chat feedback, oldest first, with counts of demonstrations, pairs and unused feedback.

    thumbs up -> a demonstration; edit -> a demonstration of the edit and a pair (edit over original);
    pick -> a pair; thumbs down -> a pair with the latest reply chosen for the same prompt, else unused.
    """
    records = store.feedback()
    chosen_for_prompt = {record.prompt: record.chosen for record in records if record.chosen}  # the latest wins
    examples: list[Example] = []
    unused = 0
    for record in records:
        system = record.system or None
        if record.kind in ("thumbs_up", "edit"):
            examples.append(Demonstration(record.prompt, record.chosen, system))
        if record.kind in ("pick", "edit"):
            examples.append(PreferencePair(record.prompt, record.chosen, record.rejected, system))
        if record.kind == "thumbs_down":
            chosen = chosen_for_prompt.get(record.prompt)
            if chosen and chosen != record.rejected:
                examples.append(PreferencePair(record.prompt, chosen, record.rejected, system))
            else:
                unused += 1
    if not examples:
        raise DatasetError(f"No usable feedback yet ({unused} thumbs down without a better reply to the same prompt): "
                           "give a thumbs up, edit a reply or pick between two.")
    summary = counts(examples)
    return examples, {"demonstrations": summary["demonstrations"], "pairs": summary["preference_pairs"],
                      "unused": unused}
