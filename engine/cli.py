"""``prt``: the command line. ``--json`` output is a stable interface for scripts and benchmarks.

User errors print one line (``prt: error: ...``) and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from engine.runtime.base_model import BaseModel, BaseModelConfig, ChatMessage
from engine.runtime.decode import Generation, GenerationResult, RewardSlot, attach_rewards
from engine.runtime.errors import PrtError
from engine.runtime.files import write_atomically
from engine.app.models import (DEFAULT_MODEL_SPEC, add_model, ensure_default_model, installed_models, resolve_model,
                           teacher_cache_path)
from engine.app.onboarding import REPLY_TOKENS, library_dir, library_reward_paths
from engine.runtime.steering import SamplingConfig

if TYPE_CHECKING:  # rewards_onnx is imported where a command needs it
    from rewards_onnx.data import Dataset, Source
    from rewards_onnx.evaluate import ReplyStats
    from rewards_onnx.metrics import Metrics

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130


class UsageError(PrtError):
    """An argument value the engine refuses."""


def parse_reward_spec(spec: str) -> tuple[Path, float]:
    """'PATH' or 'PATH:WEIGHT' (a trailing ':number' is the weight, so Windows drive letters still work)."""
    path, separator, weight = spec.rpartition(":")
    if separator:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(spec), 1.0


# -- argument groups shared by several commands -------------------------------------------------
def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL_SPEC,
                        help="a .gguf path, an installed model's name, or 'default' (default: %(default)s)")
    parser.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: one per core)")
    parser.add_argument("--gpu-layers", type=int, default=None,
                        help="layers to offload to the GPU (default: all if llama.cpp has a GPU backend, else 0)")


def _add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingConfig()
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--reward", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a reward .onnx file with optional weight; repeat for several")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="overall reward strength (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates per step (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
    parser.add_argument("--min-p", type=float, default=defaults.min_p, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=defaults.temperature,
                        help="0 for greedy (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")


def _load_base(args: argparse.Namespace) -> BaseModel:
    try:
        config = BaseModelConfig(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return BaseModel(resolve_model(args.model), config=config)


def _sampling_config(args: argparse.Namespace) -> SamplingConfig:
    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              seed=args.seed, max_tokens=args.max_tokens, alpha=args.alpha, stop=tuple(args.stop))
    except ValueError as error:
        raise UsageError(str(error)) from error


def _messages(system: str | None, history: Sequence[ChatMessage]) -> list[ChatMessage]:
    return ([{"role": "system", "content": system}] if system else []) + list(history)


# -- commands ----------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    with _load_base(args) as base:
        slots = attach_rewards(base, [parse_reward_spec(spec) for spec in args.reward])
        prompt = base.chat_prompt_tokens(_messages(args.system, [{"role": "user", "content": args.prompt}]))
        generation = Generation(base, prompt, rewards=slots, config=_sampling_config(args))
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


def _generation_json(base: BaseModel, slots: Sequence[RewardSlot], config: SamplingConfig,
                     result: GenerationResult) -> dict:
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
        "sampling": {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p,
                     "min_p": config.min_p, "alpha": config.alpha, "seed": config.seed,
                     "max_tokens": config.max_tokens},
        "trace": [step.to_dict(token_text) for step in result.trace],
    }


def _stats_line(result: GenerationResult) -> str:
    return (f"[{len(result.token_ids)} tokens, {result.tokens_per_second:.1f} tok/s, "
            f"prompt {result.prompt_tokens} tokens in {result.prompt_seconds:.2f}s, {result.finish_reason}]")


class _cancel_on_interrupt:
    """Ctrl-C during a generation cancels it (the loop ends at the next token) instead of killing the program."""

    def __init__(self, generation: Generation) -> None:
        self._generation = generation

    def __enter__(self) -> None:
        self._previous = signal.signal(signal.SIGINT, lambda *_: self._generation.cancel())

    def __exit__(self, *exc_info: object) -> None:
        signal.signal(signal.SIGINT, self._previous)


def cmd_chat(args: argparse.Namespace) -> int:
    with _load_base(args) as base:
        slots = attach_rewards(base, [parse_reward_spec(spec) for spec in args.reward])
        config = _sampling_config(args)
        active = ", ".join(f"{slot.reward.name} x{slot.weight:g}" for slot in slots) or "none"
        print(f"Chatting with {base.name} (rewards: {active}). /reset starts over, /quit or Ctrl-D leaves; "
              "Ctrl-C stops a reply.", file=sys.stderr)
        history: list[ChatMessage] = []
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
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            try:
                prompt = base.chat_prompt_tokens(_messages(args.system, history))
            except PrtError as error:  # e.g. the conversation outgrew the context: drop the turn, keep chatting
                history.pop()
                print(f"prt: error: {error}", file=sys.stderr)
                continue
            generation = Generation(base, prompt, rewards=slots, config=config)
            print("bot> ", end="", flush=True)
            with _cancel_on_interrupt(generation):
                for event in generation:
                    print(event.text, end="", flush=True)
            print()
            print(_stats_line(generation.result), file=sys.stderr)
            history.append({"role": "assistant", "content": generation.result.text})


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "add":
        if not args.path:
            raise UsageError("'prt models add' needs the path of a .gguf file.")
        added = add_model(Path(args.path))
        print(json.dumps({"added": added.name, "path": str(added.path)}) if args.json else f"Added {added.name}: {added.path}")
        return 0
    if args.action == "fetch":
        ensure_default_model()
    models = installed_models()
    if args.json:
        print(json.dumps([{"name": m.name, "path": str(m.path), "size": m.size, "default": m.is_default}
                          for m in models]))
    elif not models:
        print("No models installed. 'prt models fetch' installs the default; 'prt models add PATH' adds your own.")
    else:
        for model in models:
            marker = " (default)" if model.is_default else ""
            print(f"{model.name}{marker}\t{model.size / 1e6:.0f} MB\t{model.path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.app.bench import BenchConfig, format_report, run_bench

    config = BenchConfig(tokens=args.tokens, rounds=args.rounds, top_k=args.top_k, long_context=args.long_context)
    with _load_base(args) as base:
        library = []
        if args.library is not None:
            folder = _library_folder(args, base)
            library = library_reward_paths(folder)
            if len(library) < 2:
                raise UsageError(f"--library needs at least 2 rewards to mix; {folder} has {len(library)}. "
                                 "Build them with 'prt library build'.")
        report = run_bench(base, config, library)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_pref_bench(args: argparse.Namespace) -> int:
    from engine.app.pref import format_pref_report, load_features, run_pref_bench

    try:
        features = load_features(Path(args.features)) if args.features else None
        report = run_pref_bench(users=args.users, dims=args.dims, seed=args.seed, features=features,
                                noise_scale=args.noise_scale)
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(report) if args.json else format_pref_report(report))
    return 0


# -- training commands: they import rewards_onnx lazily, so the engine itself never needs torch ------------
class _Progress:
    """A progress report used as ``with bar:``; leaving the block closes it, also on an error."""

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class _ProgressBar(_Progress):
    """One line on stderr, redrawn in place: phase, count, bar, ETA."""

    def __init__(self) -> None:
        self._enabled = sys.stderr.isatty() or os.environ.get("PRT_PROGRESS") == "1"
        self._phase = ""

    def __call__(self, phase: str, done: int, total: int, eta: float | None, message: str = "") -> None:
        if not self._enabled:
            return
        if phase != self._phase and self._phase:
            print(file=sys.stderr)
        self._phase = phase
        width = 24
        filled = int(width * done / total) if total else width
        eta_text = f" ETA {int(eta) // 60}m{int(eta) % 60:02d}s" if eta is not None and done < total else ""
        print(f"\r{phase:>8} {done}/{total} [{'#' * filled}{'.' * (width - filled)}]{eta_text} {message}".ljust(79),
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._enabled and self._phase:
            print(file=sys.stderr)


def _training_modules():
    try:
        from rewards_onnx import train
    except ImportError as error:
        raise UsageError(f"Tuning needs the training extra ({error.name} is missing): "
                         "pip install 'prt-chat[train]'.") from error
    return train


def _load_examples(args: argparse.Namespace) -> Dataset:
    """Every source's examples; what is not an example is skipped and reported, only nothing usable is an error."""
    from rewards_onnx.data import Dataset, DatasetError, read_documents, read_jsonl

    sources = [read_jsonl(Path(path)) for path in args.data]
    sources += [source for folder in getattr(args, "documents", []) for source in read_documents(Path(folder))]
    if getattr(args, "feedback", None) is not None:
        sources.append(_feedback_examples(Path(args.feedback) if args.feedback else None))
    if not sources:
        raise DatasetError("No training data given; add --data FILE.jsonl, --documents FOLDER or --feedback.")
    data = Dataset(sources)
    data.require_examples()
    return data


def _feedback_examples(database: Path | None) -> Source:
    from engine.app.store import Store, default_store_path
    from rewards_onnx.data import read_feedback

    database = database or default_store_path()
    if not database.is_file():
        raise UsageError(f"No chat database at {database}; chat in the app first, or leave out --feedback.")
    with Store(database) as store:
        return read_feedback(store, str(database))


def _report_skipped(data: Dataset) -> None:
    """One line on stderr for everything a job skipped (--json has them all in "skipped")."""
    if data.skipped:
        print(f"prt: {data.skipped_summary()}", file=sys.stderr)


class _JsonProgress(_Progress):
    """Progress as one JSON object per line on stderr, for the desktop app's tune panel."""

    def __call__(self, phase: str, done: int, total: int, eta: float | None, message: str = "") -> None:
        from engine.app.chat import TuneProgress

        print(TuneProgress(phase, done, total, eta, message).to_json(), file=sys.stderr, flush=True)


def cmd_tune(args: argparse.Namespace) -> int:
    train = _training_modules()
    data = _load_examples(args)
    try:
        config = train.TuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    except ValueError as error:
        raise UsageError(str(error)) from error
    bar = _JsonProgress() if args.progress_json else _ProgressBar()
    with _load_base(args) as base, bar:
        report = train.tune(base, data, Path(args.out), config=config, name=args.name,
                            on_progress=lambda p: bar(p.phase, p.done, p.total, p.eta_seconds, p.message),
                            cache_path=None if args.no_cache else teacher_cache_path())
    summary = {"path": str(report.path), "held_out": report.held_out.to_json(), "epochs_run": report.epochs_run,
               "best_epoch": report.best_epoch, "parity_max_abs_diff": report.parity_max_abs_diff,
               "seconds": round(report.seconds, 1), "teacher_seconds": round(report.teacher_seconds, 1),
               "train_examples": report.train_examples, "held_out_examples": report.held_out_examples,
               "sources": [source.to_json() for source in report.data.sources],
               "skipped": report.data.skipped_json()}
    _report_skipped(report.data)
    if args.json:
        print(json.dumps(summary))
    else:
        held = report.held_out
        print(f"Saved {report.path} in {report.seconds:.0f}s. Held-out ({report.held_out_examples} examples): "
              + (f"NLL/token base {held.base_nll:.3f} -> steered {held.steered_nll:.3f} over {held.tokens} tokens"
                 if held.tokens else "")
              + (f" (teacher {held.teacher_nll:.3f}, {held.gap_closed:.0%} of the gap closed)"
                 if held.gap_closed is not None else "")
              + (f"; pair accuracy {held.pair_accuracy:.0%}" if held.pairs else ""))
        _print_reply_parts(held)
        print("Data:")
        for source in report.data.sources:
            print(f"  {source.summary_line()}")
    return 0


def _print_reply_parts(metrics: Metrics) -> None:
    """Where in the replies the teacher's gap lies, and how much of each part the reward closes."""
    for name, part in (metrics.parts or {}).items():
        closed = f", {part.gap_closed:.0%} closed" if part.gap_closed is not None else ""
        print(f"  {name:<5} {part.tokens:>6} tokens  NLL base {part.base_nll:.3f} -> steered {part.steered_nll:.3f} "
              f"(teacher {part.teacher_nll:.3f}): {part.gap_share:.0%} of the gap{closed}")


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.runtime.rewards import RewardModel
    from rewards_onnx.evaluate import compare_replies, evaluate_reward

    if args.samples < 0 or args.sample_tokens < 1:
        raise UsageError("--samples must be >= 0 and --sample-tokens >= 1")
    data = _load_examples(args)
    bar, replies = _ProgressBar(), {}
    with _load_base(args) as base, bar:
        reward = RewardModel(args.reward)
        metrics, data = evaluate_reward(base, reward, data, alpha=args.alpha, teacher_system=args.teacher_system,
                                        progress=lambda done, total: bar("teacher", done, total, None))
        if args.samples:
            replies = compare_replies(base, reward, data.examples, count=args.samples, alpha=args.alpha,
                                      max_tokens=args.sample_tokens, teacher_system=args.teacher_system,
                                      progress=lambda done, total: bar("replies", done, total, None))
    result = metrics.to_json() | {"skipped": data.skipped_json()} | (
        {"replies": {name: asdict(stats) for name, stats in replies.items()}} if replies else {})
    _report_skipped(data)
    if args.json:
        print(json.dumps(result))
    else:
        print("  ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                        for key, value in result.items()
                        if value is not None and key not in ("parts", "replies", "skipped")))
        _print_reply_parts(metrics)
        _print_reply_stats(replies, args.sample_tokens)
    return 0


def _print_reply_stats(replies: dict[str, ReplyStats], max_tokens: int) -> None:
    """What the data's, the base's, the steered base's and the teacher's replies to the same prompts look like."""
    if not replies:
        return
    print(f"Replies to the first {len(replies['data'].texts)} prompts (one seed per prompt, at most {max_tokens} tokens):")
    for name, stats in replies.items():
        ended = f", {stats.ended:.0%} ended on their own" if stats.ended is not None else ""
        print(f"  {name:<7} {stats.mean_tokens:6.1f} tokens, {stats.mean_sentences:4.2f} sentences, "
              f"{stats.one_sentence:.0%} one sentence{ended}")
    print("The first prompt's replies (all of them are in --json):")
    for name, stats in replies.items():
        print(f"  {name:<7} {textwrap.shorten(stats.texts[0], 160)!r}")


def cmd_distill(args: argparse.Namespace) -> int:
    from rewards_onnx.distill import distill, write_jsonl

    bar = _ProgressBar()
    with _load_base(args) as base, bar:
        examples = distill(base, args.system, args.count, max_tokens=args.max_tokens, temperature=args.temperature,
                           seed=args.seed,
                           progress=lambda done, total: bar("distill", done, total, None))
    write_jsonl(Path(args.out), examples)
    print(json.dumps({"path": args.out, "examples": len(examples)}) if args.json
          else f"Wrote {len(examples)} examples to {args.out}")
    return 0


def cmd_bench_rewards(args: argparse.Namespace) -> int:
    from engine.app.bench import format_merge_report, run_merge_bench

    try:
        report = run_merge_bench(rewards=args.rewards, vocab_size=args.vocab_size, top_k=args.top_k,
                                 long_context=args.long_context)
    except ValueError as error:
        raise UsageError(str(error)) from error
    print(json.dumps(report, indent=2) if args.json else format_merge_report(report))
    return 0


def cmd_library_build(args: argparse.Namespace) -> int:
    train = _training_modules()
    from rewards_onnx.library import STYLES, build_library, styles_named

    if args.count < 2:
        raise UsageError(f"--count must be at least 2 (one answer is held out), got {args.count}")
    styles = styles_named(args.style) if args.style else STYLES
    bar = _JsonProgress() if args.progress_json else _ProgressBar()
    with _load_base(args) as base:
        out_dir = Path(args.out) if args.out else library_dir(base.path)
        with bar:
            built = build_library(base, out_dir, count=args.count, config=train.TuneConfig(seed=args.seed),
                                  styles=styles,
                                  on_progress=lambda p: bar(p.phase, p.done, p.total, p.eta_seconds, p.message))
    if args.json:
        print(json.dumps({"folder": str(out_dir), "rewards": [entry.to_json() for entry in built]}))
    else:
        for entry in built:
            gap = entry.tuned.held_out.gap_closed
            print(f"{entry.style.name:<11} {entry.style.label:<24} {entry.examples} answers, distill "
                  f"{entry.distill_seconds:.0f}s + tune {entry.tuned.seconds:.0f}s"
                  + (f", {gap:.0%} of the held-out gap to the teacher closed" if gap is not None else ""))
        print(f"Saved in {out_dir}")
    return 0


def _library_folder(args: argparse.Namespace, base: BaseModel) -> Path:
    """--library, else the loaded model's library folder."""
    return Path(args.library) if args.library else library_dir(base.path)


def cmd_library_check(args: argparse.Namespace) -> int:
    from rewards_onnx.library import check_library

    bar = _ProgressBar()
    with _load_base(args) as base:
        folder = _library_folder(args, base)
        with bar:
            try:
                checks = check_library(base, folder, prompts=args.prompts, max_tokens=args.max_tokens,
                                       progress=lambda done, total: bar("check", done, total, None))
            except ValueError as error:
                raise UsageError(str(error)) from error
    if args.json:
        print(json.dumps({"library": str(folder), "checks": [check.to_json() for check in checks]}))
    else:
        for check in checks:
            result = check.to_json()
            verdict = "moved as intended" if check.moved else "did not move beyond noise (2 standard errors)"
            print(f"{result['reward']:<11} {result['marker']} ({result['direction']}): without {result['without']:.3g}"
                  f" -> with {result['with']:.3g} (shift {result['shift']:+.3g} +- {result['shift_standard_error']:.2g};"
                  f" teacher {result['teacher']:.3g}): {verdict}")
    return 0


def cmd_library_features(args: argparse.Namespace) -> int:
    from engine.app.onboarding import sample_reply_features

    if args.replies < 2:
        raise UsageError(f"--replies must be at least 2 (a question needs two), got {args.replies}")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise UsageError(f"--out must name a .npy file, got {out}")
    with _load_base(args) as base:
        folder = _library_folder(args, base)
        paths = library_reward_paths(folder)
        if not paths:
            raise UsageError(f"No base rewards in {folder}; build them with 'prt library build'.")
        bar = _ProgressBar()
        with bar:
            features = sample_reply_features(base, paths, replies=args.replies, seed=args.seed,
                                             reply_tokens=args.max_tokens,
                                             progress=lambda done, total: bar("replies", done, total, None))
    buffer = io.BytesIO()
    np.save(buffer, features)
    write_atomically(out, buffer.getvalue())
    names = [path.stem for path in paths]
    print(json.dumps({"path": str(out), "rewards": names, "replies": len(features)}) if args.json
          else f"Saved {len(features)} replies x {len(names)} rewards ({', '.join(names)}) to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prt", description="Private chat steered by portable rewards.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="generate one reply, optionally steered by rewards")
    _add_model_arguments(generate)
    generate.add_argument("--prompt", required=True)
    _add_steering_arguments(generate)
    generate.add_argument("--json", action="store_true", help="print one JSON object with the per-token trace")
    generate.set_defaults(handler=cmd_generate)

    chat = commands.add_parser("chat", help="chat in the terminal")
    _add_model_arguments(chat)
    _add_steering_arguments(chat)
    chat.set_defaults(handler=cmd_chat)

    models = commands.add_parser("models", help="list installed models, add one, or fetch the default")
    models.add_argument("action", nargs="?", choices=["list", "add", "fetch"], default="list")
    models.add_argument("path", nargs="?", help="for 'add': a .gguf file")
    models.add_argument("--json", action="store_true")
    models.set_defaults(handler=cmd_models)

    bench = commands.add_parser("bench", help="plain vs steered decoding speed, reward step cost, peak memory")
    _add_model_arguments(bench)
    bench.add_argument("--tokens", type=int, default=128, help="tokens per generation (default: %(default)s)")
    bench.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the prompts (default: %(default)s)")
    bench.add_argument("--top-k", type=int, default=SamplingConfig().top_k)
    bench.add_argument("--long-context", type=int, default=1000, help="context for the long reward-step timing")
    bench.add_argument("--library", nargs="?", const="", default=None, metavar="DIR",
                       help="also decode with the rewards in DIR (default: the model's style rewards), merged and "
                            "separately")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=cmd_bench)

    from engine.app.pref import NOISE_SCALE

    pref_bench = commands.add_parser("pref-bench",
                                     help="simulated users: how well ~10 adaptive questions find their reward weights")
    pref_bench.add_argument("--users", type=int, default=100, help="simulated users (default: %(default)s)")
    pref_bench.add_argument("--dims", type=int, default=4, help="base rewards, without --features (default: %(default)s)")
    pref_bench.add_argument("--seed", type=int, default=0)
    pref_bench.add_argument("--features", default=None, metavar="FILE.npy",
                            help="real per-reply reward values [n_replies, n_rewards] instead of synthetic ones")
    pref_bench.add_argument("--noise-scale", type=float, default=NOISE_SCALE,
                            help="simulated answers: P(A) = sigmoid(scale * lambda*.v) (default: %(default)s)")
    pref_bench.add_argument("--json", action="store_true")
    pref_bench.set_defaults(handler=cmd_pref_bench)

    tune = commands.add_parser("tune", help="train a reward from your data (Portable Reward Tuning)")
    _add_model_arguments(tune)
    tune.add_argument("--data", action="append", default=[], metavar="FILE.jsonl",
                      help="demonstrations {prompt, response} or pairs {prompt, chosen, rejected}; repeatable")
    tune.add_argument("--documents", action="append", default=[], metavar="DIR", help="a folder of .txt/.md files")
    tune.add_argument("--feedback", nargs="?", const="", default=None, metavar="CHATS.db",
                      help="the chat app's feedback (thumbs, edits, picks); default: the app's own database")
    tune.add_argument("--out", required=True, help="where to write the reward (.onnx; its card goes beside it)")
    tune.add_argument("--name", default=None, help="the reward's name (default: the file name)")
    tune.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: 20)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--no-cache", action="store_true",
                      help="pass every example through the base again, without keeping or reusing teacher passes")
    tune.add_argument("--json", action="store_true")
    tune.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stderr")
    tune.set_defaults(handler=cmd_tune)

    evaluate = commands.add_parser("eval", help="held-out NLL of a reward on data: base vs steered")
    _add_model_arguments(evaluate)
    evaluate.add_argument("--reward", required=True)
    evaluate.add_argument("--data", action="append", required=True, metavar="FILE.jsonl")
    evaluate.add_argument("--alpha", type=float, default=1.0)
    evaluate.add_argument("--teacher-system", default=None,
                          help="also report the NLL of the base given this system prompt, and the share of the gap closed")
    evaluate.add_argument("--samples", type=int, default=0, metavar="N",
                          help="also answer the first N prompts with the base, the steered base and the teacher, "
                               "and compare their replies' length with the data's")
    evaluate.add_argument("--sample-tokens", type=int, default=256, help="at most this many tokens per reply "
                          "(default: %(default)s)")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_eval)

    distill = commands.add_parser("distill", help="make example data: answers under a system prompt, kept without it")
    _add_model_arguments(distill)
    distill.add_argument("--system", required=True)
    distill.add_argument("--out", required=True)
    distill.add_argument("--count", type=int, default=220)
    distill.add_argument("--max-tokens", type=int, default=96)
    distill.add_argument("--temperature", type=float, default=0.7, help="the teacher's sampling temperature")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--json", action="store_true")
    distill.set_defaults(handler=cmd_distill)

    bench_rewards = commands.add_parser("bench-rewards",
                                        help="per-step cost and memory: N rewards as N sessions vs one merged session")
    bench_rewards.add_argument("--rewards", type=int, default=4, help="rewards to score per step (default: %(default)s)")
    bench_rewards.add_argument("--vocab-size", type=int, default=49152, help="(default: %(default)s, SmolLM2's)")
    bench_rewards.add_argument("--top-k", type=int, default=SamplingConfig().top_k)
    bench_rewards.add_argument("--long-context", type=int, default=1000, help="context for the long timing")
    bench_rewards.add_argument("--json", action="store_true")
    bench_rewards.set_defaults(handler=cmd_bench_rewards)

    from rewards_onnx.library import CHECK_MAX_TOKENS, DEFAULT_COUNT  # no torch at import

    library = commands.add_parser("library", help="base style rewards for a model: build them, check what they change")
    library_actions = library.add_subparsers(dest="action", required=True)
    library_build = library_actions.add_parser("build", help="distill and tune the base rewards for a model")
    _add_model_arguments(library_build)
    library_build.add_argument("--out", default=None,
                               help="folder for the rewards (default: the app's rewards/library/<model name>)")
    library_build.add_argument("--count", type=int, default=DEFAULT_COUNT,
                               help="distilled answers per reward (default: %(default)s)")
    library_build.add_argument("--seed", type=int, default=0)
    library_build.add_argument("--style", action="append", default=[], metavar="NAME",
                               help="build only this style (repeatable; default: all of them)")
    library_build.add_argument("--json", action="store_true")
    library_build.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stderr")
    library_build.set_defaults(handler=cmd_library_build)
    library_check = library_actions.add_parser("check", help="replies with and without each base reward: its marker")
    _add_model_arguments(library_check)
    library_check.add_argument("--library", default=None, help="the rewards' folder (default: the model's library)")
    library_check.add_argument("--prompts", type=int, default=32, help="held-out prompts (default: %(default)s)")
    library_check.add_argument("--max-tokens", type=int, default=CHECK_MAX_TOKENS, help="per reply (default: %(default)s)")
    library_check.add_argument("--json", action="store_true")
    library_check.set_defaults(handler=cmd_library_check)
    library_features = library_actions.add_parser(
        "features", help="replies under random mixes, each reward summed over each reply: for pref-bench --features")
    _add_model_arguments(library_features)
    library_features.add_argument("--library", default=None, help="the rewards' folder (default: the model's library)")
    library_features.add_argument("--replies", type=int, default=60, help="(default: %(default)s)")
    library_features.add_argument("--max-tokens", type=int, default=REPLY_TOKENS, help="per reply (default: %(default)s)")
    library_features.add_argument("--seed", type=int, default=0)
    library_features.add_argument("--out", required=True, help="a .npy file: [replies, rewards]")
    library_features.add_argument("--json", action="store_true")
    library_features.set_defaults(handler=cmd_library_features)

    app = commands.add_parser("app", help="open the desktop chat window (prt app --help: its options)", add_help=False)
    app.set_defaults(handler=cmd_app)  # its options belong to desktop.app and pass through
    return parser


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from desktop.app import main as app_main
    except ImportError as error:
        raise UsageError(f"The desktop app needs PySide6 ({error.name} is missing): pip install pyside6-essentials.") \
            from error
    return app_main(list(args.app_args))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passed_through = parser.parse_known_args(argv)
    if args.command == "app":
        args.app_args = passed_through
    elif passed_through:
        parser.error(f"unrecognized arguments: {' '.join(passed_through)}")
    try:
        return args.handler(args)
    except PrtError as error:
        print(f"prt: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
