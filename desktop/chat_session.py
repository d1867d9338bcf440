"""The conversation on screen: what is sent, streamed, stored, rated, edited and picked.

Every store call happens here, on the GUI thread. A reply streams from a ReplyJob on the thread
pool into a buffer that a 50 ms timer drains into the view and into a ReplyRecorder, which keeps
the stored assistant message current, so a stopped or crashed reply keeps its partial text.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from PySide6.QtCore import QObject, QTimer, Signal

from desktop.chat_view import ChatView, MessageBody, MessageWidget, PairWidget, ask_for_edit
from desktop.token_view import TokenInfo
from desktop.workers import ReplyJob, run_in_background
from engine.app.backend import ChatBackend
from engine.app.chat import ReplyRecorder, StoredContext
from engine.app.context import ContextUse
from engine.app.store import Message, Store
from engine.runtime.decode import GenerationResult, TokenEvent
from engine.runtime.errors import StoreError
from engine.runtime.steering import SamplingConfig

REPAINT_INTERVAL_MS = 50
RATINGS = ("thumbs_up", "thumbs_down")
TITLE_LENGTH = 48


def last_context(path: list[Message]) -> StoredContext | None:
    """What the last reply on a path sent (the next reply starts from its ``left_out``, so the KV prefix holds)."""
    replies = (StoredContext.of(message.stats) for message in reversed(path) if message.role == "assistant")
    return next((context for context in replies if context is not None), None)


def marker_position(path: list[Message], left_out: int) -> int:
    """Where the "not sent" marker goes on the shown path: below the ``left_out`` oldest messages with text."""
    sent = [index for index, message in enumerate(path) if message.content.strip()]
    return sent[left_out] if 0 < left_out < len(sent) else 0


def title_from(text: str) -> str:
    first_line = text.strip().splitlines()[0]
    return first_line if len(first_line) <= TITLE_LENGTH else first_line[: TITLE_LENGTH - 1] + "…"


@dataclass
class _StreamingReply:
    """The stored assistant message a single reply streams into (a new one, or one being continued)."""

    message_id: int
    recorder: ReplyRecorder
    widget: MessageWidget | None  # None once the view shows another conversation
    earlier_tokens: int = 0  # a continued reply's tokens before this run


class ChatSession(QObject):
    conversations_changed = Signal()  # a conversation was created, renamed or got new messages
    feedback_changed = Signal()
    busy_changed = Signal(bool)
    speed_changed = Signal(float)  # tokens per second of the reply streaming or just finished
    context_changed = Signal(int, int)  # tokens the conversation takes in the context, the context's size
    conversation_opened = Signal(object)  # the preset the conversation shown uses (an id, or None)
    error = Signal(str)

    def __init__(
        self, engine: ChatBackend, store: Store, view: ChatView, sampling: Callable[[int | None], SamplingConfig]
    ) -> None:
        super().__init__(view)
        self._engine, self._store, self._view, self._sampling = engine, store, view, sampling
        self.conversation_id: int | None = None
        self.preset_id: int | None = None  # the shown conversation's preset; a new chat keeps the last one
        self.model_ready = True  # False while a model loads
        self._tokens: dict[int, list[TokenInfo]] = {}  # per-token traces of this session's replies
        self._job: ReplyJob | None = None
        self._streamed: list[list[TokenInfo]] = []  # per slot, what the running job produced
        self._targets: list[MessageBody] = []  # per slot, the MessageBody showing it (empty once the view moved on)
        self._reply: _StreamingReply | None = None  # a single reply while it streams
        self._pair: PairWidget | None = None  # "Show me two" on screen, until one is picked
        self._pair_results: list[GenerationResult] = []
        self._pair_reward_names: list[str] = []
        self._pair_context: ContextUse | None = None
        self._token_count = 0
        self._first_token_at: float | None = None
        self._path_sent: list[Message] = []  # the shown path when the running reply was planned
        self._context_shown = False
        self._timer = QTimer(self, interval=REPAINT_INTERVAL_MS)
        self._timer.timeout.connect(self._drain)
        view.send_requested.connect(lambda text, two: self.send(text, two=two))
        view.stop_requested.connect(self.stop)
        view.regenerate_requested.connect(self.regenerate)
        view.continue_requested.connect(self.continue_reply)
        view.alternative_requested.connect(self.show_alternative)
        view.edit_requested.connect(self._ask_and_edit)
        view.rating_changed.connect(self.set_rating)
        view.pick_requested.connect(self.pick)
        view.system_prompt_edited.connect(self.set_system_prompt)

    @property
    def busy(self) -> bool:
        return self._job is not None

    # -- conversations -------------------------------------------------------
    def open(self, conversation_id: int | None) -> None:
        """Show a conversation (None: a new, empty one, created when the first message is sent)."""
        if conversation_id == self.conversation_id and conversation_id is not None:
            return
        self._targets = []  # a running reply keeps streaming into the store, off screen
        if self._reply is not None:
            self._reply.widget = None
        self.conversation_id = conversation_id
        conversation = self._store.conversation(conversation_id) if conversation_id is not None else None
        if conversation is not None:
            self.preset_id = conversation.preset_id
        self._view.set_system_prompt(conversation.system_prompt if conversation is not None else "")
        self._refresh_view()
        self.conversation_opened.emit(self.preset_id)

    def set_preset(self, preset_id: int | None) -> None:
        """The preset this conversation (or the next new one) uses."""
        self.preset_id = preset_id
        if self.conversation_id is not None:
            self._store.set_conversation_preset(self.conversation_id, preset_id)

    def set_system_prompt(self, text: str) -> None:
        if self.conversation_id is not None:
            self._store.set_system_prompt(self.conversation_id, text)

    def remember_tokens(self, message_id: int, tokens: list[TokenInfo]) -> None:
        self._tokens[message_id] = tokens

    def _refresh_view(self) -> None:
        messages = self._store.messages(self.conversation_id) if self.conversation_id is not None else []
        self._pair, self._pair_results = None, []  # an unpicked pair is dropped
        tokens = {message.id: traced for message in messages if (traced := self._tokens_of(message)) is not None}
        context = last_context(messages)
        self._view.show_messages(
            messages,
            tokens=tokens,
            ratings=self._ratings(messages),
            alternatives=self._alternatives(messages),
            left_out=marker_position(messages, context.left_out if context else 0),
        )
        self._store.mark_seen(message.id for message in messages if not message.seen)
        if context is not None:
            self.context_changed.emit(context.used, context.size)

    def _show_added(self, message_id: int) -> None:
        """Show a message just added after the shown path (the whole view again only if a pair was waiting)."""
        if self._pair is not None:
            self._refresh_view()
            return
        message = self._store.message(message_id)
        self._view.add_message(message, tokens=self._tokens.get(message_id))
        self._store.mark_seen([message_id])

    def _alternatives(self, messages: list[Message]) -> dict[int, tuple[int, int]]:
        """(index, count) among its alternatives, for each message that has some."""
        shown = {}
        for message in messages:
            ids = [sibling.id for sibling in self._store.alternatives(message.id)]
            if len(ids) > 1:
                shown[message.id] = (ids.index(message.id), len(ids))
        return shown

    def show_alternative(self, message_id: int, step: int) -> None:
        """Show the previous (-1) or next (+1) alternative of a message, and the branch below it."""
        if self.busy:
            self.error.emit("Stop the reply before moving to another version.")
            return
        ids = [sibling.id for sibling in self._store.alternatives(message_id)]
        index = ids.index(message_id) + step
        if 0 <= index < len(ids):
            self._store.show_alternative(ids[index])
            self._refresh_view()

    def _tokens_of(self, message: Message) -> list[TokenInfo] | None:
        """The message's per-token trace, if this session made it and the text is still what it made."""
        tokens = self._tokens.get(message.id)
        if tokens is not None and "".join(token.text for token in tokens) == message.content:
            return tokens
        return None  # none, edited since, or an id reused after a deletion

    def _ratings(self, messages: list[Message]) -> dict[int, str]:
        ratings: dict[int, str] = {}
        for message in messages:
            if message.role == "assistant":
                kinds = [item.kind for item in self._store.feedback(message_id=message.id) if item.kind in RATINGS]
                if kinds:
                    ratings[message.id] = kinds[-1]
        return ratings

    def _ensure_conversation(self, first_message: str) -> int:
        if self.conversation_id is None:
            self.conversation_id = self._store.create_conversation(
                title=title_from(first_message),
                system_prompt=self._view.system_prompt.text(),
                model_name=self._model_name(),
            )
            if self.preset_id is not None:
                self._store.set_conversation_preset(self.conversation_id, self.preset_id)
        return self.conversation_id

    def _model_name(self) -> str:
        return self._engine.base.name if self._engine.base is not None else ""

    def _model_messages(self) -> list[dict[str, str]]:
        """[system] + the shown path's turns with text, as the engine takes them."""
        system = self._store.conversation(self.conversation_id).system_prompt.strip()
        self._path_sent = self._store.messages(self.conversation_id)
        turns = [
            {"role": message.role, "content": message.content} for message in self._path_sent if message.content.strip()
        ]
        return ([{"role": "system", "content": system}] if system else []) + turns

    # -- replies ----------------------------------------------------------------
    def send(self, text: str, *, two: bool = False) -> None:
        if self.busy or not text.strip():
            return
        if not self.model_ready:
            self.error.emit("The model is still loading; send again in a moment.")
            return
        conversation_id = self._ensure_conversation(text)
        self._show_added(self._store.add_message(conversation_id, "user", text))
        self._store.set_model_name(conversation_id, self._model_name())
        self._view.clear_input()
        self.conversations_changed.emit()
        self._start_reply(two=two)

    def regenerate(self) -> None:
        """Write another reply to the last question; the earlier replies stay as its alternatives."""
        if self.busy or self.conversation_id is None:
            return
        messages = self._store.messages(self.conversation_id)
        if not any(message.role == "user" for message in messages):
            return
        last = messages[-1]
        self._start_reply(two=False, alternative_to=last.id if last.role == "assistant" else None)

    def continue_reply(self) -> None:
        """Extend the last reply where it stopped (stopped, cut off by its length, or interrupted by a crash)."""
        if self.busy or self.conversation_id is None:
            return
        messages = self._store.messages(self.conversation_id)
        if not messages or messages[-1].role != "assistant" or not messages[-1].content.strip():
            self.error.emit("There is no reply to continue; send a message first.")
            return
        self._start_reply(two=False, continuing=messages[-1])

    def stop(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _start_reply(self, *, two: bool, alternative_to: int | None = None, continuing: Message | None = None) -> None:
        """Stream a reply: a pair (``two``), an extension of ``continuing``, or a new message after the shown path
        (beside ``alternative_to`` when given)."""
        if two:
            seed = random.randrange(2**31 - 1)
            configs = [self._sampling(seed), self._sampling(seed + 1)]
            self._pair = self._view.add_pair()
            self._targets = list(self._pair.bodies)
        else:
            configs = [self._sampling(None)]
            self._reply = self._streaming_reply(alternative_to, continuing)
            assert self._reply.widget is not None  # just shown
            self._targets = [self._reply.widget.body]
        messages = self._model_messages()
        earlier = last_context(self._path_sent)  # the same start again keeps the KV prefix
        left_out = earlier.left_out if earlier else 0
        job = ReplyJob(self._engine, messages, configs, left_out=left_out, continue_last=bool(continuing))
        self._job, self._streamed = job, [[] for _ in configs]
        self._token_count, self._first_token_at = 0, None
        self._context_shown = False
        self._set_busy(True)
        self._timer.start()
        run_in_background(
            job.run,
            lambda results: self._finished(job, results),
            lambda message: self._finished(job, job.results, error=message),
        )

    def _streaming_reply(self, alternative_to: int | None, continuing: Message | None) -> _StreamingReply:
        """The stored message the reply streams into, shown as the last one."""
        if continuing is not None:
            self._store.update_message(continuing.id, status="streaming")
            message_id, text = continuing.id, continuing.content
            self._tokens.pop(message_id, None)  # the trace would cover only the new part
            self._refresh_view()
        else:
            message_id, text = (
                self._store.add_message(
                    self.conversation_id, "assistant", "", status="streaming", alternative_to=alternative_to
                ),
                "",
            )
            self._tokens[message_id] = []  # its widget collects the trace as it streams
            if alternative_to is None:
                self._show_added(message_id)
            else:
                self._refresh_view()  # the alternatives' "< 2/2 >"
        widget = self._view.message_widgets()[-1]
        earlier = continuing.stats.get("tokens", 0) if continuing is not None else 0
        recorder = ReplyRecorder(self._store, message_id, text=text)
        return _StreamingReply(message_id, recorder, widget, earlier_tokens=earlier if isinstance(earlier, int) else 0)

    def _drain(self) -> None:
        """Move what the worker produced since the last tick into the view and the store."""
        self._show_context()
        pieces = self._job.drain() if self._job is not None else []
        for slot in range(len(self._streamed)):
            new = [piece for piece_slot, piece in pieces if piece_slot == slot]
            if not new:
                continue
            self._streamed[slot].extend(new)
            if slot < len(self._targets):
                self._targets[slot].append_tokens(new)
            if self._reply is not None:
                self._save(self._reply.recorder.feed, TokenEvent("".join(piece.text for piece in new)))
        self._report_speed(sum(piece.shift is not None for _slot, piece in pieces))

    def _show_context(self) -> None:
        """Once the running reply's prompt is planned: the marker over what it leaves out, and the meter."""
        context = self._job.context if self._job is not None else None
        if context is None or self._context_shown:
            return
        self._context_shown = True
        if self._targets:  # still on screen
            self._view.show_left_out(marker_position(self._path_sent, context.left_out))
            self.context_changed.emit(context.prompt_tokens, context.context_size)

    def _save(self, write: Callable[..., object], *args, **kwargs) -> None:
        """A write of the streaming reply; one the store refuses (a full disk) stops the reply and is shown once.

        The recorder then writes nothing more, so the stored message keeps the text saved before.
        """
        try:
            write(*args, **kwargs)
        except StoreError as error:
            self.stop()
            self.error.emit(str(error))

    def _report_speed(self, new_tokens: int) -> None:
        """Tokens per second since the first token arrived (the prompt's prefill not counted)."""
        if new_tokens and self._first_token_at is None:
            self._first_token_at, new_tokens = time.monotonic(), new_tokens - 1
        self._token_count += new_tokens
        if self._token_count and self._first_token_at is not None:
            self.speed_changed.emit(self._token_count / max(time.monotonic() - self._first_token_at, 1e-3))

    def _finished(self, job: ReplyJob, results: list[GenerationResult], error: str | None = None) -> None:
        self._drain()
        self._timer.stop()
        self._job = None
        reply, self._reply = self._reply, None
        if reply is not None:
            self._finish_single(reply, job, results, error)
        else:
            self._finish_pair(job, results)
        if results:
            self.speed_changed.emit(results[-1].tokens_per_second)
        self._set_busy(False)
        self.conversations_changed.emit()
        if error:
            self.error.emit(error)

    def _finish_single(
        self, reply: _StreamingReply, job: ReplyJob, results: list[GenerationResult], error: str | None
    ) -> None:
        result = results[0] if results else GenerationResult(finish_reason="cancelled")
        self._save(
            reply.recorder.finish,
            result,
            job.reward_names,
            error=error,
            earlier_tokens=reply.earlier_tokens,
            context=job.context,
        )
        self._tokens[reply.message_id] = self._streamed[0]
        if reply.widget is not None:
            message = self._store.message(reply.message_id)
            reply.widget.show_status(message.status, message.stats)
            if (context := StoredContext.of(message.stats)) is not None:
                self.context_changed.emit(context.used, context.size)

    def _finish_pair(self, job: ReplyJob, results: list[GenerationResult]) -> None:
        if self._pair is not None and self._targets:
            self._pair_results, self._pair_reward_names = list(results), job.reward_names
            self._pair_context = job.context
            self._pair.allow_picks()

    def pick(self, slot: int) -> None:
        """Keep reply ``slot`` of a pair as the assistant message; the other becomes the rejected side."""
        if self.busy or slot >= len(self._pair_results):
            return
        chosen, rejected = ("".join(piece.text for piece in self._streamed[index]) for index in (slot, 1 - slot))
        message_id = self._store.add_message(self.conversation_id, "assistant", "", status="streaming")
        recorder = ReplyRecorder(self._store, message_id)
        recorder.feed(TokenEvent(chosen))
        recorder.finish(self._pair_results[slot], self._pair_reward_names, context=self._pair_context)
        self._tokens[message_id] = self._streamed[slot]
        if rejected.strip():  # a pair stopped before its second reply has nothing to prefer against
            self._add_feedback("pick", self._store.message(message_id), chosen=chosen, rejected=rejected)
        self._refresh_view()
        self.conversations_changed.emit()

    def _set_busy(self, busy: bool) -> None:
        self._view.set_busy(busy)
        self.busy_changed.emit(busy)

    # -- edits and feedback ---------------------------------------------------------
    def _ask_and_edit(self, message_id: int) -> None:
        message = self._store.message(message_id)
        text = ask_for_edit(self._view, message.content, role=message.role)
        if text is not None:
            self.edit_message(message_id, text)

    def edit_message(self, message_id: int, text: str) -> None:
        """A user message: a new branch from the edited text, answered (the old branch stays, behind < >).
        A reply: store the edit as preferred over the original."""
        message = self._store.message(message_id)
        if self.busy:
            self.error.emit("Stop the reply before editing.")
            return
        if not text.strip() or text == message.content:
            return
        if message.role == "user":
            self._store.add_message(message.conversation_id, "user", text, alternative_to=message_id)
            self._refresh_view()
            self._start_reply(two=False)
            return
        self._store.update_message(message_id, content=text)
        self._add_feedback("edit", message, chosen=text, rejected=message.content)
        self._refresh_view()

    def set_rating(self, message_id: int, kind: str | None) -> None:
        """Thumbs up, thumbs down, or neither (None) for an assistant message."""
        for item in self._store.feedback(message_id=message_id):
            if item.kind in RATINGS:
                self._store.remove_feedback(item.id)
        if kind is not None:
            message = self._store.message(message_id)
            side = "chosen" if kind == "thumbs_up" else "rejected"
            self._add_feedback(kind, message, **{side: message.content})
        self.feedback_changed.emit()

    def _add_feedback(self, kind: str, message, **sides: str) -> None:
        conversation = self._store.conversation(message.conversation_id)
        self._store.add_feedback(
            kind,
            prompt=self._prompt_before(message),
            system=conversation.system_prompt,
            conversation_id=message.conversation_id,
            message_id=message.id,
            **sides,
        )
        self.feedback_changed.emit()

    def _prompt_before(self, message) -> str:
        """The user message the reply answers."""
        earlier = [
            item
            for item in self._store.messages(message.conversation_id)
            if item.role == "user" and item.position < message.position
        ]
        return earlier[-1].content if earlier else ""
