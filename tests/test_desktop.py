"""The desktop app with a fake engine (canned tokens with real StepTraces) and a real store in tmp_path."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import sys
from pathlib import Path
from typing import get_args

import pytest
from fake_engine import REPLY, REPLY_TEXT, VOCABULARY, WAIT_MS, FakeBase, FakeEngine, FakeGeneration
from PySide6.QtCore import Qt
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import QDialog, QFileDialog, QMessageBox

from desktop.app import main
from desktop.chat_view import PairWidget
from desktop.demo import DemoEngine
from desktop.main_window import MainWindow
from desktop.settings import AppSettings
from desktop.settings_dialog import SettingsDialog
from desktop.tune_panel import TunePanel
from engine.app.backend import ChatBackend
from engine.app.chat import ChatEngine, ReplyRecorder
from engine.app.context import ContextUse
from engine.app.models import teacher_cache_path
from engine.app.store import MESSAGE_STATUSES, Store
from engine.runtime.decode import FinishReason
from engine.runtime.errors import ModelFileError

pytestmark = pytest.mark.gui


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "chats.db") as store:
        yield store


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def tune_commands():
    """The tuning argv the panel runs: set ``script`` to the fake CLI's Python source; ``calls`` records kwargs."""

    class Commands:
        script = "pass"
        calls: list[dict] = []

        def __call__(self, **kwargs) -> list[str]:
            self.calls.append(kwargs)
            return [sys.executable, "-c", self.script, str(kwargs["out_path"])]

    return Commands()


@pytest.fixture
def window(qtbot, engine, store, tune_commands):
    window = MainWindow(engine, store, settings=AppSettings(), tune_command_factory=tune_commands)
    qtbot.addWidget(window)
    window.show()
    yield window
    window.close()


def send(qtbot, window, text: str, *, two: bool = False) -> None:
    window.chat_view.input.setPlainText(text)
    (window.chat_view.two_button if two else window.chat_view.send_button).click()
    wait_idle(qtbot, window)


def wait_idle(qtbot, window) -> None:
    qtbot.waitUntil(lambda: not window.session.busy, timeout=WAIT_MS)


def stored(store, window) -> list[tuple[str, str, str]]:
    return [(m.role, m.content, m.status) for m in store.messages(window.session.conversation_id)]


def assistant_widget(window):
    return [widget for widget in window.chat_view.message_widgets() if widget.role == "assistant"][-1]


# -- the seam between the window and the engine -------------------------------------------------------
def test_the_engine_the_demo_and_the_fake_are_chat_backends() -> None:
    backends: list[ChatBackend] = [ChatEngine(), DemoEngine(), FakeEngine()]  # mypy holds each to the protocol
    members = [name for name in dir(ChatBackend) if not name.startswith("_")]
    for backend in backends:
        assert isinstance(backend, ChatBackend), [name for name in members if not hasattr(backend, name)]


def test_every_finish_reason_ends_a_stored_reply_with_a_message_status() -> None:
    assert set(ReplyRecorder.FINAL_STATUS) == set(get_args(FinishReason)) - {""}  # "": the reply never ran
    assert set(ReplyRecorder.FINAL_STATUS.values()) <= set(MESSAGE_STATUSES)


# -- chatting ---------------------------------------------------------------------------------------
def test_enter_sends_and_the_streamed_reply_is_stored_complete(qtbot, window, store, engine):
    composer = window.chat_view.input
    qtbot.keyClicks(composer, "Hi")
    qtbot.keyClick(composer, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)  # a new line, not a send
    qtbot.keyClicks(composer, "you")
    assert window.session.conversation_id is None
    qtbot.keyClick(composer, Qt.Key.Key_Return)
    wait_idle(qtbot, window)

    assert stored(store, window) == [("user", "Hi\nyou", "complete"), ("assistant", REPLY_TEXT, "complete")]
    reply = store.messages(window.session.conversation_id)[1]
    assert reply.stats["tokens"] == len(REPLY) and reply.stats["finish_reason"] == "stop"
    assert engine.replies[0][0] == [{"role": "user", "content": "Hi\nyou"}]
    assert composer.toPlainText() == ""
    assert assistant_widget(window).body.text == REPLY_TEXT
    assert window.conversations.titles() == ["Hi"]


def test_system_prompt_goes_first_and_is_stored(qtbot, window, store, engine):
    window.chat_view.system_prompt.setText("Be brief.")
    send(qtbot, window, "Hello")
    assert store.conversation(window.session.conversation_id).system_prompt == "Be brief."
    assert engine.replies[0][0][0] == {"role": "system", "content": "Be brief."}


def test_stop_keeps_the_partial_text(qtbot, window, store, engine):
    engine.generations = [FakeGeneration(REPLY, hold_after=2)]
    window.chat_view.input.setPlainText("Hello")
    window.chat_view.send_button.click()
    partial = "".join(VOCABULARY[token] for token in REPLY[:2])
    qtbot.waitUntil(lambda: assistant_widget(window).body.text == partial, timeout=WAIT_MS)
    assert window.chat_view.stop_button.isEnabled()
    qtbot.keyClick(window, Qt.Key.Key_Escape)
    wait_idle(qtbot, window)
    assert stored(store, window)[1] == ("assistant", partial, "stopped")


def test_regenerate_shows_a_new_reply_and_keeps_the_old_one_as_an_alternative(qtbot, window, store, engine):
    send(qtbot, window, "Hello")
    engine.generations = [FakeGeneration([8, 2])]
    window.chat_view.regenerate_button.click()
    wait_idle(qtbot, window)
    assert stored(store, window) == [("user", "Hello", "complete"), ("assistant", " Sure!", "complete")]
    assert engine.replies[1][0] == [{"role": "user", "content": "Hello"}]
    widget = assistant_widget(window)
    assert widget.alternative_label.text() == "2/2"
    widget.alternative_buttons[0].click()  # "<": back to the first reply
    assert stored(store, window)[1] == ("assistant", REPLY_TEXT, "complete")
    assert assistant_widget(window).alternative_label.text() == "1/2"


def test_editing_a_user_message_starts_a_branch_and_keeps_the_old_one(qtbot, window, store, engine):
    send(qtbot, window, "First")
    send(qtbot, window, "Second")
    first = store.messages(window.session.conversation_id)[0]
    engine.generations = [FakeGeneration([9])]
    window.session.edit_message(first.id, "First, edited")
    wait_idle(qtbot, window)
    assert stored(store, window) == [("user", "First, edited", "complete"), ("assistant", " No", "complete")]
    assert engine.replies[-1][0] == [{"role": "user", "content": "First, edited"}]
    [question] = [w for w in window.chat_view.message_widgets() if w.role == "user"]
    question.alternative_buttons[0].click()  # the old branch, with everything that followed it
    assert [text for _role, text, _status in stored(store, window)] == ["First", REPLY_TEXT, "Second", REPLY_TEXT]


def test_editing_a_reply_keeps_the_edit_as_preferred(qtbot, window, store):
    send(qtbot, window, "Hello")
    reply = store.messages(window.session.conversation_id)[1]
    window.session.edit_message(reply.id, "Hi! What do you need?")
    assert store.message(reply.id).content == "Hi! What do you need?"
    [edit] = store.feedback(message_id=reply.id)
    assert (edit.kind, edit.prompt, edit.chosen, edit.rejected) == (
        "edit",
        "Hello",
        "Hi! What do you need?",
        REPLY_TEXT,
    )


def test_thumbs_up_and_down_store_one_rating_each(qtbot, window, store):
    window.chat_view.system_prompt.setText("Be kind.")
    send(qtbot, window, "Hello")
    widget = assistant_widget(window)
    widget.rating_buttons["thumbs_up"].click()
    [up] = store.feedback(message_id=widget.message_id)
    assert (up.kind, up.prompt, up.system, up.chosen, up.rejected) == (
        "thumbs_up",
        "Hello",
        "Be kind.",
        REPLY_TEXT,
        None,
    )
    widget.rating_buttons["thumbs_down"].click()
    [down] = store.feedback(message_id=widget.message_id)
    assert (down.kind, down.rejected, down.chosen) == ("thumbs_down", REPLY_TEXT, None)
    assert not widget.rating_buttons["thumbs_up"].isChecked()
    assert "1 thumbs down" in window.tune_panel.feedback_box.text()
    widget.rating_buttons["thumbs_down"].click()
    assert store.feedback(message_id=widget.message_id) == []


def test_show_me_two_keeps_the_picked_reply_and_records_the_pick(qtbot, window, store, engine):
    engine.generations = [FakeGeneration([8, 2]), FakeGeneration([9, 2])]
    send(qtbot, window, "Hello", two=True)
    [pair] = window.chat_view.findChildren(PairWidget)
    assert [body.text for body in pair.bodies] == [" Sure!", " No!"]
    first_seed, second_seed = (config.seed for _messages, config in engine.replies)
    assert first_seed != second_seed
    assert stored(store, window) == [("user", "Hello", "complete")]  # nothing kept until a pick
    pair.pick_buttons[1].click()
    assert stored(store, window) == [("user", "Hello", "complete"), ("assistant", " No!", "complete")]
    [pick] = store.feedback()
    assert (pick.kind, pick.prompt, pick.chosen, pick.rejected) == ("pick", "Hello", " No!", " Sure!")


def test_an_engine_error_is_shown_and_the_partial_reply_kept(qtbot, window, store, engine):
    engine.generations = [FakeGeneration(REPLY, fail_after=3)]
    send(qtbot, window, "Hello")
    assert "broken graph" in window.error_box.text() and window.error_box.isVisible()
    role, content, status = stored(store, window)[1]
    assert (content, status) == ("".join(VOCABULARY[token] for token in REPLY[:3]), "error")
    assert "broken graph" in assistant_widget(window).status_label.text()


def test_search_filters_the_conversation_list(window, store):
    for title, text in (("Trip planning", "Which trains go to Lyon?"), ("Recipes", "A zebra-shaped cake")):
        conversation_id = store.create_conversation(title)
        store.add_message(conversation_id, "user", text)
    window.conversations.refresh()
    assert sorted(window.conversations.titles()) == ["Recipes", "Trip planning"]
    window.conversations.search.setText("zebra")
    assert window.conversations.titles() == ["Recipes"]
    window.conversations.search.setText("trip")
    assert window.conversations.titles() == ["Trip planning"]


# -- rewards and the token view -----------------------------------------------------------------------
def test_reward_dials_reach_the_engine_at_once_and_are_saved(window, store, engine, tmp_path):
    style, other = str(tmp_path / "style.onnx"), str(tmp_path / "other-vocab.onnx")
    store.add_reward(style, "style")
    store.add_reward(other, "other-vocab")
    window.rewards_panel.refresh()
    row, incompatible = window.rewards_panel.rows
    assert engine.active_reward_calls[-1] == {style: 1.0}  # the incompatible one is never switched on
    assert not incompatible.enabled_box.isEnabled()

    row.weight_slider.setValue(150)
    assert engine.active_reward_calls[-1] == {style: 1.5}
    row.enabled_box.setChecked(False)
    assert engine.active_reward_calls[-1] == {}
    window.rewards_panel.strength_slider.setValue(50)
    assert engine.alpha_calls[-1] == 0.5
    [saved_style, _other] = store.rewards()
    assert (saved_style.enabled, saved_style.weight) == (False, 1.5)
    assert AppSettings.load(store).alpha == 0.5


def test_incompatible_reward_has_a_badge_with_the_reason(window, store, tmp_path):
    store.add_reward(str(tmp_path / "other-vocab.onnx"), "other-vocab")
    window.rewards_panel.refresh()
    [row] = window.rewards_panel.rows
    badges = [label for label in row.findChildren(type(window.model_label)) if label.text() == "incompatible"]
    assert badges and badges[0].toolTip() == "Trained for another vocabulary."


def test_token_view_tints_tokens_and_lists_candidates(qtbot, window):
    send(qtbot, window, "Hello")
    body = assistant_widget(window).body
    assert not body.shows_tokens
    window.token_view_action.trigger()
    assert body.shows_tokens and body.toPlainText() == REPLY_TEXT
    fragments = []
    block = body.document().begin()
    iterator = block.begin()
    while not iterator.atEnd():
        fragments.append(iterator.fragment())
        iterator += 1
    assert [fragment.text() for fragment in fragments] == [VOCABULARY[token] for token in REPLY]
    for position, fragment in enumerate(fragments):
        color = fragment.charFormat().background().color()
        raised = position % 2 == 0
        assert (color.green() > color.red()) == raised, (position, color.name())
        tooltip = fragment.charFormat().toolTip()
        assert "before" in tooltip and "after" in tooltip and "style" in tooltip
    cursor = QTextCursor(body.document())
    cursor.setPosition(fragments[1].position() + 1)
    point = body.cursorRect(cursor).center()
    point.setX(point.x() - 2)
    assert body.token_tooltip_at(point) == fragments[1].charFormat().toolTip()
    assert "␣there" in fragments[0].charFormat().toolTip()
    window.token_view_action.trigger()
    assert not body.shows_tokens


# -- tuning --------------------------------------------------------------------------------------------
PROGRESS_SCRIPT = r"""
import json, os, sys, time
def progress(phase, done, total, eta):
    print(json.dumps({"phase": phase, "done": done, "total": total, "eta_seconds": eta}), file=sys.stderr, flush=True)
out = sys.argv[1]
progress("teacher", 4, 4, None)
progress("train", 10, 20, 80)
while not os.path.exists(out + ".go"):
    time.sleep(0.02)
progress("export", 1, 1, 0)
held = {"tokens": 120, "base_nll": 2.5, "steered_nll": 2.0, "teacher_nll": 1.5, "pairs": 4, "pair_accuracy": 0.75,
        "gap_closed": 0.5}
print(json.dumps({"path": out, "held_out": held, "seconds": 95.0}))
"""


def test_tune_panel_follows_progress_and_installs_the_reward(qtbot, window, store, tune_commands):
    tune_commands.script = PROGRESS_SCRIPT
    send(qtbot, window, "Hello")
    assistant_widget(window).rating_buttons["thumbs_up"].click()
    panel = window.tune_panel
    panel.name_edit.setText("mine")
    assert panel.feedback_box.isChecked()
    panel.start()
    qtbot.waitUntil(lambda: "Training: 10/20" in panel.phase_label.text(), timeout=WAIT_MS)
    assert "1 min 20 s left" in panel.phase_label.text()
    assert (panel.progress.value(), panel.progress.maximum()) == (10, 20)
    out_path = Path(tune_commands.calls[-1]["out_path"])
    assert tune_commands.calls[-1]["feedback_db"] == store.path and out_path.name == "mine.onnx"
    Path(f"{out_path}.go").touch()
    qtbot.waitUntil(lambda: not panel.running, timeout=WAIT_MS)

    assert "50% of the gap" in panel.result_label.text() and "2.500 → 2.000" in panel.result_label.text()
    [run] = store.tuning_runs()
    assert (run.status, run.reward_path, run.metrics["pair_accuracy"]) == ("done", str(out_path), 0.75)
    assert run.sources["feedback"] is True
    assert [entry.path for entry in store.rewards()] == [str(out_path)]
    assert [row.path for row in window.rewards_panel.rows] == [str(out_path)]


def test_a_failed_tuning_run_shows_the_error_line(qtbot, store, engine, tmp_path):
    script = "import sys; print('loading', file=sys.stderr); print('prt: error: No training data.', file=sys.stderr); sys.exit(1)"
    panel = TunePanel(engine, store, command_factory=lambda **kwargs: [sys.executable, "-c", script])
    qtbot.addWidget(panel)
    panel.add_data_files([tmp_path / "data.jsonl"])
    panel.start()
    qtbot.waitUntil(lambda: not panel.running, timeout=WAIT_MS)
    assert panel.result_label.text() == "prt: error: No training data."
    [run] = store.tuning_runs()
    assert (run.status, run.error) == ("failed", "prt: error: No training data.")


def test_a_tuning_process_that_cannot_start_is_reported(qtbot, store, engine, tmp_path):
    panel = TunePanel(engine, store, command_factory=lambda **kwargs: [str(tmp_path / "no-such-program")])
    qtbot.addWidget(panel)
    panel.add_data_files([tmp_path / "data.jsonl"])
    panel.start()
    qtbot.waitUntil(lambda: not panel.running, timeout=WAIT_MS)
    assert panel.result_label.text().startswith("Could not start the tuning process")
    assert store.tuning_runs()[0].status == "failed"


def test_cancelling_a_tuning_run_kills_it(qtbot, store, engine, tmp_path):
    panel = TunePanel(
        engine, store, command_factory=lambda **kwargs: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    qtbot.addWidget(panel)
    panel.set_documents_folder(tmp_path)
    panel.start()
    assert panel.running and panel.cancel_button.isEnabled()
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: not panel.running, timeout=WAIT_MS)
    assert store.tuning_runs()[0].status == "cancelled"
    assert store.rewards() == []


def test_tuning_needs_a_source(qtbot, store, engine):
    panel = TunePanel(engine, store, command_factory=lambda **kwargs: pytest.fail("must not start"))
    qtbot.addWidget(panel)
    panel.start()
    assert "Choose what to train on" in panel.result_label.text() and not panel.running


# -- the entry point -------------------------------------------------------------------------------------
def test_demo_screenshot_writes_a_png(qapp, tmp_path):
    path = tmp_path / "window.png"
    assert main(["--screenshot", str(path), "--demo"]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_settings_round_trip_through_the_store(store):
    settings = AppSettings(n_threads=3, temperature=0.2, max_tokens=64, alpha=1.5)
    settings.save(store)
    assert AppSettings.load(store) == settings
    assert settings.sampling(seed=4).temperature == 0.2 and settings.model_config().n_threads == 3
    store.set_setting("desktop", {**json.loads(json.dumps(store.setting("desktop"))), "unknown": 1})
    assert AppSettings.load(store) == settings


# -- model, settings and data ------------------------------------------------------------------------------
def test_loading_a_model_shows_progress_and_remembers_it(qtbot, window, engine, store, tmp_path):
    model = tmp_path / "other.gguf"
    window.load_model(model)
    assert not window.session.model_ready and window.busy_bar.isVisible()
    qtbot.waitUntil(lambda: window.session.model_ready, timeout=WAIT_MS)
    assert not window.busy_bar.isVisible()
    assert engine.loads == [(model, AppSettings().model_config())]
    assert AppSettings.load(store).last_model == str(model)


def test_a_model_that_fails_to_load_is_reported(qtbot, window, engine, tmp_path):
    engine.load_error = ModelFileError("broken.gguf is not a GGUF model.")
    window.load_model(tmp_path / "broken.gguf")
    qtbot.waitUntil(lambda: window.session.model_ready, timeout=WAIT_MS)
    assert window.error_box.text() == "broken.gguf is not a GGUF model."


def test_changing_model_settings_reloads_the_model(qtbot, window, engine, store, monkeypatch):
    def accept_with_changes(dialog):
        dialog.context.setValue(2048)
        dialog.temperature.setValue(0.3)
        return QDialog.DialogCode.Accepted

    monkeypatch.setattr(SettingsDialog, "exec", accept_with_changes)
    window.open_settings()
    qtbot.waitUntil(lambda: window.session.model_ready and bool(engine.loads), timeout=WAIT_MS)
    [(path, config)] = engine.loads
    assert path == FakeBase.path and config.n_ctx == 2048
    saved = AppSettings.load(store)
    assert (saved.n_ctx, saved.temperature) == (2048, 0.3)
    send(qtbot, window, "Hello")
    assert engine.replies[-1][1].temperature == 0.3


def test_settings_dialog_auto_values_mean_none(qtbot, tmp_path):
    dialog = SettingsDialog(AppSettings(n_threads=4), tmp_path)
    qtbot.addWidget(dialog)
    dialog.threads.setValue(dialog.threads.minimum())
    dialog.gpu_layers.setValue(0)
    settings = dialog.settings()
    assert (settings.n_threads, settings.n_gpu_layers) == (None, 0)
    assert dialog.threads.text() == "Auto"


def test_delete_all_data_asks_first(qtbot, window, store, monkeypatch):
    send(qtbot, window, "Hello")
    teacher_cache_path().write_bytes(b"passes of the texts tuned on")
    answers = [QMessageBox.StandardButton.Cancel, QMessageBox.StandardButton.Yes]
    monkeypatch.setattr(QMessageBox, "warning", lambda *args: answers.pop(0))
    window.delete_all_data()
    assert len(store.conversations()) == 1 and teacher_cache_path().exists()
    window.delete_all_data()
    assert store.conversations() == [] and window.conversations.titles() == []
    assert not teacher_cache_path().exists()
    assert window.session.conversation_id is None and window.chat_view.message_widgets() == []


@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="None is immortal on Python 3.12+: its reference count never drops, so this cannot fail",
)
def test_the_qt_binding_keeps_its_references_to_none(qapp):
    """PySide6 6.12.0 on Python < 3.12 drops a reference to None on every call of a void Qt method, so the app
    dies ("Fatal Python error: none_dealloc") after a few thousand repaints; 6.11.3 is fine. Python 3.12+ is
    immune (None is immortal there)."""
    from PySide6.QtWidgets import QLabel

    label = QLabel()
    before = sys.getrefcount(None)
    for _ in range(1000):
        label.setText("x")
    assert sys.getrefcount(None) > before - 100, "this PySide6 leaks None: install pyside6-essentials<6.12"


# -- the real window on real parts ------------------------------------------------------------------
def test_real_window_on_a_tiny_gguf_with_a_tiny_reward(qtbot, tmp_path, tiny_gguf, tiny_base):
    """Type a prompt, get a streamed reply steered by a real ONNX reward, give feedback, find the rows in SQLite."""
    from engine.app.chat import ChatEngine
    from engine.runtime.reward_graph import random_reward_weights
    from tiny_models import small_reward_shape, write_reward

    reward = write_reward(
        tmp_path / "tiny-style.onnx",
        random_reward_weights(small_reward_shape(tiny_base.n_vocab), seed=5),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )
    engine = ChatEngine()
    with Store(tmp_path / "chats.db") as store:
        store.add_reward(str(reward), "tiny-style")
        settings = AppSettings(n_ctx=512, max_tokens=16, n_threads=2, n_gpu_layers=0)
        window = MainWindow(engine, store, settings=settings)
        qtbot.addWidget(window)
        window.show()
        window.load_model(tiny_gguf)
        qtbot.waitUntil(lambda: window.session.model_ready, timeout=60_000)
        window.rewards_panel.refresh()
        assert engine.active_reward_names == ["tiny-style"]

        send(qtbot, window, "Hello there")
        [(user_role, user_text, _), (role, reply_text, status)] = stored(store, window)
        assert (user_role, user_text, role, status) == ("user", "Hello there", "assistant", "complete")
        assert reply_text and reply_text == assistant_widget(window).body.text
        assert store.messages(window.session.conversation_id)[1].stats["rewards"] == ["tiny-style"]

        widget = assistant_widget(window)
        widget.rating_buttons["thumbs_up"].click()
        [feedback] = store.feedback(message_id=widget.message_id)
        assert (feedback.kind, feedback.prompt, feedback.chosen) == ("thumbs_up", "Hello there", reply_text)
        window.close()
    engine.close()


# -- alternatives, Continue, the context, presets, undo ------------------------------------------------------
def test_continue_extends_a_stopped_reply_in_place(qtbot, window, store, engine):
    engine.generations = [FakeGeneration(REPLY, hold_after=2)]
    window.chat_view.input.setPlainText("Hello")
    window.chat_view.send_button.click()
    partial = "".join(VOCABULARY[token] for token in REPLY[:2])
    qtbot.waitUntil(lambda: assistant_widget(window).body.text == partial, timeout=WAIT_MS)
    window.session.stop()
    wait_idle(qtbot, window)
    engine.generations = [FakeGeneration([8, 2])]
    window.chat_view.continue_button.click()
    wait_idle(qtbot, window)
    assert engine.reply_options[-1] == (0, True)
    assert engine.replies[-1][0][-1] == {"role": "assistant", "content": partial}
    assert stored(store, window) == [("user", "Hello", "complete"), ("assistant", partial + " Sure!", "complete")]
    assert store.messages(window.session.conversation_id)[1].stats["tokens"] == 4
    assert assistant_widget(window).body.text == partial + " Sure!"


def test_a_reply_cut_off_by_a_crash_shows_interrupted_and_can_be_continued(qtbot, engine, store, tune_commands):
    chat = store.create_conversation("Story")
    store.add_message(chat, "user", "Tell me a story")
    cut = store.add_message(chat, "assistant", "Once upon", status="streaming")
    store._db.execute("UPDATE messages SET updated = '2020-01-01T00:00:00.000000+00:00' WHERE id = ?", [cut])
    window = MainWindow(engine, store, settings=AppSettings(), tune_command_factory=tune_commands)
    qtbot.addWidget(window)
    window.session.open(chat)
    assert "interrupted" in assistant_widget(window).status_label.text()
    engine.generations = [FakeGeneration([1])]
    window.chat_view.continue_button.click()
    wait_idle(qtbot, window)
    assert stored(store, window)[1] == ("assistant", "Once upon there", "complete")
    window.close()


def test_left_out_messages_get_a_marker_and_the_status_bar_a_context_meter(qtbot, window, store, engine, tune_commands):
    send(qtbot, window, "One")
    send(qtbot, window, "Two")
    engine.generations = [FakeGeneration(REPLY, context=ContextUse(left_out=2, prompt_tokens=300, context_size=512))]
    send(qtbot, window, "Three")
    marker = window.chat_view.left_out_marker
    assert marker.isVisible() and marker.text().startswith("2 earlier messages are not sent to the model")
    layout = window.chat_view._messages
    assert [layout.indexOf(w) for w in window.chat_view.message_widgets()[:3]] == [0, 1, 3]  # the marker at 2
    assert window.context_label.text() == f"Context: {300 + len(REPLY)} / 512"
    send(qtbot, window, "Four")
    assert engine.reply_options[-1] == (2, False)  # the next reply keeps the same prefix
    chat = window.session.conversation_id
    window.session.open(None)
    assert not window.chat_view.left_out_marker.isVisible()

    restarted = MainWindow(engine, store, settings=AppSettings(), tune_command_factory=tune_commands)
    qtbot.addWidget(restarted)
    restarted.show()
    restarted.session.open(chat)  # the last reply's stats say what it sent
    assert restarted.chat_view.left_out_marker.isVisible()
    assert restarted.context_label.text() == f"Context: {20 + len(REPLY)} / 4096"
    restarted.close()


def test_only_alternatives_the_user_saw_and_passed_over_count_as_pairs(qtbot, window, store, engine):
    send(qtbot, window, "Hello")
    window.chat_view.regenerate_button.click()
    wait_idle(qtbot, window)
    assert store.feedback_counts()["alternative"] == 0  # no choice made yet
    send(qtbot, window, "And then?")
    assert store.feedback_counts()["alternative"] == 1
    assert "1 pairs from regenerated replies" in window.tune_panel.feedback_box.text()


def test_a_preset_brings_its_prompt_dials_strength_and_sampling_to_its_chats(qtbot, window, store, engine, tmp_path):
    reward = str(tmp_path / "style.onnx")
    store.add_reward(reward, "style")
    window.rewards_panel.refresh()
    window.chat_view.system_prompt.setText("Be formal.")
    window.settings = AppSettings(temperature=0.3, stop=("###",))
    window.save_preset("Work")
    send(qtbot, window, "Hello")
    work_chat = window.session.conversation_id
    assert store.conversation(work_chat).preset_id is not None
    assert window.preset_picker.names() == ["No preset", "Work"]

    window.new_chat()
    window.choose_preset(None)
    window.rewards_panel.rows[0].weight_slider.setValue(-50)
    window.settings = AppSettings(temperature=1.2)
    send(qtbot, window, "Casual chat")
    window.session.open(work_chat)
    assert window.rewards_panel.dials() == {reward: 1.0}
    assert window.settings.temperature == 0.3 and window.settings.stop == ("###",)
    assert window.preset_picker.combo.currentText() == "Work"
    send(qtbot, window, "Again")
    assert engine.replies[-1][1].stop == ("###",) and engine.replies[-1][0][0] == {
        "role": "system",
        "content": "Be formal.",
    }
    export = tmp_path / "export.json"
    store.export_json(export)
    assert [p["name"] for p in json.loads(export.read_text(encoding="utf-8"))["presets"]] == ["Work"]


def test_a_deleted_chat_can_be_undone_until_the_app_closes(qtbot, window, store, monkeypatch):
    send(qtbot, window, "Keep me")
    chat = window.session.conversation_id
    monkeypatch.setattr(QMessageBox, "question", lambda *args: QMessageBox.StandardButton.Yes)
    window.conversations._delete(chat, "Keep me")
    assert window.conversations.titles() == [] and window.undo_delete_action.isEnabled()
    window.undo_delete_action.trigger()
    assert window.conversations.titles() == ["Keep me"] and window.session.conversation_id == chat
    window.conversations._delete(chat, "Keep me")
    window.close()
    assert store.message_tree(chat) == []  # the trash is emptied on close


def test_stop_sequences_reach_every_reply_and_round_trip(qtbot, store):
    settings = AppSettings(stop=("###", "\nUser:"))
    settings.save(store)
    assert AppSettings.load(store) == settings and settings.sampling().stop == ("###", "\nUser:")
    dialog = SettingsDialog(settings, Path("/tmp"))
    qtbot.addWidget(dialog)
    assert dialog.stop.text() == "### | \\nUser:"
    dialog.stop.setText("END |  | \\n\\n")
    assert dialog.settings().stop == ("END", "\n\n")
    store.set_setting("desktop", {"stop": ["ok", ""]})  # an empty stop text is not one the app wrote
    assert AppSettings.load(store).stop == ()


@pytest.mark.slow
def test_real_window_a_60_turn_chat_on_a_512_token_context_answers_every_turn(qtbot, tmp_path, tiny_gguf):
    """The context policy in the window: the oldest turns are left out, with the marker and the meter."""
    engine = ChatEngine()
    with Store(tmp_path / "chats.db") as store:
        settings = AppSettings(n_ctx=512, max_tokens=12, n_threads=2, n_gpu_layers=0, temperature=0.0)
        window = MainWindow(engine, store, settings=settings)
        qtbot.addWidget(window)
        window.show()
        window.load_model(tiny_gguf)
        qtbot.waitUntil(lambda: window.session.model_ready and engine.base is not None, timeout=60_000)
        meters = []
        window.session.context_changed.connect(lambda used, size: meters.append((used, size)))
        errors = []
        window.session.error.connect(errors.append)
        for turn in range(60):
            send(qtbot, window, f"Turn {turn}: tell me one more thing about the number {turn}, please.")
        replies = [m for m in store.messages(window.session.conversation_id) if m.role == "assistant"]
        assert errors == [] and len(replies) == 60
        assert all(reply.status == "complete" and reply.content for reply in replies)
        assert window.chat_view.left_out_marker.isVisible()
        assert window.chat_view.left_out_marker.text().split()[0].isdigit()
        assert meters and all(used <= size == 512 for used, size in meters)
        assert window.context_label.text().startswith("Context: ") and window.context_label.text().endswith("/ 512")
        send(qtbot, window, "word " * 600)  # one message longer than the whole context
        [too_long] = errors
        assert "Settings" in too_long and "shorten" in too_long.lower(), too_long
        window.close()
    engine.close()


@pytest.mark.slow
def test_real_window_alternatives_survive_a_restart(qtbot, tmp_path, tiny_gguf):
    engine = ChatEngine()
    settings = AppSettings(n_ctx=512, max_tokens=8, n_threads=2, n_gpu_layers=0)
    with Store(tmp_path / "chats.db") as store:
        window = MainWindow(engine, store, settings=settings)
        qtbot.addWidget(window)
        window.load_model(tiny_gguf)
        qtbot.waitUntil(lambda: window.session.model_ready and engine.base is not None, timeout=60_000)
        send(qtbot, window, "Hello there")
        window.chat_view.regenerate_button.click()
        wait_idle(qtbot, window)
        chat = window.session.conversation_id
        shown = [m.content for m in store.messages(chat)]
        window.close()
    with Store(tmp_path / "chats.db") as store:
        window = MainWindow(engine, store, settings=settings)
        qtbot.addWidget(window)
        window.session.open(chat)
        assert [w.body.text for w in window.chat_view.message_widgets()] == shown
        assert assistant_widget(window).alternative_label.text() == "2/2"
        assistant_widget(window).alternative_buttons[0].click()
        assert assistant_widget(window).alternative_label.text() == "1/2"
        window.close()
    engine.close()


def test_back_up_and_restore_from_the_window(qtbot, engine, tmp_path, monkeypatch, tune_commands):
    """Settings › Back up everything, then Restore into a fresh data folder: the chats with their alternatives,
    presets and dials come back."""
    from engine.app.paths import AppPaths

    old, new = AppPaths(tmp_path / "old"), AppPaths(tmp_path / "new")
    archive = tmp_path / "backup.zip"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *args: (str(archive), ""))
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *args: (str(archive), ""))
    with Store(old.store) as store:
        window = MainWindow(engine, store, paths=old, settings=AppSettings(), tune_command_factory=tune_commands)
        qtbot.addWidget(window)
        send(qtbot, window, "Hello")
        window.chat_view.regenerate_button.click()
        wait_idle(qtbot, window)
        window.save_preset("Work")
        window.back_up()
        qtbot.waitUntil(lambda: archive.exists() and window.session.model_ready, timeout=WAIT_MS)
        before = [(m.role, m.content) for c in store.conversations() for m in store.message_tree(c.id)]
        window.close()
    with Store(new.store) as store:
        window = MainWindow(engine, store, paths=new, settings=AppSettings(), tune_command_factory=tune_commands)
        qtbot.addWidget(window)
        window.restore()
        qtbot.waitUntil(lambda: window.conversations.titles() == ["Hello"], timeout=WAIT_MS)
        assert [(m.role, m.content) for c in store.conversations() for m in store.message_tree(c.id)] == before
        assert window.preset_picker.names() == ["No preset", "Work"]
        assert "Restored" in window.statusBar().currentMessage()
        window.close()
