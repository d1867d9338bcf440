"""Light or dark, as the OS says: the few colors of our own (token tints, badges) pick their shade here.

Everything else uses palette roles, which Qt switches by itself when the OS scheme changes.
"""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette

# (light scheme, dark scheme) shades for "raised by the reward" / "lowered by the reward"
_RAISED = (QColor(26, 127, 55), QColor(87, 201, 120))
_LOWERED = (QColor(207, 34, 46), QColor(255, 123, 114))


def is_dark() -> bool:
    """The OS scheme when Qt knows it, else judged from the window color of the palette."""
    scheme = QGuiApplication.styleHints().colorScheme()
    if scheme != Qt.ColorScheme.Unknown:
        return scheme == Qt.ColorScheme.Dark
    return QGuiApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128


def raised_color() -> QColor:
    return QColor(_RAISED[is_dark()])


def lowered_color() -> QColor:
    return QColor(_LOWERED[is_dark()])
