"""One backup file with everything, and its restore (engine/app/backup.py, `prt backup`): the whole app state
through a real Store and real ONNX rewards, bad archives, a non-empty target, unreadable files, a full disk."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlite_utils

from engine.app.backup import BACKUP_FORMAT, BACKUP_VERSION, MANIFEST, create_backup, restore_backup
from engine.app.onboarding import saved_profile
from engine.app.paths import AppPaths
from engine.app.pref import Profile
from engine.app.store import MIGRATIONS, SCHEMA_VERSION, Store
from engine.runtime.errors import StoreError
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import RewardModel, card_path
from helpers import assert_one_line_error, prt, prt_process
from tiny_models import small_reward_shape, write_reward

REPO = Path(__file__).resolve().parents[1]
VOCAB = 64  # small real rewards: the format does not care about the vocabulary
# The tables of the app's database; a new one fails app_state until this test compares it too.
TABLES = {"conversations", "messages", "feedback", "presets", "rewards", "tuning_runs", "settings"}
PROFILE = Profile(name="My style", weights={"concise": 1.0, "formal": -0.5}, answers=[([0.2, -0.1], "a")])


def make_reward(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = random_reward_weights(small_reward_shape(VOCAB), seed=seed)
    return write_reward(path, weights, vocabulary_fingerprint="fp-test", base_name="tiny-a")


@dataclass
class App:
    paths: AppPaths
    library: Path  # a style reward, rewards/library/tiny-a/concise.onnx
    mine: Path  # a tuned reward in rewards/
    outside: Path  # a reward installed from a folder outside the data folder


def fill_app(paths: AppPaths, outside_folder: Path) -> App:
    """A data folder as a user leaves it: chats with alternatives, one in the trash, feedback, presets, settings,
    a style profile, three installed rewards (one from outside the data folder), a model and a teacher cache."""
    library = make_reward(paths.library("tiny-a.gguf") / "concise.onnx", seed=1)
    make_reward(paths.library("tiny-a.gguf") / "formal.onnx", seed=4)  # built, never installed
    mine = make_reward(paths.rewards / "mine.onnx", seed=2)
    outside = make_reward(outside_folder / "bierce.onnx", seed=3)
    (paths.models / "tiny-a.gguf").write_bytes(b"GGUF" + bytes(100))
    paths.teacher_cache.write_bytes(b"derived data")
    with Store(paths.store) as store:
        store.add_reward(mine, "mine")
        store.set_reward_state(mine, weight=0.7)
        store.add_reward(outside, "bierce")
        store.set_reward_state(outside, enabled=False, weight=-0.25)
        store.save_style_profile(
            {"profile": json.loads(PROFILE.to_json()), "questions": [{"prompt": "Hi?", "answer": "a"}]},
            picks=[("Hi?", "Hello.", "Well, hello there, friend!")],
            dials={library: ("concise", 0.5)},
        )
        preset = store.save_preset(
            "Terse",
            system_prompt="Be terse.",
            dials={str(library): 0.5, str(outside): 1.5},
            strength=1.2,
            sampling={"temperature": 0.7, "top_k": 40, "stop": ["\n\n"]},
        )
        first = store.create_conversation("Rust ownership", system_prompt="Be brief.", model_name="tiny-a")
        question = store.add_message(first, "user", "What is a borrow?")
        answer = store.add_message(first, "assistant", "A reference.", stats={"tokens": 3, "rewards": ["mine"]})
        regenerated = store.add_message(first, "assistant", "A loan of a value.", alternative_to=answer)
        store.mark_seen([question, answer, regenerated])
        store.show_alternative(answer)
        store.add_message(first, "user", "And a move?")
        store.set_conversation_preset(first, preset)
        second = store.create_conversation("Café plans ☕", model_name="SmolLM2-135M-Instruct")
        store.add_message(second, "user", "Where to go?")
        reply = store.add_message(second, "assistant", "Some", status="stopped")
        trashed = store.create_conversation("Old chat", model_name="tiny-a")
        store.add_message(trashed, "user", "Bye.")
        store.delete_conversation(trashed)
        store.add_feedback(
            "thumbs_up", prompt="What is a borrow?", chosen="A reference.", conversation_id=first, message_id=answer
        )
        store.add_feedback(
            "thumbs_down", prompt="Where to go?", rejected="Some", conversation_id=second, message_id=reply
        )
        store.set_setting("window", {"width": 900, "theme": "dark"})
        store.set_setting("alpha", 1.5)
        run = store.start_tuning_run({"feedback": 3})
        store.finish_tuning_run(run, status="done", reward_path=mine, metrics={"gap_closed": 0.4})
    return App(paths, library, mine, outside)


@pytest.fixture
def app(tmp_path) -> App:
    return fill_app(AppPaths(tmp_path / "old"), tmp_path / "elsewhere")


@pytest.fixture
def backup(app, tmp_path) -> Path:
    create_backup(app.paths, tmp_path / "backup.zip")
    return tmp_path / "backup.zip"


def app_state(database: Path) -> dict:
    """Every row of every table, ids replaced by what they point at (a uid, a position, a name)."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        connection.row_factory = sqlite3.Row
        tables = {
            name
            for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if "_fts" not in name
        }
        assert tables == TABLES
        rows = {
            table: [dict(row) for row in connection.execute(f"SELECT * FROM {table} ORDER BY rowid")]
            for table in tables
        }
    uid = {row["id"]: row["uid"] for row in rows["conversations"]}
    position = {row["id"]: (uid[row["conversation_id"]], row["position"]) for row in rows["messages"]}
    preset = {row["id"]: row["name"] for row in rows["presets"]}

    def without(row: dict, *names: str) -> dict:
        return {key: value for key, value in row.items() if key not in names}

    return {
        "conversations": sorted(
            (without(row, "id") | {"preset_id": preset.get(row["preset_id"])} for row in rows["conversations"]),
            key=lambda row: row["uid"],
        ),
        "messages": sorted(
            (
                without(row, "id")
                | {"conversation_id": uid[row["conversation_id"]], "parent_id": position.get(row["parent_id"])}
                for row in rows["messages"]
            ),
            key=lambda row: (row["conversation_id"], row["position"]),
        ),
        "feedback": [
            without(row, "id")
            | {"conversation_id": uid.get(row["conversation_id"]), "message_id": position.get(row["message_id"])}
            for row in rows["feedback"]
        ],
        "presets": sorted(
            (without(row, "id") | {"dials": json.loads(row["dials"])} for row in rows["presets"]),
            key=lambda row: row["name"],
        ),
        "rewards": sorted(rows["rewards"], key=lambda row: row["name"]),
        "tuning_runs": [without(row, "id") for row in rows["tuning_runs"]],
        "settings": {row["key"]: json.loads(row["value"]) for row in rows["settings"]},
    }


def relocated(state: dict, moved: dict[str, str]) -> dict:
    """The state with each installed reward's path and each preset's dials moved as a restore moves them."""
    state = copy.deepcopy(state)
    for row in state["rewards"]:
        row["path"] = moved.get(row["path"], row["path"])
    for row in state["presets"]:
        row["dials"] = {moved.get(path, path): weight for path, weight in row["dials"].items()}
    state["rewards"].sort(key=lambda row: row["name"])
    return state


def files_in(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_a_restore_brings_back_the_whole_app_state_in_a_new_folder(app, backup, tmp_path):
    before = app_state(app.paths.store)
    new = AppPaths(tmp_path / "new")
    summary = restore_backup(backup, new)

    outside_now = new.data / "rewards" / "restored" / "bierce.onnx"
    moved = {str(app.outside): str(outside_now)} | {
        str(app.paths.data / relative): str(new.data / relative)
        for relative in ("rewards/mine.onnx", "rewards/library/tiny-a/concise.onnx")
    }
    assert app_state(new.store) == relocated(before, moved)
    assert before["messages"] and before["feedback"] and before["presets"] and "style_profile" in before["settings"]
    assert any(row["deleted"] for row in before["conversations"])  # the trash comes back too
    branches = {(row["conversation_id"], row["parent_id"]) for row in before["messages"]}
    assert len(branches) < len(before["messages"])  # a regenerated reply: two messages of one parent

    with Store(new.store) as store:
        rewards = {reward.name: reward for reward in store.rewards()}
        assert {name: (r.enabled, r.weight) for name, r in rewards.items()} == {
            "mine": (True, 0.7),
            "bierce": (False, -0.25),
            "concise": (True, 0.5),
        }
        assert rewards["bierce"].path == str(outside_now)
        for reward, original in (
            (rewards["mine"], app.mine),
            (rewards["concise"], app.library),
            (rewards["bierce"], app.outside),
        ):
            path = Path(reward.path)
            assert path.is_relative_to(new.data)
            assert path.read_bytes() == original.read_bytes()
            assert card_path(path).read_bytes() == card_path(original).read_bytes()
            with RewardModel(path) as model:  # a real reward, as the app loads it
                assert model.card.base_model_name == "tiny-a"
        [preset] = store.presets()
        assert preset.dials == {str(new.data / "rewards/library/tiny-a/concise.onnx"): 0.5, str(outside_now): 1.5}
        assert saved_profile(store) == PROFILE
        assert [c.title for c in store.conversations(search="borrow")] == ["Rust ownership"]  # the index came too
        first = store.conversations(search="borrow")[0]
        assert [m.content for m in store.messages(first.id)] == ["What is a borrow?", "A reference.", "And a move?"]
        assert store.conversation(first.id).preset_id == preset.id

    library_files = files_in(app.paths.rewards)  # the whole rewards folder, the library's unused reward included
    assert {
        name: data for name, data in files_in(new.rewards).items() if not name.startswith("restored/")
    } == library_files
    assert not (new.data / "teacher-cache.sqlite").exists() and list(new.models.glob("*.gguf")) == []
    assert (summary.conversations, summary.messages, summary.feedback, summary.presets) == (3, 7, 3, 1)
    assert summary.rewards == 3 and summary.skipped == ()
    assert summary.models == ("SmolLM2-135M-Instruct", "tiny-a") == summary.missing_models
    assert "tiny-a" in summary.describe() and "not installed here" in summary.describe()
    assert not (new.data / ".restore.partial").exists()


def test_the_manifest_lists_every_member_with_its_size_and_sha256(app, tmp_path):
    summary = create_backup(app.paths, tmp_path / "backup.zip")
    with zipfile.ZipFile(tmp_path / "backup.zip") as archive:
        manifest = json.loads(archive.read(MANIFEST))
        members = {name: archive.read(name) for name in archive.namelist() if name != MANIFEST}
    assert (manifest["format"], manifest["version"], manifest["schema_version"]) == (
        BACKUP_FORMAT,
        BACKUP_VERSION,
        SCHEMA_VERSION,
    )
    assert {m["name"]: (m["size"], m["sha256"]) for m in manifest["members"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()
    }
    assert sorted(members) == [
        "chats.db",
        "external/bierce.json",
        "external/bierce.onnx",
        "rewards/library/tiny-a/concise.json",
        "rewards/library/tiny-a/concise.onnx",
        "rewards/library/tiny-a/formal.json",
        "rewards/library/tiny-a/formal.onnx",
        "rewards/mine.json",
        "rewards/mine.onnx",
    ]  # no model, no teacher cache
    assert manifest["models"] == ["SmolLM2-135M-Instruct", "tiny-a"]
    assert {entry["path"]: entry["member"] for entry in manifest["rewards"]} == {
        str(app.mine): "rewards/mine.onnx",
        str(app.library): "rewards/library/tiny-a/concise.onnx",
        str(app.outside): "external/bierce.onnx",
    }
    assert summary.files == len(members) and summary.bytes == sum(map(len, members.values()))
    assert summary.models == ("SmolLM2-135M-Instruct", "tiny-a") and summary.missing_models == ()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_backup_is_a_consistent_snapshot_while_the_app_has_the_database_open_and_writes(app, tmp_path):
    with Store(app.paths.store) as live:  # the window's store: its recent writes sit in the WAL, not in chats.db
        conversation = live.create_conversation("Busy", model_name="tiny-a")
        live.add_message(conversation, "user", "written just now")
        stop = threading.Event()

        def write() -> None:
            with Store(app.paths.store) as writer:
                while not stop.is_set():
                    writer.add_message(conversation, "user", "more")

        thread = threading.Thread(target=write)
        thread.start()
        try:
            create_backup(app.paths, tmp_path / "backup.zip")
        finally:
            stop.set()
            thread.join()
        restore_backup(tmp_path / "backup.zip", AppPaths(tmp_path / "new"))
    new_db = tmp_path / "new" / "chats.db"
    with contextlib.closing(sqlite3.connect(new_db)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    with Store(new_db) as store:
        [busy] = [c for c in store.conversations() if c.title == "Busy"]
        texts = [m.content for m in store.messages(busy.id)]
        assert texts[0] == "written just now" and set(texts[1:]) <= {"more"}


def test_missing_and_unreadable_reward_files_are_left_out_and_listed(app, tmp_path):
    app.mine.unlink()  # installed, gone from the rewards folder
    card_path(app.outside).unlink()  # an outside reward without its card
    folder_reward = tmp_path / "elsewhere" / "folder.onnx"
    folder_reward.mkdir()  # a path that cannot be read as a file
    gone = tmp_path / "elsewhere" / "gone.onnx"
    with Store(app.paths.store) as store:
        store.add_reward(folder_reward, "folder")
        store.add_reward(gone, "gone")
    summary = create_backup(app.paths, tmp_path / "backup.zip")
    reasons = {file.path: file.reason for file in summary.skipped}
    assert reasons == {
        str(app.mine): "missing",
        str(card_path(app.outside)): "missing",
        str(folder_reward): "is a directory",
        str(gone): "missing",
    }
    assert summary.rewards == 2  # the library's and the outside one
    assert "missing or unreadable" in summary.describe() and str(gone) in summary.describe()

    restored = restore_backup(tmp_path / "backup.zip", AppPaths(tmp_path / "new"))
    assert restored.skipped == summary.skipped and restored.rewards == 2
    with Store(tmp_path / "new" / "chats.db") as store:
        paths = {reward.name: reward.path for reward in store.rewards()}
    assert paths["bierce"] == str(tmp_path / "new" / "rewards" / "restored" / "bierce.onnx")
    assert paths["gone"] == str(gone)  # not in the backup: left as it was
    assert (tmp_path / "new" / "rewards" / "restored" / "bierce.onnx").read_bytes() == app.outside.read_bytes()


def test_outside_rewards_of_one_name_keep_apart_and_a_folder_without_chats_backs_up(tmp_path):
    paths = AppPaths(tmp_path / "old")
    first = make_reward(tmp_path / "a" / "style.onnx", seed=1)
    second = make_reward(tmp_path / "b" / "style.onnx", seed=2)
    make_reward(paths.rewards / "restored" / "style.onnx", seed=3)  # a restore's earlier outside reward
    with Store(paths.store) as store:
        store.add_reward(first, "first")
        store.add_reward(second, "second")
    summary = create_backup(paths, tmp_path / "backup.zip")
    assert summary.conversations == 0 and summary.rewards == 2 and summary.models == ()
    new = AppPaths(tmp_path / "new")
    restore_backup(tmp_path / "backup.zip", new)
    with Store(new.store) as store:
        restored = {reward.name: Path(reward.path) for reward in store.rewards()}
    assert restored["first"].read_bytes() == first.read_bytes()
    assert restored["second"].read_bytes() == second.read_bytes()
    assert len({restored["first"], restored["second"], new.rewards / "restored" / "style.onnx"}) == 3


def test_a_data_folder_without_a_database_backs_up_and_restores_empty(tmp_path):
    paths = AppPaths(tmp_path / "old")
    make_reward(paths.rewards / "mine.onnx", seed=1)
    summary = create_backup(paths, tmp_path / "backup.zip")
    assert (summary.conversations, summary.rewards, summary.files) == (0, 0, 3)
    assert not (paths.data / "chats.db").exists()  # a backup writes nothing in the data folder
    new = AppPaths(tmp_path / "new")
    restore_backup(tmp_path / "backup.zip", new)
    assert (new.rewards / "mine.onnx").read_bytes() == (paths.rewards / "mine.onnx").read_bytes()
    with Store(new.store) as store:
        assert store.conversations() == [] and store.rewards() == []


# -- bad archives: each one clear error, and nothing written ---------------------------------------------------
def rezip(
    source: Path,
    target: Path,
    *,
    replace: dict[str, bytes | None] | None = None,
    add: dict[str, bytes] | None = None,
    manifest: Callable[[dict], None] = lambda manifest: None,
    listed: bool = True,
    manifest_text: str | None = None,
    twice: str | None = None,
) -> Path:
    """A copy of a backup with members replaced, removed (None) or added, and its manifest edited; the manifest
    lists the new members with their true sha256 unless ``listed`` is False; ``manifest_text`` replaces it
    whole; ``twice`` names a member written a second time."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(source) as zipped:
        members = {name: zipped.read(name) for name in zipped.namelist() if name != MANIFEST}
        data = json.loads(zipped.read(MANIFEST))
    for name, content in {**replace, **add}.items():
        if content is None:
            members.pop(name)
        else:
            members[name] = content
    if listed:
        data["members"] = [
            {"name": name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
            for name, content in members.items()
        ]
    manifest(data)
    with zipfile.ZipFile(target, "w") as zipped:
        for name, content in members.items():
            zipped.writestr(zipfile.ZipInfo(name), content)
        if twice:
            with pytest.warns(UserWarning, match="Duplicate name"):
                zipped.writestr(twice, members[twice])
        zipped.writestr(MANIFEST, json.dumps(data) if manifest_text is None else manifest_text)
    return target


def just_bytes(data: bytes) -> Callable[[Path, Path], Path]:
    def make(backup: Path, target: Path) -> Path:
        target.write_bytes(data)
        return target

    return make


def foreign_zip(backup: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as zipped:
        zipped.writestr("report.txt", "not a backup")
    return target


def truncated(backup: Path, target: Path) -> Path:
    target.write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])
    return target


def flipped_byte(backup: Path, target: Path) -> Path:
    with zipfile.ZipFile(backup) as zipped:
        info = zipped.getinfo("chats.db")
    data = bytearray(backup.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.compress_size // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def changed_member(backup: Path, target: Path) -> Path:
    """One byte of a reward changed, its zip entry whole (a right CRC), the manifest's sha256 left as it was."""
    with zipfile.ZipFile(backup) as zipped:
        data = bytearray(zipped.read("rewards/mine.onnx"))
    data[len(data) // 2] ^= 0xFF
    return rezip(backup, target, replace={"rewards/mine.onnx": bytes(data)}, listed=False)


def with_manifest(change: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    return lambda backup, target: rezip(backup, target, manifest=change)


def with_member(name: str, content: bytes | None, *, listed: bool = True) -> Callable[[Path, Path], Path]:
    return lambda backup, target: rezip(backup, target, replace={name: content}, listed=listed)


BAD_ARCHIVES = {
    "random bytes": (just_bytes(os.urandom(4096)), "not a zip file"),
    "an empty file": (just_bytes(b""), "not a zip file"),
    "cut in half": (truncated, "not a zip file, or a damaged or cut-off one"),
    "a flipped byte": (flipped_byte, "chats.db"),
    "a foreign zip": (foreign_zip, "it has no manifest.json"),
    "another format": (with_manifest(lambda m: m.update(format="something-else")), '"format": "prt-chat-backup"'),
    "a newer format": (with_manifest(lambda m: m.update(version=BACKUP_VERSION + 1)), "newer version of the app"),
    "a newer schema": (
        with_manifest(lambda m: m.update(schema_version=SCHEMA_VERSION + 1)),
        "newer version of the app",
    ),
    "a manifest that is not JSON": (
        lambda backup, target: rezip(backup, target, manifest_text="{nope"),
        "manifest.json is not valid",
    ),
    "a manifest that is a list": (lambda backup, target: rezip(backup, target, manifest_text="[]"), '"format"'),
    "two files of one name": (
        lambda backup, target: rezip(backup, target, twice="rewards/mine.onnx"),
        "two files of one name",
    ),
    "a member going up": (with_member("rewards/../../evil.onnx", b"x"), "'rewards/../../evil.onnx'"),
    "an absolute member": (with_member("/tmp/evil.onnx", b"x"), "'/tmp/evil.onnx'"),
    "a drive letter": (with_member("rewards/C:/evil.onnx", b"x"), "'rewards/C:/evil.onnx'"),
    "a backslash": (with_member("rewards\\..\\evil.onnx", b"x"), "evil.onnx'"),
    "a member elsewhere": (with_member("models/big.gguf", b"x"), "'models/big.gguf'"),
    "a changed member": (changed_member, "rewards/mine.onnx does not match the sha256"),
    "a member of another size": (with_member("rewards/mine.onnx", b"x", listed=False), "not the size"),
    "an unlisted member": (with_member("rewards/extra.onnx", b"x", listed=False), "which its manifest does not list"),
    "a missing member": (with_member("rewards/mine.onnx", None, listed=False), "lacks rewards/mine.onnx"),
    "no database": (with_member("chats.db", None), "lists no chats.db"),
    "a database that is not one": (with_member("chats.db", b"SQLite format 3\x00" + bytes(200)), "not a chat database"),
    "a bad sha256": (with_manifest(lambda m: m["members"][0].update(sha256="abc")), "without a name, size and sha256"),
    "a reward without a member": (
        with_manifest(lambda m: m["rewards"].append({"path": "/x.onnx", "member": "rewards/none.onnx"})),
        "lists a reward without",
    ),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES, ids=list(BAD_ARCHIVES))
def test_a_bad_archive_is_one_clear_error_and_nothing_is_written(backup, tmp_path, case):
    make, fragment = BAD_ARCHIVES[case]
    archive = make(backup, tmp_path / "bad.zip")
    target = tmp_path / "new"
    with pytest.raises(StoreError) as refused:
        restore_backup(archive, AppPaths(target))
    message = str(refused.value)
    assert fragment in message and "\n" not in message, message
    if "newer version" in fragment:
        assert "update the app" in message
    else:
        assert "is not a PRT Chat backup" in message and "nothing was restored" in message
    assert not target.exists()
    target.mkdir()  # an existing empty data folder stays empty
    with pytest.raises(StoreError):
        restore_backup(archive, AppPaths(target))
    assert list(target.iterdir()) == []


def test_a_missing_archive_or_a_folder_in_its_place_is_one_clear_error(tmp_path):
    for archive in (tmp_path / "none.zip", tmp_path):
        with pytest.raises(StoreError, match="Cannot read"):
            restore_backup(archive, AppPaths(tmp_path / "new"))
    assert not (tmp_path / "new").exists()


# -- the target data folder --------------------------------------------------------------------------------------
def test_a_restore_into_a_folder_with_chats_is_refused_and_changes_nothing(backup, tmp_path):
    target = AppPaths(tmp_path / "target")
    with Store(target.store) as store:
        store.delete_conversation(store.create_conversation("Mine"))  # even one in the trash
    before = files_in(target.data)
    with pytest.raises(StoreError) as refused:
        restore_backup(backup, target)
    assert "restore into a new data folder, or delete all data first" in str(refused.value)
    assert files_in(target.data) == before


def test_a_restore_into_a_folder_without_chats_replaces_its_database_and_an_open_store_sees_it(app, backup, tmp_path):
    target = AppPaths(tmp_path / "target")
    with Store(target.store) as window:  # the window keeps its store open; a fresh app wrote a setting
        window.set_setting("window", {"width": 300})
        restore_backup(backup, target)
        assert window.setting("window") == {"width": 900, "theme": "dark"}
        assert sorted(c.title for c in window.conversations()) == ["Café plans ☕", "Rust ownership"]
    assert app_state(target.store)["messages"] == app_state(app.paths.store)["messages"]


def test_a_backup_of_an_older_schema_is_migrated_when_restored(backup, tmp_path):
    old_db = tmp_path / "schema-2.db"
    old = sqlite3.connect(old_db)
    database = sqlite_utils.Database(old)
    for migration in MIGRATIONS[:2]:
        migration(database)
    old.execute("PRAGMA user_version = 2")
    stamp = "2024-01-01T00:00:00.000000+00:00"
    old.execute(
        "INSERT INTO conversations (id, uid, title, created, updated) VALUES (1, 'u1', 'Old chat', ?, ?)",
        [stamp, stamp],
    )
    old.execute(
        "INSERT INTO messages (conversation_id, position, role, content, status, created, updated) "
        "VALUES (1, 0, 'user', 'ancient words', 'complete', ?, ?)",
        [stamp, stamp],
    )
    old.commit()
    old.close()
    archive = rezip(
        backup,
        tmp_path / "old.zip",
        replace={"chats.db": old_db.read_bytes()},
        manifest=lambda m: m.update(schema_version=2),
    )
    new = AppPaths(tmp_path / "new")
    summary = restore_backup(archive, new)
    assert summary.conversations == 1 and summary.messages == 1
    with Store(new.store) as store:
        [chat] = store.conversations()
        assert chat.title == "Old chat" and [m.content for m in store.messages(chat.id)] == ["ancient words"]
    with contextlib.closing(sqlite3.connect(new.store)) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


KILLED_RESTORE = """
import os, signal, sys
from pathlib import Path
import engine.app.backup as backup
from engine.app.paths import AppPaths

writes, kill_at = 0, int(sys.argv[3])
real_write = backup.write_atomically


def write_then_die(path, data):  # the scratch database first, then each reward file
    global writes
    if writes == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    writes += 1
    real_write(path, data)


backup.write_atomically = write_then_die
backup.restore_backup(Path(sys.argv[1]), AppPaths(Path(sys.argv[2])))
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("kill_at", [0, 1, 6])
def test_a_killed_restore_leaves_no_database_and_the_next_one_restores_everything(app, backup, tmp_path, kill_at):
    target = tmp_path / "new"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RESTORE, str(backup), str(target), str(kill_at)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr
    assert not (target / "chats.db").exists()  # the database is written last, whole
    summary = restore_backup(backup, AppPaths(target))
    assert summary.conversations == 3
    assert app_state(target / "chats.db")["messages"] == app_state(app.paths.store)["messages"]
    assert not (target / ".restore.partial").exists()
    assert not [path for path in target.rglob("*") if path.name.endswith(".partial")]


# -- writing the backup --------------------------------------------------------------------------------------------
def test_an_unwritable_target_is_one_clear_error_and_leaves_no_file(app, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    for out, fragment in ((tmp_path / "a-file" / "backup.zip", "Cannot write the backup"), (tmp_path, "is a folder")):
        with pytest.raises(StoreError, match=fragment):
            create_backup(app.paths, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "elsewhere", "old", "prt-home"]
    with pytest.raises(StoreError, match="There is no data folder"):
        create_backup(AppPaths(tmp_path / "nowhere"), tmp_path / "backup.zip")


def test_a_backup_replaces_an_older_one_only_when_it_is_whole(app, tmp_path):
    out = tmp_path / "backup.zip"
    out.write_bytes(b"last week's backup")
    create_backup(app.paths, out)
    with zipfile.ZipFile(out) as zipped:
        assert zipped.testzip() is None


# -- a real full disk ------------------------------------------------------------------------------------------------
NAMESPACES = (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"])
ON_A_SMALL_DISK = """
disk=$1 size=$2 keep=$3; shift 3
mount -t tmpfs -o size="$size" none "$disk" || exit 97
"$@"; status=$?
cp -a "$disk"/. "$keep"/
exit $status
"""


def on_a_small_disk(disk: Path, size: int, *command: str) -> tuple[subprocess.CompletedProcess, dict[str, bytes]]:
    """Run ``command`` with ``disk`` a tmpfs of ``size`` bytes; what it held afterwards."""
    keep = disk.with_name(disk.name + "-after")
    disk.mkdir()
    keep.mkdir()
    problems = []
    for namespace in NAMESPACES:
        try:
            ran = subprocess.run(
                [*namespace, "sh", "-c", ON_A_SMALL_DISK, "sh", str(disk), str(size), str(keep), *command],
                cwd=REPO,
                env=os.environ | {"PYTHONIOENCODING": "utf-8"},
                capture_output=True,
                text=True,
                timeout=300,
            )
        except OSError as error:
            problems.append(str(error))
            continue
        if ran.returncode != 97 and "unshare:" not in ran.stderr:
            return ran, files_in(keep)
        problems.append(ran.stderr.strip())
    pytest.fail(f"no private mount namespace for a small tmpfs here (see test_full_disk.py): {problems}", pytrace=False)


@pytest.mark.subprocess
def test_a_full_disk_during_a_backup_or_a_restore_is_one_clear_error_and_leaves_nothing(app, backup, tmp_path):
    size = backup.stat().st_size // 2
    ran, left = on_a_small_disk(
        tmp_path / "disk", size, sys.executable, "-m", "engine.cli", "backup", "create", str(tmp_path / "disk" / "b.zip"),
        "--data-folder", str(app.paths.data),
    )  # fmt: skip
    assert_one_line_error(ran, "The disk is full")
    assert "free some space" in ran.stderr and left == {}

    ran, left = on_a_small_disk(
        tmp_path / "data", size, sys.executable, "-m", "engine.cli", "backup", "restore", str(backup),
        "--data-folder", str(tmp_path / "data"),
    )  # fmt: skip
    assert_one_line_error(ran, "The disk is full")
    assert left == {}


# -- the command ---------------------------------------------------------------------------------------------------
@pytest.mark.subprocess
def test_prt_backup_create_and_restore_end_to_end(app, tmp_path):
    out, new = tmp_path / "backup.zip", tmp_path / "new"
    created = prt_process("backup", "create", str(out), "--data-folder", str(app.paths.data), "--json")
    assert created.returncode == 0, created.stderr
    summary = json.loads(created.stdout.strip().splitlines()[-1])
    assert summary["action"] == "backup" and summary["archive"] == str(out) and summary["rewards"] == 3
    restored = prt_process("backup", "restore", str(out), "--data-folder", str(new), "--json")
    assert restored.returncode == 0, restored.stderr
    summary = json.loads(restored.stdout.strip().splitlines()[-1])
    assert summary["action"] == "restore" and summary["conversations"] == 3
    assert summary["missing_models"] == ["SmolLM2-135M-Instruct", "tiny-a"]
    with Store(new / "chats.db") as store:
        assert {reward.name for reward in store.rewards()} == {"mine", "bierce", "concise"}
        assert all(Path(reward.path).is_relative_to(new) for reward in store.rewards())

    again = prt_process("backup", "restore", str(out), "--data-folder", str(new))
    assert_one_line_error(again, "restore into a new data folder, or delete all data first")


def test_prt_backup_says_what_it_did_and_what_it_skipped(app, tmp_path):
    app.mine.unlink()
    made = prt("backup", "create", str(tmp_path / "b.zip"), "--data-folder", str(app.paths.data))
    assert made.returncode == 0, made.stderr
    assert made.stdout.startswith("Backed up 3 chats (7 messages)") and "tiny-a" in made.stdout
    assert made.stderr == f"prt: skipped {app.mine} (missing)\n"
    restored = prt("backup", "restore", str(tmp_path / "b.zip"), "--data-folder", str(tmp_path / "new"))
    assert restored.returncode == 0 and restored.stdout.startswith("Restored 3 chats"), restored.stderr
    bad = prt("backup", "restore", str(tmp_path / "b.zip"), "--data-folder", str(tmp_path / "new"))
    assert_one_line_error(bad, "delete all data first")
    (tmp_path / "junk.zip").write_bytes(b"junk")
    junk = prt("backup", "restore", str(tmp_path / "junk.zip"), "--data-folder", str(tmp_path / "other"))
    assert_one_line_error(junk, "is not a PRT Chat backup")
    assert not (tmp_path / "other").exists()
