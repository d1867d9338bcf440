"""The model picker: installed GGUFs, the loaded one, and "Add a file…"."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QFileDialog

from engine.app.models import add_model, installed_models
from engine.app.paths import AppPaths
from engine.runtime.errors import PrtError

ADD_FILE = "Add a file…"


class ModelPicker(QComboBox):
    model_chosen = Signal(object)  # Path
    error = Signal(str)

    def __init__(self, paths: AppPaths) -> None:
        super().__init__()
        self._paths = paths  # where the installed models are
        self.setMinimumContentsLength(24)
        self.setToolTip("The model that writes the replies")
        self._current: Path | None = None
        self.activated.connect(self._activated)

    def refresh(self) -> None:
        """List the installed models (and the current one, if it was loaded by path)."""
        try:
            models = [(model.name, model.path) for model in installed_models(self._paths)]
        except PrtError as error:
            models = []
            self.error.emit(str(error))
        if self._current is not None and self._current not in [path for _name, path in models]:
            models.insert(0, (self._current.stem, self._current))
        self.blockSignals(True)
        self.clear()
        for name, path in models:
            self.addItem(name, str(path))
            self.setItemData(self.count() - 1, str(path), Qt.ItemDataRole.ToolTipRole)
        self.insertSeparator(self.count())
        self.addItem(ADD_FILE)
        self.setCurrentIndex(self.findData(str(self._current)) if self._current else -1)
        self.blockSignals(False)

    def show_current(self, path: Path | None) -> None:
        self._current = Path(path).resolve() if path is not None else None
        self.refresh()

    def _activated(self, index: int) -> None:
        path = self.itemData(index)
        if path is None:  # "Add a file…"
            self.add_file()
        elif Path(path) != self._current:
            self.model_chosen.emit(Path(path))

    def add_file(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "Add a model", "", "GGUF models (*.gguf)")
        self.refresh()  # puts the selection back while the new model loads
        if not path:
            return
        try:
            added = add_model(self._paths, Path(path))
        except PrtError as error:
            self.error.emit(str(error))
            return
        self.refresh()
        self.model_chosen.emit(added.path)
