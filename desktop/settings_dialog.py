"""Preferences: model (threads, GPU layers, context size), sampling defaults, and the data folder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from desktop.settings import AUTOMATIC, MAX_STOP_SEQUENCES, SETTING_RANGES, AppSettings

AUTO = "Auto"


def _int_box(key: str, value: int | None, *, step: int = 1) -> QSpinBox:
    """A box over a whole-number setting's range; an automatic setting gets one more value below it, which reads
    'Auto' and stands for None."""
    low, high = SETTING_RANGES[key]
    if not isinstance(low, int) or not isinstance(high, int):
        raise ValueError(f"{key} is not a whole-number setting")
    auto = key in AUTOMATIC
    box = QSpinBox(minimum=low - 1 if auto else low, maximum=high, singleStep=step)
    if auto:
        box.setSpecialValueText(AUTO)
    box.setValue(box.minimum() if value is None else value)
    return box


def _float_box(key: str, value: float, *, step: float) -> QDoubleSpinBox:
    """A box over a decimal setting's range."""
    low, high = SETTING_RANGES[key]
    return QDoubleSpinBox(minimum=low, maximum=high, singleStep=step, decimals=2, value=value)


def stop_text(stop: tuple[str, ...]) -> str:
    return " | ".join(text.replace("\n", "\\n") for text in stop)


def parse_stop_text(text: str) -> tuple[str, ...]:
    r"""'### | \\nUser:' -> ('###', '\nUser:'): the stop sequences typed in the field (at most MAX_STOP_SEQUENCES)."""
    parts = (part.strip().replace("\\n", "\n") for part in text.split("|"))
    return tuple(part for part in parts if part)[:MAX_STOP_SEQUENCES]


def _auto_value(box: QSpinBox) -> int | None:
    return None if box.value() == box.minimum() else box.value()


class SettingsDialog(QDialog):
    def __init__(self, settings: AppSettings, data_folder: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self._settings = settings
        self.threads = _int_box("n_threads", settings.n_threads)
        self.gpu_layers = _int_box("n_gpu_layers", settings.n_gpu_layers)
        self.gpu_layers.setToolTip("Auto: all layers when llama.cpp has a GPU backend. 0: CPU only.")
        self.context = _int_box("n_ctx", settings.n_ctx, step=256)
        self.temperature = _float_box("temperature", settings.temperature, step=0.05)
        self.temperature.setToolTip("0 picks the most likely token every time")
        self.top_k = _int_box("top_k", settings.top_k)
        self.top_k.setToolTip("Candidates per token; the rewards score these")
        self.top_p = _float_box("top_p", settings.top_p, step=0.01)
        self.min_p = _float_box("min_p", settings.min_p, step=0.01)
        self.max_tokens = _int_box("max_tokens", settings.max_tokens)
        self.stop = QLineEdit(stop_text(settings.stop))
        self.stop.setPlaceholderText("none")
        self.stop.setToolTip(
            f"Up to {MAX_STOP_SEQUENCES} texts separated by | : the reply ends before the first one it writes. "
            "\\n stands for a new line."
        )
        self.data_folder = QLineEdit(str(data_folder))
        model = QFormLayout()
        model.addRow("CPU threads", self.threads)
        model.addRow("GPU layers", self.gpu_layers)
        model.addRow("Context size (tokens)", self.context)
        sampling = QFormLayout()
        sampling.addRow("Temperature", self.temperature)
        sampling.addRow("Top-k", self.top_k)
        sampling.addRow("Top-p", self.top_p)
        sampling.addRow("Min-p", self.min_p)
        sampling.addRow("Max tokens per reply", self.max_tokens)
        sampling.addRow("Stop sequences", self.stop)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(self._group("Model (changes reload it)", model))
        layout.addWidget(self._group("Sampling defaults", sampling))
        layout.addWidget(self._group("Data folder (takes effect after a restart)", self._folder_row()))
        layout.addWidget(buttons)

    @staticmethod
    def _group(title: str, content: QLayout) -> QGroupBox:
        group = QGroupBox(title)
        group.setLayout(content)
        return group

    def _folder_row(self) -> QVBoxLayout:
        choose = QPushButton("Choose…")
        choose.clicked.connect(self._choose_folder)
        row = QHBoxLayout()
        row.addWidget(self.data_folder, 1)
        row.addWidget(choose)
        column = QVBoxLayout()
        column.addLayout(row)
        column.addWidget(QLabel("Chats, rewards and models live here. Existing data is not moved.", wordWrap=True))
        return column

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Data folder", self.data_folder.text())
        if folder:
            self.data_folder.setText(folder)

    def settings(self) -> AppSettings:
        return replace(
            self._settings,
            n_threads=_auto_value(self.threads),
            n_gpu_layers=_auto_value(self.gpu_layers),
            n_ctx=self.context.value(),
            temperature=self.temperature.value(),
            top_k=self.top_k.value(),
            top_p=self.top_p.value(),
            min_p=self.min_p.value(),
            max_tokens=self.max_tokens.value(),
            stop=parse_stop_text(self.stop.text()),
        )

    def chosen_data_folder(self) -> Path:
        return Path(self.data_folder.text()).expanduser()
