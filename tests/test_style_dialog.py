"""The "Find your style" dialog: the questions on a real tiny GGUF with real ONNX rewards and SQLite, the
shipped library installed on Start, the library build as a child process, and the first-run offer."""

from __future__ import annotations

import shutil
import sys
import threading
from dataclasses import replace

import pytest
from fake_engine import FakeEngine
from PySide6.QtWidgets import QDialog

from conftest import TINY_CONFIG
from desktop.main_window import MainWindow
from desktop.settings import AppSettings
from desktop.style_dialog import SURVEY_SETTING, StyleDialog
from engine.app.chat import ChatEngine
from engine.app.onboarding import StyleSurvey, library_dir, library_reward_paths, saved_profile
from engine.app.store import Store
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import RewardCard, card_path, write_card
from tiny_models import small_reward_shape, write_reward

pytestmark = [pytest.mark.gui, pytest.mark.slow]

WAIT_MS = 60_000
LABELS = {"brief": "Short and to the point", "warm": "Casual and personal"}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "chats.db") as store:
        yield store


@pytest.fixture(scope="module")
def real_engine(tiny_gguf):
    engine = ChatEngine()
    engine.load_model(tiny_gguf, TINY_CONFIG)
    yield engine
    engine.close()


def write_library(folder, base) -> list:
    """Two labelled style rewards, as `prt library build` leaves them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, (name, label) in enumerate(LABELS.items(), start=1):
        weights = random_reward_weights(small_reward_shape(base.n_vocab), seed=seed, scale=1.0)
        path = write_reward(
            folder / f"{name}.onnx", weights, vocabulary_fingerprint=base.vocabulary_fingerprint, base_name=base.name
        )
        card = RewardCard.load(card_path(path))
        card.label = label
        write_card(path, card)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def shipped_folder(tmp_path_factory, real_engine):
    """A pack for the tiny GGUF as `prt library build` writes one, of two labelled rewards (random weights, the
    embedding the base's own projected one, as a build's)."""
    from rewards_onnx.library import STYLES, pack_library, projected_base_embedding  # torch, in this test only

    base, built = real_engine.base, tmp_path_factory.mktemp("built")
    shape = small_reward_shape(base.n_vocab)
    embedding = projected_base_embedding(base.path, shape.width, seed=0)
    for seed, style in enumerate(STYLES[:2], start=1):
        weights = replace(random_reward_weights(shape, seed=seed, scale=1.0), embedding=embedding)
        path = write_reward(
            built / f"{style.name}.onnx",
            weights,
            vocabulary_fingerprint=base.vocabulary_fingerprint,
            base_name=base.name,
        )
        card = RewardCard.load(card_path(path))
        card.label = style.label
        write_card(path, card)
    return pack_library(base, built, tmp_path_factory.mktemp("shipped"), styles=STYLES[:2]).parent


def open_dialog(qtbot, engine, store, **options) -> StyleDialog:
    dialog = StyleDialog(engine, store, **options)
    qtbot.addWidget(dialog)
    dialog.show()
    return dialog


def wait_for_question(qtbot, dialog) -> None:
    qtbot.waitUntil(lambda: dialog.answer_buttons["a"].isEnabled() or dialog.pages.currentIndex() == 2, timeout=WAIT_MS)


def test_the_answers_set_the_dials_through_the_real_model(qtbot, store, real_engine):
    write_library(library_dir(real_engine.base.path), real_engine.base)
    dialog = open_dialog(qtbot, real_engine, store, questions=2)
    assert dialog.start_button.isEnabled() and dialog.build_button.isHidden()
    assert "2 style rewards" in dialog.intro_label.text()
    dialog.start_button.click()
    wait_for_question(qtbot, dialog)
    assert dialog.counter_label.text() == "<b>Question 1 of 2</b>" and dialog.prompt_label.text().startswith("Prompt: ")
    first_a, first_b = (view.toPlainText() for view in dialog.reply_views)
    assert first_a and first_b and first_a != first_b
    assert not dialog.finish_button.isEnabled()  # nothing answered yet
    qtbot.waitUntil(lambda: not dialog._round_running, timeout=WAIT_MS)  # the next round, written while we read
    dialog.answer_buttons["a"].click()
    assert dialog.counter_label.text() == "<b>Question 2 of 2</b>" and dialog.finish_button.isEnabled()  # no wait
    dialog.answer_buttons["none"].click()

    assert dialog.pages.currentIndex() == 2 and "from 2 answers" in dialog.result_label.text()
    profile = saved_profile(store)
    assert [len(profile.answers), store.setting(SURVEY_SETTING)] == [2, "done"]
    [pick] = store.feedback()
    assert (pick.kind, pick.chosen, pick.rejected) == ("pick", first_a, first_b)
    dials = {entry.name: entry.weight for entry in store.rewards()}
    assert set(dials) == set(LABELS) and max(map(abs, dials.values())) == pytest.approx(1.5)
    assert all(f"{LABELS[name]}: {weight:+.2f}" in dialog.result_label.text() for name, weight in dials.items())


def test_the_shipped_rewards_are_installed_on_start_and_ask_the_first_question_without_a_build(
    qtbot, store, real_engine, shipped_folder
):
    calls = []
    folder = library_dir(real_engine.base.path)
    dialog = open_dialog(
        qtbot,
        real_engine,
        store,
        questions=2,
        shipped_folder=shipped_folder,
        build_command=lambda **options: calls.append(options) or [sys.executable, "-c", "pass"],
    )
    assert library_reward_paths(folder) == [] and dialog.start_button.isEnabled() and dialog.build_button.isHidden()
    assert "The 2 style rewards for tiny-a come with the app" in dialog.intro_label.text()
    dialog.start_button.click()
    assert dialog.writing_label.text() == "Setting up the style rewards…"
    wait_for_question(qtbot, dialog)
    assert dialog.counter_label.text() == "<b>Question 1 of 2</b>" and calls == []  # nothing was built
    installed = library_reward_paths(folder)
    assert [path.stem for path in installed] == ["concise", "structured"]
    first_a, first_b = (view.toPlainText() for view in dialog.reply_views)
    assert first_a and first_b and first_a != first_b
    dialog.answer_buttons["a"].click()
    wait_for_question(qtbot, dialog)
    dialog.answer_buttons["b"].click()

    assert dialog.pages.currentIndex() == 2 and "from 2 answers" in dialog.result_label.text()
    assert len(saved_profile(store).answers) == 2
    [(first, _), _] = dialog._survey.answered
    assert store.feedback()[0].chosen == first.first.text  # the pick "a" of the first question
    assert sorted(entry.path for entry in store.rewards()) == [str(path) for path in installed]  # the dials
    assert "Short and to the point: " in dialog.result_label.text()  # the shipped card's label
    reopened = open_dialog(qtbot, real_engine, store, shipped_folder=shipped_folder)
    assert "2 style rewards for tiny-a." in reopened.intro_label.text()  # installed once


def test_a_shipped_library_that_does_not_install_leaves_the_build_to_offer(
    qtbot, store, real_engine, shipped_folder, tmp_path
):
    damaged = shutil.copytree(shipped_folder, tmp_path / "damaged")
    [weights] = damaged.glob("*.bin")
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    dialog = open_dialog(qtbot, real_engine, store, shipped_folder=damaged)
    dialog.start_button.click()
    qtbot.waitUntil(lambda: dialog.pages.currentIndex() == 0, timeout=WAIT_MS)
    assert "damaged" in dialog.build_label.text() and not dialog.build_button.isHidden()
    assert not dialog.start_button.isEnabled() and library_reward_paths(library_dir(real_engine.base.path)) == []


def test_the_first_question_is_asked_as_soon_as_two_replies_are_written(qtbot, store, real_engine):
    write_library(library_dir(real_engine.base.path), real_engine.base)
    release = threading.Event()

    class HeldThirdReply(StyleSurvey):
        """Holds the first round's third reply until released."""

        replies = 0

        def write_reply(self, *args, **options):
            self.replies += 1
            if self.replies == 3:
                release.wait(WAIT_MS / 1000)
            return super().write_reply(*args, **options)

    dialog = open_dialog(qtbot, real_engine, store, questions=3, survey_factory=HeldThirdReply)
    dialog.start_button.click()
    wait_for_question(qtbot, dialog)
    survey = dialog._ready_survey
    qtbot.waitUntil(lambda: survey.replies == 3, timeout=WAIT_MS)  # the third reply, held
    assert dialog.counter_label.text() == "<b>Question 1 of 3</b>" and dialog._round_running
    release.set()  # the round ends, then the one written while the user reads the first question
    qtbot.waitUntil(lambda: survey.replies == 6 and not dialog._round_running, timeout=WAIT_MS)
    assert survey.unasked == 2 + 3
    dialog.answer_buttons["a"].click()
    assert dialog.counter_label.text() == "<b>Question 2 of 3</b>" and dialog.answer_buttons["a"].isEnabled()


def test_an_answer_given_before_the_next_round_is_written_waits_for_it(qtbot, store, real_engine):
    write_library(library_dir(real_engine.base.path), real_engine.base)
    release = threading.Event()

    class HeldSurvey(StyleSurvey):
        """Writes its first round at once and holds the next until released."""

        def write_round(self, **options) -> None:
            if self.unasked:
                release.wait(WAIT_MS / 1000)
            super().write_round(**options)

    dialog = open_dialog(qtbot, real_engine, store, questions=3, survey_factory=HeldSurvey)
    dialog.start_button.click()
    wait_for_question(qtbot, dialog)
    dialog.answer_buttons["b"].click()
    assert not dialog.answer_buttons["a"].isEnabled() and dialog.writing_label.text() == "Writing replies…"
    release.set()
    wait_for_question(qtbot, dialog)
    assert dialog.counter_label.text() == "<b>Question 2 of 3</b>"
    dialog.finish_button.click()  # cancels the round being written ahead; its error is not shown
    qtbot.waitUntil(lambda: not dialog._round_running, timeout=WAIT_MS)
    assert "from 1 answer" in dialog.result_label.text() and len(saved_profile(store).answers) == 1


def test_the_rewards_panel_shows_the_profile_with_labels_and_negative_dials(qtbot, store, real_engine):
    paths = write_library(library_dir(real_engine.base.path), real_engine.base)
    window = MainWindow(real_engine, store, settings=AppSettings())
    qtbot.addWidget(window)
    panel = window.rewards_panel
    assert (
        panel.profile_label.text().startswith("No style profile yet") and panel.style_button.text() == "Find my style…"
    )
    profile = {
        "name": "My style",
        "weights": {"brief": -1.0, "warm": 0.5},
        "prior_var": 1.0,
        "answers": [{"v": [1.0, 0.0], "answer": "b"}],
        "format_version": 1,
    }
    store.save_style_profile(
        {"profile": profile}, picks=[], dials={paths[0]: ("brief", -1.5), paths[1]: ("warm", 0.75)}
    )
    panel.refresh()
    assert panel.profile_label.text() == "Style: My style, from 1 answer."
    assert panel.style_button.text() == "Retune my style…"
    assert [row.enabled_box.text() for row in panel.rows] == [f"{LABELS['brief']} (brief)", f"{LABELS['warm']} (warm)"]
    assert [row.weight for row in panel.rows] == [-1.5, 0.75] and panel.rows[0].weight_label.text() == "-1.50"
    assert sorted(real_engine.active_reward_names) == ["brief", "warm"]
    with qtbot.waitSignal(panel.style_requested, timeout=WAIT_MS):
        panel.style_button.click()


BUILD_SCRIPT = """
import json, shutil, sys
print(json.dumps({"phase": "distill", "done": 1, "total": 2, "eta_seconds": 30, "message": "brief"}), file=sys.stderr)
for source in sys.argv[2:]:
    shutil.copy(source, sys.argv[1])
print(json.dumps({"folder": sys.argv[1], "rewards": []}))
"""


def test_a_model_without_style_rewards_gets_them_built_first(qtbot, store, real_engine, tmp_path):
    ready = write_library(tmp_path / "built", real_engine.base)
    files = [str(path) for path in ready] + [str(card_path(path)) for path in ready]
    calls = []

    def build_command(**options):
        calls.append(options)
        return [sys.executable, "-c", BUILD_SCRIPT, str(options["out_dir"]), *files]

    dialog = open_dialog(qtbot, real_engine, store, build_command=build_command)
    assert not dialog.build_button.isHidden() and not dialog.start_button.isEnabled()
    assert "no style rewards yet" in dialog.intro_label.text()
    shown = []
    dialog._build.progress.connect(lambda progress: shown.append(dialog.build_label.text()))
    dialog.build_button.click()
    qtbot.waitUntil(dialog.start_button.isEnabled, timeout=WAIT_MS)
    assert calls == [{"model_path": real_engine.base.path, "out_dir": library_dir(real_engine.base.path)}]
    assert shown == ["Writing example answers: 1/2 · about 30 s left · brief"]
    assert dialog.build_label.text() == "The style rewards are ready." and dialog.build_button.isHidden()


def test_a_failed_build_says_why_and_closing_cancels_a_running_one(qtbot, store, real_engine):
    failing = "import sys; print('prt: error: The disk is full.', file=sys.stderr); sys.exit(1)"
    dialog = open_dialog(qtbot, real_engine, store, build_command=lambda **_: [sys.executable, "-c", failing])
    dialog.build_button.click()
    qtbot.waitUntil(lambda: not dialog._build.running, timeout=WAIT_MS)
    assert dialog.build_label.text() == "prt: error: The disk is full." and dialog.build_button.isEnabled()

    sleeping = open_dialog(
        qtbot, real_engine, store, build_command=lambda **_: [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    sleeping.build_button.click()
    assert sleeping._build.running and not sleeping.build_button.isEnabled()
    sleeping.reject()
    assert not sleeping._build.running and sleeping.build_label.text() == "Cancelled."


def test_the_first_run_offer_opens_once_and_skip_is_remembered(qtbot, store):
    window = MainWindow(FakeEngine(), store, settings=AppSettings(), offer_style_survey=True)
    qtbot.addWidget(window)
    window.load_model("fake-model.gguf")
    qtbot.waitUntil(lambda: window.style_dialog is not None and window.style_dialog.isVisible(), timeout=WAIT_MS)
    assert not window.style_dialog.build_button.isHidden()  # the fake model has no style rewards
    window.style_dialog.skip_button.click()
    assert window.style_dialog.result() == QDialog.DialogCode.Rejected and store.setting(SURVEY_SETTING) == "skipped"
    window.style_dialog = None
    window.load_model("fake-model.gguf")
    qtbot.waitUntil(lambda: window.session.model_ready, timeout=WAIT_MS)
    assert window.style_dialog is None  # not offered again
