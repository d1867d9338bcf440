"""Portable Reward Tuning: fit r so that softmax(log p_base + r) on the top-K support matches the data.

Demonstrations: cross-entropy of each response token under softmax(lp + r) on S_t; for
distilled data (the teacher's log-probs are known) the cross-entropy is against the
distribution the reply was sampled from (the teacher's on S_t), which carries far more per
token than one sample. A reply sampled at temperature T is fitted by the PRT model at T,
softmax((lp + r) / T) against softmax(lp_teacher / T): decoding at T then reproduces the
teacher, and r learns what the teacher's prompt changes, not the temperature.
Preference pairs: -log sigmoid(beta * (D(chosen) - D(rejected))), D(y) = sum_t [r(y_t) - log Z_t],
log Z_t = logsumexp(lp + r) - logsumexp(lp) on S_t (DPO on the PRT model).
The base model is frozen; it only supplies lp, once, in the teacher pass.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.runtime.base_model import BaseModel
from engine.runtime.errors import DiskFullError, PrtError, RewardFileError
from engine.runtime.files import file_sha256
from engine.runtime.reward_graph import RewardNetworkShape, build_reward_model, embedding_rank_for
from engine.runtime.rewards import RewardCard, RewardModel, card_path, save_reward
from rewards_onnx.data import Dataset, DatasetError, Demonstration, Example, as_dataset, counts
from rewards_onnx.metrics import Metrics, compute_metrics
from rewards_onnx.network import RewardNet, base_embedding_projection
from rewards_onnx.teacher import TRAIN_TOP_K, SequenceTargets, TeacherData, fitting, teacher_pass
from rewards_onnx.teacher_cache import TeacherCache

PARITY_TOLERANCE = 1e-3


class ExportParityError(PrtError):
    """The exported ONNX reward does not reproduce the torch model."""


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    held_out_fraction: float = 0.1
    patience: int = 4  # epochs without held-out improvement before stopping
    seed: int = 0
    pair_beta: float = 1.0
    top_k: int = TRAIN_TOP_K
    width: int = 128
    layers: int = 2
    heads: int = 4
    train_embedding: bool = True  # +2-3 points of the gap closed on the example data, training 2x slower

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not 0 < self.held_out_fraction < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1 and held_out_fraction in (0, 1)")


@dataclass
class Progress:
    """What a progress bar needs; ``phase`` is "teacher", "train" or "export"."""

    phase: str
    done: int
    total: int
    elapsed: float
    message: str = ""

    @property
    def eta_seconds(self) -> float | None:
        return self.elapsed / self.done * (self.total - self.done) if self.done else None


@dataclass
class TuneReport:
    path: Path
    held_out: Metrics
    epochs_run: int
    best_epoch: int
    parity_max_abs_diff: float
    seconds: float
    teacher_seconds: float
    train_examples: int
    held_out_examples: int
    data: Dataset  # what was trained on and held out, per source, and what was skipped


def tune(
    base: BaseModel,
    examples: Sequence[Example] | Dataset,
    out_path: Path,
    *,
    config: TuneConfig = TuneConfig(),
    name: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cache_path: Path | None = None,
    held_out: Sequence[Example] | None = None,
) -> TuneReport:
    """Train, export and check a reward on the examples the teacher pass can take (the others are skipped and
    counted). With ``cache_path``, teacher passes are kept there and reused (rewards_onnx/teacher_cache.py): the
    same examples give the same reward, minus the passes' time. Early stopping watches ``held_out``, if given
    (``prt compare`` holds out the same examples for every model), else a split of the examples."""
    started = time.perf_counter()
    out_path = _checked_destination(Path(out_path))
    report = on_progress or (lambda progress: None)
    _seed_everything(config.seed)
    model_sha256 = file_sha256(base.path)
    data = fitting(base, as_dataset(examples))
    examples = data.examples
    if len(examples) < 2 and data.skipped and held_out is None:  # say what was skipped before split_held_out refuses
        raise DatasetError(f"Tuning needs at least 2 usable examples; {data.skipped_summary()}.")
    if held_out is None:
        train_examples, held_examples = split_held_out(examples, config)
    else:
        train_examples, held_examples = list(examples), list(held_out)
    with _teacher_cache(cache_path, model_sha256, config.top_k) as cache:
        train_data, held_data = _teacher_data(base, train_examples, held_examples, config, report, cache)
    teacher_seconds = time.perf_counter() - started

    model = _initial_model(base, config)
    best_state, best_epoch, epochs_run = _fit(model, train_data, held_data, config, report)
    model.load_state_dict(best_state)
    model.round_embedding()

    report(Progress("export", 0, 1, time.perf_counter() - started, "exporting and checking parity"))
    held_metrics = evaluate_torch(model, held_data, config.pair_beta)
    card = RewardCard(
        name=name or Path(out_path).stem,
        vocabulary_fingerprint=base.vocabulary_fingerprint,
        vocabulary_size=base.n_vocab,
        base_model_name=base.name,
        base_model_sha256=model_sha256,
        description=f"Tuned on {len(examples)} examples",
        network={
            "width": config.width,
            "layers": config.layers,
            "heads": config.heads,
            "embedding_rank": model.shape.rank,
            "top_k": config.top_k,
        },
        training_data={
            **counts(examples),
            "train_examples": len(train_examples),
            "held_out_examples": len(held_examples),
            "train_tokens": train_data.n_targets,
            "skipped": len(data.skipped),
            "skipped_by_reason": data.skipped_by_reason(),
        },
        metrics={
            "held_out": held_metrics.to_json(),
            "best_epoch": best_epoch,
            "epochs_run": epochs_run,
            "config": asdict(config),
        },
    )
    path, parity = _save_checked(model, card, out_path, seed=config.seed)
    report(Progress("export", 1, 1, time.perf_counter() - started, f"parity max |diff| {parity:.2e}"))
    return TuneReport(
        path=path,
        held_out=held_metrics,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        parity_max_abs_diff=parity,
        seconds=time.perf_counter() - started,
        teacher_seconds=teacher_seconds,
        train_examples=len(train_examples),
        held_out_examples=len(held_examples),
        data=data,
    )


def _checked_destination(out_path: Path) -> Path:
    """Refuse a bad destination before minutes of work, not after."""
    if out_path.suffix != ".onnx":
        raise RewardFileError(f"The reward file must end in .onnx, got {out_path.name}.")
    if not out_path.parent.is_dir():
        raise RewardFileError(f"The folder {out_path.parent} does not exist; create it or choose another --out.")
    return out_path


def _teacher_cache(path: Path | None, model_sha256: str, k: int) -> contextlib.AbstractContextManager:
    return TeacherCache(path, model_sha256=model_sha256, k=k) if path else contextlib.nullcontext()


def _teacher_data(
    base: BaseModel,
    train: Sequence[Example],
    held: Sequence[Example],
    config: TuneConfig,
    report: Callable[[Progress], None],
    cache: TeacherCache | None,
) -> tuple[TeacherData, TeacherData]:
    """One teacher pass over both sets (through the cache, if there is one), split back into the two."""
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        report(Progress("teacher", done, total, time.perf_counter() - started))

    if cache:
        data = cache.teacher_pass(base, [*train, *held], progress=progress)
    else:
        data = teacher_pass(base, [*train, *held], k=config.top_k, progress=progress)
    train_demonstrations = sum(isinstance(example, Demonstration) for example in train)
    train_pairs = len(train) - train_demonstrations
    return (
        TeacherData(data.demonstrations[:train_demonstrations], data.pairs[:train_pairs]),
        TeacherData(data.demonstrations[train_demonstrations:], data.pairs[train_pairs:]),
    )


def _initial_model(base: BaseModel, config: TuneConfig) -> RewardNet:
    shape = RewardNetworkShape(
        vocab_size=base.n_vocab,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        embedding_rank=embedding_rank_for(base.n_vocab, config.width, base.path.stat().st_size),
    )
    embedding = base_embedding_projection(base.path, shape.rank, seed=config.seed)
    if embedding is None:  # a GGUF without token_embd: start from noise
        embedding = np.random.default_rng(config.seed).standard_normal((base.n_vocab, shape.rank))
    return RewardNet(shape, embedding, train_embedding=config.train_embedding)


def _save_checked(model: RewardNet, card: RewardCard, out_path: Path, *, seed: int) -> tuple[Path, float]:
    """Export beside ``out_path`` under a hidden name, check parity there, then move both files into place."""
    staged = out_path.with_name(f".{out_path.stem}.checking.onnx")
    try:
        save_reward(staged, build_reward_model(model.export(), metadata={"trained_with": "prt tune"}), card)
        parity = check_export_parity(model, staged, seed=seed)
        os.replace(card_path(staged), card_path(out_path))
        os.replace(staged, out_path)
    except DiskFullError as error:  # name the file the user asked for, not the staged one
        raise DiskFullError(
            f"The disk is full: no room in {out_path.parent} for the reward {out_path.name} and its "
            "card (nothing there was changed); free some space or choose another --out, then tune "
            "again."
        ) from error
    finally:
        staged.unlink(missing_ok=True)
        card_path(staged).unlink(missing_ok=True)
    return out_path, parity


def split_held_out(examples: Sequence[Example], config: TuneConfig) -> tuple[list[Example], list[Example]]:
    """Hold out whole prompts: all answers to one prompt (a thumbs-up and an edit of it, or several distilled
    answers) fall on one side, so the held-out figures are about prompts the reward has not seen."""
    if len(examples) < 2:
        raise DatasetError(
            f"Tuning needs at least 2 examples (one is held out to check the result); got {len(examples)}."
        )
    groups = _prompt_groups(examples)
    if len(groups) < 2:  # every example answers the same prompt: hold out answers instead
        groups = [[index] for index in range(len(examples))]
    random.Random(config.seed).shuffle(groups)
    wanted = max(1, round(len(examples) * config.held_out_fraction))
    held_groups = held_count = 0
    while held_count < wanted and held_groups < len(groups) - 1:  # never hold out every prompt
        held_count += len(groups[held_groups])
        held_groups += 1
    train, held = groups[held_groups:], groups[:held_groups]
    return [examples[i] for group in train for i in group], [examples[i] for group in held for i in group]


def _prompt_groups(examples: Sequence[Example]) -> list[list[int]]:
    """Indices of the examples, grouped by (system, prompt), in order of first appearance."""
    groups: dict[tuple[str | None, str], list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault((example.system, example.prompt), []).append(index)
    return list(groups.values())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)  # else some CPU kernels sum in thread order: runs differ


# -- training ------------------------------------------------------------------------------------
def _fit(
    model: RewardNet, train: TeacherData, held: TeacherData, config: TuneConfig, report: Callable[[Progress], None]
) -> tuple[dict, int, int]:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    rng = random.Random(config.seed)
    items: list[SequenceTargets | tuple[SequenceTargets, SequenceTargets]] = [*train.demonstrations, *train.pairs]
    steps_per_epoch = max(1, -(-len(items) // config.batch_size))
    best = (evaluate_torch(model, held, config.pair_beta).objective(), copy.deepcopy(model.state_dict()), 0)
    started, stale, epoch = time.perf_counter(), 0, 0
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(items)
        model.train()
        for step in range(steps_per_epoch):
            batch = items[step * config.batch_size : (step + 1) * config.batch_size]
            loss = _batch_loss(
                model,
                [s for s in batch if isinstance(s, SequenceTargets)],
                [p for p in batch if isinstance(p, tuple)],
                config.pair_beta,
            )
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            done = (epoch - 1) * steps_per_epoch + step + 1
            report(
                Progress(
                    "train",
                    done,
                    config.epochs * steps_per_epoch,
                    time.perf_counter() - started,
                    f"epoch {epoch}, loss {loss.item():.4f}",
                )
            )
        objective = evaluate_torch(model, held, config.pair_beta).objective()
        if objective < best[0] - 1e-4:
            best, stale = (objective, copy.deepcopy(model.state_dict()), epoch), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return best[1], best[2], epoch


def _batch_loss(
    model: RewardNet, demos: list[SequenceTargets], pairs: list[tuple[SequenceTargets, SequenceTargets]], beta: float
) -> torch.Tensor:
    loss = torch.zeros(())
    if demos:
        logits, _, base = _support_logits(model, demos)
        wanted = _target_distribution(demos, base.shape[1])  # [M, K+1]
        log_probs = logits.log_softmax(-1).masked_fill(torch.isinf(base), 0.0)  # unused slots carry no mass
        loss = loss - (wanted * log_probs).sum(-1).mean()
    if pairs:
        loss = loss - F.logsigmoid(beta * _pair_margins(model, pairs)).mean()
    return loss


def _target_distribution(demos: list[SequenceTargets], n_slots: int) -> torch.Tensor:
    """One-hot on the sampled token, or, where the teacher is known, the distribution the reply was drawn from:
    the teacher's on the support, at the temperature it was sampled at."""
    rows = []
    for sequence in demos:
        if sequence.teacher_logprobs is not None:
            teacher = torch.from_numpy(sequence.teacher_logprobs) / sequence.teacher_temperature
            rows.append(teacher.log_softmax(-1).exp())
        else:
            rows.append(F.one_hot(torch.from_numpy(sequence.target_index), n_slots).float())
    return torch.cat(rows)


def _support_logits(
    model: RewardNet, sequences: list[SequenceTargets]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every target of every sequence, at its sampling temperature T:
    ((lp + r) / T on S_t [M, K+1], target index [M], lp / T [M, K+1])."""
    length = max(len(s.tokens) for s in sequences)
    tokens = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        tokens[row, : len(sequence.tokens)] = torch.from_numpy(sequence.tokens)
    queries = model.queries(tokens)  # [B, L, d]
    # the query at position p predicts the token at p + 1
    rows = torch.cat([torch.full((s.n_targets,), i) for i, s in enumerate(sequences)])
    positions = torch.cat([torch.arange(s.first_target - 1, len(s.tokens) - 1) for s in sequences])
    candidates = torch.from_numpy(np.concatenate([s.candidate_ids for s in sequences]))  # [M, K+1]
    base_logprobs = torch.from_numpy(np.concatenate([s.base_logprobs for s in sequences]))
    targets = torch.from_numpy(np.concatenate([s.target_index for s in sequences]))
    rewards = model.rewards(queries[rows, positions], candidates)  # [M, K+1]
    temperatures = torch.cat([torch.full((s.n_targets, 1), s.teacher_temperature) for s in sequences])
    return (base_logprobs + rewards) / temperatures, targets, base_logprobs / temperatures


def _pair_margins(model: RewardNet, pairs: list[tuple[SequenceTargets, SequenceTargets]]) -> torch.Tensor:
    """D(chosen) - D(rejected) per pair, D(y) = log p_prt(y) - log p_base(y) on the supports."""
    sequences = [s for pair in pairs for s in pair]
    steered, targets, base = _support_logits(model, sequences)
    per_token = (steered.log_softmax(-1) - base.log_softmax(-1)).gather(1, targets[:, None]).squeeze(1)
    per_sequence = torch.stack([chunk.sum() for chunk in per_token.split([s.n_targets for s in sequences])])
    return per_sequence[0::2] - per_sequence[1::2]


@torch.no_grad()
def evaluate_torch(model: RewardNet, data: TeacherData, beta: float) -> Metrics:
    model.eval()

    def rewards_for(sequence: SequenceTargets) -> np.ndarray:
        tokens = torch.from_numpy(sequence.tokens)[None]
        queries = model.queries(tokens)[0, sequence.first_target - 1 : -1]  # [N, d]
        return model.rewards(queries, torch.from_numpy(sequence.candidate_ids)).numpy()

    return compute_metrics(data, rewards_for, beta=beta)


# -- export ----------------------------------------------------------------------------------------
@torch.no_grad()
def check_export_parity(
    model: RewardNet, onnx_path: Path, *, seed: int, prefixes: int = 4, length: int = 48, candidates: int = 41
) -> float:
    """Torch vs onnxruntime through the engine's KV path (prefill, then one token per step)."""
    model.eval()
    rng = np.random.default_rng(seed)
    reward = RewardModel(onnx_path)
    worst = 0.0
    for _ in range(prefixes):
        tokens = rng.integers(0, model.shape.vocab_size, length)
        ids = rng.integers(0, model.shape.vocab_size, (length, candidates))
        expected = model.rewards(model.queries(torch.from_numpy(tokens)[None])[0], torch.from_numpy(ids)).numpy()
        reward.reset()
        prefill = length // 2
        actual = [reward.advance(tokens[:prefill].tolist(), ids[prefill - 1])]
        actual += [reward.advance([int(tokens[p])], ids[p]) for p in range(prefill, length)]
        worst = max(worst, float(np.abs(np.stack(actual) - expected[prefill - 1 :]).max()))
    if worst > PARITY_TOLERANCE:
        raise ExportParityError(
            f"The exported reward differs from the trained model by {worst:.2e} "
            f"(tolerance {PARITY_TOLERANCE}); nothing was saved. Please report this."
        )
    return worst
