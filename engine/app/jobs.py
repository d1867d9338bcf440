"""The job protocol: how a ``prt`` command reports to whoever runs it, the terminal or the window.

The window runs ``prt tune`` and ``prt library build`` as child processes (desktop/child_process.py). A job
- prints its progress as one JobProgress per stderr line (``--progress-json``), or as a bar on a terminal;
- prints its summary as one JSON object on its last stdout line (``--json``);
- prints an error as one stderr line that starts with ERROR_PREFIX;
- exits with EXIT_OK, EXIT_USER_ERROR or EXIT_INTERRUPTED.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

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


def summary_from(stdout: str, key: str) -> dict | None:
    """The JSON summary on the last non-empty stdout line, if there is one and it has ``key``."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        summary = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return summary if isinstance(summary, dict) and key in summary else None


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
