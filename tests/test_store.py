"""The SQLite store, through real database files: round trips, search, migrations, export/import, threads, a kill."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlite_utils

from engine.app.store import MIGRATIONS, SCHEMA_VERSION, Store, default_store_path
from engine.runtime.errors import StoreError
from rewards_onnx.data import DatasetError, Demonstration, PreferencePair, examples_from_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "data" / "chats.db"


@pytest.fixture
def store(db_path):
    with Store(db_path) as store:
        yield store


def fill(store: Store) -> dict[str, int]:
    """Two conversations with messages and feedback, one feedback row detached from any conversation."""
    first = store.create_conversation("Rust ownership", system_prompt="Be brief.", model_name="tiny")
    question = store.add_message(first, "user", "What is a borrow?")
    answer = store.add_message(first, "assistant", "A reference.", stats={"tokens": 3, "rewards": ["polite"]})
    second = store.create_conversation("Café plans")
    store.add_message(second, "user", "Where to go?")
    reply = store.add_message(second, "assistant", "Some", status="stopped")
    store.add_feedback(
        "thumbs_up",
        prompt="What is a borrow?",
        system="Be brief.",
        chosen="A reference.",
        conversation_id=first,
        message_id=answer,
    )
    store.add_feedback("thumbs_down", prompt="Where to go?", rejected="Some", conversation_id=second, message_id=reply)
    store.add_feedback("pick", prompt="Hi", chosen="Hello!", rejected="What?")
    return {"first": first, "second": second, "question": question, "answer": answer, "reply": reply}


def test_default_store_path_is_in_the_app_folder(isolated_app_folder):
    assert default_store_path() == isolated_app_folder / "chats.db"


def test_conversation_round_trip_and_edits(store):
    conversation_id = store.create_conversation("First", system_prompt="Be kind.", model_name="smol")
    stored = store.conversation(conversation_id)
    assert (stored.title, stored.system_prompt, stored.model_name) == ("First", "Be kind.", "smol")
    assert stored.created.endswith("+00:00") and len(stored.uid) == 32
    store.rename_conversation(conversation_id, "Renamed")
    store.set_system_prompt(conversation_id, "Be terse.")
    store.set_model_name(conversation_id, "gemma")
    stored = store.conversation(conversation_id)
    assert (stored.title, stored.system_prompt, stored.model_name) == ("Renamed", "Be terse.", "gemma")
    assert store.conversation(store.create_conversation()).title == "New chat"
    with pytest.raises(StoreError, match="no conversation 999"):
        store.conversation(999)
    with pytest.raises(StoreError, match="no conversation 999"):
        store.rename_conversation(999, "x")


def test_conversations_most_recently_updated_first(store):
    older = store.create_conversation("older")
    newer = store.create_conversation("newer")
    assert [c.id for c in store.conversations()] == [newer, older]
    store.add_message(older, "user", "bump")
    assert [c.id for c in store.conversations()] == [older, newer]
    store.add_message(newer, "user", "bump")
    assert [c.id for c in store.conversations()] == [newer, older]


def test_messages_round_trip_in_order(store):
    conversation_id = store.create_conversation()
    ids = [
        store.add_message(conversation_id, role, f"text {i}", stats={"i": i})
        for i, role in enumerate(["user", "assistant", "user", "assistant"])
    ]
    messages = store.messages(conversation_id)
    assert [m.id for m in messages] == ids
    assert [m.position for m in messages] == [0, 1, 2, 3]
    assert [m.stats for m in messages] == [{"i": i} for i in range(4)]
    assert [m.parent_id for m in messages] == [None, *ids[:3]]
    assert store.message(ids[1]).role == "assistant" and store.message(ids[1]).status == "complete"
    with pytest.raises(ValueError, match="role"):
        store.add_message(conversation_id, "system", "no")
    with pytest.raises(ValueError, match="status"):
        store.add_message(conversation_id, "user", "no", status="done")
    with pytest.raises(StoreError, match="no conversation 999"):
        store.add_message(999, "user", "orphan")
    with pytest.raises(StoreError, match="no message 999"):
        store.message(999)


def test_update_message_changes_only_what_is_given_and_commits_at_once(store, db_path):
    conversation_id = store.create_conversation()
    reply = store.add_message(conversation_id, "assistant", "", status="streaming", stats={"tokens": 0})
    store.update_message(reply, content="Partial rep")
    with Store(db_path) as other:  # a second connection sees the committed partial text
        seen = other.message(reply)
    assert (seen.content, seen.status, seen.stats) == ("Partial rep", "streaming", {"tokens": 0})
    store.update_message(reply, status="stopped", stats={"tokens": 3, "finish_reason": "stop"})
    final = store.message(reply)
    assert (final.content, final.status) == ("Partial rep", "stopped")
    assert final.stats == {"tokens": 3, "finish_reason": "stop"}
    assert final.updated > final.created
    with pytest.raises(StoreError, match="no message 999"):
        store.update_message(999, content="x")


def test_search_titles_and_messages_with_odd_input(store):
    rust = store.create_conversation("Rust ownership")
    store.add_message(rust, "user", 'How do I write c++ templates? "quoted" text')
    cafe = store.create_conversation("Café au lait")
    store.add_message(cafe, "user", "日本語のテキスト")
    operators = store.create_conversation("AND OR NOT")
    store.add_message(operators, "user", "NEAR(x y) col:value")

    def found(text):
        return [c.id for c in store.conversations(search=text)]

    assert found("own") == [rust]  # a prefix of a title word
    assert found("TEMPL") == [rust]  # a prefix of a message word, any case
    assert found("how templates") == [rust]
    assert rust in found("c++")
    assert found('"quoted') == [rust]
    assert found("cafe") == [cafe] and found("Café") == [cafe]
    assert found("日本") == [cafe]
    assert found("AND") == [operators] and found("NOT") == [operators]
    assert found("NEAR(x") == [operators] and found("col:value") == [operators]
    assert found("missing") == []
    for odd in ['"', "*", "-", "()", "^", "'", "🙂"]:
        assert found(odd) == []
    assert found("   ") == [operators, cafe, rust]


def test_search_follows_edits_and_deletes(store):
    conversation_id = store.create_conversation("Plans")
    reply = store.add_message(conversation_id, "assistant", "apples")
    store.update_message(reply, content="bananas")
    assert store.conversations(search="apples") == []
    assert [c.id for c in store.conversations(search="banana")] == [conversation_id]
    store.rename_conversation(conversation_id, "Fruit")
    assert store.conversations(search="plans") == [] and len(store.conversations(search="fruit")) == 1
    store.delete_conversation(conversation_id)
    assert store.conversations(search="banana") == [] and store.conversations(search="fruit") == []
    store.restore_conversation(conversation_id)
    assert [c.id for c in store.conversations(search="banana")] == [conversation_id]


def test_a_deleted_conversation_waits_in_the_trash_until_emptied(store):
    ids = fill(store)
    store.delete_conversation(ids["first"])
    assert ids["first"] not in [c.id for c in store.conversations()]
    assert store.messages(ids["first"]) != []  # still there: the window can undo
    store.restore_conversation(ids["first"])
    assert ids["first"] in [c.id for c in store.conversations()]
    store.delete_conversation(ids["first"])
    assert store.empty_trash() == 1 and store.empty_trash() == 0
    assert store.messages(ids["first"]) == []
    with pytest.raises(StoreError):
        store.message(ids["answer"])
    kept = [f for f in store.feedback() if f.kind == "thumbs_up"]
    assert [(f.conversation_id, f.message_id, f.prompt, f.chosen) for f in kept] == [
        (None, None, "What is a borrow?", "A reference.")
    ]
    assert [m.id for m in store.messages(ids["second"])] != []


def test_feedback_is_validated_listed_counted_and_removed(store):
    ids = fill(store)
    assert store.feedback_counts() == {"thumbs_up": 1, "thumbs_down": 1, "pick": 1, "edit": 0, "alternative": 0}
    assert [f.kind for f in store.feedback()] == ["thumbs_up", "thumbs_down", "pick"]
    [on_reply] = store.feedback(message_id=ids["reply"])
    assert (on_reply.kind, on_reply.rejected, on_reply.chosen) == ("thumbs_down", "Some", None)
    store.remove_feedback(on_reply.id)
    assert store.feedback(message_id=ids["reply"]) == []
    with pytest.raises(StoreError, match="kind"):
        store.add_feedback("love", prompt="p", chosen="c")
    with pytest.raises(StoreError, match="rejected text is empty"):
        store.add_feedback("edit", prompt="p", chosen="c", rejected="  ")
    with pytest.raises(StoreError, match="prompt and chosen text is empty"):
        store.add_feedback("thumbs_up", prompt="")
    with pytest.raises(StoreError, match="takes no rejected"):
        store.add_feedback("thumbs_up", prompt="p", chosen="c", rejected="r")
    assert store.feedback_counts()["edit"] == 0


def test_rewards_are_upserted_by_absolute_path_and_keep_their_dials(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store.add_reward("polite.onnx", "polite")
    [entry] = store.rewards()
    assert (entry.path, entry.name, entry.enabled, entry.weight) == (str(tmp_path / "polite.onnx"), "polite", True, 1.0)
    store.set_reward_state(tmp_path / "polite.onnx", enabled=False, weight=0.25)
    store.add_reward(tmp_path / "polite.onnx", "polite v2")
    [entry] = store.rewards()
    assert (entry.name, entry.enabled, entry.weight) == ("polite v2", False, 0.25)
    store.set_reward_state("polite.onnx", enabled=True)
    assert store.rewards()[0].enabled is True and store.rewards()[0].weight == 0.25
    store.add_reward("terse.onnx", "terse")
    assert [r.name for r in store.rewards()] == ["polite v2", "terse"]
    with pytest.raises(ValueError, match="weight"):
        store.set_reward_state("terse.onnx", weight=float("nan"))
    with pytest.raises(StoreError, match="no installed reward"):
        store.set_reward_state("gone.onnx", enabled=False)
    store.remove_reward("polite.onnx")
    assert [r.name for r in store.rewards()] == ["terse"]


def test_tuning_runs_newest_first(store):
    failed = store.start_tuning_run({"feedback": True})
    done = store.start_tuning_run({"documents": "/notes"})
    assert store.tuning_runs()[0].status == "running" and store.tuning_runs()[0].finished is None
    store.finish_tuning_run(failed, status="failed", error="out of memory")
    store.finish_tuning_run(done, status="done", reward_path=Path("/r/mine.onnx"), metrics={"held_out_nll": 1.5})
    runs = store.tuning_runs()
    assert [r.id for r in runs] == [done, failed]
    assert (runs[0].status, runs[0].reward_path, runs[0].metrics, runs[0].sources) == (
        "done",
        "/r/mine.onnx",
        {"held_out_nll": 1.5},
        {"documents": "/notes"},
    )
    assert (runs[1].status, runs[1].error, runs[1].metrics) == ("failed", "out of memory", {})
    with pytest.raises(ValueError, match="status"):
        store.finish_tuning_run(done, status="running")


def test_settings_hold_json_values(store):
    assert store.setting("theme") is None and store.setting("theme", "dark") == "dark"
    store.set_setting("theme", "light")
    store.set_setting("sampling", {"temperature": 0.7, "top_k": [40]})
    store.set_setting("theme", "dark")
    assert store.setting("theme") == "dark"
    assert store.setting("sampling") == {"temperature": 0.7, "top_k": [40]}
    with pytest.raises(ValueError, match="JSON"):
        store.set_setting("bad", object())


def test_a_schema_1_database_is_migrated_with_its_rows(db_path):
    db_path.parent.mkdir(parents=True)
    old = sqlite_utils.Database(db_path)
    MIGRATIONS[0](old)
    old.execute("PRAGMA user_version = 1")
    stamp = "2024-01-01T00:00:00.000000+00:00"
    old["conversations"].insert({"id": 7, "uid": "u7", "title": "Old chat", "created": stamp, "updated": stamp})
    old["messages"].insert(
        {
            "id": 3,
            "conversation_id": 7,
            "position": 0,
            "role": "user",
            "content": "ancient words",
            "status": "complete",
            "stats": '{"tokens": 2}',
            "created": stamp,
            "updated": stamp,
        }
    )
    old["feedback"].insert(
        {
            "conversation_id": 7,
            "message_id": 3,
            "kind": "thumbs_up",
            "prompt": "p",
            "chosen": "ancient words",
            "created": stamp,
        }
    )
    old.close()
    with Store(db_path) as store:
        assert store.conversation(7).title == "Old chat"
        assert store.messages(7)[0].content == "ancient words" and store.messages(7)[0].stats == {"tokens": 2}
        assert store.feedback()[0].message_id == 3
        assert [c.id for c in store.conversations(search="ancien")] == [7]  # the new index covers old rows
        store.set_setting("migrated", True)
    version = sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION >= 2


def test_a_database_from_a_newer_app_is_refused(db_path):
    Store(db_path).close()
    with sqlite3.connect(db_path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer version of the app.*update the app"):
        Store(db_path)


def test_a_garbage_file_is_refused_and_left_alone(tmp_path):
    garbage = tmp_path / "chats.db"
    garbage.write_bytes(b"this is not sqlite at all\n" * 200)
    with pytest.raises(StoreError, match="is not a chat database.*move it aside"):
        Store(garbage)
    assert garbage.read_bytes() == b"this is not sqlite at all\n" * 200


def test_a_folder_in_place_of_the_file_is_refused(tmp_path):
    with pytest.raises(StoreError, match="Cannot open the chat database"):
        Store(tmp_path)


def test_another_programs_database_is_refused(tmp_path):
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY)")
    with pytest.raises(StoreError, match="is not a chat database"):
        Store(foreign)


def exported(path: Path) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    del data["exported"]
    return data


def test_export_delete_all_import_round_trip(store, db_path, tmp_path):
    ids = fill(store)
    store.add_reward(tmp_path / "r.onnx", "r")
    store.set_setting("theme", "dark")
    store.start_tuning_run({})
    preset = store.save_preset("Work", system_prompt="Be formal.", dials={"/r.onnx": 0.5}, strength=1.2, sampling={})
    store.set_conversation_preset(ids["first"], preset)
    store.add_message(ids["first"], "assistant", "Another answer.", alternative_to=ids["answer"])
    before = tmp_path / "before.json"
    assert store.export_json(before) == {"conversations": 2, "messages": 5, "feedback": 3, "presets": 1}

    store.delete_all()
    assert store.conversations() == [] and store.feedback() == [] and store.rewards() == []
    assert store.tuning_runs() == [] and store.setting("theme") is None
    assert store.conversations(search="borrow") == []
    for file in db_path.parent.iterdir():  # the database, its WAL and shared memory: the text is gone from disk
        assert b"borrow" not in file.read_bytes()

    assert store.import_json(before) == {
        "conversations": 2,
        "messages": 5,
        "skipped": 0,
        "feedback": 3,
        "presets": 1,
    }
    after = tmp_path / "after.json"
    store.export_json(after)
    assert exported(after) == exported(before)
    [thumbs_up] = [f for f in store.feedback() if f.kind == "thumbs_up"]
    assert store.message(thumbs_up.message_id).content == "A reference."  # links survive the trip
    assert [c.title for c in store.conversations(search="borrow")] == ["Rust ownership"]


def test_importing_the_same_file_twice_adds_nothing(store, tmp_path):
    fill(store)
    export = tmp_path / "export.json"
    store.export_json(export)
    with Store(tmp_path / "fresh.db") as fresh:
        added = {"conversations": 2, "messages": 4, "skipped": 0, "feedback": 3, "presets": 0}
        assert fresh.import_json(export) == added
        skipped = {"conversations": 0, "messages": 0, "skipped": 2, "feedback": 0, "presets": 0}
        assert fresh.import_json(export) == skipped
        assert len(fresh.conversations()) == 2 and len(fresh.feedback()) == 3
    assert store.import_json(export)["skipped"] == 2 and len(store.feedback()) == 3


def _break_role(data):
    data["conversations"][1]["messages"][0]["role"] = "system"


def _break_feedback(data):
    data["feedback"][2]["rejected"] = None


def _break_position(data):  # passes the shape checks; fails inside the transaction, after rows went in
    data["conversations"][1]["messages"][1]["position"] = 0


def _break_type(data):
    data["conversations"][0]["messages"][0]["stats"] = "fast"


@pytest.mark.parametrize(
    "text, breaks, message",
    [
        ("{not json", None, "not valid JSON"),
        ("[]", None, "format"),
        ('{"format": "something-else"}', None, "format"),
        (
            '{"format": "prt-chat-export", "version": 1, "conversations": {}}',
            None,
            "conversations is missing or not a list",
        ),
        (None, _break_role, r"conversations\[1\].messages\[0\].role must be one of"),
        (None, _break_feedback, r"feedback\[2\].*rejected text is empty"),
        (None, _break_type, r"stats is missing or not an object"),
        (None, _break_position, "UNIQUE constraint failed"),
    ],
)
def test_a_malformed_import_is_refused_and_nothing_is_imported(store, tmp_path, text, breaks, message):
    source = tmp_path / "source.json"
    with Store(tmp_path / "source.db") as other:
        fill(other)
        other.export_json(source)
    if breaks:
        data = json.loads(source.read_text(encoding="utf-8"))
        breaks(data)
        text = json.dumps(data)
    broken = tmp_path / "broken.json"
    broken.write_text(text, encoding="utf-8")
    with pytest.raises(StoreError, match=message) as refused:
        store.import_json(broken)
    assert "nothing was imported" in str(refused.value)
    assert store.conversations() == [] and store.feedback() == []
    assert store.conversations(search="borrow") == []


def test_imports_from_a_newer_app_or_a_missing_file_are_refused(store, tmp_path):
    newer = tmp_path / "newer.json"
    newer.write_text('{"format": "prt-chat-export", "version": 99}')
    with pytest.raises(StoreError, match="newer version of the app"):
        store.import_json(newer)
    with pytest.raises(StoreError, match="Cannot read"):
        store.import_json(tmp_path / "missing.json")


def test_threads_share_one_store(store):
    conversation_id = store.create_conversation()
    writers, per_writer = 6, 25
    failures = []

    def write(worker):
        try:
            for i in range(per_writer):
                message = store.add_message(conversation_id, "user", f"{worker}-{i}", status="streaming")
                store.update_message(message, content=f"{worker}-{i} done", status="complete")
                store.conversations(search=f"{worker}")
        except Exception as error:  # collected: an exception in a thread would not fail the test
            failures.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    messages = store.messages(conversation_id)
    assert [m.position for m in messages] == list(range(writers * per_writer))
    assert sorted(m.content for m in messages) == sorted(
        f"{w}-{i} done" for w in range(writers) for i in range(per_writer)
    )


STREAMING_CHILD = """
import sys
sys.path.insert(0, {repo!r})
from engine.app.store import Store
store = Store({path!r})
conversation = store.create_conversation("Kill test")
store.add_message(conversation, "user", "Tell me a long story")
reply = store.add_message(conversation, "assistant", "", status="streaming")
text = ""
while True:
    text += "word "
    store.update_message(reply, content=text)
    print(len(text), flush=True)
"""


@pytest.mark.subprocess
def test_a_killed_generation_keeps_its_partial_reply(db_path):
    code = STREAMING_CHILD.format(repo=str(REPO), path=str(db_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reported = []
        while len(reported) < 25:
            line = child.stdout.readline()
            assert line, f"the child stopped early: {child.stderr.read()}"
            reported.append(int(line))
    finally:
        child.kill()  # SIGKILL: no cleanup, no close
        child.wait()
    with Store(db_path) as store:
        [conversation] = store.conversations()
        user, reply = store.messages(conversation.id)
    assert (user.role, user.content) == ("user", "Tell me a long story")
    assert (reply.role, reply.status) == ("assistant", "streaming")
    assert len(reply.content) >= reported[-1] > 0
    assert reply.content == "word " * (len(reply.content) // 5)
    with sqlite3.connect(db_path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_examples_from_store_turn_feedback_into_training_data(store):
    store.add_feedback("thumbs_up", prompt="Greet me", system="Be warm.", chosen="Hello, friend!")
    store.add_feedback("edit", prompt="Sum 2+2", chosen="4", rejected="5")
    store.add_feedback("pick", prompt="Name a colour", chosen="Teal", rejected="Beige")
    store.add_feedback("thumbs_down", prompt="Greet me", system="Be warm.", rejected="Go away.")
    store.add_feedback("thumbs_down", prompt="Unanswered", rejected="Meh.")
    examples, counts = examples_from_store(store)
    assert examples == [
        Demonstration("Greet me", "Hello, friend!", "Be warm."),
        Demonstration("Sum 2+2", "4"),
        PreferencePair("Sum 2+2", "4", "5"),
        PreferencePair("Name a colour", "Teal", "Beige"),
        PreferencePair("Greet me", "Hello, friend!", "Go away.", "Be warm."),
    ]
    assert counts == {"demonstrations": 2, "pairs": 3, "unused": 1}


def test_examples_from_store_without_usable_feedback_is_an_error(store):
    with pytest.raises(DatasetError, match="No usable feedback yet.*thumbs up, edit a reply or pick"):
        examples_from_store(store)
    store.add_feedback("thumbs_down", prompt="Hi", rejected="Bye.")
    with pytest.raises(DatasetError, match=r"\(1 thumbs down"):
        examples_from_store(store)


def test_a_style_profile_is_saved_all_or_nothing(store, tmp_path):
    dials = {tmp_path / "concise.onnx": ("concise", -1.5), tmp_path / "casual.onnx": ("casual", 0.0)}
    with pytest.raises(StoreError, match="the chosen text is empty"):
        store.save_style_profile({"profile": 1}, picks=[("Q?", "", "B")], dials=dials)
    with pytest.raises(ValueError, match="finite"):
        store.save_style_profile({"profile": 1}, picks=[], dials={tmp_path / "x.onnx": ("x", float("nan"))})
    assert (store.setting("style_profile"), store.feedback(), store.rewards()) == (None, [], [])

    store.save_style_profile({"profile": 1}, picks=[("Q?", "A", "B")], dials=dials)
    store.set_reward_state(tmp_path / "casual.onnx", weight=0.3)
    store.save_style_profile({"profile": 2}, picks=[], dials=dials)  # a retune resets the dials it owns
    assert store.setting("style_profile") == {"profile": 2}
    assert [(f.kind, f.prompt, f.chosen, f.rejected) for f in store.feedback()] == [("pick", "Q?", "A", "B")]
    assert [(r.name, r.enabled, r.weight) for r in store.rewards()] == [("casual", False, 0.0), ("concise", True, -1.5)]
