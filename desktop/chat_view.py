"""The chat view: system prompt, messages (Markdown or tinted tokens), a side-by-side pair, and the composer.

Widgets only: they show what they are given and emit what the user asked for; ChatSession decides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from PySide6.QtCore import QEvent, QPoint, Qt, QUrl, Signal
from PySide6.QtGui import QGuiApplication, QHelpEvent, QKeyEvent, QPalette, QTextCursor
from PySide6.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QTextBrowser,
    QToolButton,
    QToolTip,
    QVBoxLayout,
    QWidget,
)

from desktop.code_blocks import CodeBlocks, follow_link
from desktop.formatting import speed_text
from desktop.token_view import TokenInfo, write_tokens
from engine.app.store import Message, MessageStatus


class MessageBody(QTextBrowser):
    """A message's text at the height of its content: Markdown (or plain text), or tinted tokens.

    Tokens exist for replies generated in this session; the token view shows them when switched on.
    Markdown's code blocks are highlighted, each with a Copy link above it (desktop/code_blocks.py).
    """

    def __init__(
        self,
        text: str = "",
        *,
        markdown: bool = True,
        tokens: Sequence[TokenInfo] | None = None,
        token_view: bool = False,
    ) -> None:
        super().__init__()
        self._text = text
        self._tokens = list(tokens) if tokens is not None else None
        self._markdown = markdown
        self._token_view = token_view
        self._code_blocks = CodeBlocks()
        self.document().setUndoRedoEnabled(False)  # read-only; each render would add to the undo stack
        self.setOpenLinks(False)  # links go to _follow_link: a Copy link copies, a web link opens outside
        self.anchorClicked.connect(self._follow_link)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        palette = self.palette()
        palette.setColor(QPalette.ColorRole.Base, Qt.GlobalColor.transparent)  # the message frame shows through
        self.setPalette(palette)
        self.document().documentLayout().documentSizeChanged.connect(self._fit_height)
        self._render()

    @property
    def text(self) -> str:
        return self._text

    @property
    def shows_tokens(self) -> bool:
        return self._token_view and bool(self._tokens)

    @property
    def code_texts(self) -> list[str]:
        """What the Copy link of each code block copies, in order."""
        return list(self._code_blocks.texts)

    def append_tokens(self, pieces: Sequence[TokenInfo]) -> None:
        """Add streamed pieces to the text (and to the tokens, when it has them)."""
        self._text += "".join(piece.text for piece in pieces)
        if self._tokens is not None:
            self._tokens.extend(pieces)
        self._render()

    def set_token_view(self, on: bool) -> None:
        if on != self._token_view:
            self._token_view = on
            self._render()

    def token_tooltip_at(self, point: QPoint) -> str:
        """The tooltip of the token under ``point`` (viewport coordinates), or ''."""
        position = self.document().documentLayout().hitTest(point, Qt.HitTestAccuracy.ExactHit)
        if position < 0:
            return ""
        cursor = QTextCursor(self.document())
        cursor.setPosition(position + 1)  # charFormat() describes the character before the cursor
        return cursor.charFormat().toolTip()

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):  # Qt sends it as one
            tip = self.token_tooltip_at(self.viewport().mapFrom(self, event.pos()))
            if tip:
                QToolTip.showText(event.globalPos(), tip, self)
            else:
                QToolTip.hideText()
            return True
        return super().event(event)

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and (self.shows_tokens or self._code_blocks.texts):
            self._render()  # tints and code colours have a light and a dark shade

    def _render(self) -> None:
        if self._token_view and self._tokens:  # shows_tokens, spelled out so that mypy sees the tokens
            self._code_blocks.clear()
            write_tokens(self.document(), self._tokens)
        elif self._markdown:
            self._code_blocks.render(self.setMarkdown, self.document(), self._text, self.palette())
        else:
            self._code_blocks.clear()
            self.setPlainText(self._text)

    def _follow_link(self, url: QUrl) -> None:
        follow_link(url, self._code_blocks.texts)

    def _fit_height(self) -> None:
        height = self.document().size().height()
        self.setFixedHeight(math.ceil(height) + 2 * self.frameWidth())


def _tool_button(text: str, tip: str, *, checkable: bool = False) -> QToolButton:
    button = QToolButton()
    button.setText(text)
    button.setToolTip(tip)
    button.setCheckable(checkable)
    button.setAutoRaise(True)
    return button


def stats_text(status: MessageStatus, stats: dict) -> str:
    """'stopped · 42 tokens · 18.3 tok/s · rewards: concise' for an assistant message's header."""
    parts: list[str] = [status] if status in ("streaming", "stopped") else []
    if status == "interrupted":
        parts.append("interrupted (the app closed while it was written): Continue extends it")
    if stats.get("error"):
        parts.append(f"error: {stats['error']}")
    if stats.get("tokens"):
        parts.append(f"{stats['tokens']} tokens")
    if stats.get("tokens_per_second"):
        parts.append(speed_text(stats["tokens_per_second"]))
    if stats.get("rewards"):
        parts.append("rewards: " + ", ".join(stats["rewards"]))
    return " · ".join(parts)


class MessageWidget(QFrame):
    """One stored message: who, its status, its text, and the buttons that act on it; "< 2/3 >" moves between
    its alternatives (regenerated replies, edited questions)."""

    edit_requested = Signal(int)
    rating_changed = Signal(int, object)  # message id, "thumbs_up" | "thumbs_down" | None
    alternative_requested = Signal(int, int)  # message id, -1 (previous) | +1 (next)

    def __init__(
        self,
        message: Message,
        *,
        tokens: Sequence[TokenInfo] | None = None,
        rating: str | None = None,
        token_view: bool = False,
        alternative: tuple[int, int] = (0, 1),
    ) -> None:
        """``alternative``: (index, count) of this message among its alternatives."""
        super().__init__()
        self.message_id = message.id
        self.role = message.role
        is_user = message.role == "user"
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.setAutoFillBackground(True)
        self.setBackgroundRole(QPalette.ColorRole.AlternateBase if is_user else QPalette.ColorRole.Base)
        self.body = MessageBody(message.content, markdown=not is_user, tokens=tokens, token_view=token_view)
        self.status_label = QLabel(wordWrap=True)
        self.status_label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.rating_buttons = {} if is_user else self._rating_buttons(rating)
        self.alternative_label = QLabel(f"{alternative[0] + 1}/{alternative[1]}")
        self.alternative_buttons = self._alternative_buttons(*alternative)
        header = QHBoxLayout()
        header.addWidget(QLabel(f"<b>{'You' if is_user else 'Assistant'}</b>"))
        if alternative[1] > 1:
            header.addWidget(self.alternative_buttons[0])
            header.addWidget(self.alternative_label)
            header.addWidget(self.alternative_buttons[1])
        header.addStretch(1)
        for button in (self._copy_button(), self._edit_button(), *self.rating_buttons.values()):
            header.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.status_label)
        layout.addWidget(self.body)
        self.show_status(message.status, message.stats)

    def show_status(self, status: MessageStatus, stats: dict) -> None:
        text = stats_text(status, stats)
        self.status_label.setText(text)
        self.status_label.setVisible(bool(text))

    def _alternative_buttons(self, index: int, count: int) -> tuple[QToolButton, QToolButton]:
        noun = "question" if self.role == "user" else "reply"
        buttons = (_tool_button("<", f"The previous {noun}"), _tool_button(">", f"The next {noun}"))
        for step, button in zip((-1, 1), buttons):
            button.setEnabled(0 <= index + step < count)
            button.clicked.connect(
                lambda _checked=False, step=step: self.alternative_requested.emit(self.message_id, step)
            )
        return buttons

    def _copy_button(self) -> QToolButton:
        button = _tool_button("Copy", "Copy this message")
        button.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.body.text))
        return button

    def _edit_button(self) -> QToolButton:
        tip = (
            "Edit and send again (the conversation so far stays, as another branch)"
            if self.role == "user"
            else "Edit this reply (kept as preferred over the original)"
        )
        button = _tool_button("Edit", tip)
        button.clicked.connect(lambda: self.edit_requested.emit(self.message_id))
        return button

    def _rating_buttons(self, rating: str | None) -> dict[str, QToolButton]:
        buttons = {
            "thumbs_up": _tool_button("▲ Good", "A good reply (thumbs up)", checkable=True),
            "thumbs_down": _tool_button("▼ Bad", "A bad reply (thumbs down)", checkable=True),
        }
        for kind, button in buttons.items():
            button.setChecked(kind == rating)
            button.clicked.connect(lambda checked, kind=kind: self._rate(kind, checked))
        return buttons

    def _rate(self, kind: str, checked: bool) -> None:
        for other, button in self.rating_buttons.items():
            button.setChecked(checked and other == kind)
        self.rating_changed.emit(self.message_id, kind if checked else None)


class PairWidget(QFrame):
    """Two replies side by side ("Show me two"); the user keeps one."""

    pick_requested = Signal(int)

    def __init__(self, *, token_view: bool) -> None:
        super().__init__()
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.bodies = [MessageBody(tokens=[], token_view=token_view) for _ in range(2)]
        self.pick_buttons = [QPushButton(f"Keep reply {'AB'[slot]}") for slot in range(2)]
        columns = QHBoxLayout(self)
        for slot, (body, button) in enumerate(zip(self.bodies, self.pick_buttons)):
            button.setEnabled(False)
            button.clicked.connect(lambda _checked=False, slot=slot: self.pick_requested.emit(slot))
            column = QVBoxLayout()
            column.addWidget(QLabel(f"<b>Reply {'AB'[slot]}</b>"))
            column.addWidget(body)
            column.addWidget(button)
            columns.addLayout(column, 1)

    def allow_picks(self) -> None:
        for body, button in zip(self.bodies, self.pick_buttons):
            button.setEnabled(bool(body.text.strip()))


class Composer(QPlainTextEdit):
    """The message box: Enter or Ctrl+Enter sends, Shift+Enter starts a new line."""

    submitted = Signal()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        is_enter = event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        if is_enter and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.submitted.emit()
            return
        super().keyPressEvent(event)


def left_out_text(count: int) -> str:
    return (
        f"{count} earlier message{'s are' if count != 1 else ' is'} not sent to the model: the conversation is "
        "longer than its context. They stay here and in search."
    )


class ChatView(QWidget):
    send_requested = Signal(str, bool)  # text, show two replies
    stop_requested = Signal()
    regenerate_requested = Signal()
    continue_requested = Signal()
    alternative_requested = Signal(int, int)  # message id, -1 | +1
    edit_requested = Signal(int)
    rating_changed = Signal(int, object)
    pick_requested = Signal(int)
    system_prompt_edited = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self._token_view = False
        self._bodies: list[MessageBody] = []
        self._follow = True  # keep the newest text in sight unless the user scrolled up
        self.system_prompt = QLineEdit(placeholderText="System prompt for this conversation (optional)")
        self.system_prompt.editingFinished.connect(lambda: self.system_prompt_edited.emit(self.system_prompt.text()))
        self._messages = QVBoxLayout()
        self._messages.addStretch(1)
        self.scroll_area = self._scroll_area()
        self.input = Composer(placeholderText="Message (Enter sends, Shift+Enter for a new line)")
        self.input.setMaximumHeight(90)
        self.input.submitted.connect(lambda: self._request_send(two=False))
        self.send_button = QPushButton("Send")
        self.two_button = QPushButton("Show me two")
        self.two_button.setToolTip("Generate two replies side by side and keep the one you prefer")
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Write another reply; the earlier ones stay (< 1/2 > moves between them)")
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip("Extend the last reply where it stopped")
        self.left_out_marker = QLabel(wordWrap=True)
        self.left_out_marker.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.left_out_marker.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop the reply (Esc)")
        self.send_button.clicked.connect(lambda: self._request_send(two=False))
        self.two_button.clicked.connect(lambda: self._request_send(two=True))
        self.regenerate_button.clicked.connect(self.regenerate_requested)
        self.continue_button.clicked.connect(self.continue_requested)
        self.stop_button.clicked.connect(self.stop_requested)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        for button in (
            self.continue_button,
            self.regenerate_button,
            self.two_button,
            self.stop_button,
            self.send_button,
        ):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.system_prompt)
        layout.addWidget(self.scroll_area, 1)
        layout.addWidget(self.input)
        layout.addLayout(buttons)
        self.set_busy(False)

    def _scroll_area(self) -> QScrollArea:
        container = QWidget()
        container.setLayout(self._messages)
        area = QScrollArea()
        area.setWidgetResizable(True)
        area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        area.setWidget(container)
        area.verticalScrollBar().valueChanged.connect(self._scrolled)
        area.verticalScrollBar().rangeChanged.connect(self._content_resized)
        return area

    def _scrolled(self, value: int) -> None:
        self._follow = value >= self.scroll_area.verticalScrollBar().maximum() - 8

    def _content_resized(self, _minimum: int, maximum: int) -> None:
        if self._follow:
            self.scroll_area.verticalScrollBar().setValue(maximum)

    # -- what the session shows --------------------------------------------
    def show_messages(
        self,
        messages: Sequence[Message],
        *,
        tokens: Mapping[int, Sequence[TokenInfo]],
        ratings: Mapping[int, str],
        alternatives: Mapping[int, tuple[int, int]] | None = None,
        left_out: int = 0,
    ) -> None:
        """Replace the messages on screen; ``tokens``: the per-token traces there are, by message id;
        ``alternatives``: (index, count) of the messages that have some; ``left_out``: how many of the first
        messages the model no longer sees (a marker goes below them)."""
        while self._messages.count() > 1:  # everything but the trailing stretch
            item = self._messages.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None and widget is not self.left_out_marker:
                widget.hide()
                widget.deleteLater()
        self._bodies = []
        self._follow = True
        self.left_out_marker.setVisible(False)
        for index, message in enumerate(messages):
            if index == left_out and left_out:
                self.show_left_out(left_out)
            self.add_message(
                message,
                tokens=tokens.get(message.id),
                rating=ratings.get(message.id),
                alternative=(alternatives or {}).get(message.id, (0, 1)),
            )

    def show_left_out(self, count: int) -> None:
        """Put the marker below the first ``count`` messages (0: hide it)."""
        self._messages.removeWidget(self.left_out_marker)
        if count:
            self.left_out_marker.setText(left_out_text(count))
            self._messages.insertWidget(count, self.left_out_marker)  # before showing it: no window of its own
        self.left_out_marker.setVisible(count > 0)

    def add_message(
        self,
        message: Message,
        *,
        tokens: Sequence[TokenInfo] | None = None,
        rating: str | None = None,
        alternative: tuple[int, int] = (0, 1),
    ) -> MessageWidget:
        widget = MessageWidget(
            message, tokens=tokens, rating=rating, token_view=self._token_view, alternative=alternative
        )
        widget.edit_requested.connect(self.edit_requested)
        widget.rating_changed.connect(self.rating_changed)
        widget.alternative_requested.connect(self.alternative_requested)
        self._insert(widget, [widget.body])
        return widget

    def add_pair(self) -> PairWidget:
        pair = PairWidget(token_view=self._token_view)
        pair.pick_requested.connect(self.pick_requested)
        self._insert(pair, pair.bodies)
        return pair

    def _insert(self, widget: QWidget, bodies: list[MessageBody]) -> None:
        self._messages.insertWidget(self._messages.count() - 1, widget)
        self._bodies += bodies

    def message_widgets(self) -> list[MessageWidget]:
        items = (self._messages.itemAt(index) for index in range(self._messages.count() - 1))
        widgets = (item.widget() for item in items if item is not None)
        return [widget for widget in widgets if isinstance(widget, MessageWidget)]

    def set_token_view(self, on: bool) -> None:
        self._token_view = on
        for body in self._bodies:
            body.set_token_view(on)

    def set_busy(self, busy: bool) -> None:
        for button in (self.send_button, self.two_button, self.regenerate_button, self.continue_button):
            button.setEnabled(not busy)
        self.stop_button.setEnabled(busy)

    def set_system_prompt(self, text: str) -> None:
        self.system_prompt.setText(text)

    def clear_input(self) -> None:
        self.input.clear()

    def _request_send(self, *, two: bool) -> None:
        self.send_requested.emit(self.input.toPlainText(), two)


def ask_for_edit(parent: QWidget, text: str, *, role: str) -> str | None:
    """A dialog to edit a message; the new text, or None when cancelled."""
    dialog = QDialog(parent)
    dialog.setWindowTitle("Edit your message" if role == "user" else "Edit the reply")
    editor = QPlainTextEdit(text)
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    note = QLabel(
        "The conversation continues from the edited message; the earlier version stays as another branch (< >)."
        if role == "user"
        else "Your edit is kept as preferred over the original, for tuning."
    )
    layout = QVBoxLayout(dialog)
    layout.addWidget(note)
    layout.addWidget(editor)
    layout.addWidget(buttons)
    dialog.resize(560, 320)
    return editor.toPlainText() if dialog.exec() == QDialog.DialogCode.Accepted else None
