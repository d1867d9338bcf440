"""The rewards panel: installed rewards with their card, a compatibility badge, an on/off box and a
weight each, and the overall strength. Every change reaches the engine at once (the next token) and
is saved in the store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QSlider,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from desktop.formatting import held_out_text, sentence, training_data_text
from desktop.settings import SETTING_RANGES
from desktop.theme import lowered_color, raised_color
from engine.app.backend import ChatBackend
from engine.app.chat import RewardInfo
from engine.app.onboarding import saved_profile
from engine.app.pref import Profile, ProfileError
from engine.app.store import RewardEntry, Store
from engine.runtime.errors import PrtError

WEIGHT_STEPS = 100  # slider steps per 1.0 of weight or strength
MAX_WEIGHT = 2.0
MAX_STRENGTH = SETTING_RANGES["alpha"][1]


def _slider(minimum: float, maximum: float, value: float) -> QSlider:
    slider = QSlider(Qt.Orientation.Horizontal)
    slider.setRange(round(minimum * WEIGHT_STEPS), round(maximum * WEIGHT_STEPS))
    slider.setValue(round(value * WEIGHT_STEPS))
    return slider


def row_title(info: RewardInfo, name: str) -> str:
    """The card's human label with the reward's name, e.g. 'Short and to the point (concise)'."""
    label = info.card.label if info.card is not None else ""
    return f"{label} ({name})" if label and label != name else name


def profile_summary(profile: Profile | None) -> str:
    if profile is None:
        return "No style profile yet: answer a few questions to set the style dials."
    answers = len(profile.answers)
    return f"Style: {profile.name}, from {answers} answer{'s' if answers != 1 else ''}."


def card_text(info: RewardInfo) -> str:
    """Trained for which model, on how much data, with which held-out result."""
    if info.card is None:
        return info.problem
    card = info.card
    return (
        f"Trained on {card.base_model_name} with {training_data_text(card.training_data)}. "
        f"{sentence(held_out_text(card.metrics.get('held_out', {})))}."
    )


def badge(info: RewardInfo) -> tuple[str, QColor | None]:
    """The badge text and its color (None: the palette's own)."""
    if info.compatible is None:
        return "no model loaded", None
    return ("compatible", raised_color()) if info.compatible else ("incompatible", lowered_color())


class RewardRow(QFrame):
    changed = Signal()
    remove_requested = Signal(str)

    def __init__(self, entry: RewardEntry, info: RewardInfo) -> None:
        super().__init__()
        self.path = entry.path
        self.usable = info.compatible is True
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.enabled_box = QCheckBox(row_title(info, entry.name))
        self.enabled_box.setChecked(entry.enabled)
        self.enabled_box.setEnabled(self.usable)
        self.weight_slider = _slider(-MAX_WEIGHT, MAX_WEIGHT, entry.weight)  # below 0: away from this reward
        self.weight_label = QLabel()
        self._show_weight()
        self.weight_slider.setToolTip("Above 0 steers toward this reward, below 0 away from it")
        self.enabled_box.toggled.connect(self.changed)
        self.weight_slider.valueChanged.connect(self._show_weight)
        self.weight_slider.valueChanged.connect(self.changed)
        remove = QToolButton(text="Remove", toolTip="Uninstall this reward (its file stays on disk)")
        remove.setAutoRaise(True)
        remove.clicked.connect(lambda: self.remove_requested.emit(self.path))
        top = QHBoxLayout()
        top.addWidget(self.enabled_box, 1)
        top.addWidget(self._badge_label(info))
        top.addWidget(remove)
        weight = QHBoxLayout()
        weight.addWidget(QLabel("Weight"))
        weight.addWidget(self.weight_slider, 1)
        weight.addWidget(self.weight_label)
        details = QLabel(card_text(info), wordWrap=True)
        details.setToolTip(str(info.path))
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(weight)
        layout.addWidget(details)

    @staticmethod
    def _badge_label(info: RewardInfo) -> QLabel:
        text, color = badge(info)
        label = QLabel(text)
        label.setToolTip(info.problem or "Same vocabulary as the loaded model: usable.")
        if color is not None:
            label.setStyleSheet(f"color: {color.name()}; font-weight: bold")
        return label

    @property
    def weight(self) -> float:
        return self.weight_slider.value() / WEIGHT_STEPS

    @property
    def active(self) -> bool:
        return self.usable and self.enabled_box.isChecked()

    def switch_off(self) -> None:
        self.enabled_box.blockSignals(True)
        self.enabled_box.setChecked(False)
        self.enabled_box.blockSignals(False)

    def _show_weight(self) -> None:
        self.weight_label.setText(f"{self.weight:+.2f}")


class RewardsPanel(QWidget):
    changed = Signal()  # which rewards steer, or how strongly, changed
    strength_changed = Signal(float)
    error = Signal(str)
    style_requested = Signal()  # "Retune my style…"

    def __init__(self, engine: ChatBackend, store: Store, *, strength: float = 1.0) -> None:
        super().__init__()
        self._engine, self._store = engine, store
        self.rows: list[RewardRow] = []
        self.strength_slider = _slider(0, MAX_STRENGTH, strength)
        self.strength_label = QLabel()
        self.strength_slider.valueChanged.connect(self._strength_moved)
        strength_row = QHBoxLayout()
        strength_row.addWidget(QLabel("Overall strength"))
        strength_row.addWidget(self.strength_slider, 1)
        strength_row.addWidget(self.strength_label)
        self._rows_layout = QVBoxLayout()
        self._rows_layout.addStretch(1)
        rows = QWidget()
        rows.setLayout(self._rows_layout)
        scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        scroll.setWidget(rows)
        add = QPushButton("Add reward file…")
        add.clicked.connect(self.choose_reward_file)
        self.profile_label = QLabel(wordWrap=True)
        self.style_button = QPushButton("Retune my style…")
        self.style_button.setToolTip("Answer up to ten “which reply do you prefer?” questions to set the style dials")
        self.style_button.clicked.connect(self.style_requested)
        profile_row = QHBoxLayout()
        profile_row.addWidget(self.profile_label, 1)
        profile_row.addWidget(self.style_button)
        self.empty_note = QLabel(
            "No rewards installed yet. Tune one from your feedback, or add a reward file (.onnx with its .json card).",
            wordWrap=True,
        )
        layout = QVBoxLayout(self)
        layout.addLayout(profile_row)
        layout.addLayout(strength_row)
        layout.addWidget(self.empty_note)
        layout.addWidget(scroll, 1)
        layout.addWidget(add)
        self._show_strength()
        engine.set_alpha(self.strength)

    @property
    def strength(self) -> float:
        return self.strength_slider.value() / WEIGHT_STEPS

    def refresh(self) -> None:
        """Rebuild the rows from the store, checked against the loaded model, and steer with them."""
        for row in self.rows:
            row.hide()
            row.deleteLater()
        entries = self._store.rewards()
        infos = self._engine.describe_rewards([entry.path for entry in entries])
        self.rows = [RewardRow(entry, info) for entry, info in zip(entries, infos)]
        for row in self.rows:
            row.changed.connect(lambda row=row: self._row_changed(row))
            row.remove_requested.connect(self._remove)
            self._rows_layout.insertWidget(self._rows_layout.count() - 1, row)
        self.empty_note.setVisible(not self.rows)
        self._show_profile()
        self._try_apply()

    def _show_profile(self) -> None:
        try:
            profile = saved_profile(self._store)
        except ProfileError as error:
            self.profile_label.setText(str(error))
            return
        self.profile_label.setText(profile_summary(profile))
        self.style_button.setText("Retune my style…" if profile is not None else "Find my style…")

    def add_reward_file(self, path: Path | str) -> None:
        info = self._engine.describe_rewards([path])[0]
        if info.card is None:
            self.error.emit(info.problem)
            return
        self._store.add_reward(path, info.name)
        self.refresh()

    def active_weights(self) -> dict[Path | str, float]:
        return {row.path: row.weight for row in self.rows if row.active}

    def dials(self) -> dict[str, float]:
        """The switched-on rewards and their weights, as a preset keeps them."""
        return {row.path: row.weight for row in self.rows if row.enabled_box.isChecked()}

    def apply_dials(self, dials: Mapping[str, float], strength: float) -> None:
        """A preset's dials: the rewards it names on at its weights, every other one off; then its strength."""
        for entry in self._store.rewards():
            weight = dials.get(entry.path)
            self._store.set_reward_state(entry.path, enabled=weight is not None, weight=weight)
        self.strength_slider.setValue(round(strength * WEIGHT_STEPS))
        self.refresh()

    def _try_apply(self) -> bool:
        """Steer with the active rows; on a reward's error the engine changes nothing and False is returned."""
        try:
            self._engine.set_active_rewards(self.active_weights())
        except PrtError as error:
            self.error.emit(str(error))
            return False
        self.changed.emit()
        return True

    def _row_changed(self, row: RewardRow) -> None:
        if not self._try_apply():
            row.switch_off()
        self._store.set_reward_state(row.path, enabled=row.enabled_box.isChecked(), weight=row.weight)

    def _remove(self, path: str) -> None:
        self._store.remove_reward(path)
        self.refresh()

    def _strength_moved(self) -> None:
        self._show_strength()
        self._engine.set_alpha(self.strength)
        self.strength_changed.emit(self.strength)
        self.changed.emit()

    def _show_strength(self) -> None:
        self.strength_label.setText(f"{self.strength:.2f}×")

    def choose_reward_file(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "Add a reward", "", "Reward models (*.onnx)")
        if path:
            self.add_reward_file(path)
