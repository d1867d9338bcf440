"""What the desktop app asks of the engine: one model, rewards with live dials, replies that
stream and are stored as they go, and tuning in a separate process. No Qt here; the
methods block, so the app calls them from worker threads.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from engine.app.context import ContextUse, default_reply_room, plan_prompt
from engine.runtime.base_model import BaseModel, BaseModelConfig, ChatMessage
from engine.runtime.decode import FinishReason, Generation, GenerationResult, RewardSlot, TokenEvent, attach_rewards
from engine.runtime.errors import PrtError, RewardFileError, StoreError
from engine.runtime.mixing import MergedSessions
from engine.runtime.rewards import RewardCard, RewardModel, card_path
from engine.runtime.steering import SamplingConfig

if TYPE_CHECKING:  # for annotations only: engine.app.backend imports this module
    from engine.app.backend import ReplyStream
    from engine.app.store import MessageStatus


T = TypeVar("T")


@dataclass(frozen=True)
class RewardInfo:
    """An installed reward as the rewards panel shows it."""

    path: Path
    card: RewardCard | None  # None when the card cannot be read
    compatible: bool | None  # None while no model is loaded
    problem: str = ""  # why it cannot be used, in words

    @property
    def name(self) -> str:
        return self.card.name if self.card else self.path.stem


class ChatReply(Generation):
    """A Generation for a chat turn, with the plan of what it sends (``context``)."""

    def __init__(
        self,
        base: BaseModel,
        prompt_tokens: Sequence[int],
        *,
        context: ContextUse,
        rewards: Sequence[RewardSlot],
        config: SamplingConfig,
        merged_sessions: MergedSessions,
    ) -> None:
        super().__init__(base, prompt_tokens, rewards=rewards, config=config, merged_sessions=merged_sessions)
        self.context = context


class ChatEngine:
    """One loaded base model and the rewards switched on for it."""

    def __init__(self, *, reward_threads: int = 1) -> None:
        self.base: BaseModel | None = None
        self.alpha = 1.0  # overall strength; applies from the next token
        self._reward_threads = reward_threads
        self._slots: dict[Path, RewardSlot] = {}
        self._weights: dict[Path, float] = {}
        self._switched_off: list[RewardModel] = []  # closed once no reply can be using them
        self.merged_sessions = MergedSessions()  # the active rewards' merged sessions, kept between replies
        self._lock = threading.Lock()  # one generation or model change at a time

    # -- model ------------------------------------------------------------------
    def load_model(self, path: Path | str, config: BaseModelConfig = BaseModelConfig()) -> BaseModel:
        with self._lock:
            new = BaseModel(path, config=config)
            if self.base is not None:
                self.base.close()
            self.base = new
            self._close_rewards()  # rewards keep their dial but are loaded again for the new vocabulary
        return new

    def close(self) -> None:
        """Close the model, the rewards and their merged sessions, once no reply uses them; safe to call twice."""
        with self._lock:  # a reply or the style survey may still be running on a worker
            if self.base is not None:
                self.base.close()
                self.base = None
            self._close_rewards()

    def _close_rewards(self) -> None:
        self._switched_off += [slot.reward for slot in self._slots.values()]
        self._slots = {}
        self._close_switched_off()

    def _close_switched_off(self) -> None:
        """Close the rewards switched off since the last reply, and the merged sessions that score them."""
        self.merged_sessions.forget(self._switched_off)
        for reward in self._switched_off:
            reward.close()
        self._switched_off = []

    # -- rewards ----------------------------------------------------------------
    def describe_rewards(self, paths: Iterable[Path | str]) -> list[RewardInfo]:
        return [self._describe(Path(path)) for path in paths]

    def _describe(self, path: Path) -> RewardInfo:
        try:
            card = RewardCard.load(card_path(path))
        except RewardFileError as error:
            return RewardInfo(path, None, False, str(error))
        if not path.is_file():
            return RewardInfo(path, card, False, f"Reward file not found: {path}.")
        if self.base is None:
            return RewardInfo(path, card, None)
        if card.vocabulary_fingerprint != self.base.vocabulary_fingerprint:
            return RewardInfo(
                path,
                card,
                False,
                f"Trained for '{card.base_model_name}', whose vocabulary differs from '{self.base.name}'.",
            )
        return RewardInfo(path, card, True)

    def set_active_rewards(self, weights: Mapping[Path | str, float]) -> None:
        """The rewards to steer with and their weights; loads new ones, drops the rest.

        A weight change reaches a running generation at its next token. Raises the reward's
        own error (missing file, other vocabulary) and changes nothing in that case.
        """
        wanted = {Path(path): float(weight) for path, weight in weights.items()}
        current = self._slots | self._load_slots([path for path in wanted if path not in self._slots])
        self._switched_off += [slot.reward for path, slot in current.items() if path not in wanted]
        self._weights = wanted
        self._slots = {path: current[path] for path in wanted}
        self._apply_weights()

    def set_alpha(self, alpha: float) -> None:
        self.alpha = alpha
        self._apply_weights()

    def _apply_weights(self) -> None:
        for path, slot in self._slots.items():
            slot.weight = self._weights[path] * self.alpha

    def _load_slots(self, paths: Sequence[Path]) -> dict[Path, RewardSlot]:
        """The rewards at ``paths``, checked against the model; on an error none of them stays open."""
        if not paths:
            return {}
        if self.base is None:
            raise PrtError("Load a model before switching rewards on.")
        slots = attach_rewards(self.base, [(path, 1.0) for path in paths], threads=self._reward_threads)
        return dict(zip(paths, slots, strict=True))

    @property
    def active_reward_names(self) -> list[str]:
        return [slot.reward.name for slot in self._slots.values() if slot.weight != 0]

    # -- replies ----------------------------------------------------------------
    def reply(
        self,
        messages: Sequence[ChatMessage],
        config: SamplingConfig = SamplingConfig(),
        *,
        left_out: int = 0,
        continue_last: bool = False,
    ) -> ChatReply:
        """A generation for the next assistant turn; iterate it (in a worker) to run it.

        What of ``messages`` is sent follows the context policy (engine/app/context.py): ``left_out`` is the last
        reply's ``context.left_out`` (0 for a new chat), and the reply's ``context`` says what this one sends.
        ``continue_last``: extend the last message, an assistant reply, instead of answering after it.
        The overall strength lives in the reward weights, so ``config.alpha`` is not used.
        """
        if self.base is None:
            raise PrtError("No model is loaded yet; pick one in the model list.")
        prompt, context = plan_prompt(
            self.base,
            messages,
            reply_room=default_reply_room(self.base.n_ctx, config.max_tokens),
            left_out=left_out,
            continue_last=continue_last,
        )
        return ChatReply(
            self.base,
            prompt,
            context=context,
            rewards=list(self._slots.values()),
            config=replace(config, alpha=1.0),
            merged_sessions=self.merged_sessions,
        )

    def run_locked(self, generation: ReplyStream, on_event: Callable[[TokenEvent], None]) -> GenerationResult:
        """Iterate ``generation`` while no model change can happen, calling ``on_event`` per event."""
        with self._lock:
            try:
                for event in generation:
                    on_event(event)
            finally:  # the reply that may have used the rewards switched off meanwhile has ended
                self._close_switched_off()
        return generation.result

    def run_exclusive(self, work: Callable[[BaseModel], T]) -> T:
        """``work(base)`` while no reply or model change runs, e.g. the style survey writing its replies."""
        with self._lock:
            if self.base is None:
                raise PrtError("No model is loaded yet; pick one in the model list.")
            return work(self.base)


class ReplyRecorder:
    """Keeps an assistant message in the store up to date while it streams.

    The partial text is written at most every ``interval`` seconds, so a crash or a kill
    loses at most that much; ``finish`` writes the final text, status and statistics.
    When the store refuses a write (a full disk), the StoreError is raised once and nothing
    more is written: the message keeps the text saved before, as after a crash.
    """

    FINAL_STATUS: dict[FinishReason, MessageStatus] = {
        "stop": "complete",
        "length": "complete",
        "context": "complete",
        "cancelled": "stopped",
        "error": "error",
    }

    def __init__(self, store, message_id: int, *, interval: float = 0.25, text: str = "") -> None:
        """``text``: what the message holds already (a reply being continued); the stream is added to it."""
        self._store = store
        self._message_id = message_id
        self._interval = interval
        self._text = text
        self._last_write = time.monotonic()
        self._refused: StoreError | None = None  # the store's error, once it refused a write

    @property
    def text(self) -> str:
        return self._text

    def feed(self, event: TokenEvent) -> None:
        self._text += event.text
        if time.monotonic() - self._last_write >= self._interval:
            self._write(content=self._text, status="streaming")
            self._last_write = time.monotonic()

    def finish(
        self,
        result: GenerationResult,
        reward_names: Sequence[str] = (),
        error: str | None = None,
        *,
        earlier_tokens: int = 0,
        context: ContextUse | None = None,
    ) -> MessageStatus:
        """``earlier_tokens``: a continued reply's tokens before this run, counted in its total; ``context``: what
        its prompt sent, kept in its stats (``context_stats``) for the next reply and the window's meter."""
        status: MessageStatus = "error" if error else self.FINAL_STATUS.get(result.finish_reason, "complete")
        stats: dict[str, object] = {
            "tokens": earlier_tokens + len(result.token_ids),
            "tokens_per_second": round(result.tokens_per_second, 2),
            "finish_reason": result.finish_reason,
            "rewards": list(reward_names),
        }
        if error:
            stats["error"] = error
        if context is not None:
            stats["context"] = {
                "left_out": context.left_out,
                "used": context.prompt_tokens + len(result.token_ids),
                "size": context.context_size,
            }
        self._write(content=self._text, status=status, stats=stats)
        return status

    def _write(self, **values) -> None:
        if self._refused is not None:
            return
        try:
            self._store.update_message(self._message_id, **values)
        except StoreError as error:
            self._refused = error
            raise


@dataclass(frozen=True)
class StoredContext:
    """What a stored reply's prompt sent, as ReplyRecorder.finish keeps it in the reply's stats."""

    left_out: int  # the oldest messages not sent
    used: int  # tokens in the context after the reply: its prompt and its own
    size: int  # the context's

    @classmethod
    def of(cls, stats: Mapping) -> StoredContext | None:
        """The reply's, or None (written before the app kept it, or not a shape it writes)."""
        saved = stats.get("context")
        if not isinstance(saved, dict) or set(saved) != {"left_out", "used", "size"}:
            return None
        values = saved.values()
        if not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0 for value in values):
            return None
        return cls(**saved)


# -- tuning runs in a child process: torch stays out of the app, and cancel is a clean kill -------------
def tune_command(
    *,
    model_path: Path | str,
    out_path: Path | str,
    data_files: Sequence[Path | str] = (),
    documents: Sequence[Path | str] = (),
    feedback_db: Path | str | None = None,
    name: str | None = None,
    epochs: int | None = None,
    data_folder: Path | str | None = None,
) -> list[str]:
    """The argv that tunes a reward with progress as JSON lines on stderr and a JSON summary on stdout.

    ``data_folder``: the app's (AppPaths.data), for the teacher passes; None: the child resolves its own.
    """
    argv = [
        sys.executable,
        "-m",
        "engine.cli",
        "tune",
        "--model",
        str(model_path),
        "--out",
        str(out_path),
        "--json",
        "--progress-json",
        *_data_folder_flag(data_folder),
    ]
    for path in data_files:
        argv += ["--data", str(path)]
    for folder in documents:
        argv += ["--documents", str(folder)]
    if feedback_db is not None:
        argv += ["--feedback", str(feedback_db)]
    if name:
        argv += ["--name", name]
    if epochs:
        argv += ["--epochs", str(epochs)]
    return argv


def library_build_command(
    *, model_path: Path | str, out_dir: Path | str, data_folder: Path | str | None = None
) -> list[str]:
    """The argv that builds the base style rewards for a model, reporting like ``tune_command``."""
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "library",
        "build",
        "--model",
        str(model_path),
        "--out",
        str(out_dir),
        "--json",
        "--progress-json",
        *_data_folder_flag(data_folder),
    ]


def _data_folder_flag(data_folder: Path | str | None) -> list[str]:
    """A child process is told the app's data folder: the app never rewrites its environment for it."""
    return [] if data_folder is None else ["--data-folder", str(data_folder)]
