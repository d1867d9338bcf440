"""The tune panel: pick the data, train a reward in a child process, follow its progress, keep the result.

Tuning runs as ``python -m engine.cli tune ... --json --progress-json`` (engine.app.chat.tune_command) in a
ProgressProcess (desktop/child_process.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from desktop.child_process import ProgressProcess, show_progress
from desktop.formatting import duration_text, held_out_text, sentence
from engine.app.backend import ChatBackend
from engine.app.chat import tune_command
from engine.app.jobs import JobProgress, TuneSummary
from engine.app.paths import AppPaths
from engine.app.store import Store

PHASES = {"teacher": "Scoring your data with the model", "train": "Training", "export": "Exporting and checking"}
FEEDBACK_LABELS = {
    "thumbs_up": "thumbs up",
    "thumbs_down": "thumbs down",
    "pick": "picks",
    "edit": "edits",
    "alternative": "pairs from regenerated replies",
}


def safe_file_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "-", name.strip()).strip("-.")


def feedback_text(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    details = ", ".join(f"{counts.get(kind, 0)} {label}" for kind, label in FEEDBACK_LABELS.items())
    return f"Collected feedback: {total} ({details})"


def skipped_text(skipped: dict | None) -> str:
    """'3 examples skipped (2 longer than the 4096-token context, 1 not valid JSON), e.g. data.jsonl:7.' from the
    tune summary's "skipped"; empty when nothing was."""
    if not skipped or not skipped.get("count"):
        return ""
    count = skipped["count"]
    by_reason = sorted(skipped.get("by_reason", {}).items(), key=lambda item: (-item[1], item[0]))  # most first
    reasons = ", ".join(f"{number} {reason}" for reason, number in by_reason)
    example = f", e.g. {skipped['items'][0]['where']}" if skipped.get("items") else ""
    return f"{count} example{'s' if count != 1 else ''} skipped ({reasons}){example}."


class TunePanel(QWidget):
    reward_tuned = Signal(str)  # the new reward's path

    def __init__(
        self,
        engine: ChatBackend,
        store: Store,
        *,
        paths: AppPaths | None = None,
        command_factory: Callable[..., list[str]] | None = None,
    ) -> None:
        """``paths``: the app's (None: resolved here); ``command_factory``: tune_command for its data folder."""
        super().__init__()
        self._engine, self._store = engine, store
        self._paths = paths or AppPaths.resolve()
        self._command_factory = command_factory or partial(tune_command, data_folder=self._paths.data)
        self._process = ProgressProcess(self, summary=TuneSummary, what="tuning process")
        self._process.progress.connect(self._show_progress)
        self._process.succeeded.connect(self._succeeded)
        self._process.failed.connect(lambda message: self._end_run("failed", message))
        self._process.cancelled.connect(lambda: self._end_run("cancelled", "Cancelled; nothing was saved."))
        self._run_id: int | None = None
        self._name = ""  # the reward's name, as given when the run started
        self.name_edit = QLineEdit("my-style")
        self.feedback_box = QCheckBox()
        self.documents_box = QCheckBox("Documents folder: none")
        for box in (self.feedback_box, self.documents_box):
            box.setEnabled(False)  # until there is feedback, or a folder
        self._documents: Path | None = None
        self.data_list = QListWidget()
        self.data_list.setMaximumHeight(90)
        self.start_button = QPushButton("Start tuning")
        self.cancel_button = QPushButton("Cancel")
        self.progress = QProgressBar()
        self.phase_label = QLabel()
        self.result_label = QLabel(wordWrap=True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self._build_layout()
        self.refresh_counts()
        self._show_running(False)

    def _build_layout(self) -> None:
        choose_folder = QPushButton("Choose folder…")
        choose_folder.clicked.connect(self._choose_documents)
        add_files = QPushButton("Add JSONL files…")
        add_files.clicked.connect(self._choose_data_files)
        remove_file = QPushButton("Remove")
        remove_file.clicked.connect(lambda: self.data_list.takeItem(self.data_list.currentRow()))
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.documents_box, 1)
        folder_row.addWidget(choose_folder)
        files_row = QHBoxLayout()
        files_row.addWidget(add_files)
        files_row.addWidget(remove_file)
        files_row.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        form = QFormLayout()
        form.addRow("Reward name", self.name_edit)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(QLabel("<b>Train on</b>"))
        layout.addWidget(self.feedback_box)
        layout.addLayout(folder_row)
        layout.addWidget(QLabel("Example files (JSONL: demonstrations or preference pairs)"))
        layout.addWidget(self.data_list)
        layout.addLayout(files_row)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.phase_label)
        layout.addWidget(self.result_label)
        layout.addStretch(1)

    # -- sources ---------------------------------------------------------------
    def refresh_counts(self) -> None:
        counts = self._store.feedback_counts()
        self.feedback_box.setText(feedback_text(counts))
        has_feedback = sum(counts.values()) > 0
        if has_feedback != self.feedback_box.isEnabled():  # offered (checked) once there is some; the user decides
            self.feedback_box.setEnabled(has_feedback)
            self.feedback_box.setChecked(has_feedback)

    def set_documents_folder(self, folder: Path | str) -> None:
        self._documents = Path(folder)
        self.documents_box.setText(f"Documents folder: {self._documents}")
        self.documents_box.setEnabled(True)
        self.documents_box.setChecked(True)

    def add_data_files(self, paths) -> None:
        self.data_list.addItems([str(path) for path in paths])

    def _choose_documents(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A folder of .txt or .md documents")
        if folder:
            self.set_documents_folder(folder)

    def _choose_data_files(self) -> None:
        paths, _filter = QFileDialog.getOpenFileNames(self, "Example files", "", "JSON Lines (*.jsonl)")
        self.add_data_files(paths)

    def _sources(self) -> dict:
        return {
            "feedback": self.feedback_box.isChecked(),
            "documents": [str(self._documents)] if self.documents_box.isChecked() and self._documents else [],
            "data": [self.data_list.item(row).text() for row in range(self.data_list.count())],
        }

    # -- the run ----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._process.running

    def start(self) -> None:
        if self.running:
            return
        problem, argv = self._command()
        if problem:
            self._show_result(problem)
            return
        self._name = self.name_edit.text().strip()
        self._run_id = self._store.start_tuning_run({**self._sources(), "name": self._name})
        self._show_running(True)
        self._show_result("")
        self._process.start(argv, self._paths.rewards)

    def _command(self) -> tuple[str, list[str]]:
        """(what is missing, []) or ('', the tuning argv)."""
        name = safe_file_name(self.name_edit.text())
        sources = self._sources()
        out_path = self._paths.rewards / f"{name}.onnx"
        if self._engine.base is None:
            return "Load a model first: the reward is trained against it.", []
        if not name:
            return "Give the reward a name.", []
        if out_path.exists():
            return f"A reward named {name} exists already ({out_path}); choose another name.", []
        if not (sources["feedback"] or sources["documents"] or sources["data"]):
            return "Choose what to train on: your feedback, a documents folder or example files.", []
        return "", self._command_factory(
            model_path=self._engine.base.path,
            out_path=out_path,
            data_files=sources["data"],
            documents=sources["documents"],
            feedback_db=self._store.path if sources["feedback"] else None,
            name=self.name_edit.text().strip(),
        )

    def cancel(self) -> None:
        self._process.cancel()

    def shutdown(self) -> None:
        """Cancel a run and wait until it is recorded as cancelled."""
        self.cancel()
        self._process.wait(5000)

    def _show_progress(self, progress: JobProgress) -> None:
        show_progress(self.progress, self.phase_label, progress, PHASES)

    def _succeeded(self, summary: TuneSummary) -> None:
        self._show_running(False)
        self._store.add_reward(summary.path, self._name)
        self._store.finish_tuning_run(self._run_id, status="done", reward_path=summary.path, metrics=summary.held_out)
        took = f" in {duration_text(summary.seconds)}" if summary.seconds is not None else ""
        skipped = skipped_text(summary.skipped)
        self._show_result(
            f"Saved {self._name}{took}. {sentence(held_out_text(summary.held_out))}. "
            + (f"{skipped} " if skipped else "")
            + "Switch it on in the Rewards panel."
        )
        self.reward_tuned.emit(summary.path)

    def _end_run(self, status: str, message: str) -> None:
        self._show_running(False)
        self._store.finish_tuning_run(self._run_id, status=status, error=None if status == "cancelled" else message)
        self._show_result(message)

    def _show_running(self, running: bool) -> None:
        self.start_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        if running:
            self.progress.setRange(0, 0)  # busy until the first progress line
            self.phase_label.setText("Starting…")
        else:
            self.phase_label.clear()

    def _show_result(self, text: str) -> None:
        self.result_label.setText(text)
