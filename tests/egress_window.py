"""Drive the real window as a first-time user would, for the egress test: ``prt app --model GGUF``,
skip "Find your style", type a message, press Enter, wait for the streamed reply, quit.

Prints one JSON line: the reply's stored status and text. Exits non-zero if any step did not happen.
"""

from __future__ import annotations

import json
import sys
import time

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QApplication

from desktop import app
from desktop.main_window import MainWindow

PROMPT = "Hello there"
TIMEOUT_SECONDS = 240


class Driver:
    def __init__(self, qt_app: QApplication) -> None:
        self.qt_app = qt_app
        self.started = time.monotonic()
        self.sent = False
        self.reply: dict | None = None
        self.timer = QTimer()
        self.timer.timeout.connect(self.step)
        self.timer.start(100)

    def step(self) -> None:
        window = next((w for w in self.qt_app.topLevelWidgets() if isinstance(w, MainWindow)), None)
        if time.monotonic() - self.started > TIMEOUT_SECONDS:
            self.qt_app.exit(3)
        elif window is None or not window.session.model_ready:
            return
        elif window.style_dialog is not None and window.style_dialog.isVisible():
            window.style_dialog.skip_button.click()
        elif not self.sent:
            self.type_and_send(window)
        elif not window.session.busy:
            [_question, answer] = window.store.messages(window.session.conversation_id)
            self.reply = {"status": answer.status, "text": answer.content}
            window.close()

    def type_and_send(self, window: MainWindow) -> None:
        box = window.chat_view.input
        box.setFocus()
        box.setPlainText(PROMPT)
        for kind in (QKeyEvent.Type.KeyPress, QKeyEvent.Type.KeyRelease):
            QApplication.sendEvent(box, QKeyEvent(kind, Qt.Key.Key_Return, Qt.KeyboardModifier.NoModifier))
        self.sent = True


def main() -> int:
    qt_app = QApplication([sys.argv[0]])
    driver = Driver(qt_app)
    code = app.main(sys.argv[1:])
    print(json.dumps(driver.reply))
    return code or (0 if driver.reply else 4)


if __name__ == "__main__":
    sys.exit(main())
