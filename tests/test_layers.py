"""Dependencies point one way: runtime <- app services <- front ends (the commands, the window) and the trainer.

Every import in every module is read, the ones inside functions too, so a lazy import cannot hide a wrong one.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What each part of the tree must not import (a name forbids the package and everything under it).
FORBIDDEN = {
    "engine/runtime": (
        "engine.app",
        "engine.cli",
        "engine.commands",
        "rewards_onnx",
        "desktop",
        "torch",
        "PySide6",
        "sqlite_utils",
        "platformdirs",
    ),
    "engine/app": ("engine.cli", "engine.commands", "rewards_onnx", "desktop", "torch", "PySide6"),
    "engine": ("rewards_onnx", "desktop", "torch", "PySide6"),
    "rewards_onnx": ("desktop", "PySide6"),
    "desktop": ("rewards_onnx", "torch"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return names


def rules_for(path: Path) -> tuple[str, ...]:
    """The rules of the innermost part of the tree that holds ``path``."""
    relative = path.relative_to(ROOT).as_posix()
    part = max((part for part in FORBIDDEN if relative.startswith(part + "/")), key=len)
    return FORBIDDEN[part]


def breaks(name: str, forbidden: tuple[str, ...]) -> bool:
    return any(name == banned or name.startswith(banned + ".") for banned in forbidden)


@pytest.mark.parametrize(
    "path",
    sorted(p for part in ("engine", "rewards_onnx", "desktop") for p in (ROOT / part).rglob("*.py")),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_each_module_imports_only_the_layers_below_it(path):
    forbidden = rules_for(path)
    assert not {name for name in imported_modules(path) if breaks(name, forbidden)}


def test_only_the_adapter_imports_llama_cpp():
    """One seam: upgrading llama-cpp-python means reading engine/runtime/llama_adapter.py and its contract test."""
    importers = {
        path.relative_to(ROOT).as_posix()
        for part in ("engine", "rewards_onnx", "desktop")
        for path in (ROOT / part).rglob("*.py")
        if any(breaks(name, ("llama_cpp",)) for name in imported_modules(path))
    }
    assert importers == {"engine/runtime/llama_adapter.py"}


def test_the_rules_catch_a_wrong_import(tmp_path):
    """The check itself: a lazy import of the trainer inside a runtime function is found."""
    module = tmp_path / "leaky.py"
    module.write_text("def f():\n    from rewards_onnx.train import tune\n    import PySide6.QtCore\n")
    found = {name for name in imported_modules(module) if breaks(name, FORBIDDEN["engine/runtime"])}
    assert found == {"rewards_onnx.train", "rewards_onnx.train.tune", "PySide6.QtCore"}


@pytest.mark.subprocess
def test_prt_generate_runs_without_torch_qt_the_trainer_or_the_window(tiny_gguf):
    code = (
        "import json, sys\n"
        "from engine.cli import main\n"
        f"code = main(['generate', '--model', {str(tiny_gguf)!r}, '--prompt', 'Hi', '--max-tokens', '3',"
        " '--ctx', '512', '--json'])\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'PySide6', 'rewards_onnx', 'desktop'})\n"
        "print(json.dumps({'code': code, 'loaded': loaded}), file=sys.stderr)\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    report = json.loads(ran.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}, ran.stderr
    assert json.loads(ran.stdout)["completion_tokens"] > 0
