"""The job protocol: how a ``prt`` command reports to whoever runs it, the terminal or the window.

The window runs ``prt tune`` and ``prt library build`` as child processes (desktop/child_process.py). A job
- prints its progress as one JobProgress per stderr line (``--progress-json``), or as a bar on a terminal;
- prints its summary (a TuneSummary or LibrarySummary) as one JSON object on its last stdout line (``--json``);
- prints an error as one stderr line that starts with ERROR_PREFIX;
- exits with EXIT_OK, EXIT_USER_ERROR or EXIT_INTERRUPTED.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ERROR_PREFIX = "prt: error: "
EXIT_OK = 0
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


@dataclass(frozen=True)
class JobProgress:
    phase: str  # tune: "teacher" | "train" | "export"; library build: also "distill"
    done: int
    total: int
    eta_seconds: float | None
    message: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "eta_seconds": self.eta_seconds,
                "message": self.message,
            }
        )

    @classmethod
    def parse(cls, line: str) -> JobProgress | None:
        """A progress line from a job, or None for any other line."""
        try:
            data = json.loads(line)
            return cls(
                str(data["phase"]),
                int(data["done"]),
                int(data["total"]),
                data.get("eta_seconds"),
                str(data.get("message", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class TuneSummary:
    """What ``prt tune --json`` prints last: the reward it wrote, its held-out figures, what it used and skipped."""

    path: str
    held_out: dict[str, Any] = field(default_factory=dict)  # rewards_onnx.metrics.Metrics.to_json()
    seconds: float | None = None
    teacher_seconds: float | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    parity_max_abs_diff: float | None = None
    train_examples: int | None = None
    held_out_examples: int | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)  # per file: examples, skipped, characters
    skipped: dict[str, Any] | None = None  # count, by_reason, items (rewards_onnx.data.Dataset.skipped_json())


@dataclass(frozen=True)
class LibrarySummary:
    """What ``prt library build --json`` prints last: the folder of the style rewards and each one's card."""

    folder: str
    rewards: list[dict[str, Any]] = field(default_factory=list)


JobSummary = TuneSummary | LibrarySummary


def summary_json(summary: JobSummary) -> str:
    return json.dumps(asdict(summary))


def summary_from(stdout: str, kind: type[TuneSummary] | type[LibrarySummary]) -> JobSummary | None:
    """The summary on the last non-empty stdout line, if it is one of ``kind`` (fields it does not know are
    ignored, so a newer job's summary still reads)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        data = json.loads(lines[-1]) if lines else None
        if not isinstance(data, dict):
            return None
        return kind(**{known.name: data[known.name] for known in fields(kind) if known.name in data})
    except (ValueError, TypeError):  # not JSON, or a required field missing
        return None


class ProgressReport:
    """Where a job's progress goes; used as ``with report:``, leaving the block closes it, also on an error."""

    def __enter__(self) -> ProgressReport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, phase: str, done: int, total: int, eta: float | None, message: str = "") -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class ProgressBar(ProgressReport):
    """One line on stderr, redrawn in place: phase, count, bar, ETA (on a terminal, or with PRT_PROGRESS=1)."""

    def __init__(self) -> None:
        self._enabled = sys.stderr.isatty() or os.environ.get("PRT_PROGRESS") == "1"
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int, eta: float | None, message: str = "") -> None:
        if not self._enabled:
            return
        if phase != self._phase and self._phase:
            print(file=sys.stderr)
        self._phase = phase
        width = 24
        filled = int(width * done / total) if total else width
        eta_text = f" ETA {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None and done < total else ""
        print(
            f"\r{phase:>8} {done}/{total} [{'#' * filled}{'.' * (width - filled)}]{eta_text} {message}".ljust(79),
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self._enabled and self._phase:
            print(file=sys.stderr)


class JsonProgress(ProgressReport):
    """Progress as one JobProgress per stderr line, for the window (``--progress-json``)."""

    def __call__(self, phase: str, done: int, total: int, eta: float | None, message: str = "") -> None:
        print(JobProgress(phase, done, total, eta, message).to_json(), file=sys.stderr, flush=True)


def progress_report(as_json: bool) -> ProgressReport:
    return JsonProgress() if as_json else ProgressBar()
