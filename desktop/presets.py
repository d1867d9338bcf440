"""Presets in the toolbar: a named bundle of system prompt, reward dials, strength and sampling settings, chosen
per chat. The picker only lists and asks; the main window applies a preset to the chat, the dials and the settings.
"""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QInputDialog, QToolButton, QWidget

from engine.app.store import Store

NO_PRESET = "No preset"


class PresetPicker(QWidget):
    preset_chosen = Signal(object)  # the preset id, or None for "No preset"
    save_requested = Signal(str)  # the name to save the current settings under
    delete_requested = Signal(int)

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self.combo = QComboBox(minimumContentsLength=14)
        self.combo.setToolTip("The preset this chat uses: its system prompt, reward dials, strength and sampling")
        self.combo.activated.connect(lambda _index: self.preset_chosen.emit(self.current_id()))
        self.save_button = QToolButton(text="Save as preset…", autoRaise=True)
        self.save_button.setToolTip("Keep the current system prompt, dials, strength and sampling under a name")
        self.save_button.clicked.connect(self._ask_name)
        self.delete_button = QToolButton(text="Delete preset", autoRaise=True)
        self.delete_button.clicked.connect(self._delete_current)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for widget in (self.combo, self.save_button, self.delete_button):
            layout.addWidget(widget)
        self.refresh()

    def refresh(self, select: int | None = None) -> None:
        """Reload the presets from the store and show ``select`` (None: "No preset"), without emitting."""
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItem(NO_PRESET, None)
        for preset in self._store.presets():
            self.combo.addItem(preset.name, preset.id)
        self.combo.setCurrentIndex(max(self.combo.findData(select), 0))
        self.combo.blockSignals(False)
        self.delete_button.setEnabled(select is not None)

    def current_id(self) -> int | None:
        return self.combo.currentData()

    def names(self) -> list[str]:
        return [self.combo.itemText(index) for index in range(self.combo.count())]

    def _ask_name(self) -> None:
        current = self.combo.currentText() if self.current_id() is not None else ""
        name, ok = QInputDialog.getText(self, "Save as preset", "Preset name:", text=current)
        if ok and name.strip():
            self.save_requested.emit(name.strip())

    def _delete_current(self) -> None:
        preset_id = self.current_id()
        if preset_id is not None:
            self.delete_requested.emit(preset_id)
