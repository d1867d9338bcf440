"""``prt eval``: held-out NLL under the base and the steered model, through the real ONNX reward (no torch)."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from engine.base_model import BaseModel
from engine.rewards import RewardModel
from rewards_onnx.data import Demonstration, Example
from rewards_onnx.metrics import Metrics, compute_metrics
from rewards_onnx.teacher import TRAIN_TOP_K, SequenceTargets, teacher_pass


def onnx_rewards(reward: RewardModel) -> Callable[[SequenceTargets], np.ndarray]:
    """Rewards on each position's support, stepping the reward's KV cache through the sequence."""
    def rewards_for(sequence: SequenceTargets) -> np.ndarray:
        tokens, first = sequence.tokens, sequence.first_target
        reward.reset()
        rows = [reward.advance(tokens[:first], sequence.candidate_ids[0])]
        rows += [reward.advance([tokens[p]], sequence.candidate_ids[p - first + 1]) for p in range(first, len(tokens) - 1)]
        return np.stack(rows)
    return rewards_for


def evaluate_reward(base: BaseModel, reward: RewardModel, examples: Sequence[Example], *, alpha: float = 1.0,
                    teacher_system: str | None = None, k: int = TRAIN_TOP_K,
                    progress: Callable[[int, int], None] | None = None) -> Metrics:
    """Base and steered NLL on the examples; with a teacher (``teacher_system``, or the data's own), its NLL too."""
    reward.check_compatible(base_name=base.name, base_fingerprint=base.vocabulary_fingerprint)
    if teacher_system:
        examples = [replace(e, teacher_system=teacher_system) if isinstance(e, Demonstration) else e for e in examples]
    return compute_metrics(teacher_pass(base, examples, k=k, progress=progress), onnx_rewards(reward), alpha=alpha)
