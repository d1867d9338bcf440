"""Held-out figures on the top-K support, from any source of rewards (torch while training, ONNX in ``prt eval``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from engine.runtime.steering import log_softmax
from rewards_onnx.teacher import SequenceTargets, TeacherData

RewardsFor = Callable[[SequenceTargets], np.ndarray]  # a sequence -> rewards [N, K+1] on its support
# Where in a reply a token sits: its first token, tokens 2-4, the body, and its last token (the end of turn)
REPLY_PARTS = ("first", "early", "body", "last")


def gap_closed(base_nll: float, steered_nll: float, teacher_nll: float | None) -> float | None:
    """(base - steered) / (base - teacher): the share of the teacher's improvement the reward reproduces."""
    if teacher_nll is None or base_nll == teacher_nll:
        return None
    return (base_nll - steered_nll) / (base_nll - teacher_nll)


def reply_part(position: int, n_targets: int) -> str:
    if position == n_targets - 1:
        return "last"
    return "first" if position == 0 else "early" if position < 4 else "body"


@dataclass
class PartFigures:
    """One part of the replies (distilled data): its NLLs per token and its share of the teacher's gap."""

    tokens: int
    base_nll: float
    steered_nll: float
    teacher_nll: float
    gap_share: float  # this part's share of (base - teacher) over all taught tokens

    @property
    def gap_closed(self) -> float | None:
        return gap_closed(self.base_nll, self.steered_nll, self.teacher_nll)

    def to_json(self) -> dict:
        return {**asdict(self), "gap_closed": self.gap_closed}


@dataclass
class Metrics:
    tokens: int = 0
    base_nll: float = 0.0  # per token, on the top-K support, at the data's sampling temperature
    steered_nll: float = 0.0
    teacher_nll: float | None = None  # distilled data: the base given the teacher's system prompt
    pairs: int = 0
    pair_accuracy: float | None = None
    pair_loss: float | None = None
    parts: dict[str, PartFigures] | None = None  # distilled data: where in the replies the gap lies

    @property
    def gap_closed(self) -> float | None:
        return gap_closed(self.base_nll, self.steered_nll, self.teacher_nll)

    def to_json(self) -> dict:
        parts = {name: part.to_json() for name, part in self.parts.items()} if self.parts else None
        return {**asdict(self), "gap_closed": self.gap_closed, "parts": parts}

    def objective(self) -> float:
        """What early stopping minimizes: held-out NLL, or the pair loss when there are only pairs."""
        if self.tokens:
            return self.steered_nll
        if self.pair_loss is None:
            raise ValueError("no held-out tokens and no pairs: nothing to stop on")
        return self.pair_loss


def support_logprobs(scores: np.ndarray, target_index: np.ndarray) -> np.ndarray:
    """Log-prob of each target under softmax(scores) on its support: scores [N, K+1] (-inf: unused) -> [N]."""
    return log_softmax(scores)[np.arange(len(target_index)), target_index]


def target_logprobs(
    sequence: SequenceTargets, rewards: np.ndarray, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(base, steered) log-prob of each target on the support, at the reply's sampling temperature: [N] each."""
    temperature = sequence.teacher_temperature
    return (
        support_logprobs(sequence.base_logprobs / temperature, sequence.target_index),
        support_logprobs((sequence.base_logprobs + alpha * rewards) / temperature, sequence.target_index),
    )


def teacher_target_logprobs(sequence: SequenceTargets) -> np.ndarray:
    """The teacher's log-prob of each target on the support [N]; only distilled data has a teacher."""
    if sequence.teacher_logprobs is None:
        raise ValueError("the sequence has no teacher log-probs (it is not distilled data)")
    return support_logprobs(sequence.teacher_logprobs / sequence.teacher_temperature, sequence.target_index)


def compute_metrics(data: TeacherData, rewards_for: RewardsFor, *, beta: float = 1.0, alpha: float = 1.0) -> Metrics:
    metrics = Metrics()
    base_total = steered_total = 0.0
    part_nlls = {name: np.zeros(4) for name in REPLY_PARTS}  # tokens, base, steered, teacher NLL sums
    for sequence in data.demonstrations:
        base, steered = target_logprobs(sequence, rewards_for(sequence), alpha)
        base_total -= base.sum()
        steered_total -= steered.sum()
        metrics.tokens += sequence.n_targets
        if sequence.teacher_logprobs is not None:
            teacher = teacher_target_logprobs(sequence)
            parts = np.array([reply_part(position, sequence.n_targets) for position in range(sequence.n_targets)])
            for name in REPLY_PARTS:
                mask = parts == name
                part_nlls[name] += (mask.sum(), -base[mask].sum(), -steered[mask].sum(), -teacher[mask].sum())
    if metrics.tokens:
        metrics.base_nll, metrics.steered_nll = (
            float(base_total / metrics.tokens),
            float(steered_total / metrics.tokens),
        )
    taught_tokens = sum(nlls[0] for nlls in part_nlls.values())
    if taught_tokens:
        metrics.teacher_nll = float(sum(nlls[3] for nlls in part_nlls.values()) / taught_tokens)
        metrics.parts = _part_figures(part_nlls)
    if data.pairs:
        margins = np.array(
            [
                _log_ratio(chosen, rewards_for(chosen), alpha) - _log_ratio(rejected, rewards_for(rejected), alpha)
                for chosen, rejected in data.pairs
            ]
        )
        metrics.pairs = len(margins)
        metrics.pair_accuracy = float((margins > 0).mean())
        metrics.pair_loss = float(np.logaddexp(0.0, -beta * margins).mean())
    return metrics


def _part_figures(part_nlls: dict[str, np.ndarray]) -> dict[str, PartFigures]:
    gap = sum(nlls[1] - nlls[3] for nlls in part_nlls.values())
    return {
        name: PartFigures(
            tokens=int(tokens),
            base_nll=float(base / tokens),
            steered_nll=float(steered / tokens),
            teacher_nll=float(teacher / tokens),
            gap_share=float((base - teacher) / gap) if gap else 0.0,
        )
        for name, (tokens, base, steered, teacher) in part_nlls.items()
        if tokens
    }


def _log_ratio(sequence: SequenceTargets, rewards: np.ndarray, alpha: float) -> float:
    """log p_prt(y) - log p_base(y) on the supports."""
    base, steered = target_logprobs(sequence, rewards, alpha)
    return float((steered - base).sum())


def with_rest_slot(sequence: SequenceTargets) -> np.ndarray:
    """The base's log-probs [N, K+1] on the top-K, and in the last slot the log of the base's mass on every other
    token (a target outside the top-K is one of them). A softmax over these slots is the softmax over the whole
    vocabulary with the tokens outside the top-K merged into one, which the reward cannot move."""
    base = sequence.base_logprobs.astype(np.float64)
    k = base.shape[1] - 1
    rest = -np.expm1(_logsumexp(base[:, :k]))
    outside = sequence.target_index == k
    rest = np.where(outside, np.maximum(rest, np.exp(base[:, k])), rest)  # never below the target's own share
    slots = base.copy()
    slots[:, k] = np.log(np.clip(rest, 1e-30, None))
    return slots


def full_vocabulary_logprobs(support: SequenceTargets, rewards: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(base, steered) log-prob of each target over the whole vocabulary: the reward moves the top-K candidates,
    as in decoding, and every other token keeps its share of the base's probability. [N] each."""
    slots = with_rest_slot(support)
    moved = slots + rewards.astype(np.float64)
    moved[:, -1] = slots[:, -1]  # the rest of the vocabulary: no reward
    rows = np.arange(len(support.target_index))
    base = support.base_logprobs.astype(np.float64)[rows, support.target_index]
    change = log_softmax(moved) - slots  # the slots are log-probs already
    return base, base + change[rows, support.target_index]


def _logsumexp(values: np.ndarray) -> np.ndarray:
    peak = values.max(-1)
    return peak + np.log(np.exp(values - peak[:, None]).sum(-1))
