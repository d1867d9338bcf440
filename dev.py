#!/usr/bin/env python3
"""The README's two commands, the same on Linux, macOS and Windows.

    python3 dev.py run          create .venv, install (with the training tools), fetch the default model,
                                open the chat window
    python3 dev.py test         create .venv, install with test and training tools, run the whole test suite
    python3 dev.py screenshots  render the README's screenshots (offscreen, demo data) into docs/

Extra arguments go to the program (run) or to pytest (test).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment(extras: str) -> Path:
    """Create .venv and install the project (editable) with ``extras``; reinstall when pyproject.toml changes."""
    python = venv_python()
    if not python.exists():
        print("Creating the virtual environment in .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print("Installing the app (the first time builds llama.cpp, about 5 minutes) ...", flush=True)
        target = f".[{extras}]" if extras else "."
        subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", "-e", target],
                       cwd=ROOT, check=True)
        stamp.write_text(wanted)
    return python


def run(args: list[str]) -> int:
    python = ensure_environment("train")  # the app's tune panel runs `prt tune`, which needs torch
    subprocess.run([python, "-m", "engine.cli", "models", "fetch"], cwd=ROOT, check=True)
    return subprocess.call([python, "-m", "engine.cli", "app", *args], cwd=ROOT)


def test(args: list[str]) -> int:
    python = ensure_environment("dev,train")
    return subprocess.call([python, "-m", "pytest", *args], cwd=ROOT)


def screenshots(args: list[str]) -> int:
    python = ensure_environment("train")
    target = ROOT / "docs" / "screenshot-main.png"
    return subprocess.call([python, "-m", "engine.cli", "app", "--demo", "--screenshot", str(target), *args],
                           cwd=ROOT, env=os.environ | {"QT_QPA_PLATFORM": "offscreen"})


def main() -> int:
    commands = {"run": run, "test": test, "screenshots": screenshots}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(__doc__.strip())
        return 2
    try:
        return commands[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as error:
        print(f"dev.py: '{' '.join(map(str, error.cmd))}' failed with exit code {error.returncode}", file=sys.stderr)
        return error.returncode or 1


if __name__ == "__main__":
    sys.exit(main())
