"""The app's paths: one AppPaths resolved at start-up (--data-folder, PRT_HOME, the settings, the OS's folder) and
passed down to the window, the commands and the child processes; nothing rewrites the environment at run time."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import ast
import dataclasses
import json
from pathlib import Path

import platformdirs
import pytest
from PySide6.QtWidgets import QMessageBox

from desktop.demo import DemoEngine, demo_data
from desktop.main_window import MainWindow
from desktop.settings import AppSettings
from engine.app.chat import library_build_command, tune_command
from engine.app.paths import APP_NAME, AppPaths
from engine.app.store import Store
from engine.cli import build_parser
from helpers import prt

ROOT = Path(__file__).resolve().parent.parent
ENVIRONMENT_SWITCH = ROOT / "engine" / "privacy.py"  # the offline switch: the one place that sets variables


def test_the_data_folder_is_the_flag_else_prt_home_else_the_settings_else_the_os_folder(tmp_path, monkeypatch):
    flag, home, configured = tmp_path / "flag", tmp_path / "home", tmp_path / "configured"
    monkeypatch.setenv("PRT_HOME", str(home))
    assert AppPaths.resolve(flag, configured=configured).data == flag
    assert AppPaths.resolve(configured=configured).data == home
    monkeypatch.delenv("PRT_HOME")
    assert AppPaths.resolve(configured=configured).data == configured
    assert AppPaths.resolve().data == Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def test_every_file_is_under_the_data_folder_and_a_folder_is_made_when_first_asked_for(tmp_path):
    paths = AppPaths(tmp_path / "data")
    assert not paths.data.exists()
    assert paths.store == paths.data / "chats.db" and paths.teacher_cache == paths.data / "teacher-cache.sqlite"
    assert paths.data.is_dir() and not paths.store.exists()
    assert paths.library("/anywhere/SmolLM2.Q4.gguf") == paths.data / "rewards" / "library" / "SmolLM2.Q4"
    assert paths.models.is_dir() and paths.rewards.is_dir() and not (paths.rewards / "library").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        paths.data = tmp_path  # type: ignore[misc]


def test_a_command_uses_its_data_folder_flag_and_prt_home_stays_as_it_was(tmp_path, tiny_gguf, isolated_app_folder):
    elsewhere = tmp_path / "elsewhere"
    added = prt("models", "add", str(tiny_gguf), "--data-folder", str(elsewhere), "--json")
    assert added.returncode == 0, added.stderr
    assert (elsewhere / "models" / "models.json").is_file()
    here, there = (
        [model["name"] for model in json.loads(prt("models", "--json", *flag).stdout)]
        for flag in ([], ["--data-folder", str(elsewhere)])
    )
    assert "tiny-a" not in here and "tiny-a" in there
    assert os.environ["PRT_HOME"] == str(isolated_app_folder)


@pytest.mark.parametrize("command", [tune_command, library_build_command])
def test_the_window_gives_its_child_processes_its_data_folder_as_a_flag(tmp_path, command):
    outputs = {"out_path": "r.onnx"} if command is tune_command else {"out_dir": "library"}
    argv = command(model_path="m.gguf", data_folder=tmp_path, **outputs)
    assert argv[1:3] == ["-m", "engine.cli"]
    assert build_parser(argv[3]).parse_args(argv[3:]).data_folder == tmp_path
    assert "--data-folder" not in command(model_path="m.gguf", **outputs)  # without one, the child resolves its own


def test_the_window_and_its_panels_use_the_paths_they_are_given(qtbot, tmp_path, tiny_gguf, monkeypatch):
    paths = AppPaths(tmp_path / "data")
    (paths.models / "tiny-a.gguf").symlink_to(tiny_gguf)
    paths.teacher_cache.write_bytes(b"passes of the texts tuned on")
    with Store(tmp_path / "chats.db") as store:
        window = MainWindow(DemoEngine(), store, paths=paths, settings=AppSettings())
        qtbot.addWidget(window)
        assert window.model_picker.findText("tiny-a") >= 0  # the given folder's models, not PRT_HOME's (none)
        monkeypatch.setattr(QMessageBox, "warning", lambda *_args: QMessageBox.StandardButton.Yes)
        window.delete_all_data()
        assert not paths.teacher_cache.exists()


def test_the_demo_has_a_folder_of_its_own_and_leaves_the_environment_alone(isolated_app_folder):
    before = dict(os.environ)
    with demo_data() as demo:
        paths = demo.paths
        assert paths.data.is_dir() and paths.data != isolated_app_folder
        assert dict(os.environ) == before
    assert not paths.data.exists()


def environment_writes(path: Path) -> list[int]:
    """The lines of ``path`` that change os.environ: an item set or deleted, or a method that changes it called."""

    def is_environ(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr == "environ"
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        )

    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)) and is_environ(node.value):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and (
                (is_environ(node.func.value) and node.func.attr in {"update", "setdefault", "pop", "popitem", "clear"})
                or (
                    node.func.attr in {"putenv", "unsetenv"}
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os"
                )
            )
        ):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize(
    "path",
    sorted(p for part in ("engine", "desktop") for p in (ROOT / part).rglob("*.py") if p != ENVIRONMENT_SWITCH),
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_module_rewrites_the_environment(path):
    assert environment_writes(path) == []


def test_the_environment_check_finds_a_write(tmp_path):
    module = tmp_path / "rewriting.py"
    module.write_text("import os\nos.environ['PRT_HOME'] = 'x'\nos.environ.setdefault('A', 'b')\ndel os.environ['A']\n")
    assert environment_writes(module) == [2, 3, 4] and environment_writes(ENVIRONMENT_SWITCH) != []
