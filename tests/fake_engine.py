"""A fake engine for the window's tests: canned tokens with real StepTraces, played one generation at a time.

It implements engine.app.backend.ChatBackend, as the real ChatEngine does (tests/test_desktop.py checks both).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from engine.app.backend import ReplyStream
from engine.app.chat import RewardInfo
from engine.app.context import ContextUse
from engine.runtime.base_model import BaseModel, BaseModelConfig, ChatMessage
from engine.runtime.decode import GenerationResult, StepTrace, TokenEvent
from engine.runtime.errors import RewardRuntimeError
from engine.runtime.rewards import RewardCard
from engine.runtime.steering import SamplingConfig

VOCABULARY = ["Hello", " there", "!", " How", " can", " I", " help", "?", " Sure", " No", " maybe"]
REPLY = [1, 2, 3, 4, 5, 6, 7]  # " there! How can I help?"
REPLY_TEXT = "".join(VOCABULARY[token] for token in REPLY)
WAIT_MS = 10_000
FAKE_CONTEXT = ContextUse(left_out=0, prompt_tokens=20, context_size=4096)  # a reply's, unless a test gives one
T = TypeVar("T")


def step_trace(token: int, position: int) -> StepTrace:
    """Four candidates, the chosen one first; the reward raises it at even positions and lowers it at odd ones."""
    candidates = np.array([token] + [other for other in (8, 9, 10, 0) if other != token][:3])
    base = np.array([-0.5, -1.5, -2.5, -3.5], dtype=np.float32)
    rewards = np.array([[1.5 if position % 2 == 0 else -1.5, 0.0, 0.5, 0.0]], dtype=np.float32)
    return StepTrace(token, 0, candidates, base, rewards, base + rewards[0], ("style",))


class FakeGeneration:
    """Streams canned tokens like engine.runtime.decode.Generation; can hold after some tokens until cancelled, or fail."""

    def __init__(
        self,
        tokens: list[int],
        *,
        hold_after: int | None = None,
        fail_after: int | None = None,
        context: ContextUse = FAKE_CONTEXT,
    ) -> None:
        self.tokens, self.hold_after, self.fail_after = tokens, hold_after, fail_after
        self.result = GenerationResult()
        self.context = context
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        for position, token in enumerate(self.tokens):
            if position == self.hold_after:
                self._cancelled.wait(WAIT_MS / 1000)
            if self._cancelled.is_set():
                self.result.finish_reason = "cancelled"
                return
            if position == self.fail_after:
                self.result.finish_reason = "error"
                raise RewardRuntimeError("The reward model 'style' failed: broken graph.")
            trace = step_trace(token, position)
            self.result.token_ids.append(token)
            self.result.trace.append(trace)
            self.result.text += VOCABULARY[token]
            yield TokenEvent(VOCABULARY[token], token, trace)
        self.result.finish_reason = "stop"
        self.result.decode_seconds = 0.5


class FakeBase:
    name = "fake-model"
    path = Path("fake-model.gguf")

    def token_bytes(self, token: int) -> bytes:
        return VOCABULARY[token].encode()


class FakeEngine:
    """A ChatBackend like ChatEngine: records what the window asks; each reply plays the next queued generation."""

    def __init__(self) -> None:
        self.base = FakeBase()
        self.alpha = 1.0
        self.generations: list[FakeGeneration] = []  # queued; default: REPLY
        self.replies: list[tuple[list[ChatMessage], SamplingConfig]] = []  # per reply
        self.reply_options: list[tuple[int, bool]] = []  # per reply: left_out, continue_last
        self.loads: list[tuple[Path, BaseModelConfig]] = []
        self.load_error: Exception | None = None
        self.active_reward_calls: list[dict] = []
        self.alpha_calls: list[float] = []
        self._weights: dict = {}

    def reply(
        self, messages: Sequence[ChatMessage], config: SamplingConfig, *, left_out: int = 0, continue_last: bool = False
    ) -> FakeGeneration:
        self.replies.append((list(messages), config))
        self.reply_options.append((left_out, continue_last))
        generation = self.generations.pop(0) if self.generations else FakeGeneration(REPLY)
        if generation.context.left_out < left_out:  # as the real policy: never fewer left out than asked
            generation.context = replace(generation.context, left_out=left_out)
        return generation

    def run_locked(self, generation: ReplyStream, on_event: Callable[[TokenEvent], None]) -> GenerationResult:
        for event in generation:
            on_event(event)
        return generation.result

    def run_exclusive(self, work: Callable[[BaseModel], T]) -> T:
        raise NotImplementedError(
            "no model to lend: the style survey is tested with the real engine (tests/test_style_dialog.py)"
        )

    def describe_rewards(self, paths: Sequence[Path | str]) -> list[RewardInfo]:
        infos = []
        for path in map(Path, paths):
            card = RewardCard(
                name=path.stem,
                vocabulary_fingerprint="sha256:x",
                vocabulary_size=11,
                base_model_name="fake-model",
                training_data={"demonstrations": 12},
                metrics={"held_out": {"tokens": 300, "base_nll": 2.5, "steered_nll": 2.1}},
            )
            compatible = "other-vocab" not in path.stem
            infos.append(RewardInfo(path, card, compatible, "" if compatible else "Trained for another vocabulary."))
        return infos

    def set_active_rewards(self, weights: Mapping[Path | str, float]) -> None:
        self.active_reward_calls.append(dict(weights))
        self._weights = dict(weights)

    def set_alpha(self, alpha: float) -> None:
        self.alpha_calls.append(alpha)
        self.alpha = alpha

    @property
    def active_reward_names(self) -> list[str]:
        return [Path(path).stem for path in self._weights]

    def load_model(self, path: Path, config: BaseModelConfig) -> FakeBase:
        self.loads.append((Path(path), config))
        if self.load_error is not None:
            raise self.load_error
        return self.base
