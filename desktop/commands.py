"""The desktop's ``prt`` command: ``prt app`` opens the window; its options belong to desktop.app."""

from __future__ import annotations

import argparse

from engine.cli import UsageError


def register(commands: argparse._SubParsersAction) -> None:
    """Adds `prt app`."""
    app = commands.add_parser("app", help="open the desktop chat window (prt app --help: its options)", add_help=False)
    app.set_defaults(handler=cmd_app, pass_through=True)  # its options belong to desktop.app


def cmd_app(args: argparse.Namespace) -> int:
    try:
        from desktop.app import main as app_main
    except ImportError as error:
        raise UsageError(
            f"The desktop app needs PySide6 ({error.name} is missing): pip install pyside6-essentials."
        ) from error
    return app_main(list(args.passed_through))
