"""Knowledge kept: factual questions the base answers correctly, asked again of the steered base and of the
fine-tune (``prt compare``). Each is judged at temperature 0, and the correct answer's log-prob is read
after a fixed lead ("The capital of France is" -> " Paris")."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, RewardSlot
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import SamplingConfig
from rewards_onnx.data import DatasetError
from rewards_onnx.evaluate import onnx_rewards
from rewards_onnx.finetune import reply_log_probs
from rewards_onnx.metrics import full_vocabulary_logprobs
from rewards_onnx.teacher import TRAIN_TOP_K, messages_for, reduce_to_support
from rewards_onnx.torch_llama import TorchLlama

SHIPPED_FACTS = Path(__file__).resolve().parent.parent / "assets" / "probes" / "facts.jsonl"
ANSWER_TOKENS = 24  # a short answer names the fact within this many tokens


@dataclass(frozen=True)
class Fact:
    prompt: str
    lead: str
    answer: str
    kind: str


@dataclass
class ProbeAnswers:
    """One model's answers to the facts: its replies, whether each was right, and the right answer's log-prob
    after the lead."""

    facts: list[Fact] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    answer_logprob: list[float] = field(default_factory=list)

    def add(self, fact: Fact, reply: str, answer_logprob: float) -> None:
        self.facts.append(fact)
        self.replies.append(reply)
        self.correct.append(is_correct(reply, fact.answer))
        self.answer_logprob.append(answer_logprob)

    def to_json(self) -> dict:
        wrong = [
            {"prompt": fact.prompt, "answer": fact.answer, "reply": reply}
            for fact, reply, correct in zip(self.facts, self.replies, self.correct)
            if not correct
        ]
        return {
            "correct": float(np.mean(self.correct)),
            "answer_logprob": float(np.mean(self.answer_logprob)),
            "wrong": wrong,
        }


def read_facts(path: Path, *, limit: int | None = None) -> list[Fact]:
    """The probe's facts, the kinds interleaved so that any first ``limit`` of them covers every kind."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        facts = [
            Fact(**{key: record[key] for key in ("prompt", "lead", "answer", "kind")})
            for record in map(json.loads, lines)
        ]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(
            f"Cannot read the fact probe {path}: {error}. Each line needs prompt, lead, answer and kind."
        ) from error
    by_kind: dict[str, list[Fact]] = {}
    for fact in facts:
        by_kind.setdefault(fact.kind, []).append(fact)
    interleaved = [fact for round_ in itertools.zip_longest(*by_kind.values()) for fact in round_ if fact]
    return interleaved[:limit]


def is_correct(reply: str, answer: str) -> bool:
    """The answer appears in the reply as a whole word (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", reply, flags=re.IGNORECASE) is not None


def answer_sequence(base: BaseModel, fact: Fact) -> tuple[list[int], int]:
    """The question, then a reply made of the lead and the answer; the answer's first token's index."""
    lead = base.chat_prompt_tokens(messages_for(fact.prompt, None)) + base.tokenize(fact.lead)
    return lead + base.tokenize(" " + fact.answer), len(lead)


def ask_engine(
    base: BaseModel, facts: Sequence[Fact], reward: RewardModel | None, on_fact: Callable[[], None]
) -> ProbeAnswers:
    """The base (or the base steered by ``reward``) through the real decode loop and ONNX reward."""
    slots = [RewardSlot(reward)] if reward else []
    rewards_for = onnx_rewards(reward) if reward else None
    answers = ProbeAnswers()
    for fact in facts:
        prompt = base.chat_prompt_tokens(messages_for(fact.prompt, None))
        config = SamplingConfig(temperature=0.0, max_tokens=ANSWER_TOKENS)
        reply = Generation(base, prompt, rewards=slots, config=config).run().text
        support = reduce_to_support(base, *answer_sequence(base, fact), TRAIN_TOP_K)
        rewards = rewards_for(support) if rewards_for else np.zeros(support.candidate_ids.shape, dtype=np.float32)
        answers.add(fact, reply, float(full_vocabulary_logprobs(support, rewards)[1].sum()))
        on_fact()
    return answers


@torch.no_grad()
def ask_finetuned(
    model: TorchLlama, base: BaseModel, facts: Sequence[Fact], on_fact: Callable[[], None]
) -> ProbeAnswers:
    """The fine-tuned torch model, greedy, on the same tokens (the base supplies the tokenizer and template)."""
    answers = ProbeAnswers()
    for fact in facts:
        prompt = base.chat_prompt_tokens(messages_for(fact.prompt, None))
        reply = base.detokenize(model.greedy(prompt, max_tokens=ANSWER_TOKENS, is_stop=base.is_end_of_generation))
        answers.add(fact, reply, float(reply_log_probs(model, [answer_sequence(base, fact)]).sum()))
        on_fact()
    return answers
