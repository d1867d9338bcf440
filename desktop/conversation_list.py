"""The left side: a search box over titles and message texts, and the conversations, newest first."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QInputDialog,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QMessageBox,
    QVBoxLayout,
    QWidget,
)

from engine.app.store import Store


class ConversationList(QWidget):
    conversation_selected = Signal(int)
    conversation_deleted = Signal(int)

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self.search = QLineEdit(placeholderText="Search chats (Ctrl+F)")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(lambda _text: self.refresh())
        self.list = QListWidget()
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._context_menu)
        self.list.currentItemChanged.connect(self._current_changed)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.search)
        layout.addWidget(self.list)

    def refresh(self, select: int | None = None) -> None:
        """Reload from the store (filtered by the search text), keeping or moving the selection quietly."""
        current = self.current_id() if select is None else select
        self.list.blockSignals(True)
        self.list.clear()
        for conversation in self._store.conversations(self.search.text()):
            item = QListWidgetItem(conversation.title)
            item.setData(Qt.ItemDataRole.UserRole, conversation.id)
            item.setToolTip(f"{conversation.title}\nlast active {conversation.updated[:16].replace('T', ' ')} UTC")
            self.list.addItem(item)
            if conversation.id == current:
                self.list.setCurrentItem(item)
        self.list.blockSignals(False)

    def current_id(self) -> int | None:
        item = self.list.currentItem()
        return item.data(Qt.ItemDataRole.UserRole) if item is not None else None

    def titles(self) -> list[str]:
        return [self.list.item(row).text() for row in range(self.list.count())]

    def clear_selection(self) -> None:
        self.list.setCurrentRow(-1)  # Qt's setCurrentItem(None) does this; the stub takes no None

    def focus_search(self) -> None:
        self.search.setFocus()
        self.search.selectAll()

    def _current_changed(self, item: QListWidgetItem | None) -> None:
        if item is not None:
            self.conversation_selected.emit(item.data(Qt.ItemDataRole.UserRole))

    def _context_menu(self, point) -> None:
        item = self.list.itemAt(point)
        if item is None:
            return
        conversation_id = item.data(Qt.ItemDataRole.UserRole)
        menu = QMenu(self)
        menu.addAction("Rename…", lambda: self._rename(conversation_id, item.text()))
        menu.addAction("Delete…", lambda: self._delete(conversation_id, item.text()))
        menu.exec(self.list.mapToGlobal(point))

    def _rename(self, conversation_id: int, title: str) -> None:
        new_title, ok = QInputDialog.getText(self, "Rename chat", "Title:", text=title)
        if ok and new_title.strip():
            self._store.rename_conversation(conversation_id, new_title.strip())
            self.refresh()

    def _delete(self, conversation_id: int, title: str) -> None:
        answer = QMessageBox.question(
            self,
            "Delete chat",
            f"Delete “{title}” and its messages? Chat › Undo delete brings it back until the app closes. "
            "Feedback you gave in it stays, as training data.",
        )
        if answer == QMessageBox.StandardButton.Yes:
            self._store.delete_conversation(conversation_id)
            self.conversation_deleted.emit(conversation_id)
            self.refresh()
