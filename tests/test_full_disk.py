"""A disk that fills up for real: a small tmpfs in a private mount namespace, never a mock.

Each case runs the app's own code in a child process that sees the tmpfs; what the tmpfs holds afterwards is
copied out (it goes away with the namespace) and checked here: what was saved stays, the user gets one clear
error, and no half-written file is left behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from engine.app.store import Store
from helpers import assert_one_line_error

pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]
NAMESPACES = (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"])
PAGE = 4096  # tmpfs hands out space in pages
# In the namespace: mount a tmpfs of SIZE bytes on DISK, put SEED's files on it, run the command, copy the
# tmpfs back out to KEEP.
ON_A_SMALL_DISK = """
disk=$1 size=$2 seed=$3 keep=$4; shift 4
mount -t tmpfs -o size="$size" none "$disk" || exit 97
cp -a "$seed"/. "$disk"/ || exit 98
"$@"; status=$?
cp -a "$disk"/. "$keep"/
exit $status
"""


@pytest.fixture(scope="module")
def namespace() -> list[str]:
    """An unshare command that gives a child its own mount namespace, checked by filling a real tmpfs in it."""
    problems = []
    for command in NAMESPACES:
        with tempfile.TemporaryDirectory() as disk:
            shell = f"mount -t tmpfs -o size=64k none {disk} && dd if=/dev/zero of={disk}/fill bs=1k count=128"
            try:
                probe = subprocess.run([*command, "sh", "-c", shell], capture_output=True, text=True, timeout=60)
            except OSError as error:
                problems.append(f"{' '.join(command)}: {error}")
                continue
        if "No space left on device" in probe.stderr:
            return command
        problems.append(f"{' '.join(command)}: {probe.stderr.strip() or f'exit {probe.returncode}'}")
    pytest.fail(
        "These tests fill a real disk, a small tmpfs in a private mount namespace (Linux; util-linux "
        "unshare, with unprivileged user namespaces allowed or run as root), and could not make one here: "
        + "; ".join(problems),
        pytrace=False,
    )


class SmallDisk:
    """A folder that, for one command, is a tmpfs of ``size`` bytes holding ``seed``'s files."""

    def __init__(self, namespace: list[str], root: Path, size: int) -> None:
        self.namespace, self.size = namespace, size
        self.path, self.seed, self.after = root / "disk", root / "seed", root / "after"
        for folder in (self.path, self.seed, self.after):
            folder.mkdir()

    def run(self, *command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        """Run ``command`` with the tmpfs mounted; afterwards ``self.after`` holds what the tmpfs held."""
        return subprocess.run(
            [
                *self.namespace,
                "sh",
                "-c",
                ON_A_SMALL_DISK,
                "sh",
                str(self.path),
                str(self.size),
                str(self.seed),
                str(self.after),
                *command,
            ],
            cwd=REPO,
            env=os.environ | env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def files_after(self) -> dict[str, str]:
        """Every file the tmpfs held at the end, hidden ones included: relative path -> sha256."""
        return files_in(self.after)

    def seeded(self) -> dict[str, str]:
        return files_in(self.seed)


def files_in(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def assert_says_the_disk_is_full(message: str) -> None:
    assert "disk is full" in message and "free some space" in message, message


# -- 1. a reply streaming into the chat database ------------------------------------------------------------
STREAMING_WINDOW = textwrap.dedent("""
    import json, sys
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    from engine.app.chat import ChatEngine
    from engine.app.models import app_data_dir
    from engine.app.store import Store, default_store_path
    from desktop.main_window import MainWindow
    from desktop.settings import AppSettings

    model = sys.argv[1]
    app = QApplication([])
    shown, uncaught = [], []  # the errors the window showed; exceptions that escaped to Qt instead
    sys.excepthook = lambda kind, error, trace: uncaught.append(f"{kind.__name__}: {error}")
    settings = AppSettings(n_ctx=4096, n_threads=1, n_gpu_layers=0, max_tokens=3000)
    engine, store = ChatEngine(), Store(default_store_path())
    engine.load_model(model, settings.model_config())
    window = MainWindow(engine, store, settings=settings)
    window.session.error.connect(shown.append)
    saved_when_full = None

    def fill_the_disk():
        with open(app_data_dir() / "filler", "wb") as filler:
            while True:
                filler.write(b"x" * 4096)
                filler.flush()

    def watch():
        global saved_when_full
        if saved_when_full is None:
            reply = store.messages(window.session.conversation_id)[-1]
            if reply.role == "assistant" and reply.content:  # the first partial text has landed: the disk fills up
                saved_when_full = reply.content
                try:
                    fill_the_disk()
                except OSError:
                    pass
        elif not window.session.busy:
            report_and_exit(0)

    def report_and_exit(status):
        reply = [w for w in window.chat_view.message_widgets() if w.role == "assistant"][-1]
        print(json.dumps({"shown": shown, "uncaught": uncaught, "saved_when_full": saved_when_full,
                          "on_screen": reply.body.text, "busy": window.session.busy}))
        app.exit(status)

    window.chat_view.input.setPlainText("Tell me a long story.")
    window.chat_view.send_button.click()
    timer = QTimer(interval=10, timeout=watch)
    timer.start()
    QTimer.singleShot(60_000, lambda: report_and_exit(3))  # still busy a minute later
    sys.exit(app.exec())
""")


def test_a_reply_streaming_when_the_disk_fills_keeps_what_was_saved(namespace, tmp_path, tiny_gguf):
    disk = SmallDisk(namespace, tmp_path, size=1 << 20)
    ran = disk.run(
        sys.executable,
        "-c",
        STREAMING_WINDOW,
        str(tiny_gguf),
        env={"PRT_HOME": str(disk.path), "QT_QPA_PLATFORM": "offscreen"},
    )
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stdout + ran.stderr
    report = json.loads(ran.stdout)
    [message] = report["shown"]  # one error, not one per repaint
    assert report["uncaught"] == []
    assert_says_the_disk_is_full(message)
    assert not [name for name in disk.files_after() if name.endswith(".partial")]
    with sqlite3.connect(disk.after / "chats.db") as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Store(disk.after / "chats.db") as store:  # what the user finds after freeing some space
        [conversation] = store.conversations()
        user, reply = store.messages(conversation.id)
        assert (user.role, user.content, user.status) == ("user", "Tell me a long story.", "complete")
        assert reply.role == "assistant" and reply.content.startswith(report["saved_when_full"])
        assert report["on_screen"].startswith(reply.content)


# -- 2. prt tune writing its reward -----------------------------------------------------------------------
def tune_command(model: Path, data: Path) -> list[str]:
    """``prt tune`` of a tiny reward, less its --out."""
    return [
        sys.executable,
        "-m",
        "engine.cli",
        "tune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--epochs",
        "1",
        "--ctx",
        "512",
    ]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_gguf) -> tuple[list[str], Path]:
    """A tune's command and the reward it writes on a disk with room; tuning is deterministic, so it writes the
    same file again."""
    folder = tmp_path_factory.mktemp("tuned")
    data = folder / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"Question {index}?", "response": "A short answer."}) + "\n" for index in range(6)
        )
    )
    command, reference = tune_command(tiny_gguf, data), folder / "mine.onnx"
    ran = subprocess.run(
        [*command, "--out", str(reference)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PRT_HOME": str(folder / "home")},
    )
    assert ran.returncode == 0, ran.stderr
    return command, reference


@pytest.mark.parametrize("refused", [".onnx", ".json"])
def test_a_tune_on_a_full_disk_leaves_no_half_reward_and_keeps_the_old_one(namespace, tmp_path, tuned, refused):
    """The disk fills while the reward file is written (an older reward is kept beside it), or right after it,
    when its card is written."""
    command, reference = tuned
    reward_pages = math.ceil(reference.stat().st_size / PAGE) * PAGE
    if refused == ".onnx":  # the old reward, its card, and 64 KiB of room
        disk = SmallDisk(namespace, tmp_path, size=reward_pages + PAGE + 64 * 1024)
        for path in (reference, reference.with_suffix(".json")):
            shutil.copy(path, disk.seed)
    else:  # room for the new reward file, to the page, and none for its card
        disk = SmallDisk(namespace, tmp_path, size=reward_pages)
    ran = disk.run(*command, "--out", str(disk.path / "mine.onnx"), env={"PRT_HOME": str(tmp_path / "home")})
    assert_one_line_error(ran, "for the reward mine.onnx and its card (nothing there was changed)")
    assert_says_the_disk_is_full(ran.stderr)
    assert disk.files_after() == disk.seeded()


# -- 3. exporting the chats --------------------------------------------------------------------------------
EXPORT = textwrap.dedent("""
    import json, sys
    from engine.runtime.errors import PrtError
    from engine.app.store import Store, default_store_path

    with Store(default_store_path()) as store:
        try:
            store.export_json(sys.argv[1])
        except PrtError as error:
            print(json.dumps({"error": str(error)}))
""")


def test_an_export_on_a_full_disk_leaves_the_previous_export_and_the_chats(namespace, tmp_path):
    home = tmp_path / "home"
    with Store(home / "chats.db") as store:
        conversation = store.create_conversation("Long")
        store.export_json(tmp_path / "chats.json")  # last week's export: it fits
        for index in range(100):
            store.add_message(conversation, "user", f"Message {index}: " + "words " * 200)
    disk = SmallDisk(namespace, tmp_path, size=64 * 1024)
    shutil.move(tmp_path / "chats.json", disk.seed / "chats.json")
    ran = disk.run(sys.executable, "-c", EXPORT, str(disk.path / "chats.json"), env={"PRT_HOME": str(home)})
    assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr
    assert_says_the_disk_is_full(json.loads(ran.stdout)["error"])
    assert disk.files_after() == disk.seeded()
    with Store(home / "chats.db") as store:
        assert len(store.messages(conversation)) == 100
