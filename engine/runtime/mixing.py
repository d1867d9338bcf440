"""Several rewards in one onnxruntime session: one run per step scores all of them.

Rewards tuned against one base with one seed and the embedding frozen (the library's) share their
int8 embedding (the trainer initializes it from the base's own embedding, rewards_onnx/network.py). Rewards of one network
shape and one embedding are stacked into one graph (``build_stacked_reward_model``): the embedding
is stored once, each layer runs as one batched MatMul over the rewards, and a step returns the
rewards [N, K] while the KV state stays per reward ([N, H, P, D] per layer). The mix
``sum_i w_i r_i`` is still taken by the decode loop, so weights stay live per slot.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import onnx

from engine.runtime.reward_graph import (
    RewardNetworkShape,
    RewardWeights,
    build_stacked_reward_model,
    candidate_rows,
    read_reward_weights,
)
from engine.runtime.rewards import RewardModel, RewardSession, open_session

CACHED_PLANS = 2  # sets of rewards whose plans are kept, with their KV state between replies (and their memory)


@dataclass(frozen=True)
class ScoringGroup:
    """One session and the rewards whose rows it returns, as indices into the caller's list, in row order."""

    indices: tuple[int, ...]
    session: RewardSession

    @property
    def merged(self) -> bool:
        """Whether the session was built for this group (and is closed with its plan), not a reward's own."""
        return len(self.indices) > 1


def scoring_groups(rewards: Sequence[RewardModel], *, merge: bool = True) -> list[ScoringGroup]:
    """How to score ``rewards`` at each step: mergeable rewards share one session, the rest use their own.

    The merged sessions are new and the caller's to close (``close_plan``); MergedSessions keeps plans for reuse.
    """
    if not merge or len(rewards) < 2:
        return _separate(rewards)
    return _plan(rewards)


def close_plan(groups: Sequence[ScoringGroup]) -> None:
    """Close the merged sessions of a plan; the rewards' own sessions stay open (their RewardModel owns them)."""
    for group in groups:
        if group.merged:
            group.session.close()


class MergedSessions:
    """The plans of the last ``capacity`` sets of rewards, so that merged sessions keep their KV state from one
    reply to the next, as the rewards' own sessions do. Owned by its user (the ChatEngine), who closes it; a plan
    pushed out by a newer one is closed at once. One generation at a time may use it.
    """

    def __init__(self, *, capacity: int = CACHED_PLANS) -> None:
        self._capacity = capacity
        self._plans: OrderedDict[tuple[RewardModel, ...], list[ScoringGroup]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cached_plans(self) -> int:
        return len(self._plans)

    def groups(self, rewards: Sequence[RewardModel], *, merge: bool = True) -> list[ScoringGroup]:
        """``scoring_groups(rewards)``, the same plan (and merged sessions) as last time for the same rewards."""
        if not merge or len(rewards) < 2:
            return _separate(rewards)  # no merged session: nothing to keep
        key = tuple(rewards)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = _plan(rewards)
                if len(self._plans) > self._capacity:
                    close_plan(self._plans.popitem(last=False)[1])
            self._plans.move_to_end(key)
            return self._plans[key]

    def forget(self, rewards: Sequence[RewardModel]) -> None:
        """Close the plans that score any of ``rewards`` (before those are closed themselves)."""
        gone = set(rewards)
        with self._lock:
            for key in [key for key in self._plans if not gone.isdisjoint(key)]:
                close_plan(self._plans.pop(key))

    def close(self) -> None:
        """Close every merged session held here. Safe twice; the cache may be used again afterwards (empty)."""
        with self._lock:
            while self._plans:
                close_plan(self._plans.popitem()[1])

    def __enter__(self) -> MergedSessions:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _separate(rewards: Sequence[RewardModel]) -> list[ScoringGroup]:
    return [ScoringGroup((index,), reward.session) for index, reward in enumerate(rewards)]


def _plan(rewards: Sequence[RewardModel]) -> list[ScoringGroup]:
    groups: dict[object, list[int]] = {}  # stack key (or a key of its own) -> indices, in the order first seen
    stackable: dict[int, RewardWeights] = {}
    for index, reward in enumerate(rewards):
        weights = _readable_weights(reward)
        if weights is None:
            groups[("alone", index)] = [index]
            continue
        members = groups.setdefault(stack_key(weights), [])
        if members:  # hold one copy of the shared embedding
            weights = replace(weights, embedding=stackable[members[0]].embedding)
        members.append(index)
        stackable[index] = weights
    return [_scoring_group(rewards, indices, stackable) for indices in groups.values()]


def _scoring_group(
    rewards: Sequence[RewardModel], indices: list[int], stackable: dict[int, RewardWeights]
) -> ScoringGroup:
    if len(indices) == 1:
        return ScoringGroup((indices[0],), rewards[indices[0]].session)
    return ScoringGroup(tuple(indices), merged_session([rewards[i] for i in indices], [stackable[i] for i in indices]))


def _readable_weights(reward: RewardModel) -> RewardWeights | None:
    """The reward's weights, or None for a graph not made by the engine's builder (it keeps its own session)."""
    try:
        return read_reward_weights(onnx.load(str(reward.path)))
    except (ValueError, OSError):
        return None


def stack_key(weights: RewardWeights) -> tuple[RewardNetworkShape, str]:
    """Rewards with equal keys can be stacked: one network shape, one embedding."""
    return weights.shape, hashlib.sha256(weights.embedding.tobytes()).hexdigest()


def merged_session(rewards: Sequence[RewardModel], weights: Sequence[RewardWeights]) -> RewardSession:
    """One session computing ``rewards`` (equal stack keys) as rows [N, K], in the given order."""
    names = ", ".join(f"'{reward.name}'" for reward in rewards)
    model = stacked_graph(weights)
    return RewardSession(
        open_session(model.SerializeToString(), threads=max(r.threads for r in rewards)),
        title=f"The rewards {names} (merged)",
        source=f"merged rewards {names}",
        candidate_rows=candidate_rows(model),
    )


def stacked_graph(weights: Sequence[RewardWeights]) -> onnx.ModelProto:
    return build_stacked_reward_model(weights, metadata={"stacked_rewards": str(len(weights))})


def stacked_model(weights: Sequence[RewardWeights]) -> bytes:
    """The serialized graph of the stacked rewards."""
    return stacked_graph(weights).SerializeToString()
