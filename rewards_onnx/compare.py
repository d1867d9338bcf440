"""``prt compare``: a reward tuned on the user's replies against a per-user fine-tune of the same base, on the
same training examples and the same held-out prompts.

Every NLL is per reply token over the whole vocabulary, at temperature 1. The steered model is the base
with its top-K candidates moved by the reward, as in decoding (every other token keeps the base's
probability). Each gain is measured within one implementation: the reward's in llama.cpp (base vs
steered), the fine-tune's in torch (the dequantized base vs the fine-tuned one); how closely the two
implementations agree on the base is reported beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, RewardSlot
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import SamplingConfig
from rewards_onnx.data import Dataset, Demonstration, Example
from rewards_onnx.evaluate import ReplyStats, onnx_rewards
from rewards_onnx.finetune import FinetuneConfig, TokenSequence, finetune
from rewards_onnx.knowledge import Fact, ProbeAnswers, ask_engine, ask_finetuned
from rewards_onnx.metrics import REPLY_PARTS, full_vocabulary_logprobs, reply_part
from rewards_onnx.teacher import SequenceTargets, fitting, messages_for, response_sequence, teacher_pass
from rewards_onnx.torch_llama import TorchLlama
from rewards_onnx.train import TuneConfig, split_held_out, tune

Progress = Callable[[str, int, int, str], None]  # phase, done, total, message
PAIRS_SKIPPED = "a preference pair: prt compare measures replies"


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    train_examples: int | None = None  # the first N of the training side of the split; None: all of it
    tune: TuneConfig = TuneConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    facts: int = 200  # probe questions asked of the base; those it answers correctly are asked again
    samples: int = 0  # held-out prompts answered by the three models, side by side
    sample_tokens: int = 96
    ceiling_k: tuple[int, ...] = (40, 200, 1000)


@dataclass
class CompareReport:
    train_examples: int
    held_out_examples: int
    held_out_tokens: int
    nll: dict[str, float]  # base, steered (llama.cpp); torch_base, finetuned (torch)
    share_of_finetune_gain: float | None  # (base - steered) / (torch_base - finetuned)
    seconds: dict[str, float]  # reward (prt tune: teacher pass, training, export), finetune
    finetune_held_out_nll: list[float]  # before training, then after each epoch
    finetune_best_epoch: int
    base_logprob_agreement: dict[str, float]  # |llama.cpp - torch| on the held-out targets: mean, max
    by_part: dict[str, dict[str, float | None]]  # where in the replies each model gains
    by_base_rank: dict[str, dict[str, float | None]]  # targets inside vs outside the base's top-K
    top_k_ceiling: dict[str, float]  # share of the fine-tune's gain a K-candidate reward copying it would reach
    knowledge: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def compare(
    base: BaseModel,
    data: Dataset,
    work_dir: Path,
    *,
    facts: Sequence[Fact],
    config: CompareConfig = CompareConfig(),
    progress: Progress | None = None,
) -> CompareReport:
    report = progress or (lambda phase, done, total, message: None)
    data = fitting(base, data.kept(lambda e: None if isinstance(e, Demonstration) else PAIRS_SKIPPED))
    data.require_examples()
    train, held = split_held_out(data.examples, config.tune)
    train = train[: config.train_examples]
    held_support = teacher_pass(base, [_untaught(e) for e in held]).demonstrations

    tuned = tune(
        base,
        train,
        work_dir / "reward.onnx",
        config=config.tune,
        held_out=held,
        on_progress=lambda p: report(f"reward {p.phase}", p.done, p.total, p.message),
    )
    reward = RewardModel(tuned.path)
    rewards_for = onnx_rewards(reward)
    llama_base, steered = (
        np.concatenate(parts) for parts in zip(*(full_vocabulary_logprobs(s, rewards_for(s)) for s in held_support))
    )

    held_tokens: list[TokenSequence] = [(s.tokens.tolist(), s.first_target) for s in held_support]
    tuned_model = finetune(
        base.path,
        [_reply_tokens(base, example) for example in train],
        held_tokens,
        config=config.finetune,
        progress=lambda done, total, message: report("fine-tune", done, total, message),
    )
    torch_base = TorchLlama.from_gguf(base.path)
    torch_lp, finetuned, ceilings = _torch_log_probs(torch_base, tuned_model.model, held_tokens, config.ceiling_k)

    per_token = {"base": llama_base, "steered": steered, "torch_base": torch_lp, "finetuned": finetuned}
    result = CompareReport(
        train_examples=len(train),
        held_out_examples=len(held),
        held_out_tokens=len(steered),
        nll={name: float(-values.mean()) for name, values in per_token.items()},
        share_of_finetune_gain=_share(per_token, np.ones(len(steered), dtype=bool)),
        seconds={"reward": round(tuned.seconds, 1), "finetune": round(tuned_model.seconds, 1)},
        finetune_held_out_nll=[round(nll, 4) for nll in tuned_model.held_out_nll],
        finetune_best_epoch=tuned_model.best_epoch,
        base_logprob_agreement={
            "mean": float(np.abs(llama_base - torch_lp).mean()),
            "max": float(np.abs(llama_base - torch_lp).max()),
        },
        by_part=_by_mask(per_token, _reply_parts(held_support)),
        by_base_rank=_by_mask(per_token, _base_ranks(held_support, config.tune.top_k)),
        top_k_ceiling={
            str(k): float((torch_lp - ceiling).mean() / (torch_lp - finetuned).mean())
            for k, ceiling in ceilings.items()
        },
        skipped=data.skipped_json(),
    )
    result.knowledge = _knowledge(base, reward, torch_base, tuned_model.model, facts[: config.facts], report)
    if config.samples:
        result.samples = _samples(base, reward, tuned_model.model, held[: config.samples], config.sample_tokens)
    reward.close()
    return result


def _untaught(example: Example) -> Example:
    """Held-out replies are scored as they are; a distilled reply's teacher is not one of the compared models."""
    return replace(example, teacher_system=None) if isinstance(example, Demonstration) else example


def _reply_tokens(base: BaseModel, example: Example) -> TokenSequence:
    assert isinstance(example, Demonstration)
    return response_sequence(base, messages_for(example.prompt, example.system), example.response)


@torch.no_grad()
def _torch_log_probs(
    torch_base: TorchLlama, finetuned: TorchLlama, sequences: Sequence[TokenSequence], ks: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """Per held-out target: the torch base's and the fine-tune's log-prob, and for each K, the log-prob under
    the base with its top-K candidates given the fine-tune's log-probs (the best a K-candidate reward copying
    the fine-tune could do)."""
    base_rows, tuned_rows = [], []
    ceiling_rows: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for tokens, first in sequences:
        inputs = torch.tensor([tokens])
        targets = inputs[0, first:, None]
        base_lp = torch_base(inputs)[0, first - 1 : -1].log_softmax(-1)
        tuned_lp = finetuned(inputs)[0, first - 1 : -1].log_softmax(-1)
        base_rows.append(base_lp.gather(1, targets).squeeze(1))
        tuned_rows.append(tuned_lp.gather(1, targets).squeeze(1))
        for k in ks:
            top = base_lp.topk(min(k, base_lp.shape[1]), dim=-1).indices
            mixed = base_lp.scatter(1, top, tuned_lp.gather(1, top)).log_softmax(-1)
            ceiling_rows[k].append(mixed.gather(1, targets).squeeze(1))
    return (
        torch.cat(base_rows).numpy().astype(np.float64),
        torch.cat(tuned_rows).numpy().astype(np.float64),
        {k: torch.cat(rows).numpy().astype(np.float64) for k, rows in ceiling_rows.items()},
    )


def _share(per_token: dict[str, np.ndarray], mask: np.ndarray) -> float | None:
    gain = (per_token["finetuned"][mask] - per_token["torch_base"][mask]).sum()
    if not mask.any() or gain == 0:
        return None
    return float((per_token["steered"][mask] - per_token["base"][mask]).sum() / gain)


def _reply_parts(held: Sequence[SequenceTargets]) -> dict[str, np.ndarray]:
    parts = np.concatenate([[reply_part(i, s.n_targets) for i in range(s.n_targets)] for s in held])
    return {name: parts == name for name in REPLY_PARTS}


def _base_ranks(held: Sequence[SequenceTargets], k: int) -> dict[str, np.ndarray]:
    inside = np.concatenate([s.target_index < k for s in held])
    return {f"in the base's top {k}": inside, f"outside the base's top {k}": ~inside}


def _by_mask(per_token: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
    """Tokens, each model's NLL and the reward's share of the fine-tune's gain, on each group of targets."""
    figures = {}
    for name, mask in masks.items():
        if mask.any():
            nlls = {model: float(-values[mask].mean()) for model, values in per_token.items()}
            figures[name] = {"tokens": int(mask.sum()), **nlls, "share_of_finetune_gain": _share(per_token, mask)}
    return figures


def _knowledge(
    base: BaseModel,
    reward: RewardModel,
    torch_base: TorchLlama,
    finetuned: TorchLlama,
    facts: Sequence[Fact],
    report: Progress,
) -> dict:
    """Of the facts the base answers correctly, the share each model still answers correctly, and the mean
    log-prob of the correct answer. The torch base is the fine-tune's control (the same weights untrained)."""
    asked = _counted(report, "facts: base", len(facts))
    base_answers = ask_engine(base, facts, None, asked)
    known = [fact for fact, correct in zip(facts, base_answers.correct) if correct]
    if not known:
        return {"asked": len(facts), "known": 0}
    kept = ProbeAnswers()
    for fact, reply, logprob, correct in zip(
        facts, base_answers.replies, base_answers.answer_logprob, base_answers.correct
    ):
        if correct:
            kept.add(fact, reply, logprob)
    answers = {
        "base": kept,
        "steered": ask_engine(base, known, reward, _counted(report, "facts: steered", len(known))),
        "torch_base": ask_finetuned(torch_base, base, known, _counted(report, "facts: torch base", len(known))),
        "finetuned": ask_finetuned(finetuned, base, known, _counted(report, "facts: fine-tune", len(known))),
    }
    return {"asked": len(facts), "known": len(known), **{name: a.to_json() for name, a in answers.items()}}


def _counted(report: Progress, phase: str, total: int) -> Callable[[], None]:
    done = [0]

    def advance() -> None:
        done[0] += 1
        report(phase, done[0], total, "")

    return advance


def _samples(
    base: BaseModel, reward: RewardModel, finetuned: TorchLlama, held: Sequence[Example], max_tokens: int
) -> dict:
    """Greedy replies of the base, the steered base and the fine-tune to held-out prompts, beside the data's."""
    demonstrations = [e for e in held if isinstance(e, Demonstration)]
    prompts = [base.chat_prompt_tokens(messages_for(e.prompt, e.system)) for e in demonstrations]
    config = SamplingConfig(temperature=0.0, max_tokens=max_tokens)
    replies: dict[str, list[list[int]]] = {
        "data": [base.tokenize(e.response) for e in demonstrations],
        "base": [Generation(base, p, config=config).run().token_ids for p in prompts],
        "steered": [Generation(base, p, rewards=[RewardSlot(reward)], config=config).run().token_ids for p in prompts],
        "finetuned": [finetuned.greedy(p, max_tokens=max_tokens, is_stop=base.is_end_of_generation) for p in prompts],
    }
    stats = {
        name: asdict(ReplyStats.of([base.detokenize(r) for r in tokens], [len(r) for r in tokens]))
        for name, tokens in replies.items()
    }
    return {"prompts": [e.prompt for e in demonstrations], **stats}
