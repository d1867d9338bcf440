"""``prt``: the command line, composed from the commands each package contributes.

pyproject.toml names them (entry points in the group ``prt.commands``): generate, chat, models, bench, pref-bench
and bench-rewards from the engine (engine/commands.py), tune, eval, distill and library from the trainer
(rewards_onnx/commands.py), app from the desktop (desktop/commands.py). Only the module of the command being run
is imported, so ``prt generate`` loads neither torch nor Qt, and nothing here imports the packages above it.
Below the composer: the argument groups and helpers the commands share.

``--json`` output is a stable interface for scripts and benchmarks. Errors and exit codes follow the job protocol
(engine/app/jobs.py): one ``prt: error: ...`` line and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from engine.app.jobs import ERROR_PREFIX, EXIT_INTERRUPTED, EXIT_USER_ERROR
from engine.app.models import DEFAULT_MODEL_SPEC, resolve_model
from engine.app.paths import AppPaths
from engine.runtime.base_model import BaseModel, BaseModelConfig
from engine.runtime.errors import PrtError
from engine.runtime.steering import SamplingConfig

COMMAND_GROUP = "prt.commands"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args, passed_through = parser.parse_known_args(argv)
    if args.pass_through:
        args.passed_through = passed_through
    elif passed_through:
        parser.error(f"unrecognized arguments: {' '.join(passed_through)}")
    try:
        args.paths = AppPaths.resolve(args.data_folder)  # once: the commands find every file of the app through it
        return args.handler(args)
    except PrtError as error:
        print(f"{ERROR_PREFIX}{error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s package's commands, or with every package's (for help and mistakes)."""
    parser = argparse.ArgumentParser(prog="prt", description="Private chat steered by portable rewards.")
    # pass_through: a command whose options belong to another program sets it; data_folder: --data-folder's
    parser.set_defaults(pass_through=False, data_folder=None)
    commands = parser.add_subparsers(dest="command", required=True)
    for register in _registrars(command):
        register(commands)
    return parser


def _registrars(command: str | None) -> list[Callable[[argparse._SubParsersAction], None]]:
    """Each package's ``register(commands)``, once: only the one that provides ``command``, if one does."""
    provided = {entry.name: entry for entry in entry_points(group=COMMAND_GROUP)}
    if not provided:
        raise SystemExit(
            f"{ERROR_PREFIX}no commands are installed; install the app with 'pip install -e .' (python3 dev.py does)."
        )
    wanted: list[EntryPoint] = [provided[command]] if command in provided else list(provided.values())
    wanted.sort(key=lambda entry: not entry.value.startswith("engine."))  # the engine's own commands first in help
    return list({entry.value: entry.load() for entry in wanted}.values())


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
def add_data_folder_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-folder",
        type=Path,
        default=None,
        metavar="DIR",
        help="the app's data folder: models, rewards, chats (default: PRT_HOME, else the OS's)",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_folder_argument(parser)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_SPEC,
        help="a .gguf path, an installed model's name, or 'default' (default: %(default)s)",
    )
    parser.add_argument("--ctx", type=int, default=4096, help="context size in tokens (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for llama.cpp (default: one per core)")
    parser.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        help="layers to offload to the GPU (default: all if llama.cpp has a GPU backend, else 0)",
    )


def add_steering_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SamplingConfig()
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="PATH[:WEIGHT]",
        help="a reward .onnx file with optional weight; repeat for several",
    )
    parser.add_argument(
        "--alpha", type=float, default=defaults.alpha, help="overall reward strength (default: %(default)s)"
    )
    parser.add_argument("--top-k", type=int, default=defaults.top_k, help="candidates per step (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=defaults.top_p, help="(default: %(default)s)")
    parser.add_argument("--min-p", type=float, default=defaults.min_p, help="(default: %(default)s)")
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="0 for greedy (default: %(default)s)"
    )
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")


def load_base(args: argparse.Namespace) -> BaseModel:
    try:
        config = BaseModelConfig(n_ctx=args.ctx, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
    except ValueError as error:
        raise UsageError(str(error)) from error
    return BaseModel(resolve_model(args.paths, args.model), config=config)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    try:
        return SamplingConfig(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            seed=args.seed,
            max_tokens=args.max_tokens,
            alpha=args.alpha,
            stop=tuple(args.stop),
        )
    except ValueError as error:
        raise UsageError(str(error)) from error


def library_folder(args: argparse.Namespace, base: BaseModel) -> Path:
    """--library, else the loaded model's library folder."""
    return Path(args.library) if args.library else args.paths.library(base.path)


if __name__ == "__main__":
    sys.exit(main())
