"""``prt bench --context-policy``: what the context policy (engine/app/context.py) costs per turn.

One scripted chat (the same user messages, greedy replies of at most ``max_tokens``) runs twice through the path
``prt chat`` takes (plan_prompt, then a steered Generation with merged sessions kept between turns):
(a) on a small context, where the policy leaves out the oldest turns and the window moves now and then, and
(b) on a context that holds the whole chat, where nothing is left out. Per turn it records the prompt tokens
the base model and each reward evaluate (the prompt less the prefix their KV state already holds), the prefill
seconds (base and rewards, Generation.result.prompt_seconds), the planning seconds (the chat template rendered
and tokenized), and where the window moved.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.app.bench import write_reference_reward
from engine.app.context import default_reply_room, plan_prompt
from engine.runtime.base_model import BaseModel, BaseModelConfig, ChatMessage, common_prefix_length
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.mixing import MergedSessions
from engine.runtime.steering import SamplingConfig

SYSTEM_PROMPT = "You are a helpful assistant. Answer in a few sentences."
TOPICS = (
    "bicycles",
    "lighthouses",
    "tea",
    "volcanoes",
    "libraries",
    "bees",
    "glaciers",
    "chess",
    "bread",
    "comets",
)


def chat_script(turns: int) -> list[str]:
    """The user's messages, one per turn."""
    return [
        f"Question {turn + 1}: tell me one interesting fact about {TOPICS[turn % len(TOPICS)]}."
        for turn in range(turns)
    ]


@dataclass(frozen=True)
class TurnFigures:
    turn: int  # from 1
    left_out: int
    prompt_tokens: int
    base_prefill_tokens: int
    reward_prefill_tokens: list[int]  # per reward session (rewards merged into one session count once)
    prefill_seconds: float  # base and rewards
    plan_seconds: float
    reply_tokens: int
    decode_seconds: float


def run_chat(
    model_path: Path,
    config: BaseModelConfig,
    reward_paths: Sequence[Path],
    messages: Sequence[str],
    *,
    max_tokens: int,
) -> list[TurnFigures]:
    """The scripted chat on one context size; the figures of each turn."""
    sampling = SamplingConfig(temperature=0.0, max_tokens=max_tokens)
    with BaseModel(model_path, config=config) as base, MergedSessions() as merged, contextlib.ExitStack() as opened:
        slots = attach_rewards(base, [(path, 1.0) for path in reward_paths])
        for slot in slots:
            opened.callback(slot.reward.close)
        rewards = [slot.reward for slot in slots]
        sessions = [group.session for group in merged.groups(rewards)]  # the plan each Generation takes up
        room = default_reply_room(base.n_ctx, max_tokens)
        history: list[ChatMessage] = [{"role": "system", "content": SYSTEM_PROMPT}]
        left_out = 0
        held_by_rewards: list[list[int]] = [[] for _ in sessions]  # what each reward session's KV state holds
        figures = []
        for turn, text in enumerate(messages, start=1):
            history.append({"role": "user", "content": text})
            started = time.perf_counter()
            prompt, context = plan_prompt(base, history, reply_room=room, left_out=left_out)
            plan_seconds = time.perf_counter() - started
            left_out = context.left_out
            base_prefill = _prefilled(base.evaluated_tokens, prompt)
            reward_prefill = [_prefilled(held, prompt) for held in held_by_rewards]
            generation = Generation(base, prompt, rewards=slots, config=sampling, merged_sessions=merged)
            result = generation.run()
            held_by_rewards = [_held(session.n_past, prompt + result.token_ids) for session in sessions]
            figures.append(
                TurnFigures(
                    turn=turn,
                    left_out=left_out,
                    prompt_tokens=len(prompt),
                    base_prefill_tokens=base_prefill,
                    reward_prefill_tokens=reward_prefill,
                    prefill_seconds=result.prompt_seconds,
                    plan_seconds=plan_seconds,
                    reply_tokens=len(result.token_ids),
                    decode_seconds=result.decode_seconds,
                )
            )
            history.append({"role": "assistant", "content": result.text})
    return figures


def _prefilled(held: Sequence[int], prompt: Sequence[int]) -> int:
    """The tokens a KV state holding ``held`` evaluates to hold ``prompt`` (as BaseModel.sync and
    RewardSession.sync do: the common prefix is kept, and at least the last token is evaluated)."""
    return len(prompt) - min(common_prefix_length(held, prompt), len(prompt) - 1)


def _held(n_past: int, sequence: list[int]) -> list[int]:
    """What a reward session holds after a reply: the prompt and the reply's tokens fed to it, in order (its
    ``n_past`` first ones)."""
    if n_past > len(sequence):
        raise RuntimeError(f"the reward holds {n_past} tokens, more than the {len(sequence)} of the chat")
    return sequence[:n_past]


def _summary(figures: Sequence[TurnFigures], n_ctx: int) -> dict:
    moved = [row.turn for previous, row in zip(figures, figures[1:]) if row.left_out != previous.left_out]
    return {
        "n_ctx": n_ctx,
        "turns": len(figures),
        "mean_prompt_tokens": round(float(np.mean([row.prompt_tokens for row in figures])), 1),
        "mean_base_prefill_tokens": round(float(np.mean([row.base_prefill_tokens for row in figures])), 1),
        "mean_reward_prefill_tokens": round(float(np.mean([sum(row.reward_prefill_tokens) for row in figures])), 1),
        "mean_prefill_seconds": round(float(np.mean([row.prefill_seconds for row in figures])), 4),
        "mean_plan_seconds": round(float(np.mean([row.plan_seconds for row in figures])), 5),
        "mean_reply_tokens": round(float(np.mean([row.reply_tokens for row in figures])), 1),
        "mean_decode_tokens_per_second": round(
            sum(row.reply_tokens for row in figures) / sum(row.decode_seconds for row in figures), 1
        ),
        "window_moved_at_turns": moved,
        "left_out_at_the_end": figures[-1].left_out,
        "per_turn": [asdict(row) for row in figures],
    }


def run_context_bench(
    model_path: Path,
    *,
    reward_paths: Sequence[Path] = (),
    turns: int = 50,
    small_ctx: int = 512,
    max_tokens: int = 64,
    threads: int | None = None,
    gpu_layers: int | None = None,
) -> dict:
    """The scripted chat on ``small_ctx`` (the policy at work) and on a context that holds all of it."""
    if turns < 2 or small_ctx < 64 or max_tokens < 1:
        raise ValueError("the context bench needs turns >= 2, a context of >= 64 tokens, max_tokens >= 1")
    messages = chat_script(turns)
    large_ctx = _large_context(turns, max_tokens)
    with tempfile.TemporaryDirectory(prefix="prt-bench-") as folder:
        if not reward_paths:
            reward_paths = [_reference_reward(model_path, Path(folder) / "reference-reward.onnx", threads)]

        def chat(n_ctx: int) -> list[TurnFigures]:
            config = BaseModelConfig(n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers)
            return run_chat(model_path, config, reward_paths, messages, max_tokens=max_tokens)

        chat(small_ctx)  # warm-up: pages in the weights, builds onnxruntime's kernels
        policy, whole = _summary(chat(small_ctx), small_ctx), _summary(chat(large_ctx), large_ctx)
    if whole["left_out_at_the_end"]:
        raise RuntimeError(f"the {large_ctx}-token context left messages out; the comparison needs all of them")
    return {
        "model": model_path.name,
        "rewards": [path.name for path in reward_paths],
        "turns": turns,
        "max_tokens": max_tokens,
        "policy": policy,
        "whole_chat": whole,
        "ratio_prefill_tokens": _ratio(policy["mean_base_prefill_tokens"], whole["mean_base_prefill_tokens"]),
        "ratio_prefill_seconds": _ratio(policy["mean_prefill_seconds"], whole["mean_prefill_seconds"]),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("inf")


def _large_context(turns: int, max_tokens: int) -> int:
    """Room for the whole chat: each turn's message, reply and template, with a margin, in 1024s."""
    needed = 256 + turns * (max_tokens + 48)
    return -(-needed // 1024) * 1024


def _reference_reward(model_path: Path, path: Path, threads: int | None) -> Path:
    with BaseModel(model_path, config=BaseModelConfig(n_ctx=64, n_threads=threads, n_gpu_layers=0)) as base:
        return write_reference_reward(base, path)


def format_context_report(report: dict) -> str:
    policy, whole = report["policy"], report["whole_chat"]

    def row(label: str, figures: dict) -> str:
        return (
            f"{label:<28} {figures['mean_base_prefill_tokens']:>8.1f} {figures['mean_reward_prefill_tokens']:>8.1f} "
            f"{figures['mean_prefill_seconds']:>10.4f} {figures['mean_plan_seconds'] * 1e3:>8.2f} "
            f"{figures['mean_prompt_tokens']:>8.1f} {figures['mean_reply_tokens']:>6.1f} "
            f"{figures['mean_decode_tokens_per_second']:>7.1f}"
        )

    return "\n".join(
        [
            f"context policy: {report['turns']} turns on {report['model']}, rewards {', '.join(report['rewards'])}, "
            f"greedy replies of at most {report['max_tokens']} tokens",
            f"{'means per turn':<28} {'base pf':>8} {'rwd pf':>8} {'prefill s':>10} {'plan ms':>8} "
            f"{'prompt':>8} {'reply':>6} {'tok/s':>7}",
            row(f"a) {policy['n_ctx']}-token context", policy),
            row(f"b) {whole['n_ctx']}-token context", whole),
            f"a/b: prefill tokens {report['ratio_prefill_tokens']:.3f}, prefill seconds "
            f"{report['ratio_prefill_seconds']:.3f}",
            f"a) the window moved at turns {policy['window_moved_at_turns']}; "
            f"{policy['left_out_at_the_end']} messages left out at the end; b) none left out",
        ]
    )
