"""Every importer fed damaged input: each bad input gives one PrtError (one line) and changes nothing.

Importers: a chat export (Store.import_json), the chat database itself (opening and migrating it), reward
cards and ONNX reward files (RewardModel), the app's settings (AppSettings.load, desktop.json), GGUF models
(check_gguf_file, BaseModel, ``prt generate``), preference profiles and feature files (engine/app/pref.py).
Pure-Python importers get a few hundred hypothesis examples each (derandomized: every run sees the same
inputs); file damage is a deterministic loop over offsets. llama.cpp may abort the whole process on a
damaged model, so GGUF files are loaded in child processes.
"""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGUFReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from desktop.settings import SETTING_RANGES, AppSettings, configured_data_folder, startup_paths
from desktop.settings_dialog import SettingsDialog
from engine.app.models import app_data_dir
from engine.app.paths import AppPaths
from engine.app.pref import PreferencePosterior, Profile, ProfileError, load_features
from engine.app.store import SCHEMA_VERSION, Store
from engine.runtime.base_model import BaseModel, BaseModelConfig
from engine.runtime.errors import ModelFileError, PrtError, RewardFileError, RewardRuntimeError, StoreError
from engine.runtime.gguf_metadata import check_gguf_file
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import RewardCard, RewardModel, card_path, save_reward
from helpers import assert_one_line_error, prt_process
from tiny_models import small_reward_shape, write_reward

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- JSON values of every type, and which type a value is -------------------------------------------------
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def json_type(value) -> str:
    kinds = (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "list"),
        (dict, "object"),
        (type(None), "null"),
    )
    return next(name for kind, name in kinds if isinstance(value, kind))


def values_not_of(allowed: tuple[str, ...]):
    return json_values.filter(lambda value: json_type(value) not in allowed)


def deeply_nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def cut_offsets(size: int, *, every: int) -> list[int]:
    """Every offset of the first 64 bytes, then every ``every``-th: each one a strict prefix."""
    return sorted(set(range(min(64, size))) | set(range(0, size, every)))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert message and "\n" not in message, message
    return message


# -- chat export JSON --------------------------------------------------------------------------------------
EXPORT_FIELDS = {  # record kind -> field -> the JSON types an export may hold there
    "file": {"format": ("string",), "version": ("integer",), "conversations": ("list",), "feedback": ("list",)},
    "conversation": {
        "uid": ("string",),
        "title": ("string",),
        "system_prompt": ("string",),
        "model_name": ("string",),
        "created": ("string",),
        "updated": ("string",),
        "messages": ("list",),
    },
    "message": {
        "position": ("integer",),
        "role": ("string",),
        "content": ("string",),
        "status": ("string",),
        "stats": ("object",),
        "created": ("string",),
        "updated": ("string",),
    },
    "feedback": {
        "kind": ("string",),
        "prompt": ("string",),
        "system": ("string",),
        "chosen": ("string", "null"),
        "rejected": ("string", "null"),
        "created": ("string",),
        "conversation_uid": ("string", "null"),
        "message_position": ("integer", "null"),
    },
}


@pytest.fixture
def export_file(tmp_path) -> Path:
    """A real export: three conversations with messages and stats, feedback on messages and detached."""
    with Store(tmp_path / "source" / "chats.db") as source:
        for n in range(3):
            conversation = source.create_conversation(f"Chat {n} ☕", system_prompt="Be brief.", model_name="tiny")
            source.add_message(conversation, "user", f"Question {n}?")
            answer = source.add_message(
                conversation,
                "assistant",
                f"Answer {n}.",
                stats={"tokens": 3, "tokens_per_second": 12.5, "rewards": ["brief"]},
            )
            source.add_feedback(
                "thumbs_up",
                prompt=f"Question {n}?",
                chosen=f"Answer {n}.",
                conversation_id=conversation,
                message_id=answer,
            )
        source.add_feedback("pick", prompt="Hi", chosen="Hello!", rejected="What?")
        path = tmp_path / "export.json"
        source.export_json(path)
    return path


@pytest.fixture
def target(tmp_path):
    """The store imports go into; it holds data of its own, so 'unchanged' means something."""
    with Store(tmp_path / "target" / "chats.db") as store:
        conversation = store.create_conversation("Mine")
        store.add_message(conversation, "user", "My own words")
        store.add_feedback("pick", prompt="Q", chosen="A", rejected="B")
        store.set_setting("desktop", {"temperature": 0.3})
        yield store


def dump(store: Store) -> list[str]:
    """The schema version and every row of every table (search indexes too), read through a second connection."""
    with contextlib.closing(sqlite3.connect(store.path)) as connection:
        return [f"user_version {connection.execute('PRAGMA user_version').fetchone()[0]}", *connection.iterdump()]


def assert_import_refused(store: Store, path: Path) -> StoreError:
    before = dump(store)
    with pytest.raises(StoreError) as refused:
        store.import_json(path)
    assert dump(store) == before
    one_line(refused.value)
    return refused.value


def export_records(data: dict) -> list[tuple[str, dict]]:
    records = [("file", data)]
    for conversation in data["conversations"]:
        records += [("conversation", conversation)] + [("message", message) for message in conversation["messages"]]
    return records + [("feedback", feedback) for feedback in data["feedback"]]


def test_the_real_export_imports_once_then_is_skipped(target, export_file):
    before = dump(target)
    added = {"conversations": 3, "messages": 6, "skipped": 0, "feedback": 4, "presets": 0}
    assert target.import_json(export_file) == added
    after = dump(target)
    assert len(after) > len(before) and any("Question 1?" in line for line in after)  # the dump sees an import
    skipped = {"conversations": 0, "messages": 0, "skipped": 3, "feedback": 0, "presets": 0}
    assert target.import_json(export_file) == skipped
    assert dump(target) == after


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused(target, tmp_path, data):
    path = tmp_path / "random.json"
    path.write_bytes(data)
    assert_import_refused(target, path)


def test_an_export_truncated_anywhere_is_refused(target, export_file, tmp_path):
    text = export_file.read_bytes()
    offsets = cut_offsets(len(text), every=max(1, len(text) // 150))
    path = tmp_path / "cut.json"
    for offset in offsets:
        path.write_bytes(text[:offset])
        assert_import_refused(target, path)
    assert len(offsets) > 150


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_a_wrong_type_or_a_missing_key_in_any_field_is_refused(target, export_file, tmp_path, data):
    export = json.loads(export_file.read_text(encoding="utf-8"))
    kind, record = data.draw(st.sampled_from(export_records(export)))
    name = data.draw(st.sampled_from(sorted(EXPORT_FIELDS[kind])))
    allowed = EXPORT_FIELDS[kind][name]
    if "null" not in allowed and data.draw(st.booleans()):
        del record[name]
    else:
        record[name] = data.draw(values_not_of(allowed))
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(export), encoding="utf-8")  # NaN and Infinity as JavaScript writes them
    assert "nothing was imported" in str(assert_import_refused(target, path))


def _conversation(export: dict) -> dict:
    return export["conversations"][1]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda e: e.update(version=10**30), "newer version"),
        (lambda e: e.update(version=0), "version 0"),
        (lambda e: _conversation(e)["messages"][0].update(position=10**30), "position is"),
        (lambda e: _conversation(e)["messages"][0].update(position=-1), "position is -1"),
        (lambda e: e["feedback"][0].update(message_position=2**63), "message_position is"),
        (lambda e: _conversation(e)["messages"][1].update(position=0), "UNIQUE constraint"),
        (lambda e: e["conversations"].append(dict(_conversation(e))), "has the uid of conversations[1]"),
        (lambda e: _conversation(e)["messages"][0].update(content="broken \ud800 surrogate"), "not valid Unicode"),
    ],
)
def test_huge_numbers_duplicate_ids_and_lone_surrogates_are_refused(target, export_file, tmp_path, damage, message):
    export = json.loads(export_file.read_text(encoding="utf-8"))
    damage(export)
    path = tmp_path / "damaged.json"
    path.write_text(json.dumps(export), encoding="utf-8")  # ensure_ascii: a lone surrogate stays a \u escape
    assert message in str(assert_import_refused(target, path))


@pytest.mark.parametrize(
    "text",
    [
        deeply_nested(100_000),
        '{"format": "prt-chat-export", "version": 1, "conversations": ' + deeply_nested(5_000),
        "9" * 5_000,
        "NaN",
        '{"format": "prt-chat-export", "version": Infinity}',
        "\ufeff{}",
        "é".encode("latin-1"),
    ],
    ids=["deep", "deep-inside", "huge-number", "nan", "infinity", "bom", "latin-1"],
)
def test_deep_nesting_huge_numbers_and_other_encodings_are_refused(target, tmp_path, text):
    path = tmp_path / "odd.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    assert_import_refused(target, path)


def test_huge_strings_and_nesting_python_can_read_are_imported_whole(target, export_file, tmp_path):
    export = json.loads(export_file.read_text(encoding="utf-8"))
    huge = "long text " * 300_000  # 3 MB
    _conversation(export)["title"] = _conversation(export)["messages"][0]["content"] = huge
    _conversation(export)["messages"][1]["stats"] = {"deep": json.loads(deeply_nested(300))}
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(export), encoding="utf-8")
    assert target.import_json(path)["messages"] == 6
    imported = next(c for c in target.conversations() if c.title == huge)
    assert target.messages(imported.id)[0].content == huge


# -- the chat database itself: opening and migrating it -------------------------------------------------------
def use_store(path: Path, export_to: Path) -> None:
    """Open the store and read everything the app reads."""
    with Store(path) as store:
        for conversation in store.conversations():
            store.messages(conversation.id)
        store.conversations(search="message")
        store.feedback(), store.feedback_counts(), store.rewards(), store.tuning_runs(), store.setting("desktop")
        store.export_json(export_to)


@pytest.fixture
def database(tmp_path) -> bytes:
    path = tmp_path / "made" / "chats.db"
    with Store(path) as store:
        for n in range(8):
            conversation = store.create_conversation(f"Chat {n}", system_prompt="Be brief. " * 5)
            for turn in range(4):
                store.add_message(
                    conversation, ("user", "assistant")[turn % 2], f"message {n} {turn} " * 12, stats={"tokens": turn}
                )
        store.add_feedback("pick", prompt="Q", chosen="A", rejected="B")
        store.start_tuning_run({"feedback": 1})
        store.set_setting("desktop", {"temperature": 0.5})
    return path.read_bytes()


def damaged_databases(data: bytes) -> list[tuple[str, bytes]]:
    """Cut at 40 offsets; one byte flipped in the 100-byte header and at 100 offsets over the pages;
    schema versions the app never wrote."""
    rng = np.random.default_rng(3)
    cases = [(f"cut-{offset}", data[:offset]) for offset in sorted(rng.choice(len(data), 40, replace=False))]
    for offset in list(range(100)) + sorted(rng.choice(range(100, len(data)), 100, replace=False)):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        cases.append((f"flip-{offset}", bytes(flipped)))
    for version in (-1, -(2**31), SCHEMA_VERSION + 1, 2**31 - 1):
        versioned = bytearray(data)
        versioned[60:64] = version.to_bytes(4, "big", signed=True)  # where SQLite keeps PRAGMA user_version
        cases.append((f"version-{version}", bytes(versioned)))
    return cases


def test_a_damaged_chat_database_gives_a_store_error_and_stays_as_it_was(database, tmp_path):
    cases = damaged_databases(database)
    refused = 0
    for name, data in cases:
        folder = tmp_path / "cases" / name
        folder.mkdir(parents=True)
        (folder / "chats.db").write_bytes(data)
        try:
            use_store(folder / "chats.db", tmp_path / "export.json")
        except StoreError as error:
            one_line(error)
            refused += 1
        assert (folder / "chats.db").read_bytes() == data, name
        assert [path.name for path in folder.iterdir()] == ["chats.db"], name
        shutil.rmtree(folder)
    assert len(cases) == 244 and refused > 80  # the rest changed a text or a byte SQLite does not read


# -- reward cards ---------------------------------------------------------------------------------------------
CARD_FIELDS = {
    "name": ("string",),
    "vocabulary_fingerprint": ("string",),
    "vocabulary_size": ("integer",),
    "base_model_name": ("string",),
    "base_model_sha256": ("string", "null"),
    "description": ("string",),
    "label": ("string",),
    "network": ("object",),
    "training_data": ("object",),
    "metrics": ("object",),
    "created": ("string",),
    "onnx_sha256": ("string",),
    "format_version": ("integer",),
}
REQUIRED_CARD_FIELDS = ("name", "vocabulary_fingerprint", "vocabulary_size", "base_model_name")
VOCAB = 256


@pytest.fixture
def reward_path(tmp_path) -> Path:
    """A small real reward whose card carries the figures the app shows."""
    (tmp_path / "rewards").mkdir()
    path = write_reward(
        tmp_path / "rewards" / "style.onnx",
        random_reward_weights(small_reward_shape(VOCAB), seed=5),
        vocabulary_fingerprint="sha256:test",
        base_name="tiny",
    )
    card = json.loads(card_path(path).read_text())
    card["metrics"] = {"held_out": {"tokens": 40, "base_nll": 2.5, "steered_nll": 2.25}}
    card["training_data"] = {"demonstrations": 12}
    card_path(path).write_text(json.dumps(card))
    return path


def folder_contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def assert_reward_refused(path: Path) -> RewardFileError:
    before = folder_contents(path.parent)
    with pytest.raises(RewardFileError) as refused:
        RewardModel(path)
    assert folder_contents(path.parent) == before
    one_line(refused.value)
    return refused.value


@settings(FUZZ, max_examples=300)
@given(st.data())
def test_a_card_with_a_wrong_type_a_missing_or_an_unknown_field_is_refused(reward_path, data):
    card = json.loads(card_path(reward_path).read_text())
    name = data.draw(st.sampled_from(sorted(CARD_FIELDS) + ["an unknown field"]))
    if name in REQUIRED_CARD_FIELDS and data.draw(st.booleans()):
        del card[name]
    else:
        card[name] = data.draw(values_not_of(CARD_FIELDS.get(name, ())))
    card_path(reward_path).write_text(json.dumps(card))
    assert "re-export the reward" in str(assert_reward_refused(reward_path))


@settings(FUZZ, max_examples=200)
@given(st.binary(max_size=2048))
def test_a_card_of_random_bytes_is_refused(reward_path, data):
    card_path(reward_path).write_bytes(data)
    assert_reward_refused(reward_path)


def test_a_card_truncated_anywhere_is_refused(reward_path):
    text = card_path(reward_path).read_bytes()
    for offset in range(len(text)):
        card_path(reward_path).write_bytes(text[:offset])
        assert_reward_refused(reward_path)
    assert len(text) > 400


@pytest.mark.parametrize(
    "change",
    [
        {"name": "DEEP"},
        {"name": "lone \ud800 surrogate"},
        {"vocabulary_size": 0},
        {"training_data": {"demonstrations": "many"}},
        {"metrics": {"held_out": []}},
        {"metrics": {"held_out": {"base_nll": "low"}}},
        {"format_version": True},
        {"vocabulary_size": float("nan")},
    ],
)
def test_deep_nesting_surrogates_and_figures_the_app_cannot_show_are_refused(reward_path, change):
    card = json.loads(card_path(reward_path).read_text())
    text = json.dumps({**card, **change}).replace('"DEEP"', deeply_nested(100_000))  # a name nested 100,000 deep
    card_path(reward_path).write_text(text)
    assert_reward_refused(reward_path)


def test_huge_strings_and_nan_figures_still_make_a_card(reward_path):
    card = json.loads(card_path(reward_path).read_text())
    card.update(description="word " * 200_000, metrics={"held_out": {"tokens": 40, "base_nll": float("nan")}})
    card_path(reward_path).write_text(json.dumps(card))
    assert RewardModel(reward_path).card.description == card["description"]


# -- ONNX reward files ----------------------------------------------------------------------------------------
def damaged_rewards(data: bytes) -> list[tuple[str, bytes]]:
    """One byte flipped at the first 64 offsets and at 100 more; cut at 80 offsets."""
    rng = np.random.default_rng(7)
    cases = []
    for offset in list(range(64)) + sorted(rng.choice(range(64, len(data)), 100, replace=False)):
        flipped = bytearray(data)
        flipped[offset] ^= 0xFF
        cases.append((f"flip-{offset}", bytes(flipped)))
    cuts = list(range(0, 16)) + sorted(rng.choice(range(16, len(data)), 64, replace=False))
    return cases + [(f"cut-{offset}", data[:offset]) for offset in cuts]


def test_a_damaged_reward_file_is_refused_by_its_card(reward_path):
    original = reward_path.read_bytes()
    for name, data in damaged_rewards(original):
        reward_path.write_bytes(data)
        assert "does not match its card" in str(assert_reward_refused(reward_path)), name


def test_a_damaged_reward_file_whose_card_matches_is_refused_or_still_follows_the_contract(reward_path, capfd):
    """The card's sha256 updated to the damaged file: onnxruntime itself sees the damaged graph."""
    original, card = reward_path.read_bytes(), RewardCard.load(card_path(reward_path))
    cases, refused = damaged_rewards(original), 0
    for name, data in cases:
        reward_path.write_bytes(data)
        card.onnx_sha256 = hashlib.sha256(data).hexdigest()
        card_path(reward_path).write_text(card.to_json())
        try:
            rewards = RewardModel(reward_path).sync([1, 2, 3], np.arange(5))
        except RewardFileError as error:
            one_line(error)
            refused += 1
        else:  # the byte fell in a weight or in metadata: a different but well-formed reward
            assert rewards.shape == (5,), name
    assert len(cases) == 244 and refused > 120
    assert capfd.readouterr().out == ""  # onnxruntime printed nothing of its own


def contract_graph(*, rewards: str = "zeros", state: str = "grows", heads: int = 2, head_dim: int = 4):
    """A one-layer graph with the contract's inputs and outputs. By default it follows the contract
    (rewards 0 per candidate, a state one position longer per new token); the arguments break it."""
    constants = [
        helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("axes13", TensorProto.INT64, [2], [1, 3]),
        helper.make_tensor("state_shape", TensorProto.INT64, [4], [1, heads, 1, head_dim]),
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("three", TensorProto.INT64, [1], [3]),
        helper.make_tensor("seven", TensorProto.INT64, [], [7]),
    ]
    reward_nodes = {
        "zeros": [helper.make_node("Identity", ["scores"], ["rewards"])],
        "one value": [helper.make_node("ReduceSum", ["scores", "axis1"], ["rewards"], keepdims=1)],
        "float64": [helper.make_node("Cast", ["scores"], ["rewards"], to=TensorProto.DOUBLE)],
        "nan": [helper.make_node("Add", ["scores", "nan"], ["rewards"])],
        "fails": [helper.make_node("Reshape", ["scores", "three"], ["rewards"])],
        "nan for token 7": [
            helper.make_node("Equal", ["candidate_ids", "seven"], ["is_seven"]),
            helper.make_node("Where", ["is_seven", "nan", "scores"], ["rewards"]),
        ],
    }[rewards]
    new = [
        helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["ids", "axes13"], ["ids4"]),
        helper.make_node("Expand", ["ids4", "state_shape"], ["new"]),
    ]
    state_nodes = [
        helper.make_node("Concat", [f"past_{part}_0", "new"], [f"present_{part}_0"], axis=2)
        if state == "grows"
        else helper.make_node("Identity", [f"past_{part}_0"], [f"present_{part}_0"])
        for part in ("key", "value")
    ]
    nodes = [
        helper.make_node("Cast", ["candidate_ids"], ["candidates"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["candidates", "zero"], ["scores"]),
        *reward_nodes,
        *new,
        *state_nodes,
    ]
    state_type = [1, heads, "past", head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "new_tokens"]),
        helper.make_tensor_value_info("candidate_ids", TensorProto.INT64, [1, "candidates"]),
        *(helper.make_tensor_value_info(f"past_{part}_0", TensorProto.FLOAT, state_type) for part in ("key", "value")),
    ]
    reward_type = TensorProto.DOUBLE if rewards == "float64" else TensorProto.FLOAT
    outputs = [
        helper.make_tensor_value_info("rewards", reward_type, None),
        *(helper.make_tensor_value_info(f"present_{part}_0", TensorProto.FLOAT, None) for part in ("key", "value")),
    ]
    graph = helper.make_graph(nodes, "contract", inputs, outputs, initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def save_graph(path: Path, model: onnx.ModelProto) -> Path:
    path.parent.mkdir(exist_ok=True)
    card = RewardCard(name=path.stem, vocabulary_fingerprint="sha256:test", vocabulary_size=8, base_model_name="none")
    return save_reward(path, model, card)


def test_a_graph_that_follows_the_contract_loads_and_scores(tmp_path):
    reward = RewardModel(save_graph(tmp_path / "graphs" / "good.onnx", contract_graph()))
    assert reward.sync([1, 2, 3], np.arange(4)).tolist() == [0.0] * 4 and reward.n_past == 3


@pytest.mark.parametrize(
    "rewards, state, message",
    [
        ("one value", "grows", "breaks the reward contract"),
        ("float64", "grows", "breaks the reward contract"),
        ("nan", "grows", "breaks the reward contract"),
        ("zeros", "stays", "breaks the reward contract"),
        ("fails", "grows", "fails on its first token"),
    ],
)
def test_a_graph_that_loads_but_breaks_the_runtime_contract_is_refused(tmp_path, rewards, state, message):
    path = save_graph(tmp_path / "graphs" / "broken.onnx", contract_graph(rewards=rewards, state=state))
    assert message in str(assert_reward_refused(path))


def test_a_reward_that_turns_non_finite_later_stops_with_a_runtime_error(tmp_path):
    reward = RewardModel(save_graph(tmp_path / "graphs" / "nan7.onnx", contract_graph(rewards="nan for token 7")))
    assert reward.sync([1, 2], np.array([5, 6])).tolist() == [0.0, 0.0]
    with pytest.raises(RewardRuntimeError, match="not a finite number at token 2"):
        reward.advance([3], np.array([5, 7]))
    assert reward.n_past == 2  # the state is as it was before the failed step


# -- the app's settings ----------------------------------------------------------------------------------------
SETTING_NAMES = [field.name for field in dataclasses.fields(AppSettings)]


def assert_usable(loaded: AppSettings, saved) -> None:
    """Each value is the saved one (same type) or the default, and the model and sampling configs accept them."""
    defaults = AppSettings()
    for name in SETTING_NAMES:
        value, default = getattr(loaded, name), getattr(defaults, name)
        kept = isinstance(saved, dict) and name in saved and value == saved[name] and type(value) is type(saved[name])
        assert kept or (value == default and type(value) is type(default)), (name, value)
    loaded.model_config()
    loaded.sampling(seed=1)


@settings(FUZZ, max_examples=300)
@given(
    st.one_of(
        st.dictionaries(st.sampled_from(SETTING_NAMES) | st.text(max_size=8), json_values, max_size=12), json_values
    )
)
def test_saved_settings_of_any_type_and_size_start_the_window_with_usable_values(target, qapp, saved):
    target.set_setting("desktop", saved)
    loaded = AppSettings.load(target)
    assert_usable(loaded, saved)
    dialog = SettingsDialog(loaded, target.path.parent)
    dialog.deleteLater()


@pytest.mark.parametrize("end", ["minimum", "maximum"])
def test_every_setting_the_app_can_save_is_loaded_back(target, qapp, end):
    """Each box of the settings dialog at its end (the lowest of an automatic one is None), and the strength."""
    dialog = SettingsDialog(AppSettings(), target.path.parent)
    for box in (
        dialog.threads,
        dialog.gpu_layers,
        dialog.context,
        dialog.temperature,
        dialog.top_k,
        dialog.top_p,
        dialog.min_p,
        dialog.max_tokens,
    ):
        box.setValue(getattr(box, end)())
    strength = SETTING_RANGES["alpha"][end == "maximum"]
    chosen = dataclasses.replace(dialog.settings(), alpha=strength, last_model="/models/x.gguf")
    dialog.deleteLater()
    chosen.save(target)
    assert AppSettings.load(target) == chosen


@pytest.mark.parametrize("stored", ["{not json", deeply_nested(100_000), "NaN", "", '"text"'])
def test_a_damaged_stored_settings_value_gives_the_defaults(target, stored):
    with contextlib.closing(sqlite3.connect(target.path)) as connection, connection:
        connection.execute("UPDATE settings SET value = ? WHERE key = 'desktop'", [stored])
    assert AppSettings.load(target) == AppSettings()


@pytest.fixture
def desktop_json(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "config" / "desktop.json"
    path.parent.mkdir()
    monkeypatch.setattr("desktop.settings.data_folder_file", lambda: path)
    monkeypatch.delenv("PRT_HOME")
    return path


def folder_applied() -> Path | None:
    """The configured folder (absolute, or None) after checking that the window's paths at start-up use it."""
    folder = configured_data_folder()
    assert folder is None or folder.is_absolute()
    assert startup_paths().data == (AppPaths.resolve().data if folder is None else folder)
    assert "PRT_HOME" not in os.environ  # read, never written
    return folder


@settings(FUZZ, max_examples=200)
@given(
    st.one_of(
        st.binary(max_size=512),
        json_values.map(lambda value: json.dumps({"data_folder": value}).encode()),
        json_values.map(lambda value: json.dumps(value).encode()),
    )
)
def test_a_desktop_json_of_any_content_names_an_absolute_folder_or_none(desktop_json, data):
    desktop_json.write_bytes(data)
    folder_applied()


@pytest.mark.parametrize("data_folder", ["", "relative/folder", "/with\u0000nul", "/lone \ud800 surrogate", 5, None])
def test_a_desktop_json_naming_no_usable_folder_means_the_default_folder(desktop_json, data_folder):
    desktop_json.write_text(json.dumps({"data_folder": data_folder}))
    assert folder_applied() is None


def test_a_desktop_json_cut_anywhere_or_nested_deep_means_the_default_folder(desktop_json, tmp_path):
    text = json.dumps({"data_folder": str(tmp_path / "chats")}).encode()
    for data in [text[:offset] for offset in range(len(text))] + [deeply_nested(100_000).encode()]:
        desktop_json.write_bytes(data)
        assert folder_applied() is None
    desktop_json.write_bytes(text)
    assert configured_data_folder() == tmp_path / "chats"


def test_a_data_folder_that_cannot_be_created_gives_one_message(tmp_path, monkeypatch):
    in_the_way = tmp_path / "data"
    in_the_way.write_text("a file, not a folder")
    for folder in (in_the_way, in_the_way / "inside", tmp_path / ("x" * 5000)):
        monkeypatch.setenv("PRT_HOME", str(folder))
        with pytest.raises(PrtError, match="Cannot use the data folder"):
            app_data_dir()


# -- preference profiles and feature files (engine/app/pref.py) -----------------------------------------------------
@pytest.fixture(scope="module")
def profile_json() -> str:
    posterior = PreferencePosterior(3).fit(
        [([1.0, -0.5, 0.2], "a"), ([0.3, 0.9, -1.0], "b"), ([0.1, 0.1, 0.1], "none")]
    )
    return Profile.from_posterior("mine", ["brief", "warm", "formal"], posterior).to_json()


bad_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not np.isfinite(x)),
    st.integers(min_value=10**309, max_value=10**320),
    st.text(max_size=5),
    st.booleans(),
)
PROFILE_DAMAGE = {  # where -> (how to reach the value, what to put there)
    "weights": (lambda p: p, "weights", values_not_of(("object",))),
    "a weight": (lambda p: p["weights"], "warm", bad_numbers),
    "prior_var": (
        lambda p: p,
        "prior_var",
        values_not_of(("integer", "number")) | bad_numbers | st.floats(max_value=0),
    ),
    "answers": (lambda p: p, "answers", values_not_of(("list",))),
    "an answer": (lambda p: p["answers"], 2, values_not_of(("object",))),
    "an answer's v": (
        lambda p: p["answers"][0],
        "v",
        st.lists(st.floats(-5, 5), max_size=6).filter(lambda v: len(v) != 3),
    ),
    "a number in v": (lambda p: p["answers"][1]["v"], 2, bad_numbers),
    "format_version": (lambda p: p, "format_version", values_not_of(("integer",))),
}


@settings(FUZZ, max_examples=300)
@given(st.sampled_from(sorted(PROFILE_DAMAGE)), st.data())
def test_a_damaged_profile_is_refused_with_a_profile_error(profile_json, where, data):
    profile = json.loads(profile_json)
    reach, key, values = PROFILE_DAMAGE[where]
    reach(profile)[key] = data.draw(values)
    with pytest.raises(ProfileError) as refused:
        Profile.from_json(json.dumps(profile))
    one_line(refused.value)


@pytest.mark.parametrize("text", [deeply_nested(100_000), "", "{", "[]", '{"prior_var": -1}'])
def test_a_profile_that_is_not_json_or_nested_deep_is_refused(text):
    with pytest.raises(ProfileError):
        Profile.from_json(text)


def test_a_damaged_feature_file_gives_a_value_error_saying_why(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20, 4)))
    data = path.read_bytes()
    cases = [data[:offset] for offset in cut_offsets(len(data), every=7)]
    cases += [data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :] for offset in range(128)]
    cases += [data.replace(b"(20, 4)", shape) for shape in (b"(20000000000, 4)", b"(-20, 4)", b"(2, 4, 9999999)")]
    np.savez(tmp_path / "archive.npz", features=np.zeros((3, 2)))
    cases += [(tmp_path / "archive.npz").read_bytes()]
    for case in cases:
        path.write_bytes(case)
        with pytest.raises(ValueError, match="cannot read .* as a .npy array") as refused:
            load_features(path)
        one_line(refused.value)
    assert len(cases) == 296


# -- GGUF models --------------------------------------------------------------------------------------------------
def damaged(data: bytes, case: list) -> bytes:
    """A copy of data cut at an offset (["cut", offset]) or with one byte XOR-ed (["flip", offset, mask])."""
    if case[0] == "cut":
        return data[: case[1]]
    flipped = bytearray(data)
    flipped[case[1]] ^= case[2]
    return bytes(flipped)


@contextlib.contextmanager
def damaged_in_place(path: Path, original: bytes, case: list):
    """The damage applied to the file at path (a copy of original) and undone afterwards: no 15 MB write per case."""
    with open(path, "r+b") as handle:
        if case[0] == "cut":
            handle.truncate(case[1])
        else:
            handle.seek(case[1])
            handle.write(bytes([original[case[1]] ^ case[2]]))
    try:
        yield
    finally:
        with open(path, "r+b") as handle:
            handle.seek(case[1])
            handle.write(original[case[1] :] if case[0] == "cut" else original[case[1] : case[1] + 1])


@pytest.fixture(scope="module")
def gguf_layout(tiny_gguf) -> dict[str, int]:
    """Where the parts of the tiny GGUF are: each scalar field's value, the metadata's end, the tensor data."""
    reader = GGUFReader(tiny_gguf)
    layout = {}
    for name, field in reader.fields.items():
        layout[name] = field.offset + sum(part.nbytes for part in field.parts[: field.data[0]])
        end = field.offset + sum(part.nbytes for part in field.parts)
    template_start = layout["tokenizer.chat_template"]
    layout |= {
        "metadata_end": end,
        "tensor_data": reader.data_offset,
        "size": tiny_gguf.stat().st_size,
        "template_brace": template_start + tiny_gguf.read_bytes()[template_start:end].index(b"%}") + 1,
    }
    return layout


def gguf_cases(layout: dict[str, int]) -> list[list]:
    """Cuts in the header, the metadata, the tensor table and the tensor data; flipped bytes in the header and
    in the values llama.cpp trusts (a '}' of the chat template becomes '|')."""
    cuts = [
        4,
        16,
        23,
        layout["general.architecture"],
        layout["tokenizer.ggml.tokens"] + 1000,
        layout["tokenizer.ggml.merges"] + 5000,
        layout["metadata_end"] - 1,
        layout["metadata_end"] + 40,
        layout["tensor_data"] - 1,
        layout["tensor_data"] + 100,
        layout["size"] // 2,
        layout["size"] - 1,
    ]
    flips = [
        [4, 0xFF],
        [8, 0xFF],
        [16, 0xFF],
        [23, 0xFF],
        [layout["general.architecture"] - 12, 0xFF],
        [layout["llama.context_length"] + 3, 0xFF],
        [layout["llama.context_length"] + 3, 0x40],
        [layout["llama.block_count"] + 1, 0xFF],
        [layout["llama.block_count"], 0xFF],
        [layout["llama.attention.layer_norm_rms_epsilon"] + 3, 0xFF],
        [layout["llama.attention.layer_norm_rms_epsilon"] + 3, 0x80],
        [layout["llama.attention.head_count"], 0xFF],
        [layout["llama.embedding_length"], 0x01],
        [layout["tokenizer.ggml.tokens"] + 4, 0xFF],
        [layout["tokenizer.ggml.bos_token_id"] + 2, 0xFF],
        [layout["template_brace"], 0x01],
        [layout["metadata_end"] + 8, 0xFF],
    ]
    return [["cut", offset] for offset in cuts] + [["flip", *flip] for flip in flips]


def test_check_gguf_file_refuses_damaged_metadata_before_llama_cpp_sees_it(tiny_gguf, gguf_layout, tmp_path):
    """In-process and fast: cuts anywhere in the header and metadata, flips of every header byte and of every
    byte of the model's hyperparameters; the file passes, or gives one ModelFileError."""
    data = tiny_gguf.read_bytes()
    scalars = [offset for name, offset in gguf_layout.items() if name.startswith(("llama.", "general.file_type"))]
    cases = [["cut", offset] for offset in cut_offsets(gguf_layout["metadata_end"], every=20_000)]
    cases += [["flip", offset, 0xFF] for offset in range(24)]
    cases += [["flip", offset + byte, 0xFF] for offset in scalars for byte in range(4)]
    path, refused = tmp_path / "damaged.gguf", 0
    path.write_bytes(data)
    for case in cases:
        with damaged_in_place(path, data, case):
            try:
                check_gguf_file(path)
            except ModelFileError as error:
                one_line(error)
                refused += 1
            else:
                assert case[0] == "flip", case  # every cut in the metadata is seen
    assert len(cases) == 220 and refused > 150


CRASHED_BEFORE = [  # before the metadata and template checks: a bare ValueError, two aborts, a Jinja traceback
    (lambda layout: ["flip", layout["llama.context_length"] + 3, 0xFF], "its llama.context_length is"),
    (lambda layout: ["flip", layout["llama.block_count"] + 1, 0xFF], "its llama.block_count is"),
    (
        lambda layout: ["flip", layout["llama.attention.layer_norm_rms_epsilon"] + 3, 0xFF],
        "its llama.attention.layer_norm_rms_epsilon is",
    ),
    (lambda layout: ["flip", layout["template_brace"], 0x01], "The chat template in"),
]
CHILD = (
    "import sys; sys.path[:0] = [sys.argv[1]]; from test_fuzz_importers import load_damaged_models; "
    "load_damaged_models(*sys.argv[2:])"
)


def load_damaged_models(source: str, cases: str) -> None:
    """In a child process: load each damaged copy of source through BaseModel and, if it loads, evaluate a
    chat prompt; one JSON line before and after each case, so the parent can name the case that crashed."""
    original = Path(source).read_bytes()
    scratch = Path(source).with_name("damaged-in-child.gguf")
    for case in json.loads(cases):
        scratch.write_bytes(damaged(original, case))
        print(json.dumps({"started": case}), flush=True)
        try:
            with BaseModel(scratch, config=BaseModelConfig(n_ctx=256, n_threads=1, n_gpu_layers=0)) as model:
                model.sync(model.chat_prompt_tokens([{"role": "user", "content": "Hi"}]))
                model.last_logits()
            outcome = "loaded"
        except PrtError as error:
            outcome = f"{type(error).__name__}: {error}"
        print(json.dumps({"case": case, "outcome": outcome}), flush=True)


@pytest.mark.subprocess
def test_a_damaged_gguf_gives_one_model_file_error_through_base_model_and_never_a_crash(
    tiny_gguf, gguf_layout, tmp_path
):
    source = tmp_path / "tiny.gguf"
    shutil.copyfile(tiny_gguf, source)
    cases = gguf_cases(gguf_layout)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(TESTS), str(source), json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    lines = [json.loads(line) for line in child.stdout.splitlines()]
    started = [line["started"] for line in lines if "started" in line]
    assert child.returncode == 0, f"case {started[-1:]} ended the process ({child.returncode}): {child.stderr[-2000:]}"
    outcomes = {json.dumps(line["case"]): line["outcome"] for line in lines if "outcome" in line}
    assert len(outcomes) == len(cases) == 29
    assert all(outcome == "loaded" or outcome.startswith("ModelFileError: ") for outcome in outcomes.values())
    assert all(outcomes[json.dumps(["cut", offset])] != "loaded" for kind, offset, *_ in cases if kind == "cut")
    for case, fragment in CRASHED_BEFORE:  # now refused before llama.cpp sees them
        assert fragment in outcomes[json.dumps(case(gguf_layout))]


@pytest.mark.subprocess
@pytest.mark.parametrize(
    "case, fragment",
    [
        (lambda layout: ["cut", layout["tokenizer.ggml.merges"] + 5000], "truncated, corrupt"),
        (lambda layout: ["cut", layout["size"] // 2], "truncated, corrupt"),
        *CRASHED_BEFORE[1:],
    ],
    ids=["metadata-cut", "tensor-data-cut", "block-count", "norm-epsilon", "chat-template"],
)
def test_a_damaged_gguf_gives_one_error_line_from_prt_generate(tiny_gguf, gguf_layout, tmp_path, case, fragment):
    path = tmp_path / "damaged.gguf"
    path.write_bytes(damaged(tiny_gguf.read_bytes(), case(gguf_layout)))
    # a process of its own: a damaged GGUF that got past the checks could abort the whole interpreter
    assert_one_line_error(prt_process("generate", "--model", str(path), "--prompt", "Hi", "--ctx", "256"), fragment)
