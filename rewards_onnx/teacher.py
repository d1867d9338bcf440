"""The teacher pass: run the frozen base model over each example once and keep, per
response position, only its top-K log-probs and the target's (numpy only, no torch).

Memory is bounded by (response tokens) x (K + 1), never n_ctx x n_vocab: llama.cpp
returns one batch of logit rows at a time and each row is reduced at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from engine.runtime.base_model import BaseModel, ChatMessage
from engine.runtime.decode import Generation, GenerationResult, RewardSlot
from engine.runtime.errors import ContextOverflowError, PromptError
from engine.runtime.steering import CandidateSelector, SamplingConfig, log_normalizer
from rewards_onnx.data import Dataset, DatasetError, Demonstration, Example, PreferencePair

TRAIN_TOP_K = SamplingConfig().top_k  # training and decoding see the same support
Progress = Callable[[int, int], None]


class ProgressCount:
    """Counts finished steps out of ``total`` and reports the count to ``progress``, if there is one."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self.progress:
            self.progress(self.done, self.total)


@dataclass
class SequenceTargets:
    """One response under the base model, reduced to its support S_t = top-K + target at each position."""

    tokens: np.ndarray  # [L] int64, prompt + response (ending with the end-of-turn token)
    first_target: int  # index in tokens of the first response token
    candidate_ids: np.ndarray  # [N, K+1] int64, N = L - first_target; slot K: the target if outside top-K
    base_logprobs: np.ndarray  # [N, K+1] float32, full-vocabulary log-probs; -inf where a slot is unused
    target_index: np.ndarray  # [N] int64, where the target sits among the K+1 slots
    teacher_logprobs: np.ndarray | None = None  # [N, K+1] distilled data: the teacher's log-probs on the support
    teacher_temperature: float = 1.0  # the temperature the reply was sampled at from the teacher

    @property
    def n_targets(self) -> int:
        return len(self.target_index)


@dataclass
class TeacherData:
    demonstrations: list[SequenceTargets]
    pairs: list[tuple[SequenceTargets, SequenceTargets]]  # (chosen, rejected)

    @property
    def n_targets(self) -> int:
        return sum(s.n_targets for s in self.demonstrations) + sum(c.n_targets + r.n_targets for c, r in self.pairs)


def messages_for(prompt: str, system: str | None) -> list[ChatMessage]:
    messages: list[ChatMessage] = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def answer_prompts(
    base: BaseModel,
    prompts: Sequence[tuple[str, str | None]],
    *,
    rewards: Sequence[RewardSlot] = (),
    config: SamplingConfig,
    on_reply: Callable[[], None] | None = None,
) -> list[GenerationResult]:
    """Each (prompt, system prompt) answered with the prompt's index as the seed, so that sources compared on the
    same prompts (base, steered, teacher) share their seeds."""
    results = []
    for seed, (prompt, system) in enumerate(prompts):
        tokens = base.chat_prompt_tokens(messages_for(prompt, system))
        results.append(Generation(base, tokens, rewards=rewards, config=replace(config, seed=seed)).run())
        if on_reply:
            on_reply()
    return results


def response_sequence(base: BaseModel, messages: Sequence[ChatMessage], response: str) -> tuple[list[int], int]:
    """Tokens of the conversation with the reply, and where the reply starts.

    The reply is rendered by the model's own chat template, so its end-of-turn token is a
    target too (the reward learns when to stop); anything the template adds after it is cut.
    """
    prompt = base.chat_prompt_tokens(messages)
    full = base.chat_prompt_tokens([*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
    if full[: len(prompt)] != prompt:  # a template whose reply does not extend its own prompt
        full = prompt + base.tokenize(response) + [base.end_of_turn_token]
    end = next((i + 1 for i in range(len(prompt), len(full)) if base.is_end_of_generation(full[i])), len(full))
    if end <= len(prompt):
        raise DatasetError("A response is empty after tokenization; every response needs some text.")
    return full[:end], len(prompt)


def fitting(base: BaseModel, data: Dataset) -> Dataset:
    """The data without the examples the teacher pass cannot take, each of those recorded as skipped, so that one
    long chat never stops a whole job. Run before any pass, so a skipped example is never cached as one."""
    return data.kept(lambda example: unfit_reason(base, example))


def unfit_reason(base: BaseModel, example: Example) -> str | None:
    """Why the teacher pass cannot take ``example`` (the conversation with a reply does not fit the context, a reply
    is nothing once tokenized or tokenizes differently in the teacher's context, the chat template refuses it),
    or None."""
    replies = (example.chosen, example.rejected) if isinstance(example, PreferencePair) else (example.response,)
    systems = [example.system]
    if isinstance(example, Demonstration) and example.teacher_system:
        systems.append(example.teacher_system)
    targets = []  # reply tokens in each pass
    for system in systems:
        for reply in replies:
            try:
                tokens, first_target = response_sequence(base, messages_for(example.prompt, system), reply)
                base.check_fits(len(tokens))
            except ContextOverflowError:
                return f"longer than the {base.n_ctx}-token context"
            except DatasetError:
                return "a reply is empty once tokenized"
            except PromptError:  # e.g. a template that allows no system prompt
                return "the model's chat template refuses it"
            targets.append(len(tokens) - first_target)
    if len(systems) > 1 and len(set(targets)) > 1:  # one reply in two contexts
        return "the reply tokenizes differently under the teacher's system prompt"
    return None


def reduce_to_support(base: BaseModel, tokens: Sequence[int], first_target: int, k: int) -> SequenceTargets:
    select = CandidateSelector(base.n_vocab, k)
    n = len(tokens) - first_target
    candidate_ids = np.zeros((n, k + 1), dtype=np.int64)
    base_logprobs = np.full((n, k + 1), -np.inf, dtype=np.float32)
    target_index = np.zeros(n, dtype=np.int64)
    for target_position, logits in base.next_token_logits(tokens, first_target):
        row, target = target_position - first_target, tokens[target_position]
        top = select(logits)
        candidate_ids[row, :k] = top.token_ids
        base_logprobs[row, :k] = top.base_logprobs
        hits = np.flatnonzero(top.token_ids == target)
        if len(hits):
            target_index[row] = hits[0]
        else:  # the target is outside the top-K: it joins the support in the last slot
            candidate_ids[row, k] = target  # same normalizer as the top-K: their log-prob minus their logit
            base_logprobs[row, k] = logits[target] + top.base_logprobs[0] - logits[top.token_ids[0]]
            target_index[row] = k
    return SequenceTargets(np.asarray(tokens, dtype=np.int64), first_target, candidate_ids, base_logprobs, target_index)


def evaluations(example: Example) -> int:
    """How many passes of the base an example needs: its reply (or both replies of a pair), and for distilled
    data the reply again in the teacher's context. Progress counts these."""
    if isinstance(example, PreferencePair):
        return 2
    return 2 if example.teacher_system else 1


def teacher_pass(
    base: BaseModel, examples: Sequence[Example], *, k: int = TRAIN_TOP_K, progress: Progress | None = None
) -> TeacherData:
    """Every example in the plain context first, then the distilled ones in their teacher's context, so that
    consecutive evaluations share the chat template's opening and the base skips it."""
    data, taught = TeacherData([], []), []
    advance = ProgressCount(sum(map(evaluations, examples)), progress).advance

    for example in examples:
        messages = messages_for(example.prompt, example.system)
        if isinstance(example, Demonstration):
            sequence = reduce_to_support(base, *response_sequence(base, messages, example.response), k)
            data.demonstrations.append(sequence)
            if example.teacher_system:
                taught.append((example, sequence))
            advance(1)
        elif isinstance(example, PreferencePair):
            chosen, rejected = (
                reduce_to_support(base, *response_sequence(base, messages, reply), k)
                for reply in (example.chosen, example.rejected)
            )
            data.pairs.append((chosen, rejected))
            advance(2)
    for example, sequence in taught:
        teacher_context = response_sequence(
            base, messages_for(example.prompt, example.teacher_system), example.response
        )
        sequence.teacher_logprobs = logprobs_on_support(base, *teacher_context, sequence)
        sequence.teacher_temperature = example.teacher_temperature
        advance(1)
    return data


def logprobs_on_support(
    base: BaseModel, tokens: Sequence[int], first_target: int, support: SequenceTargets
) -> np.ndarray:
    """The log-probs [N, K+1] that ``base`` given ``tokens`` puts on another pass's support (same reply)."""
    if len(tokens) - first_target != support.n_targets:
        raise DatasetError("The reply tokenizes differently in the two contexts; cannot compare them token by token.")
    unused = np.isneginf(support.base_logprobs)
    out = np.empty(support.candidate_ids.shape, dtype=np.float32)
    for target_position, logits in base.next_token_logits(tokens, first_target):
        row = target_position - first_target
        out[row] = logits[support.candidate_ids[row]] - log_normalizer(logits)
    out[unused] = -np.inf
    return out
