"""Work off the GUI thread: a generic task on the thread pool, and the reply job whose tokens the GUI
drains on a timer (no signal per token). The store is only touched from the GUI thread."""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal

from desktop.token_view import TokenInfo, token_info
from engine.app.backend import ChatBackend, ReplyStream
from engine.app.context import ContextUse
from engine.runtime.base_model import ChatMessage
from engine.runtime.decode import GenerationResult, TokenEvent
from engine.runtime.errors import PrtError
from engine.runtime.steering import SamplingConfig


def error_text(error: BaseException) -> str:
    """A PrtError's own message; anything else is a bug: its traceback goes to stderr, its name to the user."""
    if isinstance(error, PrtError):
        return str(error)
    traceback.print_exception(error, file=sys.stderr)
    return f"Unexpected error ({type(error).__name__}): {error}"


class _Relay(QObject):
    """Lives on the GUI thread, so a signal emitted by a worker reaches the callbacks there."""

    done = Signal(object)
    failed = Signal(str)
    _pending: set[_Relay] = set()  # keeps each relay alive until it has delivered

    def __init__(self, on_done: Callable[[Any], None], on_error: Callable[[str], None]) -> None:
        super().__init__()
        self._on_done, self._on_error = on_done, on_error
        self.done.connect(self._deliver_result)
        self.failed.connect(self._deliver_error)
        _Relay._pending.add(self)

    def _deliver_result(self, result: Any) -> None:
        _Relay._pending.discard(self)
        self._on_done(result)

    def _deliver_error(self, message: str) -> None:
        _Relay._pending.discard(self)
        self._on_error(message)


class _Task(QRunnable):
    def __init__(self, function: Callable[[], Any], relay: _Relay) -> None:
        super().__init__()
        self._function, self._relay = function, relay

    def run(self) -> None:
        try:
            result = self._function()
        except Exception as error:  # reported to the user, never swallowed
            self._relay.failed.emit(error_text(error))
        else:
            self._relay.done.emit(result)


def run_in_background(
    function: Callable[[], Any], on_done: Callable[[Any], None], on_error: Callable[[str], None]
) -> None:
    """Run ``function`` on the thread pool; ``on_done(result)`` or ``on_error(message)`` runs on the GUI thread."""
    QThreadPool.globalInstance().start(_Task(function, _Relay(on_done, on_error)))


def wait_for_background_work() -> None:
    QThreadPool.globalInstance().waitForDone()


class ReplyJob:
    """One reply, or two for "Show me two" (one after the other, each with its own sampling config).

    ``run`` iterates the generations on a worker thread and appends (slot, TokenInfo) pieces to a
    locked buffer; the GUI takes them with ``drain``. ``cancel`` is safe from the GUI thread.
    """

    def __init__(
        self,
        engine: ChatBackend,
        messages: Sequence[ChatMessage],
        configs: Sequence[SamplingConfig],
        *,
        left_out: int = 0,
        continue_last: bool = False,
    ) -> None:
        """``left_out`` and ``continue_last``: as ChatBackend.reply takes them."""
        self._engine = engine
        self._messages = list(messages)
        self._configs = list(configs)
        self._left_out, self._continue_last = left_out, continue_last
        self.context: ContextUse | None = None  # what the (last) reply sends, once it is planned
        self.reward_names: list[str] = list(engine.active_reward_names)
        self.results: list[GenerationResult] = []  # one per started generation, filled in as it runs
        self._pieces: list[tuple[int, TokenInfo]] = []
        self._lock = threading.Lock()
        self._cancelled = False
        self._generation: ReplyStream | None = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._generation is not None:
                self._generation.cancel()

    def run(self) -> list[GenerationResult]:
        base = self._engine.base

        def token_text(token: int) -> str:
            assert base is not None  # reply() below refuses to start without a model
            return base.token_bytes(token).decode("utf-8", errors="replace")

        for slot, config in enumerate(self._configs):
            generation = self._engine.reply(
                self._messages, config, left_out=self._left_out, continue_last=self._continue_last
            )
            with self._lock:
                if self._cancelled:
                    break
                self._generation = generation
                self.context = generation.context
                self.results.append(generation.result)

            def collect(event: TokenEvent, slot: int = slot) -> None:
                piece = token_info(event, token_text)
                with self._lock:
                    self._pieces.append((slot, piece))

            self._engine.run_locked(generation, collect)
        return self.results

    def drain(self) -> list[tuple[int, TokenInfo]]:
        with self._lock:
            pieces, self._pieces = self._pieces, []
        return pieces
