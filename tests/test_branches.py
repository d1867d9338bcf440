"""The store's conversation trees: alternatives and branches, the pairs they yield for tuning, migration from every
earlier schema (with its snapshot), interrupted replies, presets, and exports of both versions."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest
import sqlite_utils

from engine.app.store import MIGRATIONS, SCHEMA_VERSION, Store
from engine.runtime.errors import StoreError
from engine.runtime.rewards import RewardCard, card_path
from helpers import other_prompts, prt
from rewards_onnx.data import PreferencePair, examples_from_store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "chats.db") as store:
        yield store


def texts(store: Store, conversation_id: int) -> list[str]:
    return [message.content for message in store.messages(conversation_id)]


def answered_twice(store: Store, question: str, *, continue_from: str | None = "second", seen: bool = True) -> dict:
    """A question with two replies (the second regenerated), the user going on after ``continue_from``."""
    chat = store.create_conversation(question, system_prompt="Be kind.")
    asked = store.add_message(chat, "user", question)
    first = store.add_message(chat, "assistant", f"First answer to {question}")
    second = store.add_message(chat, "assistant", f"Second answer to {question}", alternative_to=first)
    store.mark_seen([asked, second] + ([first] if seen else []))
    if continue_from == "first":
        store.show_alternative(first)
    if continue_from is not None:
        store.add_message(chat, "user", "Thanks, and then?")
    return {"chat": chat, "asked": asked, "first": first, "second": second}


def test_regenerated_replies_and_edited_questions_form_a_tree_that_survives_a_restart(tmp_path):
    with Store(tmp_path / "chats.db") as store:
        ids = answered_twice(store, "Why is the sky blue?")
        chat = ids["chat"]
        assert texts(store, chat) == [
            "Why is the sky blue?",
            "Second answer to Why is the sky blue?",
            "Thanks, and then?",
        ]
        assert [m.id for m in store.alternatives(ids["first"])] == [ids["first"], ids["second"]]
        edited = store.add_message(chat, "user", "Why is the sea blue?", alternative_to=ids["asked"])
        store.add_message(chat, "assistant", "Water absorbs red light.")
        assert texts(store, chat) == ["Why is the sea blue?", "Water absorbs red light."]
        store.show_alternative(ids["asked"])  # back to the old branch, as it was last shown
        assert texts(store, chat)[1:] == ["Second answer to Why is the sky blue?", "Thanks, and then?"]
        store.show_alternative(ids["first"])
        assert texts(store, chat) == ["Why is the sky blue?", "First answer to Why is the sky blue?"]
        assert len(store.message_tree(chat)) == 6
    with Store(tmp_path / "chats.db") as reopened:
        assert texts(reopened, chat) == ["Why is the sky blue?", "First answer to Why is the sky blue?"]
        reopened.show_alternative(edited)
        assert texts(reopened, chat) == ["Why is the sea blue?", "Water absorbs red light."]
    with pytest.raises(StoreError, match="not in conversation"):
        with Store(tmp_path / "chats.db") as store:
            store.add_message(store.create_conversation(), "assistant", "x", alternative_to=ids["first"])


def test_the_reply_continued_from_is_preferred_over_each_other_reply_the_user_saw(store):
    answered_twice(store, "Q1")  # the second, continued: second over first
    answered_twice(store, "Q2", continue_from="first")  # first over second
    answered_twice(store, "Q3", seen=False)  # the first was never shown: no pair
    answered_twice(store, "Q4", continue_from=None)  # nobody went on: no choice was made
    pairs = [f for f in store.training_feedback() if f.kind == "alternative"]
    assert [(p.prompt, p.chosen, p.rejected, p.system, p.id) for p in pairs] == [
        ("Q1", "Second answer to Q1", "First answer to Q1", "Be kind.", None),
        ("Q2", "First answer to Q2", "Second answer to Q2", "Be kind.", None),
    ]
    assert store.feedback_counts()["alternative"] == 2
    assert store.feedback() == []  # derived, never stored: they follow what the user does next
    examples, summary = examples_from_store(store)
    assert PreferencePair("Q1", "Second answer to Q1", "First answer to Q1", "Be kind.") in examples
    assert summary["pairs"] == 2


def test_replies_that_failed_or_whose_chat_is_deleted_give_no_pair(store):
    ids = answered_twice(store, "Q")
    store.update_message(ids["first"], status="error")
    assert store.feedback_counts()["alternative"] == 0
    store.update_message(ids["first"], status="stopped")
    assert store.feedback_counts()["alternative"] == 1
    store.delete_conversation(ids["chat"])
    assert store.feedback_counts()["alternative"] == 0
    store.restore_conversation(ids["chat"])
    assert store.feedback_counts()["alternative"] == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_pairs_reach_prt_tune_feedback(tmp_path, tiny_gguf):
    database = tmp_path / "chats.db"
    with Store(database) as store:
        for prompt in other_prompts(6):
            answered_twice(store, prompt)
        answered_twice(store, "never shown", seen=False)
    out = tmp_path / "from-alternatives.onnx"
    tuned = prt(
        "tune", "--model", str(tiny_gguf), "--feedback", str(database), "--out", str(out),
        "--epochs", "1", "--ctx", "512", "--json",
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert RewardCard.load(card_path(out)).training_data["preference_pairs"] == 6


def _schema(db_path, version: int) -> None:
    """A database at an earlier schema, with a conversation, three messages and feedback on one of them."""
    db_path.parent.mkdir(parents=True, exist_ok=True)
    old = sqlite_utils.Database(db_path)
    for migration in MIGRATIONS[:version]:
        migration(old)
    old.execute(f"PRAGMA user_version = {version}")
    stamp = "2024-01-01T00:00:00.000000+00:00"
    old["conversations"].insert({"id": 7, "uid": "u7", "title": "Old chat", "created": stamp, "updated": stamp})
    for position, (role, text) in enumerate([("user", "ancient words"), ("assistant", "old reply"), ("user", "more")]):
        old["messages"].insert(
            {
                "id": 10 + position,
                "conversation_id": 7,
                "position": position,
                "role": role,
                "content": text,
                "status": "complete",
                "stats": "{}",
                "created": stamp,
                "updated": stamp,
            }
        )
    old["feedback"].insert(
        {
            "conversation_id": 7,
            "message_id": 11,
            "kind": "thumbs_up",
            "prompt": "p",
            "chosen": "old reply",
            "created": stamp,
        }
    )
    old.close()


def _rows(db_path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        return [f"user_version {connection.execute('PRAGMA user_version').fetchone()[0]}", *connection.iterdump()]


@pytest.mark.parametrize("version", range(1, SCHEMA_VERSION))
def test_every_earlier_schema_is_migrated_after_a_snapshot(tmp_path, version):
    db_path = tmp_path / "chats.db"
    _schema(db_path, version)
    before = _rows(db_path)
    with Store(db_path) as store:
        path = store.messages(7)
        assert [m.content for m in path] == ["ancient words", "old reply", "more"]
        assert [m.parent_id for m in path] == [None, 10, 11] and all(m.seen for m in path)
        assert store.feedback()[0].message_id == 11
        assert [c.id for c in store.conversations(search="ancien")] == [7]
        assert store.conversation(7).preset_id is None
        store.add_message(7, "assistant", "a new reply")
        assert store.messages(7)[-1].parent_id == 12
    assert _rows(db_path)[0] == f"user_version {SCHEMA_VERSION}"
    snapshot = tmp_path / f"chats.db.schema-{version}.bak"
    assert _rows(snapshot) == before  # the database exactly as it was before the upgrade
    with Store(db_path):  # already current: no new snapshot
        pass
    assert sorted(p.name for p in tmp_path.iterdir() if ".bak" in p.name) == [snapshot.name]


def test_a_reply_cut_off_by_a_crash_is_marked_interrupted_and_keeps_its_text(store):
    chat = store.create_conversation()
    store.add_message(chat, "user", "Tell me a story")
    cut = store.add_message(chat, "assistant", "Once upon a time", status="streaming")
    live = store.add_message(store.create_conversation(), "assistant", "Still writing", status="streaming")
    stale = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat(timespec="microseconds")
    store._db.execute("UPDATE messages SET updated = ? WHERE id = ?", [stale, cut])  # the last write, 5 minutes ago
    assert store.mark_interrupted() == 1
    assert (store.message(cut).status, store.message(cut).content) == ("interrupted", "Once upon a time")
    assert store.message(live).status == "streaming"  # written just now: another process may be streaming it


def test_presets_are_saved_replaced_listed_and_deleted(store, tmp_path):
    reward = str(tmp_path / "r.onnx")
    work = store.save_preset("Work", system_prompt="Be formal.", dials={reward: 0.5}, strength=1.2, sampling={})
    casual = store.save_preset("casual", system_prompt="", dials={}, strength=1.0, sampling={"temperature": 1.1})
    assert store.save_preset("Work", system_prompt="Be terse.", dials={}, strength=0.8, sampling={}) == work
    assert [(p.name, p.system_prompt, p.strength) for p in store.presets()] == [
        ("casual", "", 1.0),
        ("Work", "Be terse.", 0.8),
    ]
    assert store.preset(casual).sampling == {"temperature": 1.1}
    chat = store.create_conversation()
    store.set_conversation_preset(chat, casual)
    store.delete_preset(casual)
    assert store.conversation(chat).preset_id is None
    with pytest.raises(StoreError, match="needs a name"):
        store.save_preset("  ", system_prompt="", dials={}, strength=1.0, sampling={})
    with pytest.raises(ValueError, match="finite"):
        store.save_preset("x", system_prompt="", dials={reward: float("nan")}, strength=1.0, sampling={})


def test_relocated_rewards_follow_in_the_installed_list_and_in_presets(store, tmp_path):
    old, new = str(tmp_path / "old" / "r.onnx"), str(tmp_path / "new" / "r.onnx")
    store.add_reward(old, "r")
    store.set_reward_state(old, weight=0.7)
    preset = store.save_preset("P", system_prompt="", dials={old: 0.7}, strength=1.0, sampling={})
    store.relocate_rewards({old: new})
    assert [(r.path, r.weight) for r in store.rewards()] == [(new, 0.7)]
    assert store.preset(preset).dials == {new: 0.7}


def test_an_export_keeps_the_tree_and_a_version_1_export_imports_as_a_path(store, tmp_path):
    ids = answered_twice(store, "Q")
    store.set_conversation_preset(
        ids["chat"], store.save_preset("P", system_prompt="", dials={}, strength=1.0, sampling={})
    )
    export = tmp_path / "export.json"
    store.export_json(export)
    with Store(tmp_path / "other.db") as other:
        other.import_json(export)
        [chat] = other.conversations()
        assert texts(other, chat.id) == texts(store, ids["chat"])
        assert len(other.message_tree(chat.id)) == 4 and other.feedback_counts()["alternative"] == 1
        assert other.preset(chat.preset_id).name == "P"

    version_1 = json.loads(export.read_text(encoding="utf-8"))
    version_1["version"] = 1
    del version_1["presets"]
    [conversation] = version_1["conversations"]
    conversation["uid"] = "from-version-1"
    del conversation["preset"]
    for message in conversation["messages"]:
        for key in ("parent", "active", "seen"):
            del message[key]
    (tmp_path / "v1.json").write_text(json.dumps(version_1), encoding="utf-8")
    with Store(tmp_path / "third.db") as third:
        third.import_json(tmp_path / "v1.json")
        [chat] = third.conversations()
        assert [m.parent_id is None for m in third.messages(chat.id)] == [True, False, False, False]


def test_an_export_whose_parent_is_not_an_earlier_message_is_refused(store, tmp_path):
    answered_twice(store, "Q")
    export = tmp_path / "export.json"
    store.export_json(export)
    data = json.loads(export.read_text(encoding="utf-8"))
    data["conversations"][0]["messages"][0]["parent"] = 3
    export.write_text(json.dumps(data), encoding="utf-8")
    with Store(tmp_path / "other.db") as other:
        with pytest.raises(StoreError, match="parent is 3, not the position of a message listed before it"):
            other.import_json(export)
        assert other.conversations() == []
