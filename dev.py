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
import platform
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
WHEELS = Path.home() / ".cache" / "prt-chat" / "wheels"  # llama.cpp builds, one folder per set of build flags
# llama.cpp's default build targets the building CPU (-march=native). On some x86 machines that includes AMX
# kernels which die with SIGILL on the first matrix product (seen on a virtual Sapphire Rapids), and a build
# moved to another CPU may not run at all. One fixed x86-64 level (AVX2, FMA, F16C) runs on every x86 CPU of
# the last decade and computes the same kernels everywhere. A CMAKE_ARGS of your own (e.g. -DGGML_CUDA=on)
# comes after these, so it wins.
PORTABLE_X86_LLAMA = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_environment(extras: str) -> Path:
    """Create .venv and install the project (editable) with ``extras``; reinstall when pyproject.toml or the
    llama.cpp build flags change."""
    python = venv_python()
    if not python.exists():
        print("Creating the virtual environment in .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    flags = llama_build_flags()
    inputs = (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes() + flags.encode()
    wanted = hashlib.sha256(inputs).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        print("Installing the app (the first time builds llama.cpp, about 5 minutes) ...", flush=True)
        wheel = ensure_llama_wheel(python, flags)
        pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-c", ROOT / "constraints.txt"]
        subprocess.run([*pip, "--no-deps", "--force-reinstall", wheel], cwd=ROOT, check=True)
        target = f".[{extras}]" if extras else "."
        subprocess.run([*pip, "--find-links", wheel.parent, "-e", target], cwd=ROOT, check=True)
        stamp.write_text(wanted)
    return python


def llama_build_flags() -> str:
    portable = PORTABLE_X86_LLAMA if platform.machine().lower() in ("x86_64", "amd64") else ""
    return " ".join(filter(None, [portable, os.environ.get("CMAKE_ARGS", "")]))


def ensure_llama_wheel(python: Path, flags: str) -> Path:
    """The pinned llama-cpp-python, built from source with ``flags`` once per flag set and kept in WHEELS.

    pip's own wheel cache ignores CMAKE_ARGS, so it could hand back a build made with other flags."""
    requirement = re.search(r'"(llama-cpp-python==[^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    folder = WHEELS / hashlib.sha256(f"{requirement} {flags} {platform.machine()}".encode()).hexdigest()[:16]
    built = sorted(folder.glob("llama_cpp_python-*.whl"))
    if not built:
        print(f"Building {requirement} with {flags or 'its default flags'} (about 5 minutes) ...", flush=True)
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-cache-dir",
                "--no-binary",
                "llama-cpp-python",
                "-w",
                folder,
                requirement,
            ],
            cwd=ROOT,
            check=True,
            env=os.environ | {"CMAKE_ARGS": flags},
        )
        built = sorted(folder.glob("llama_cpp_python-*.whl"))
    return built[-1]


def ensure_test_tools() -> None:
    """The egress test watches processes with strace: install it where we can (Debian, Ubuntu, as root)."""
    if not sys.platform.startswith("linux") or shutil.which("strace"):
        return
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("Installing strace for the egress test ...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], check=True)
    else:
        print("dev.py: the egress test needs strace; install it with your package manager.", file=sys.stderr)


def run(args: list[str]) -> int:
    python = ensure_environment("train")  # the app's tune panel runs `prt tune`, which needs torch
    subprocess.run([python, "-m", "engine.cli", "models", "fetch"], cwd=ROOT, check=True)
    return subprocess.call([python, "-m", "engine.cli", "app", *args], cwd=ROOT)


# Run before the tests; each must pass.
CHECKS = (["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"])


def test(args: list[str]) -> int:
    python = ensure_environment("dev,train")
    ensure_test_tools()
    for check in CHECKS:
        print(f"dev.py: {' '.join(check)}", flush=True)
        if code := subprocess.call([python, "-m", *check], cwd=ROOT):
            return code
    return subprocess.call([python, "-m", "pytest", *args], cwd=ROOT)


def screenshots(args: list[str]) -> int:
    python = ensure_environment("train")
    target = ROOT / "docs" / "screenshot-main.png"
    return subprocess.call(
        [python, "-m", "engine.cli", "app", "--demo", "--screenshot", str(target), *args],
        cwd=ROOT,
        env=os.environ | {"QT_QPA_PLATFORM": "offscreen"},
    )


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
