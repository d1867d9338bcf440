"""The trainer's ``prt`` commands: tune, eval, distill and library (build, check, features).

Importing this module imports no torch: each command imports the training code when it runs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.app.jobs import LibrarySummary, ProgressBar, TuneSummary, progress_report, summary_json
from engine.app.onboarding import REPLY_TOKENS, library_reward_paths
from engine.cli import UsageError, add_model_arguments, library_folder, load_base
from engine.runtime.files import write_atomically

if TYPE_CHECKING:  # imported where a command needs them
    from rewards_onnx.data import Dataset, Source
    from rewards_onnx.evaluate import ReplyStats
    from rewards_onnx.metrics import Metrics


def register(commands: argparse._SubParsersAction) -> None:
    """Adds tune, eval, distill and library to `prt`."""
    from rewards_onnx.library import CHECK_MAX_TOKENS, DEFAULT_COUNT  # no torch at import

    tune = commands.add_parser("tune", help="train a reward from your data (Portable Reward Tuning)")
    add_model_arguments(tune)
    _add_data_arguments(tune)
    tune.add_argument("--out", required=True, help="where to write the reward (.onnx; its card goes beside it)")
    tune.add_argument("--name", default=None, help="the reward's name (default: the file name)")
    tune.add_argument("--epochs", type=int, default=None, help="at most this many epochs (default: 20)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument(
        "--no-cache",
        action="store_true",
        help="pass every example through the base again, without keeping or reusing teacher passes",
    )
    tune.add_argument("--json", action="store_true")
    tune.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stderr")
    tune.set_defaults(handler=cmd_tune)

    evaluate = commands.add_parser("eval", help="held-out NLL of a reward on data: base vs steered")
    add_model_arguments(evaluate)
    evaluate.add_argument("--reward", required=True)
    _add_data_arguments(evaluate)
    evaluate.add_argument("--alpha", type=float, default=1.0)
    evaluate.add_argument(
        "--teacher-system",
        default=None,
        help="also report the NLL of the base given this system prompt, and the share of the gap closed",
    )
    evaluate.add_argument(
        "--samples",
        type=int,
        default=0,
        metavar="N",
        help="also answer the first N prompts with the base, the steered base and the teacher, "
        "and compare their replies' length with the data's",
    )
    evaluate.add_argument(
        "--sample-tokens", type=int, default=256, help="at most this many tokens per reply (default: %(default)s)"
    )
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_eval)

    compare = commands.add_parser(
        "compare", help="benchmark: a reward against a per-user fine-tune on the same data, and knowledge kept"
    )
    add_model_arguments(compare)
    _add_data_arguments(compare)
    compare.add_argument(
        "--train-examples", type=int, default=None, metavar="N", help="train on the first N (default: all)"
    )
    compare.add_argument("--out-dir", required=True, help="a folder for the reward it trains (reward.onnx)")
    compare.add_argument("--facts", default=None, metavar="FILE.jsonl", help="the knowledge probe (default: shipped)")
    compare.add_argument(
        "--facts-asked", type=int, default=200, help="probe questions asked of the base (default: %(default)s)"
    )
    compare.add_argument(
        "--finetune-epochs", type=int, default=4, help="at most this many fine-tune epochs (default: %(default)s)"
    )
    compare.add_argument(
        "--samples", type=int, default=0, metavar="N", help="greedy replies of the three to N held-out prompts"
    )
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--json", action="store_true")
    compare.set_defaults(handler=cmd_compare)

    distill = commands.add_parser("distill", help="make example data: answers under a system prompt, kept without it")
    add_model_arguments(distill)
    distill.add_argument("--system", required=True)
    distill.add_argument("--out", required=True)
    distill.add_argument("--count", type=int, default=220)
    distill.add_argument("--max-tokens", type=int, default=96)
    distill.add_argument("--temperature", type=float, default=0.7, help="the teacher's sampling temperature")
    distill.add_argument("--seed", type=int, default=0)
    distill.add_argument("--json", action="store_true")
    distill.set_defaults(handler=cmd_distill)

    library = commands.add_parser("library", help="base style rewards for a model: build them, check what they change")
    library_actions = library.add_subparsers(dest="action", required=True)
    library_build = library_actions.add_parser("build", help="distill and tune the base rewards for a model")
    add_model_arguments(library_build)
    library_build.add_argument(
        "--out", default=None, help="folder for the rewards (default: the app's rewards/library/<model name>)"
    )
    library_build.add_argument(
        "--count", type=int, default=DEFAULT_COUNT, help="distilled answers per reward (default: %(default)s)"
    )
    library_build.add_argument("--seed", type=int, default=0)
    library_build.add_argument(
        "--style",
        action="append",
        default=[],
        metavar="NAME",
        help="build only this style (repeatable; default: all of them)",
    )
    library_build.add_argument("--json", action="store_true")
    library_build.add_argument("--progress-json", action="store_true", help="progress as JSON lines on stderr")
    library_build.set_defaults(handler=cmd_library_build)
    library_check = library_actions.add_parser("check", help="replies with and without each base reward: its marker")
    add_model_arguments(library_check)
    library_check.add_argument("--library", default=None, help="the rewards' folder (default: the model's library)")
    library_check.add_argument("--prompts", type=int, default=32, help="held-out prompts (default: %(default)s)")
    library_check.add_argument(
        "--max-tokens", type=int, default=CHECK_MAX_TOKENS, help="per reply (default: %(default)s)"
    )
    library_check.add_argument("--json", action="store_true")
    library_check.set_defaults(handler=cmd_library_check)
    library_features = library_actions.add_parser(
        "features", help="replies under random mixes, each reward summed over each reply: for pref-bench --features"
    )
    add_model_arguments(library_features)
    library_features.add_argument("--library", default=None, help="the rewards' folder (default: the model's library)")
    library_features.add_argument("--replies", type=int, default=60, help="(default: %(default)s)")
    library_features.add_argument(
        "--max-tokens", type=int, default=REPLY_TOKENS, help="per reply (default: %(default)s)"
    )
    library_features.add_argument("--seed", type=int, default=0)
    library_features.add_argument("--out", required=True, help="a .npy file: [replies, rewards]")
    library_features.add_argument("--json", action="store_true")
    library_features.set_defaults(handler=cmd_library_features)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help="demonstrations {prompt, response} or pairs {prompt, chosen, rejected}; repeatable",
    )
    parser.add_argument("--documents", action="append", default=[], metavar="DIR", help="a folder of .txt/.md files")
    parser.add_argument(
        "--feedback",
        nargs="?",
        const="",
        default=None,
        metavar="CHATS.db",
        help="the chat app's feedback (thumbs, edits, picks); default: the app's own database",
    )


def _training_modules():
    try:
        from rewards_onnx import train
    except ImportError as error:
        raise UsageError(
            f"Tuning needs the training extra ({error.name} is missing): pip install 'prt-chat[train]'."
        ) from error
    return train


def _load_examples(args: argparse.Namespace) -> Dataset:
    """Every source's examples; what is not an example is skipped and reported, only nothing usable is an error."""
    from rewards_onnx.data import Dataset, DatasetError, read_documents, read_jsonl

    sources = [read_jsonl(Path(path)) for path in args.data]
    sources += [source for folder in args.documents for source in read_documents(Path(folder))]
    if args.feedback is not None:
        sources.append(_feedback_examples(Path(args.feedback) if args.feedback else args.paths.store))
    if not sources:
        raise DatasetError("No training data given; add --data FILE.jsonl, --documents FOLDER or --feedback.")
    data = Dataset(sources)
    data.require_examples()
    return data


def _feedback_examples(database: Path) -> Source:
    from engine.app.store import Store
    from rewards_onnx.data import read_feedback

    if not database.is_file():
        raise UsageError(f"No chat database at {database}; chat in the app first, or leave out --feedback.")
    with Store(database) as store:
        return read_feedback(store, str(database))


def _report_skipped(data: Dataset) -> None:
    """One line on stderr for everything a job skipped (--json has them all in "skipped")."""
    if data.skipped:
        print(f"prt: {data.skipped_summary()}", file=sys.stderr)


def cmd_tune(args: argparse.Namespace) -> int:
    train = _training_modules()
    data = _load_examples(args)
    try:
        config = train.TuneConfig(seed=args.seed, **({"epochs": args.epochs} if args.epochs else {}))
    except ValueError as error:
        raise UsageError(str(error)) from error
    bar = progress_report(args.progress_json)
    with load_base(args) as base, bar:
        report = train.tune(
            base,
            data,
            Path(args.out),
            config=config,
            name=args.name,
            on_progress=lambda p: bar(p.phase, p.done, p.total, p.eta_seconds, p.message),
            cache_path=None if args.no_cache else args.paths.teacher_cache,
        )
    summary = TuneSummary(
        path=str(report.path),
        held_out=report.held_out.to_json(),
        epochs_run=report.epochs_run,
        best_epoch=report.best_epoch,
        parity_max_abs_diff=report.parity_max_abs_diff,
        seconds=round(report.seconds, 1),
        teacher_seconds=round(report.teacher_seconds, 1),
        train_examples=report.train_examples,
        held_out_examples=report.held_out_examples,
        sources=[source.to_json() for source in report.data.sources],
        skipped=report.data.skipped_json(),
    )
    _report_skipped(report.data)
    if args.json:
        print(summary_json(summary))
    else:
        held = report.held_out
        print(
            f"Saved {report.path} in {report.seconds:.0f}s. Held-out ({report.held_out_examples} examples): "
            + (
                f"NLL/token base {held.base_nll:.3f} -> steered {held.steered_nll:.3f} over {held.tokens} tokens"
                if held.tokens
                else ""
            )
            + (
                f" (teacher {held.teacher_nll:.3f}, {held.gap_closed:.0%} of the gap closed)"
                if held.gap_closed is not None
                else ""
            )
            + (f"; pair accuracy {held.pair_accuracy:.0%}" if held.pairs else "")
        )
        _print_reply_parts(held)
        print("Data:")
        for source in report.data.sources:
            print(f"  {source.summary_line()}")
    return 0


def _print_reply_parts(metrics: Metrics) -> None:
    """Where in the replies the teacher's gap lies, and how much of each part the reward closes."""
    for name, part in (metrics.parts or {}).items():
        closed = f", {part.gap_closed:.0%} closed" if part.gap_closed is not None else ""
        print(
            f"  {name:<5} {part.tokens:>6} tokens  NLL base {part.base_nll:.3f} -> steered {part.steered_nll:.3f} "
            f"(teacher {part.teacher_nll:.3f}): {part.gap_share:.0%} of the gap{closed}"
        )


def cmd_eval(args: argparse.Namespace) -> int:
    from engine.runtime.rewards import RewardModel
    from rewards_onnx.evaluate import compare_replies, evaluate_reward

    if args.samples < 0 or args.sample_tokens < 1:
        raise UsageError("--samples must be >= 0 and --sample-tokens >= 1")
    data = _load_examples(args)
    bar, replies = ProgressBar(), {}
    with load_base(args) as base, bar:
        reward = RewardModel(args.reward)
        metrics, data = evaluate_reward(
            base,
            reward,
            data,
            alpha=args.alpha,
            teacher_system=args.teacher_system,
            progress=lambda done, total: bar("teacher", done, total, None),
        )
        if args.samples:
            replies = compare_replies(
                base,
                reward,
                data.examples,
                count=args.samples,
                alpha=args.alpha,
                max_tokens=args.sample_tokens,
                teacher_system=args.teacher_system,
                progress=lambda done, total: bar("replies", done, total, None),
            )
    result = (
        metrics.to_json()
        | {"skipped": data.skipped_json()}
        | ({"replies": {name: asdict(stats) for name, stats in replies.items()}} if replies else {})
    )
    _report_skipped(data)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            "  ".join(
                f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                for key, value in result.items()
                if value is not None and key not in ("parts", "replies", "skipped")
            )
        )
        _print_reply_parts(metrics)
        _print_reply_stats(replies, args.sample_tokens)
    return 0


def _print_reply_stats(replies: dict[str, ReplyStats], max_tokens: int) -> None:
    """What the data's, the base's, the steered base's and the teacher's replies to the same prompts look like."""
    if not replies:
        return
    print(
        f"Replies to the first {len(replies['data'].texts)} prompts (one seed per prompt, at most {max_tokens} tokens):"
    )
    for name, stats in replies.items():
        ended = f", {stats.ended:.0%} ended on their own" if stats.ended is not None else ""
        print(
            f"  {name:<7} {stats.mean_tokens:6.1f} tokens, {stats.mean_sentences:4.2f} sentences, "
            f"{stats.one_sentence:.0%} one sentence{ended}"
        )
    print("The first prompt's replies (all of them are in --json):")
    for name, stats in replies.items():
        print(f"  {name:<7} {textwrap.shorten(stats.texts[0], 160)!r}")


def cmd_compare(args: argparse.Namespace) -> int:
    train = _training_modules()
    from rewards_onnx.compare import CompareConfig, compare
    from rewards_onnx.finetune import FinetuneConfig
    from rewards_onnx.knowledge import SHIPPED_FACTS, read_facts

    out_dir = Path(args.out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"The folder {out_dir} does not exist; create it or choose another --out-dir.")
    if args.train_examples is not None and args.train_examples < 2 or args.finetune_epochs < 1 or args.samples < 0:
        raise UsageError("--train-examples must be >= 2, --finetune-epochs >= 1 and --samples >= 0")
    facts = read_facts(Path(args.facts) if args.facts else SHIPPED_FACTS)
    config = CompareConfig(
        train_examples=args.train_examples,
        tune=train.TuneConfig(seed=args.seed),
        finetune=FinetuneConfig(seed=args.seed, epochs=args.finetune_epochs),
        facts=args.facts_asked,
        samples=args.samples,
    )
    data = _load_examples(args)
    bar = ProgressBar()
    with load_base(args) as base, bar:
        report = compare(
            base,
            data,
            out_dir,
            facts=facts,
            config=config,
            progress=lambda phase, done, total, message: bar(phase, done, total, None, message),
        )
    _report_skipped(data)
    print(json.dumps(report.to_json()) if args.json else _compare_table(report))
    return 0


def _compare_table(report) -> str:
    nll, seconds, knowledge = report.nll, report.seconds, report.knowledge
    share = report.share_of_finetune_gain
    lines = [
        f"{report.train_examples} training examples, {report.held_out_examples} held out "
        f"({report.held_out_tokens} tokens); NLL per token, whole vocabulary:",
        f"  base        {nll['base']:.3f}   (torch copy {nll['torch_base']:.3f}; "
        f"log-probs differ by {report.base_logprob_agreement['mean']:.3f} on average)",
        f"  steered     {nll['steered']:.3f}   reward trained in {seconds['reward']:.0f}s",
        f"  fine-tuned  {nll['finetuned']:.3f}   in {seconds['finetune']:.0f}s (best epoch {report.finetune_best_epoch})",
        f"  the reward reaches {share:.0%} of the fine-tune's gain, in "
        f"{seconds['reward'] / seconds['finetune']:.0%} of its time"
        if share is not None
        else "  no gain to compare",
    ]
    if knowledge.get("known"):
        lines.append(f"Facts the base answers correctly: {knowledge['known']} of {knowledge['asked']}; still correct:")
        lines += [
            f"  {name:<11} {knowledge[name]['correct']:.1%}  (mean log-prob of the answer {knowledge[name]['answer_logprob']:.3f})"
            for name in ("base", "steered", "torch_base", "finetuned")
        ]
    return "\n".join(lines)


def cmd_distill(args: argparse.Namespace) -> int:
    from rewards_onnx.distill import distill, write_jsonl

    bar = ProgressBar()
    with load_base(args) as base, bar:
        examples = distill(
            base,
            args.system,
            args.count,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
            progress=lambda done, total: bar("distill", done, total, None),
        )
    write_jsonl(Path(args.out), examples)
    print(
        json.dumps({"path": args.out, "examples": len(examples)})
        if args.json
        else f"Wrote {len(examples)} examples to {args.out}"
    )
    return 0


def cmd_library_build(args: argparse.Namespace) -> int:
    train = _training_modules()
    from rewards_onnx.library import STYLES, build_library, styles_named

    if args.count < 2:
        raise UsageError(f"--count must be at least 2 (one answer is held out), got {args.count}")
    styles = styles_named(args.style) if args.style else STYLES
    bar = progress_report(args.progress_json)
    with load_base(args) as base:
        out_dir = Path(args.out) if args.out else args.paths.library(base.path)
        with bar:
            built = build_library(
                base,
                out_dir,
                count=args.count,
                config=train.TuneConfig(seed=args.seed),
                styles=styles,
                on_progress=lambda p: bar(p.phase, p.done, p.total, p.eta_seconds, p.message),
            )
    if args.json:
        print(summary_json(LibrarySummary(folder=str(out_dir), rewards=[entry.to_json() for entry in built])))
    else:
        for entry in built:
            gap = entry.tuned.held_out.gap_closed
            print(
                f"{entry.style.name:<11} {entry.style.label:<24} {entry.examples} answers, distill "
                f"{entry.distill_seconds:.0f}s + tune {entry.tuned.seconds:.0f}s"
                + (f", {gap:.0%} of the held-out gap to the teacher closed" if gap is not None else "")
            )
        print(f"Saved in {out_dir}")
    return 0


def cmd_library_check(args: argparse.Namespace) -> int:
    from rewards_onnx.library import check_library

    bar = ProgressBar()
    with load_base(args) as base:
        folder = library_folder(args, base)
        with bar:
            try:
                checks = check_library(
                    base,
                    folder,
                    prompts=args.prompts,
                    max_tokens=args.max_tokens,
                    progress=lambda done, total: bar("check", done, total, None),
                )
            except ValueError as error:
                raise UsageError(str(error)) from error
    if args.json:
        print(json.dumps({"library": str(folder), "checks": [check.to_json() for check in checks]}))
    else:
        for check in checks:
            result = check.to_json()
            verdict = "moved as intended" if check.moved else "did not move beyond noise (2 standard errors)"
            print(
                f"{result['reward']:<11} {result['marker']} ({result['direction']}): without {result['without']:.3g}"
                f" -> with {result['with']:.3g} (shift {result['shift']:+.3g} +- {result['shift_standard_error']:.2g};"
                f" teacher {result['teacher']:.3g}): {verdict}"
            )
    return 0


def cmd_library_features(args: argparse.Namespace) -> int:
    from engine.app.onboarding import sample_reply_features

    if args.replies < 2:
        raise UsageError(f"--replies must be at least 2 (a question needs two), got {args.replies}")
    out = Path(args.out)
    if out.suffix != ".npy":
        raise UsageError(f"--out must name a .npy file, got {out}")
    with load_base(args) as base:
        folder = library_folder(args, base)
        paths = library_reward_paths(folder)
        if not paths:
            raise UsageError(f"No base rewards in {folder}; build them with 'prt library build'.")
        bar = ProgressBar()
        with bar:
            features = sample_reply_features(
                base,
                paths,
                replies=args.replies,
                seed=args.seed,
                reply_tokens=args.max_tokens,
                progress=lambda done, total: bar("replies", done, total, None),
            )
    buffer = io.BytesIO()
    np.save(buffer, features)
    write_atomically(out, buffer.getvalue())
    names = [path.stem for path in paths]
    print(
        json.dumps({"path": str(out), "rewards": names, "replies": len(features)})
        if args.json
        else f"Saved {len(features)} replies x {len(names)} rewards ({', '.join(names)}) to {out}"
    )
    return 0
