"""The one decode loop: base logits -> top-K -> rewards -> combined scores -> sample -> stream.

A reward of contract version 2 takes each step in two halves: a worker thread advances the reward's
state by the chosen token while this thread has the base evaluate it (when llama.cpp leaves a core
free) or, on a machine whose cores llama.cpp all uses, while this thread picks the base's candidates
from the new logits; only scoring the K candidates (a K x R product) waits for both.

``Generation`` is an iterator of ``TokenEvent``s. It can be cancelled from any
thread (the next step ends it with finish_reason "cancelled"); exceptions from
the base model or a reward propagate to whoever iterates, nothing is swallowed.
Reward weights are read at every step, so a change applies to the next token.
"""

from __future__ import annotations

import codecs
import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from engine.runtime.base_model import BaseModel
from engine.runtime.mixing import MergedSessions, ScoringGroup, close_plan, scoring_groups
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import Candidates, CandidateSelector, Sampler, SamplingConfig, log_softmax, steered_scores


@dataclass
class RewardSlot:
    """A reward in use and its weight; the weight may change while a generation runs."""

    reward: RewardModel
    weight: float = 1.0


def attach_rewards(base: BaseModel, specs: Sequence[tuple[Path | str, float]], *, threads: int = 1) -> list[RewardSlot]:
    """Load rewards and refuse any whose vocabulary differs from the base model's; the caller closes them.

    On a refusal, the rewards loaded so far are closed before the error is raised.
    """
    slots = []
    with contextlib.ExitStack() as opened:
        for path, weight in specs:
            reward = opened.enter_context(RewardModel(path, threads=threads))
            reward.check_compatible(base_name=base.name, base_fingerprint=base.vocabulary_fingerprint)
            slots.append(RewardSlot(reward, weight))
        opened.pop_all()  # all of them loaded: they are the caller's now
    return slots


@dataclass(frozen=True)
class StepTrace:
    """Everything one step decided, for the per-token view and ``--json``."""

    token_id: int
    chosen: int  # index into candidate_ids
    candidate_ids: np.ndarray  # [K], sorted by base log-prob, best first
    base_logprobs: np.ndarray  # [K]
    reward_values: np.ndarray  # [R, K], raw (unweighted) rewards
    scores: np.ndarray  # [K] = base_logprobs + alpha * weights @ reward_values
    reward_names: tuple[str, ...]

    @property
    def base_logprob(self) -> float:
        return float(self.base_logprobs[self.chosen])

    @property
    def steered_logprob(self) -> float:
        """Log-prob of the chosen token under softmax(scores) on the candidates (temperature 1)."""
        return float(log_softmax(self.scores)[self.chosen])

    @property
    def rewards(self) -> dict[str, float]:
        return {name: float(values[self.chosen]) for name, values in zip(self.reward_names, self.reward_values)}

    @property
    def base_rank(self) -> int:
        return self.chosen

    @property
    def steered_rank(self) -> int:
        return int((self.scores > self.scores[self.chosen]).sum())

    def to_dict(self, token_text: Callable[[int], str], top_n: int = 5) -> dict:
        def top(order: np.ndarray) -> list[dict]:
            return [
                {
                    "token_id": int(self.candidate_ids[i]),
                    "text": token_text(int(self.candidate_ids[i])),
                    "base_logprob": round(float(self.base_logprobs[i]), 5),
                    "score": round(float(self.scores[i]), 5),
                }
                for i in order[:top_n]
            ]

        return {
            "token_id": self.token_id,
            "text": token_text(self.token_id),
            "base_logprob": round(self.base_logprob, 5),
            "steered_logprob": round(self.steered_logprob, 5),
            "rewards": {name: round(value, 5) for name, value in self.rewards.items()},
            "base_rank": self.base_rank,
            "steered_rank": self.steered_rank,
            "rank_change": self.base_rank - self.steered_rank,
            "top_base": top(np.arange(len(self.candidate_ids))),
            "top_steered": top(np.argsort(-self.scores, kind="stable")),
        }


@dataclass(frozen=True)
class TokenEvent:
    """New visible text; ``token_id`` and ``trace`` are None for a final flush of held-back text."""

    text: str
    token_id: int | None = None
    trace: StepTrace | None = None


# Why a generation ended: an end-of-generation token or a stop string, max_tokens, the full context window,
# cancel(), an exception; "" until it has run.
FinishReason = Literal["stop", "length", "context", "cancelled", "error", ""]


@dataclass
class GenerationResult:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    trace: list[StepTrace] = field(default_factory=list)
    finish_reason: FinishReason = ""
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0  # prefill of base and rewards
    decode_seconds: float = 0.0  # everything after the prefill

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.decode_seconds if self.decode_seconds > 0 else 0.0


class StopStringMatcher:
    """Streams text, holding back only what could be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to show, whether a stop string was hit)."""
        buffer = self._held + text
        hits = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        hold = max((n for stop in self._stops for n in range(1, len(stop)) if buffer.endswith(stop[:n])), default=0)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Generation:
    """A steered generation from prompt tokens; iterate it to run it."""

    def __init__(
        self,
        base: BaseModel,
        prompt_tokens: Sequence[int],
        *,
        rewards: Sequence[RewardSlot] = (),
        config: SamplingConfig = SamplingConfig(),
        merge_rewards: bool = True,
        merged_sessions: MergedSessions | None = None,
        split_reward_steps: bool = True,
    ) -> None:
        self.base = base
        self.prompt_tokens = list(prompt_tokens)
        self.rewards = list(rewards)
        self.config = config
        self.merge_rewards = (
            merge_rewards  # score mergeable rewards with one session per step (engine/runtime/mixing.py)
        )
        self.merged_sessions = merged_sessions  # the caller's, kept between replies; None: its own, closed at the end
        self.split_reward_steps = split_reward_steps  # v2 rewards step in two halves (see the module docstring)
        self._groups: list[ScoringGroup] = []
        self._worker: ThreadPoolExecutor | None = None
        self.result = GenerationResult(prompt_tokens=len(self.prompt_tokens))
        self._cancelled = threading.Event()
        self._started = False
        self._select = CandidateSelector(base.n_vocab, config.top_k)

    def cancel(self) -> None:
        """Ask the loop to stop before its next step (safe from any thread)."""
        self._cancelled.set()

    def run(self) -> GenerationResult:
        for _ in self:
            pass
        return self.result

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        return self._loop()

    def _loop(self) -> Iterator[TokenEvent]:
        base, config, result = self.base, self.config, self.result
        sampler = Sampler(config)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopStringMatcher(config.stop)
        names = tuple(slot.reward.name for slot in self.rewards)
        started = time.perf_counter()
        hit_stop = False
        result.finish_reason = "error"  # until the loop ends normally
        try:
            base.check_fits(len(self.prompt_tokens) + 1)
            self._groups = self._scoring_groups()
            if self.split_reward_steps and any(group.session.candidate_rows is not None for group in self._groups):
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-step")
            base.sync(self.prompt_tokens)
            candidates, reward_values = self._score(self.prompt_tokens)
            decoding_from = time.perf_counter()
            result.prompt_seconds = decoding_from - started
            while True:
                if self._cancelled.is_set():
                    result.finish_reason = "cancelled"
                    break
                weights = np.array([slot.weight for slot in self.rewards], dtype=np.float32)
                scores = steered_scores(candidates.base_logprobs, reward_values, weights, config.alpha)
                chosen = sampler.pick(scores)
                token = int(candidates.token_ids[chosen])
                if base.is_end_of_generation(token) and not config.ignore_eos:
                    result.finish_reason = "stop"
                    break
                step = StepTrace(
                    token, chosen, candidates.token_ids, candidates.base_logprobs, reward_values, scores, names
                )
                result.token_ids.append(token)
                result.trace.append(step)
                text, hit_stop = stops.feed(decoder.decode(base.token_bytes(token)))
                result.text += text
                yield TokenEvent(text, token, step)
                if hit_stop:
                    result.finish_reason = "stop"
                    break
                if len(result.token_ids) >= config.max_tokens:
                    result.finish_reason = "length"
                    break
                if base.n_past + 1 >= base.n_ctx:
                    result.finish_reason = "context"
                    break
                if base.leaves_a_core_free:  # the reward beside the base's decode
                    prepared = self._prepare([token])
                    base.append(token)
                else:  # both cores decode: the reward beside picking the candidates
                    base.append(token)
                    prepared = self._prepare([token])
                candidates, reward_values = self._score([token], prepared=prepared)
            if not hit_stop:  # text held back for a stop string that never came
                tail = stops.flush() + decoder.decode(b"", final=True)
                if tail:
                    result.text += tail
                    yield TokenEvent(tail)
        except GeneratorExit:
            result.finish_reason = "cancelled"
            raise
        finally:
            result.decode_seconds = time.perf_counter() - started - result.prompt_seconds
            if self._worker is not None:
                self._worker.shutdown()
            if self.merged_sessions is None:
                close_plan(self._groups)

    def _scoring_groups(self) -> list[ScoringGroup]:
        rewards = [slot.reward for slot in self.rewards]
        if self.merged_sessions is None:
            return scoring_groups(rewards, merge=self.merge_rewards)
        return self.merged_sessions.groups(rewards, merge=self.merge_rewards)

    def _score(
        self, new_tokens: Sequence[int], *, prepared: Mapping[int, Future[None]] | None = None
    ) -> tuple[Candidates, np.ndarray]:
        """The base's candidates after ``new_tokens`` and every reward's values for them: a prefill (``prepared``
        None) syncs each reward to the tokens; a step advances it, or finishes what ``_prepare`` started."""
        prefill = prepared is None
        prepared = prepared or {}
        candidates = self._select(self.base.last_logits())
        ids = candidates.token_ids
        values = np.zeros((len(self.rewards), len(ids)), dtype=np.float32)  # [R, K]
        for index, group in enumerate(self._groups):
            session = group.session
            if prefill:
                scores = session.sync(new_tokens, ids)
            elif index in prepared:
                prepared[index].result()  # raises what the worker raised
                scores = session.score_prepared(ids)
            else:
                scores = session.advance(new_tokens, ids)
            values[list(group.indices)] = scores
        return candidates, values

    def _prepare(self, new_tokens: Sequence[int]) -> dict[int, Future[None]]:
        """Start advancing every reward that can by ``new_tokens``, on the worker; by group index."""
        if self._worker is None:
            return {}
        return {
            index: self._worker.submit(group.session.prepare, new_tokens)
            for index, group in enumerate(self._groups)
            if group.session.candidate_rows is not None
        }
