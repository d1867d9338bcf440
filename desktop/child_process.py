"""A ``prt`` command run as a child process: torch never loads into the app, every stderr line is a
JobProgress, the last stdout line is a JSON summary, and cancelling is a kill (the CLI writes its files
atomically, so nothing half-written stays). Tuning and building the style rewards both run this way."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PySide6.QtCore import QByteArray, QObject, QProcess, QProcessEnvironment, Signal
from PySide6.QtWidgets import QLabel, QProgressBar

from desktop.formatting import duration_text
from engine.app.jobs import ERROR_PREFIX, JobProgress, LibrarySummary, TuneSummary, summary_from


def _bytes(array: QByteArray) -> bytes:
    """A QByteArray's contents (QByteArray.data() gives bytes; the stub also allows bytearray and memoryview)."""
    return bytes(array.data())


def show_progress(bar: QProgressBar, label: QLabel, progress: JobProgress, phases: Mapping[str, str]) -> None:
    """Fill the bar and say the phase in words, with the count, the time left and the process's message."""
    bar.setRange(0, max(progress.total, 1))
    bar.setValue(progress.done)
    eta = f" · about {duration_text(progress.eta_seconds)} left" if progress.eta_seconds is not None else ""
    message = f" · {progress.message}" if progress.message else ""
    label.setText(f"{phases.get(progress.phase, progress.phase)}: {progress.done}/{progress.total}{eta}{message}")


class ProgressProcess(QObject):
    """Runs one command at a time; ends with exactly one of ``succeeded``, ``failed`` or ``cancelled``."""

    progress = Signal(object)  # JobProgress
    succeeded = Signal(object)  # the summary: a TuneSummary or LibrarySummary
    failed = Signal(str)  # one line: the CLI's error, or what went wrong
    cancelled = Signal()

    def __init__(self, parent: QObject, *, summary: type[TuneSummary] | type[LibrarySummary], what: str) -> None:
        super().__init__(parent)
        self._summary_type = summary  # a last line that is not one is a failure
        self._what = what  # "tuning process", for messages
        self._process: QProcess | None = None
        self._cancelled = False
        self._stderr_tail = b""  # an unfinished stderr line
        self._other_lines: list[str] = []  # stderr lines that are not progress (the error, if any)

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self, argv: list[str], working_directory: Path) -> None:
        self._cancelled, self._stderr_tail, self._other_lines = False, b"", []
        process = QProcess(self)
        environment = QProcessEnvironment.systemEnvironment()
        environment.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(environment)
        process.setWorkingDirectory(str(working_directory))
        process.readyReadStandardError.connect(lambda: self._take_stderr(_bytes(process.readAllStandardError())))
        process.finished.connect(self._finished)
        process.errorOccurred.connect(self._failed_to_start)
        self._process = process
        process.start(argv[0], argv[1:])

    def cancel(self) -> None:
        if self._process is not None:
            self._cancelled = True
            self._process.kill()

    def wait(self, milliseconds: int) -> None:
        if self._process is not None:
            self._process.waitForFinished(milliseconds)

    def _take_stderr(self, data: bytes, *, final: bool = False) -> None:
        """Handle the complete lines in ``data`` (all of it when ``final``); keep the rest for next time."""
        lines = (self._stderr_tail + data).split(b"\n")
        self._stderr_tail = b"" if final else lines.pop()
        for line in (raw.decode("utf-8", errors="replace") for raw in lines):
            progress = JobProgress.parse(line)
            if progress is not None:
                self.progress.emit(progress)
            elif line.strip():
                self._other_lines.append(line.strip())

    def _detach(self) -> QProcess:
        """The running process, forgotten here (Qt deletes it back in the event loop)."""
        process, self._process = self._process, None
        if process is None:
            raise RuntimeError(f"no {self._what} is running")
        process.deleteLater()
        return process

    def _finished(self, exit_code: int, _exit_status: QProcess.ExitStatus | None = None) -> None:
        process = self._detach()
        self._take_stderr(_bytes(process.readAllStandardError()), final=True)
        summary = summary_from(
            _bytes(process.readAllStandardOutput()).decode("utf-8", errors="replace"), self._summary_type
        )
        if self._cancelled:
            self.cancelled.emit()
        elif exit_code == 0 and summary is not None:
            self.succeeded.emit(summary)
        else:
            self.failed.emit(self._error_line(exit_code))

    def _failed_to_start(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self._process is not None:
            process = self._detach()
            self.failed.emit(f"Could not start the {self._what}: {process.errorString()}.")

    def _error_line(self, exit_code: int) -> str:
        errors = [line for line in self._other_lines if line.startswith(ERROR_PREFIX)]
        if errors:
            return errors[-1]
        return self._other_lines[-1] if self._other_lines else f"The {self._what} ended with code {exit_code}."
