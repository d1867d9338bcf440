"""The user's training data: demonstrations, preference pairs and documents.

A job reads each file (and the chat database) into a Source. A line that is not an example, a document that is
not UTF-8 text and, later, an example the teacher pass cannot take (``fitting`` in rewards_onnx/teacher.py) are
skipped: each becomes a Skipped (where, reason) and the job goes on with the rest. Only a job left with nothing
usable is a DatasetError. ``load_jsonl`` is the strict reader, for a file that must be wholly good.
"""

from __future__ import annotations

import codecs
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from engine.runtime.errors import PrtError

if TYPE_CHECKING:
    from engine.app.store import Feedback, Store

DOCUMENT_SUFFIXES = (".txt", ".md")
DOCUMENT_WINDOW_CHARS = 1200  # about 250 tokens of English
DOCUMENT_MIN_CHARS = 200  # a file with less text gives no window, and no cut leaves less than this after it
DOCUMENT_PROMPT_SHARE = 0.25  # the start of each window is the prompt, the rest is what to write
DOCUMENT_INSTRUCTION = "Continue this text in the same style:\n\n"
TEACHER_TEMPERATURES = (0.01, 100.0)  # any real sampling temperature; outside, log-probs / T overflow float32
MAX_LINE_BYTES = 4 << 20  # a longer JSONL line is more than any context holds: skipped without being held
LISTED_SKIPS = 100  # skipped examples listed one by one in a JSON summary; all of them are counted

# Where a text may be cut, best first: a blank line, a sentence's end, a line's end, any whitespace. Each match
# starts at the cut.
PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
SENTENCE_END = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’)\]]))\s|(?<=[。！？])")
LINE_END = re.compile(r"\n")
WHITESPACE = re.compile(r"\s")
NOT_WHITESPACE = re.compile(r"\S")


class DatasetError(PrtError):
    """Training or evaluation data is missing, empty or has nothing usable."""


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


Example = Demonstration | PreferencePair


@dataclass(frozen=True)
class Skipped:
    """An example (a line, a document, a chat's feedback) left out of a job, and why; the job goes on without it."""

    where: str  # "data.jsonl:12", "data.jsonl:3, byte 17", "notes.md"
    reason: str  # short and the same for the same problem, so that skips are counted by reason; never content

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Source:
    """What one file or the chat database gave: its examples, where each came from, and what was skipped."""

    name: str
    examples: list[Example] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # places[i]: where examples[i] came from
    skipped: list[Skipped] = field(default_factory=list)
    characters: tuple[int, int] | None = None  # a document's characters: (read, in its windows)

    def add(self, example: Example, place: str) -> None:
        self.examples.append(example)
        self.places.append(place)

    def kept(self, reason_to_skip: Callable[[Example], str | None]) -> Source:
        """A copy without the examples that ``reason_to_skip`` gives a reason for; those are recorded as skipped."""
        kept = replace(self, examples=[], places=[], skipped=list(self.skipped))
        for example, place in zip(self.examples, self.places):
            reason = reason_to_skip(example)
            if reason:
                kept.skipped.append(Skipped(place, reason))
            else:
                kept.add(example, place)
        return kept

    def to_json(self) -> dict:
        summary = {"source": self.name, "examples": len(self.examples), "skipped": len(self.skipped)}
        if self.characters is not None:
            summary |= {"characters_read": self.characters[0], "characters_used": self.characters[1]}
        return summary

    def summary_line(self) -> str:
        """'notes.md: 13 windows from 15,012 of 15,060 characters' or 'data.jsonl: 8 examples, 2 skipped'."""
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        if self.characters is None:
            return f"{self.name}: {len(self.examples)} examples{skipped}"
        read, used = self.characters
        return f"{self.name}: {len(self.examples)} windows from {used:,} of {read:,} characters{skipped}"


@dataclass
class Dataset:
    """The examples of one job, from one or more sources, and what was skipped on the way."""

    sources: list[Source]

    @classmethod
    def of(cls, examples: Sequence[Example]) -> Dataset:
        """Examples given in code, named by their position ("example 3")."""
        source = Source("examples")
        for number, example in enumerate(examples, start=1):
            source.add(example, f"example {number}")
        return cls([source])

    @property
    def examples(self) -> list[Example]:
        return [example for source in self.sources for example in source.examples]

    @property
    def skipped(self) -> list[Skipped]:
        return [skipped for source in self.sources for skipped in source.skipped]

    def kept(self, reason_to_skip: Callable[[Example], str | None]) -> Dataset:
        return Dataset([source.kept(reason_to_skip) for source in self.sources])

    def mapped(self, change: Callable[[Example], Example]) -> Dataset:
        return Dataset([replace(source, examples=[change(e) for e in source.examples]) for source in self.sources])

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(skipped.reason for skipped in self.skipped).most_common())

    def skipped_json(self) -> dict:
        return {
            "count": len(self.skipped),
            "by_reason": self.skipped_by_reason(),
            "items": [asdict(skipped) for skipped in self.skipped[:LISTED_SKIPS]],
        }

    def skipped_summary(self, listed: int = 3) -> str:
        """'skipped 3 of 40 examples: 2 not valid JSON (data.jsonl:2, data.jsonl:5); 1 longer than ...'."""
        places: dict[str, list[str]] = {}
        for skipped in self.skipped:
            places.setdefault(skipped.reason, []).append(skipped.where)
        groups = [
            f"{len(where)} {reason} ({', '.join(where[:listed])}{', ...' if len(where) > listed else ''})"
            for reason, where in sorted(places.items(), key=lambda item: -len(item[1]))
        ]
        total = len(self.skipped) + len(self.examples)
        return f"skipped {len(self.skipped)} of {total} examples: " + "; ".join(groups)

    def require_examples(self) -> None:
        """A job needs something usable: else one error that says what each source gave."""
        if self.examples:
            return
        given = self.skipped_summary(listed=1) if self.skipped else "; ".join(s.summary_line() for s in self.sources)
        raise DatasetError(
            f"No usable examples ({given}). Each JSONL line should be {_shape_hint()}; "
            f"each document at least {DOCUMENT_MIN_CHARS} characters of UTF-8 text."
        )


def as_dataset(data: Dataset | Sequence[Example]) -> Dataset:
    return data if isinstance(data, Dataset) else Dataset.of(data)


# -- JSONL ---------------------------------------------------------------------------------------------
class _Unusable(Exception):
    """A line that is not an example: why, and where in the line if that is known ("byte 17")."""

    def __init__(self, reason: str, position: str = "") -> None:
        super().__init__(reason)
        self.reason, self.position = reason, position


def read_jsonl(path: Path) -> Source:
    """One JSON object per line: {"prompt", "response"} or {"prompt", "chosen", "rejected"}, optional "system".
    A line that is not one is skipped, with its line number and why."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"Data file not found: {path}.")
    source = Source(str(path))
    try:
        with open(path, "rb") as handle:
            for number, line in enumerate(_lines(handle), start=1):
                try:
                    if number == 1 and line is not None:
                        line = line.removeprefix(codecs.BOM_UTF8)
                    example = _parse_line(line)
                except _Unusable as unusable:
                    where = f"{path}:{number}" + (f", {unusable.position}" if unusable.position else "")
                    source.skipped.append(Skipped(where, unusable.reason))
                    continue
                if example is not None:
                    source.add(example, f"{path}:{number}")
    except OSError as error:
        raise DatasetError(f"Cannot read {path}: {error.strerror or error}.") from error
    return source


def load_jsonl(path: Path) -> list[Example]:
    """The examples of a file that must be wholly good (one the app wrote): the first bad line is the error."""
    source = read_jsonl(path)
    if source.skipped:
        raise DatasetError(f"{source.skipped[0]}; each line should be {_shape_hint()}.")
    if not source.examples:
        raise DatasetError(f"{path} has no examples; each line should be {_shape_hint()}.")
    return source.examples


def _lines(handle: BinaryIO) -> Iterator[bytes | None]:
    """Each line's bytes, or None for a line longer than MAX_LINE_BYTES (read past in pieces, never held whole)."""
    while line := handle.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = handle.readline(MAX_LINE_BYTES)
        yield None


def _parse_line(line: bytes | None) -> Example | None:
    """The line's example, None for a blank line; _Unusable says why it is neither."""
    if line is None:
        raise _Unusable(f"longer than {MAX_LINE_BYTES >> 20} MiB")
    if b"\0" in line:
        raise _Unusable("has NUL bytes (a binary or UTF-16 file?)", f"byte {line.index(0) + 1}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Unusable("not UTF-8 text", f"byte {error.start + 1}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text.rstrip("\r\n"))  # so that an error's column is on this line
    except json.JSONDecodeError as error:
        raise _Unusable("not valid JSON", f"column {error.colno}") from None
    except RecursionError:
        raise _Unusable("nested too deeply") from None
    except ValueError:  # an integer of more digits than Python converts
        raise _Unusable("has a number too long to read") from None
    return _example(record)


def _example(record: object) -> Example:
    if not isinstance(record, dict):
        raise _Unusable("not a JSON object")
    if "response" in record and ("chosen" in record or "rejected" in record):
        raise _Unusable("has both 'response' and 'chosen'/'rejected'")
    fields = ("prompt", "response") if "response" in record else ("prompt", "chosen", "rejected")
    optional = ("system", "teacher_system") if "response" in record else ("system",)
    temperature = record.get("teacher_temperature", 1.0)
    if "teacher_temperature" in record and ("teacher_system" not in record or not _is_temperature(temperature)):
        low, high = TEACHER_TEMPERATURES
        raise _Unusable(f"'teacher_temperature' is not a number from {low} to {high:g} or has no 'teacher_system'")
    for name in fields + optional:
        value = record.get(name)
        if name in optional and value is None:
            continue
        if value is None:
            raise _Unusable(f"'{name}' is missing")
        if not isinstance(value, str) or not value.strip():
            raise _Unusable(f"'{name}' is empty or not a string")
        if not _is_unicode(value):
            raise _Unusable(f"'{name}' is not valid Unicode (a lone surrogate)")
    unknown = set(record) - set(fields) - set(optional) - {"teacher_temperature"}
    if unknown:
        raise _Unusable("has unknown fields", "fields " + _short(", ".join(map(repr, sorted(unknown))), 60))
    if "response" in record:
        return Demonstration(
            record["prompt"], record["response"], record.get("system"), record.get("teacher_system"), float(temperature)
        )
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], record.get("system"))


def _is_temperature(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return TEACHER_TEMPERATURES[0] <= float(value) <= TEACHER_TEMPERATURES[1]
    except OverflowError:  # an integer too large for a float
        return False


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int) -> str:
    """``text`` on one line, cut to at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _shape_hint() -> str:
    return (
        '{"prompt": ..., "response": ...} (optional "teacher_system", "teacher_temperature") or '
        '{"prompt": ..., "chosen": ..., "rejected": ...}, optional "system", in UTF-8'
    )


# -- documents -----------------------------------------------------------------------------------------
def read_documents(folder: Path) -> list[Source]:
    """Each .txt/.md file under ``folder``, cut into windows: the start of each is the prompt, the rest the response."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"Documents folder not found: {folder}.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in DOCUMENT_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"{folder} has no .txt or .md files.")
    return [_document(path) for path in files]


def _document(path: Path) -> Source:
    source = Source(str(path))
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        source.skipped.append(Skipped(f"{path}, byte {error.start + 1}", "not UTF-8 text"))
        return source
    except OSError as error:
        source.skipped.append(Skipped(str(path), f"unreadable ({error.strerror or error})"))
        return source
    if "\0" in text:
        source.skipped.append(
            Skipped(f"{path}, character {text.index(chr(0)) + 1}", "has NUL bytes (a binary or UTF-16 file?)")
        )
        return source
    used = 0
    for line, window in _windows(text):
        cut = _prompt_end(window)
        source.add(Demonstration(DOCUMENT_INSTRUCTION + window[:cut].strip(), window[cut:].strip()), f"{path}:{line}")
        used += len(window)
    source.characters = (len(text), used)
    return source


def _windows(text: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of consecutive windows of at most DOCUMENT_WINDOW_CHARS that hold all of ``text``
    but the whitespace between them; nothing for a text shorter than DOCUMENT_MIN_CHARS."""
    start, end = _text_from(text, 0), len(text.rstrip())
    if end - start < DOCUMENT_MIN_CHARS:
        return
    line = 1 + text.count("\n", 0, start)
    while start < end:
        cut = end if end - start <= DOCUMENT_WINDOW_CHARS else _cut(text, start, end)
        yield line, text[start:cut].rstrip()
        following = _text_from(text, cut)
        line += text.count("\n", start, following)
        start = following


def _cut(text: str, start: int, end: int) -> int:
    """Where the window from ``start`` ends: the last blank line in its second half, else the last sentence end,
    else the last whitespace, else a hard cut; never leaving less than DOCUMENT_MIN_CHARS after it."""
    low, high = start + DOCUMENT_WINDOW_CHARS // 2, min(start + DOCUMENT_WINDOW_CHARS, end - DOCUMENT_MIN_CHARS)
    for boundary in (PARAGRAPH_BREAK, SENTENCE_END, WHITESPACE):
        cuts = [match.start() for match in boundary.finditer(text, low, high)]
        if cuts:
            return cuts[-1]
    return high


def _text_from(text: str, position: int) -> int:
    """The index of the first non-whitespace character at or after ``position`` (len(text) if none)."""
    match = NOT_WHITESPACE.search(text, position)
    return match.start() if match else len(text)


def _prompt_end(window: str) -> int:
    """Where a window's prompt ends: the sentence end nearest DOCUMENT_PROMPT_SHARE of it, else the nearest line end,
    else the nearest whitespace, else there; leaving at least 20 characters to write."""
    near = int(len(window) * DOCUMENT_PROMPT_SHARE)
    for boundary in (SENTENCE_END, LINE_END, WHITESPACE):
        cuts = [match.start() for match in boundary.finditer(window, 1, len(window) - 20)]
        if cuts:
            return min(cuts, key=lambda cut: abs(cut - near))
    return near


def counts(examples: list[Example]) -> dict[str, int]:
    return {
        "demonstrations": sum(isinstance(e, Demonstration) for e in examples),
        "preference_pairs": sum(isinstance(e, PreferencePair) for e in examples),
    }


# -- the app's feedback --------------------------------------------------------------------------------
def examples_from_store(store: Store) -> tuple[list[Example], dict[str, int]]:
    """Training data from chat feedback, oldest first, with counts of demonstrations, pairs and unused feedback.

    thumbs up -> a demonstration; edit -> a demonstration of the edit and a pair (edit over original);
    pick, alternative (a regenerated reply passed over) -> a pair; thumbs down -> a pair with the latest reply
    chosen for the same prompt, else unused.
    """
    used, unused = _feedback_examples(store.training_feedback())
    examples = [example for example, _ in used]
    if not examples:
        raise DatasetError(
            f"No usable feedback yet ({len(unused)} thumbs down without a better reply to the same "
            "prompt): give a thumbs up, edit a reply or pick between two."
        )
    summary = counts(examples)
    return examples, {
        "demonstrations": summary["demonstrations"],
        "pairs": summary["preference_pairs"],
        "unused": len(unused),
    }


def read_feedback(store: Store, name: str) -> Source:
    """The feedback's examples, each placed by its kind and prompt; a thumbs down with no better reply is skipped."""
    source = Source(name)
    used, unused = _feedback_examples(store.training_feedback())
    for example, record in used:
        source.add(example, _feedback_place(name, record))
    source.skipped += [
        Skipped(_feedback_place(name, record), "thumbs down without a better reply to the same prompt")
        for record in unused
    ]
    return source


def _feedback_examples(records: Sequence[Feedback]) -> tuple[list[tuple[Example, Feedback]], list[Feedback]]:
    """(example, the feedback it came from) for the usable feedback, and the thumbs down left unused."""
    chosen_for_prompt = {record.prompt: record.chosen for record in records if record.chosen}  # the latest wins
    used: list[tuple[Example, Feedback]] = []
    unused = []
    for record in records:
        system = record.system or None
        # the store keeps the texts each kind needs (engine/app/store.py, FEEDBACK_TEXTS): the checks only narrow
        if record.kind in ("thumbs_up", "edit") and record.chosen is not None:
            used.append((Demonstration(record.prompt, record.chosen, system), record))
        if record.kind != "thumbs_down" and record.chosen is not None and record.rejected is not None:
            used.append((PreferencePair(record.prompt, record.chosen, record.rejected, system), record))
        if record.kind == "thumbs_down" and record.rejected is not None:
            chosen = chosen_for_prompt.get(record.prompt)
            if chosen and chosen != record.rejected:
                used.append((PreferencePair(record.prompt, chosen, record.rejected, system), record))
            else:
                unused.append(record)
    return used, unused


def _feedback_place(name: str, record: Feedback) -> str:
    return f"{name}: {record.kind.replace('_', ' ')} on {_short(record.prompt, 40)!r}"
