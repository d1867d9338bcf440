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
from dataclasses import dataclass, replace
from typing import Sequence

import onnx

from engine.runtime.reward_graph import RewardNetworkShape, RewardWeights, build_stacked_reward_model, read_reward_weights
from engine.runtime.rewards import RewardModel, RewardSession, open_session

CACHED_PLANS = 2  # sets of rewards whose plans are kept, with their KV state between replies (and their memory)


@dataclass(frozen=True)
class ScoringGroup:
    """One session and the rewards whose rows it returns, as indices into the caller's list, in row order."""

    indices: tuple[int, ...]
    session: RewardSession


def scoring_groups(rewards: Sequence[RewardModel], *, merge: bool = True) -> list[ScoringGroup]:
    """How to score ``rewards`` at each step: mergeable rewards share one session, the rest use their own.

    The plan for a set of rewards is built once and cached, so the merged sessions keep their KV state
    from one reply to the next, like the rewards' own sessions do.
    """
    if not merge or len(rewards) < 2:
        return _separate(rewards)
    key = tuple(rewards)
    with _plans_lock:
        if key not in _plans:
            _plans[key] = _plan(rewards)
            if len(_plans) > CACHED_PLANS:
                _plans.popitem(last=False)
        _plans.move_to_end(key)
        return _plans[key]


_plans: OrderedDict[tuple[RewardModel, ...], list[ScoringGroup]] = OrderedDict()
_plans_lock = threading.Lock()


def _separate(rewards: Sequence[RewardModel]) -> list[ScoringGroup]:
    return [ScoringGroup((index,), reward.session) for index, reward in enumerate(rewards)]


def _plan(rewards: Sequence[RewardModel]) -> list[ScoringGroup]:
    groups: dict[object, list[tuple[int, RewardWeights | None]]] = {}
    for index, reward in enumerate(rewards):
        weights = _readable_weights(reward)
        key = ("alone", index) if weights is None else stack_key(weights)
        if key in groups:  # hold one copy of the shared embedding
            weights = replace(weights, embedding=groups[key][0][1].embedding)
        groups.setdefault(key, []).append((index, weights))
    return [_scoring_group(rewards, members) for members in groups.values()]


def _scoring_group(rewards: Sequence[RewardModel], members: list[tuple[int, RewardWeights | None]]) -> ScoringGroup:
    indices = tuple(index for index, _ in members)
    if len(indices) == 1:
        return ScoringGroup(indices, rewards[indices[0]].session)
    return ScoringGroup(indices, merged_session([rewards[i] for i in indices], [weights for _, weights in members]))


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
    return RewardSession(open_session(stacked_model(weights), threads=max(r.threads for r in rewards)),
                         title=f"The rewards {names} (merged)", source=f"merged rewards {names}")


def stacked_model(weights: Sequence[RewardWeights]) -> bytes:
    """The serialized graph of the stacked rewards."""
    return build_stacked_reward_model(weights, metadata={"stacked_rewards": str(len(weights))}).SerializeToString()
