"""The per-user fine-tune ``prt compare`` measures the reward against: every weight of the base, trained in torch
on the same replies, with early stopping on the same held-out NLL. A benchmark baseline, not the product."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rewards_onnx.torch_llama import TorchLlama

TokenSequence = tuple[Sequence[int], int]  # a conversation's tokens and the index of its reply's first token
Progress = Callable[[int, int, str], None]  # done, total, message


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    learning_rate: float = 2e-5
    batch_size: int = 8
    epochs: int = 4
    patience: int = 1  # epochs without held-out improvement before stopping
    seed: int = 0


@dataclass
class FinetuneReport:
    model: TorchLlama  # the best epoch's weights
    held_out_nll: list[float]  # per token, before training ([0]) and after each epoch
    best_epoch: int
    seconds: float  # loading the weights, training and the held-out evaluations


def reply_log_probs(model: TorchLlama, batch: Sequence[TokenSequence]) -> torch.Tensor:
    """Full-vocabulary log-prob of every reply token of every sequence, concatenated [M]."""
    length = max(len(tokens) for tokens, _ in batch)
    padded = torch.zeros(len(batch), length, dtype=torch.long)  # right padding: causal attention never sees it
    for row, (tokens, _) in enumerate(batch):
        padded[row, : len(tokens)] = torch.tensor(list(tokens))
    log_probs = model(padded).log_softmax(-1)
    picked = [
        log_probs[row, first - 1 : len(tokens) - 1].gather(1, padded[row, first : len(tokens), None]).squeeze(1)
        for row, (tokens, first) in enumerate(batch)
    ]
    return torch.cat(picked)


@torch.no_grad()
def reply_nll(model: TorchLlama, sequences: Sequence[TokenSequence], batch_size: int = 8) -> float:
    """Mean full-vocabulary NLL per reply token."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        picked = reply_log_probs(model, sequences[start : start + batch_size])
        total -= float(picked.sum())
        count += len(picked)
    return total / count


def finetune(
    gguf_path: Path,
    train: Sequence[TokenSequence],
    held_out: Sequence[TokenSequence],
    *,
    config: FinetuneConfig = FinetuneConfig(),
    progress: Progress | None = None,
) -> FinetuneReport:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = TorchLlama.from_gguf(gguf_path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    order = list(range(len(train)))
    rng = random.Random(config.seed)
    steps = -(-len(train) // config.batch_size)
    held_nll = [reply_nll(model, held_out)]
    best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(order)
        model.train()
        for step in range(steps):
            batch = [train[i] for i in order[step * config.batch_size : (step + 1) * config.batch_size]]
            loss = -reply_log_probs(model, batch).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if progress:
                progress((epoch - 1) * steps + step + 1, config.epochs * steps, f"epoch {epoch}, loss {loss:.3f}")
        held_nll.append(reply_nll(model, held_out))
        if held_nll[-1] < held_nll[best_epoch] - 1e-4:
            best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return FinetuneReport(model, held_nll, best_epoch, time.perf_counter() - started)
