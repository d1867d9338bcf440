"""What several test files share: running ``prt`` as a user does, the one-line error check, llama-cpp-python's own
greedy decoding as a reference.

``prt`` runs the command in this process, through the same ``engine.cli.main`` the installed command calls (the
same parser, commands, error handling and exit codes), without a new interpreter per call. ``prt_process`` runs it
as a real child process, for what only a process shows: a crash of native code, a signal, a kill.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from engine.cli import main
from engine.runtime.base_model import BaseModel


@dataclass(frozen=True)
class Ran:
    """What a run of ``prt`` gave, like subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str


def prt(*args: str, stdin: str | None = None) -> Ran:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), _standard_input(stdin):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's usage errors exit 2, as the command does
            code = exit.code if isinstance(exit.code, int) else 1
    return Ran(code, stdout.getvalue(), stderr.getvalue())


@contextlib.contextmanager
def _standard_input(text: str | None) -> Iterator[None]:
    saved, sys.stdin = sys.stdin, io.StringIO(text or "")
    try:
        yield
    finally:
        sys.stdin = saved


def prt_process(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONIOENCODING": "utf-8"},
        timeout=300,
    )


def assert_one_line_error(result: Ran | subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prt: error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def other_prompts(n: int) -> list[str]:
    return [f"Question number {i}: what do you think about item {i}?" for i in range(n)]


def reference_greedy(base: BaseModel, prompt: list[int], n_tokens: int) -> list[int]:
    """llama-cpp-python's own greedy completion, token by token."""
    base.llama.reset()
    tokens = []
    for token in base.llama.generate(prompt, top_k=1, temp=0.0, reset=False):
        tokens.append(token)
        if len(tokens) == n_tokens:
            return tokens
    return tokens
