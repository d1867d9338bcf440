"""What the desktop window asks of the engine, as one typed seam.

``ChatBackend`` names every attribute and method the window (desktop/) uses on its engine, and nothing
more. Three classes implement it structurally, without inheriting: the real ``ChatEngine``
(engine/app/chat.py), the demo's ``DemoEngine`` (desktop/demo.py) and the tests' ``FakeEngine``
(tests/test_desktop.py); the type checker holds each to it, and a test checks it at run time too.
What the window only reads is a read-only property here, so an implementation may hold a narrower type.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from engine.app.chat import RewardInfo
from engine.app.context import ContextUse
from engine.runtime.base_model import BaseModel, BaseModelConfig, ChatMessage
from engine.runtime.decode import GenerationResult, TokenEvent
from engine.runtime.steering import SamplingConfig

T = TypeVar("T")


class LoadedModel(Protocol):
    """What the window reads of the loaded base model (engine.runtime.base_model.BaseModel)."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...

    def token_bytes(self, token: int) -> bytes: ...


class ReplyStream(Protocol):
    """A reply being generated (engine.runtime.decode.Generation): iterating runs it, ``cancel`` works from any
    thread, and ``result`` fills in as it runs; ``context`` is what of the chat it sends (engine/app/context.py)."""

    @property
    def result(self) -> GenerationResult: ...

    @property
    def context(self) -> ContextUse: ...

    def cancel(self) -> None: ...

    def __iter__(self) -> Iterator[TokenEvent]: ...


@runtime_checkable
class ChatBackend(Protocol):
    """The engine as the window uses it. The methods block: the window calls them from worker threads."""

    @property
    def base(self) -> LoadedModel | None:
        """The loaded model; None until one is."""

    @property
    def alpha(self) -> float:
        """The overall strength of the rewards."""

    @property
    def active_reward_names(self) -> list[str]: ...

    def load_model(self, path: Path, config: BaseModelConfig) -> LoadedModel:
        """Replace the loaded model."""

    def describe_rewards(self, paths: Sequence[Path | str]) -> list[RewardInfo]:
        """Each reward's card and whether it fits the loaded model."""

    def set_active_rewards(self, weights: Mapping[Path | str, float]) -> None:
        """Steer with these rewards and weights; raises the reward's PrtError and changes nothing on a bad one."""

    def set_alpha(self, alpha: float) -> None: ...

    def reply(
        self, messages: Sequence[ChatMessage], config: SamplingConfig, *, left_out: int = 0, continue_last: bool = False
    ) -> ReplyStream:
        """The next assistant turn, not started; run it with ``run_locked``. ``left_out``: the last reply's
        ``context.left_out`` (0 for a new chat); ``continue_last``: extend the last message, an assistant reply."""

    def run_locked(self, generation: ReplyStream, on_event: Callable[[TokenEvent], None]) -> GenerationResult:
        """Run ``generation`` to its end while no model change can happen, calling ``on_event`` per event."""

    def run_exclusive(self, work: Callable[[BaseModel], T]) -> T:
        """``work(model)`` while no reply or model change runs (the style survey writing its replies)."""
