"""``prt eval``: held-out NLL under the base and the steered model, through the real ONNX reward (no torch),
and, on request, what the replies look like when the base, the steered base and the teacher answer the prompts."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import RewardSlot
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import SamplingConfig
from rewards_onnx.data import Dataset, Demonstration, Example, as_dataset
from rewards_onnx.metrics import Metrics, compute_metrics
from rewards_onnx.teacher import (
    TRAIN_TOP_K,
    Progress,
    ProgressCount,
    SequenceTargets,
    answer_prompts,
    fitting,
    teacher_pass,
)

SENTENCE_BREAK = re.compile(r"(?<=[.!?。！？])\s+")


def onnx_rewards(reward: RewardModel) -> Callable[[SequenceTargets], np.ndarray]:
    """Rewards on each position's support, stepping the reward's KV cache through the sequence."""

    def rewards_for(sequence: SequenceTargets) -> np.ndarray:
        tokens, first = sequence.tokens, sequence.first_target
        reward.reset()
        rows = [reward.advance(tokens[:first].tolist(), sequence.candidate_ids[0])]
        rows += [
            reward.advance([int(tokens[p])], sequence.candidate_ids[p - first + 1])
            for p in range(first, len(tokens) - 1)
        ]
        return np.stack(rows)

    return rewards_for


def evaluate_reward(
    base: BaseModel,
    reward: RewardModel,
    examples: Sequence[Example] | Dataset,
    *,
    alpha: float = 1.0,
    teacher_system: str | None = None,
    k: int = TRAIN_TOP_K,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Metrics, Dataset]:
    """Base and steered NLL on the examples; with a teacher (``teacher_system``, or the data's own), its NLL too.
    Also the data evaluated: the examples the teacher pass could take, with those it could not as skipped."""
    reward.check_compatible(base_name=base.name, base_fingerprint=base.vocabulary_fingerprint)
    data = as_dataset(examples)
    if teacher_system:
        data = data.mapped(lambda e: replace(e, teacher_system=teacher_system) if isinstance(e, Demonstration) else e)
    data = fitting(base, data)
    data.require_examples()
    metrics = compute_metrics(
        teacher_pass(base, data.examples, k=k, progress=progress), onnx_rewards(reward), alpha=alpha
    )
    return metrics, data


def sentence_count(text: str) -> int:
    return len([sentence for sentence in SENTENCE_BREAK.split(text.strip()) if sentence])


@dataclass
class ReplyStats:
    """One source's replies to the prompts, and what they look like."""

    texts: list[str]
    mean_tokens: float
    mean_sentences: float
    one_sentence: float  # share of replies that are a single sentence
    ended: float | None = None  # share that ended on their own; None for the data's replies

    @classmethod
    def of(cls, texts: Sequence[str], tokens: Sequence[int], ended: Sequence[bool] | None = None) -> ReplyStats:
        sentences = np.array([sentence_count(text) for text in texts])
        return cls(
            texts=list(texts),
            mean_tokens=float(np.mean(tokens)),
            mean_sentences=float(sentences.mean()),
            one_sentence=float((sentences == 1).mean()),
            ended=None if ended is None else float(np.mean(ended)),
        )


def compare_replies(
    base: BaseModel,
    reward: RewardModel,
    examples: Sequence[Example],
    *,
    count: int,
    alpha: float = 1.0,
    max_tokens: int = 256,
    teacher_system: str | None = None,
    progress: Progress | None = None,
) -> dict[str, ReplyStats]:
    """The first ``count`` prompts answered by the base, the steered base and, where every one has a teacher
    (``teacher_system`` or the data's own), the base given the teacher's system prompt; one seed per prompt, shared
    by the three. Beside them, the data's own replies: the behaviour the reward was trained towards."""
    reward.check_compatible(base_name=base.name, base_fingerprint=base.vocabulary_fingerprint)
    chosen = list(examples[:count])
    teachers = [teacher_system or (e.teacher_system if isinstance(e, Demonstration) else None) for e in chosen]
    own_systems = [e.system for e in chosen]
    sources = {"base": (own_systems, []), "steered": (own_systems, [RewardSlot(reward)])}
    if all(teachers):
        sources["teacher"] = (teachers, [])
    references = [e.response if isinstance(e, Demonstration) else e.chosen for e in chosen]
    stats = {"data": ReplyStats.of(references, [len(base.tokenize(text)) for text in references])}
    answered = ProgressCount(len(sources) * len(chosen), progress)
    for name, (systems, rewards) in sources.items():
        asked = [(example.prompt, system) for example, system in zip(chosen, systems)]
        results = answer_prompts(
            base,
            asked,
            rewards=rewards,
            on_reply=answered.advance,
            config=SamplingConfig(max_tokens=max_tokens, alpha=alpha),
        )
        stats[name] = ReplyStats.of(
            [r.text for r in results], [len(r.token_ids) for r in results], [r.finish_reason == "stop" for r in results]
        )
    return stats
