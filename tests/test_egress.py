"""Nothing leaves the machine: the real ``prt`` processes and the real window, watched at the OS level.

Each run gets a throwaway HOME and temp dir and an environment without our privacy switches (the test
process has them, from importing the engine), so every process must set them itself. A run fails on
any AF_INET/AF_INET6 socket, any host-name lookup, and any file written outside the app's data folder,
the temp dir and the output the user asked for. When strace cannot watch, the tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from egress import Watched, WatchUnavailable, watch
from engine.privacy import OFFLINE_ENVIRONMENT
from engine.runtime.reward_graph import random_reward_weights
from tiny_models import small_reward_shape, write_reward

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TUNE_DATA = [{"prompt": f"Name a fruit, number {i}.", "response": f"Fruit {i}: a ripe pear."} for i in range(12)]


@dataclass(frozen=True)
class Sandbox:
    """A throwaway HOME and temp dir, the inputs a user brings, and the folder for outputs they ask for."""

    home: Path
    temp: Path
    inputs: Path
    outputs: Path
    work: Path  # the current directory: writing there is a finding too

    @classmethod
    def make(cls, root: Path) -> Sandbox:
        folders = {name: root / name for name in ("home", "temp", "inputs", "outputs", "work")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        return cls(**folders)

    @property
    def data_folder(self) -> Path:
        return self.home / ".local" / "share" / "prt-chat"  # the OS's app-data folder for this HOME

    def environment(self) -> dict[str, str]:
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in OFFLINE_ENVIRONMENT and key != "PRT_HOME" and not key.startswith("XDG_")
        }
        return inherited | {
            "HOME": str(self.home),
            "TMPDIR": str(self.temp),
            "PYTHONIOENCODING": "utf-8",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)]),
            "QT_QPA_PLATFORM": "offscreen",
        }

    def run(self, *argv: str, stdin: str | None = None) -> Watched:
        try:
            return watch(
                [sys.executable, *argv],
                env=self.environment(),
                cwd=self.work,
                stdin=stdin,
                writable=[self.temp, self.data_folder, self.outputs],
            )
        except WatchUnavailable as error:
            pytest.fail(f"cannot watch the processes, so privacy is unproven: {error}")

    def prt(self, *args: str, stdin: str | None = None) -> Watched:
        return self.run("-m", "engine.cli", *args, stdin=stdin)


def assert_private(watched: Watched) -> None:
    assert watched.returncode == 0, watched.stderr[-3000:]
    assert watched.calls_seen > 100, "strace recorded almost nothing: it did not watch"
    assert not watched.findings, watched.summary()


@pytest.fixture
def sandbox(tmp_path) -> Sandbox:
    return Sandbox.make(tmp_path / "sandbox")


@pytest.fixture
def reward(sandbox, tiny_base) -> Path:
    return write_reward(
        sandbox.inputs / "style.onnx",
        random_reward_weights(small_reward_shape(tiny_base.n_vocab), seed=4),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )


def test_the_watcher_sees_sockets_lookups_and_stray_files(sandbox):
    """If this fails, the other tests here prove nothing: the watcher must see what it is meant to catch."""
    canary = (
        "import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close(); "
        "open('/etc/hosts').close(); open('stray.txt', 'w').close(); "
        "import os; os.mkdir(os.path.expanduser('~/.cache'))"
    )
    watched = sandbox.run("-c", canary)
    assert watched.returncode == 0, watched.stderr
    assert [f.kind for f in watched.findings] == [
        "internet socket",
        "host-name lookup",
        "written outside",
        "written outside",
    ], watched.summary()
    assert "stray.txt" in watched.findings[2].call and ".cache" in watched.findings[3].call


def test_generate_with_a_reward_stays_on_the_machine(sandbox, tiny_gguf, reward):
    watched = sandbox.prt(
        "generate",
        "--model",
        str(tiny_gguf),
        "--prompt",
        "Hello",
        "--reward",
        f"{reward}:0.5",
        "--ctx",
        "512",
        "--max-tokens",
        "8",
        "--json",
    )
    assert_private(watched)
    assert json.loads(watched.stdout)["rewards"][0]["name"] == "style"


def test_a_two_turn_chat_stays_on_the_machine(sandbox, tiny_gguf, reward):
    watched = sandbox.prt(
        "chat",
        "--model",
        str(tiny_gguf),
        "--reward",
        str(reward),
        "--ctx",
        "512",
        "--max-tokens",
        "6",
        stdin="Hello\nAnd again\n/quit\n",
    )
    assert_private(watched)
    assert watched.stdout.count("bot> ") == 2


def test_tune_then_eval_stay_on_the_machine(sandbox, tiny_gguf):
    data = sandbox.inputs / "mine.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in TUNE_DATA))
    out = sandbox.outputs / "mine.onnx"
    tuned = sandbox.prt(
        "tune",
        "--model",
        str(tiny_gguf),
        "--data",
        str(data),
        "--out",
        str(out),
        "--ctx",
        "512",
        "--epochs",
        "1",
        "--json",
    )
    assert_private(tuned)
    assert out.is_file() and (sandbox.data_folder / "teacher-cache.sqlite").is_file()
    evaluated = sandbox.prt(
        "eval", "--model", str(tiny_gguf), "--reward", str(out), "--data", str(data), "--ctx", "512", "--json"
    )
    assert_private(evaluated)
    assert json.loads(evaluated.stdout)["tokens"] > 0


def test_compare_with_its_fine_tune_and_fact_probe_stays_on_the_machine(sandbox, tiny_gguf):
    data = sandbox.inputs / "mine.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in TUNE_DATA))
    compared = sandbox.prt(
        *("compare", "--model", str(tiny_gguf), "--data", str(data), "--out-dir", str(sandbox.outputs)),
        *("--ctx", "512", "--train-examples", "4", "--finetune-epochs", "1", "--facts-asked", "3", "--json"),
    )
    assert_private(compared)
    assert json.loads(compared.stdout)["knowledge"]["asked"] == 3


def test_a_backup_and_its_restore_stay_on_the_machine(sandbox, reward):
    from engine.app.store import Store

    with Store(sandbox.data_folder / "chats.db") as store:
        chat = store.create_conversation("Kept")
        store.add_message(chat, "user", "Hello")
        store.add_reward(reward, "style")
    archive = sandbox.outputs / "backup.zip"
    assert_private(sandbox.prt("backup", "create", str(archive), "--json"))
    restored = sandbox.outputs / "restored"
    assert_private(sandbox.prt("backup", "restore", str(archive), "--data-folder", str(restored), "--json"))
    with Store(restored / "chats.db") as store:
        assert [c.title for c in store.conversations()] == ["Kept"] and len(store.rewards()) == 1


def test_the_window_streams_a_reply_and_stays_on_the_machine(sandbox, tiny_gguf):
    watched = sandbox.run(str(TESTS / "egress_window.py"), "--model", str(tiny_gguf))
    assert_private(watched)
    reply = json.loads(watched.stdout.strip().splitlines()[-1])
    assert reply["status"] == "complete" and reply["text"]
    assert (sandbox.data_folder / "chats.db").is_file()


def test_fetching_the_default_model_is_the_one_network_use_and_only_pip_makes_it(sandbox):
    """Set-up's download of the default model goes through one `pip download`; prt itself opens no socket."""
    watched = sandbox.prt("models", "fetch", "--json")
    assert watched.returncode == 0, watched.stderr[-3000:]
    [installed] = json.loads(watched.stdout)
    assert installed["default"] and Path(installed["path"]).parent == sandbox.data_folder / "models"
    network = watched.of_kind("internet socket") + watched.of_kind("host-name lookup")
    assert network, "the download made no network call the watcher could see"
    assert all(" -m pip download " in f.program for f in network), watched.summary()
    by_pip = [f for f in watched.findings if any(" -m pip download " in program for program in f.lineage)]
    assert by_pip == watched.findings, watched.summary()  # pip (and the `rustc --version` of its user agent)


@pytest.mark.parametrize(
    "calls, kinds",
    [
        (
            [
                'connect(5<socket:[1]>, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = 0',
                'sendto(5<socket:[1]>, "\\2\\0\\0\\0\\16\\0\\0\\0\\f\\0\\0\\0example.com\\0", 24, MSG_NOSIGNAL, NULL, 0) = 24',
            ],
            ["host-name lookup"],
        ),
        (
            [
                'connect(5<socket:[1]>, {sa_family=AF_UNIX, sun_path="/var/run/nscd/socket"}, 110) = 0',
                'sendto(5<socket:[1]>, "\\2\\0\\0\\0\\1\\0\\0\\0\\2\\0\\0\\0000\\0", 14, MSG_NOSIGNAL, NULL, 0) = 14',
            ],
            [],
        ),
        (
            ['connect(3<socket:[2]>, {sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("10.0.0.2")}, 16) = 0'],
            ["internet socket"],
        ),
        (['openat(AT_FDCWD</w>, "/etc/resolv.conf", O_RDONLY|O_CLOEXEC) = 3</etc/resolv.conf>'], ["host-name lookup"]),
        (['renameat2(AT_FDCWD</w>, ".x.partial", AT_FDCWD</w>, "x", RENAME_NOREPLACE) = 0'], ["written outside"]),
        (['openat(AT_FDCWD</w>, "/d/x", O_WRONLY|O_CREAT|O_TRUNC, 0666) = 3</d/x>'], []),
    ],
)
def test_the_watcher_reads_strace_lines(calls, kinds):
    """Cases this machine cannot stage for real: nscd answering a host look-up (and a user look-up, allowed)."""
    from egress import judge_thread

    assert [kind for kind in judge_thread(calls, [Path("/d")], Path("/w")) if kind] == kinds
