"""Find your style: up to ten "which reply do you prefer?" questions about the base style rewards
(PReF, engine/app/onboarding.py); the answers set the style dials. Offered once on first run (skippable)
and any time from "Retune my style…". The default model's base rewards come with the app: Start installs
them (engine.app.onboarding.install_shipped_library, a few seconds) and asks the first question. Another
model gets them built first, by ``prt library build`` in a child process (engine.app.chat.library_build_command).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import (
    QDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QStackedWidget,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from desktop.child_process import ProgressProcess, show_progress
from desktop.workers import run_in_background
from engine.app.backend import ChatBackend
from engine.app.chat import library_build_command
from engine.app.jobs import LibrarySummary
from engine.app.onboarding import (
    DEFAULT_QUESTIONS,
    SHIPPED_LIBRARIES,
    ShippedLibrary,
    StyleQuestion,
    StyleSurvey,
    dial_weights,
    install_shipped_library,
    library_reward_paths,
    save_profile,
    shipped_library,
)
from engine.app.paths import AppPaths
from engine.app.pref import Profile
from engine.app.store import Store

if TYPE_CHECKING:
    from importlib.abc import Traversable

SURVEY_SETTING = "style_survey"  # "done" or "skipped" once the first-run offer was answered
PROFILE_NAME = "My style"
BUILD_MINUTES = 30  # `prt library build` with its default count, measured on the 2-core VM
BUILD_PHASES = {
    "distill": "Writing example answers",
    "teacher": "Scoring them with the model",
    "train": "Training",
    "export": "Exporting and checking",
}


def first_run_pending(store: Store) -> bool:
    return store.setting(SURVEY_SETTING) is None


def dials_text(profile: Profile, labels: dict[str, str]) -> str:
    """One line per reward with its dial, strongest first: 'Short and to the point: +1.50'."""
    ranked = sorted(dial_weights(profile).items(), key=lambda item: -abs(item[1]))
    return "\n".join(f"{labels.get(name, name)}: {weight:+.2f}" for name, weight in ranked)


class _ProgressRelay(QObject):
    """Created on the GUI thread, so progress emitted by the worker arrives there (a queued signal)."""

    progress = Signal(int, int)


class StyleDialog(QDialog):
    profile_saved = Signal()

    def __init__(
        self,
        engine: ChatBackend,
        store: Store,
        parent: QWidget | None = None,
        *,
        questions: int = DEFAULT_QUESTIONS,
        paths: AppPaths | None = None,
        build_command: Callable[..., list[str]] | None = None,
        survey_factory: Callable[..., StyleSurvey] = StyleSurvey,
        shipped_folder: Traversable | Path = SHIPPED_LIBRARIES,
    ) -> None:
        """``paths``: the app's (None: resolved here); ``build_command``: library_build_command for its data folder;
        ``shipped_folder``: where the libraries that come with the app are (engine.app.onboarding.shipped_library)."""
        super().__init__(parent)
        self.setWindowTitle("Find your style")
        self.resize(900, 600)
        self._engine, self._store = engine, store
        self._paths = paths or AppPaths.resolve()
        self._build_command = build_command or partial(library_build_command, data_folder=self._paths.data)
        self._questions, self._survey_factory = questions, survey_factory
        self._shipped_folder = shipped_folder
        self._shipped_refused: set[Path] = set()  # models whose shipped library failed to install: build instead
        self._survey: StyleSurvey | None = None
        self._question: StyleQuestion | None = None
        self._round_running = False  # a round of replies is being written on a worker
        self._round_owed = False  # a question was shown while its own round ran: write the next one after it
        self._show_when_written = False  # the user is waiting for that round
        self._waiting = False  # the user waits for replies (the writing bar is up)
        self._labels: dict[str, str] = {}
        self._relay = _ProgressRelay(self)
        self._relay.progress.connect(self._show_writing)
        self._build = ProgressProcess(self, summary=LibrarySummary, what="style reward build")
        self._build.progress.connect(
            lambda progress: show_progress(self.build_bar, self.build_label, progress, BUILD_PHASES)
        )
        self._build.succeeded.connect(lambda _summary: self._build_ended("The style rewards are ready."))
        self._build.failed.connect(self._build_ended)
        self._build.cancelled.connect(lambda: self._build_ended("Cancelled."))
        self.pages = QStackedWidget()
        self.pages.addWidget(self._intro_page())
        self.pages.addWidget(self._question_page())
        self.pages.addWidget(self._done_page())
        QVBoxLayout(self).addWidget(self.pages)
        self.show_intro()

    # -- pages ----------------------------------------------------------------------
    def _intro_page(self) -> QWidget:
        self.intro_label = QLabel(wordWrap=True)
        self.build_button = QPushButton("Build the style rewards")
        self.build_button.clicked.connect(self.build_library)
        self.build_bar = QProgressBar(visible=False)
        self.build_label = QLabel(wordWrap=True)
        self.start_button = QPushButton("Start")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start)
        self.skip_button = QPushButton("Skip")
        self.skip_button.clicked.connect(self.reject)
        return _page(
            self.intro_label,
            self.build_button,
            self.build_bar,
            self.build_label,
            stretch=True,
            buttons=[self.skip_button, self.start_button],
        )

    def _question_page(self) -> QWidget:
        self.counter_label = QLabel()
        self.prompt_label = QLabel(wordWrap=True, textInteractionFlags=Qt.TextInteractionFlag.TextSelectableByMouse)
        self.reply_views = (QTextBrowser(), QTextBrowser())
        replies = QGridLayout()
        for column, (title, view) in enumerate(zip(("Reply A", "Reply B"), self.reply_views)):
            replies.addWidget(QLabel(f"<b>{title}</b>"), 0, column)
            replies.addWidget(view, 1, column)
        self.writing_bar = QProgressBar()
        self.writing_label = QLabel()
        self.answer_buttons = {
            "a": QPushButton("A is better"),
            "none": QPushButton("No preference"),
            "b": QPushButton("B is better"),
        }
        for answer, button in self.answer_buttons.items():
            button.clicked.connect(lambda _checked=False, answer=answer: self.answer(answer))
        self.finish_button = QPushButton("Finish now")
        self.finish_button.setToolTip("Set the dials from the answers so far")
        self.finish_button.clicked.connect(self.finish)
        writing = QHBoxLayout()
        writing.addWidget(self.writing_bar)
        writing.addWidget(self.writing_label, 1)
        page = _page(self.counter_label, self.prompt_label, buttons=[self.finish_button, *self.answer_buttons.values()])
        layout = page.layout()
        assert isinstance(layout, QVBoxLayout)  # _page lays the page out in a column
        layout.insertLayout(2, replies, 1)
        layout.insertLayout(3, writing)
        return page

    def _done_page(self) -> QWidget:
        self.result_label = QLabel(wordWrap=True, textInteractionFlags=Qt.TextInteractionFlag.TextSelectableByMouse)
        close = QPushButton("Close")
        close.clicked.connect(self.accept)
        return _page(self.result_label, stretch=True, buttons=[close])

    # -- intro and building ---------------------------------------------------------
    def _library_paths(self) -> list[Path]:
        base = self._engine.base
        return library_reward_paths(self._paths.library(base.path)) if base is not None else []

    def _shipped(self) -> ShippedLibrary | None:
        """The library that comes with the app for the loaded model file, if any (and it did not fail to install)."""
        base = self._engine.base
        if base is None or Path(base.path) in self._shipped_refused:
            return None
        return shipped_library(base.path, folder=self._shipped_folder)

    def show_intro(self) -> None:
        self.pages.setCurrentIndex(0)
        paths = self._library_paths()
        shipped = None if paths else self._shipped()
        self.start_button.setEnabled(bool(paths or shipped) and not self._build.running)
        self.build_button.setVisible(not paths and not shipped and self._engine.base is not None)
        self.build_button.setEnabled(not self._build.running)
        about = (
            f"Answer up to {self._questions} questions. Each shows two replies to one prompt; pick the one you "
            "prefer, or say you have no preference. Your answers set the style dials in the Rewards panel; "
            "move them any time, or answer again with “Retune my style…”."
        )
        if self._engine.base is None:
            self.intro_label.setText(f"{about}\n\nLoad a model first.")
        elif paths:
            self.intro_label.setText(f"{about}\n\n{len(paths)} style rewards for {self._engine.base.name}.")
        elif shipped:
            self.intro_label.setText(
                f"{about}\n\nThe {len(shipped.reward_names)} style rewards for {self._engine.base.name} come "
                "with the app; Start sets them up (a few seconds)."
            )
        else:
            self.intro_label.setText(
                f"{about}\n\n{self._engine.base.name} has no style rewards yet. Building them "
                f"takes about {BUILD_MINUTES} minutes on a laptop CPU, once per model; closing "
                "this window cancels the build."
            )

    def build_library(self) -> None:
        base = self._engine.base
        assert base is not None  # the build button shows only with a model loaded
        folder = self._paths.library(base.path)
        argv = self._build_command(model_path=base.path, out_dir=folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.build_bar.setRange(0, 0)
        self.build_bar.show()
        self.build_label.setText("Starting…")
        self._build.start(argv, folder)
        self.show_intro()

    def _build_ended(self, message: str) -> None:
        self.build_bar.hide()
        self.build_label.setText(message)
        self.show_intro()

    # -- the questions --------------------------------------------------------------
    @property
    def _ready_survey(self) -> StyleSurvey:
        """The survey, for the steps that come after it loaded (a question, a round of replies, an answer)."""
        if self._survey is None:
            raise RuntimeError("the style survey has not loaded yet")
        return self._survey

    def start(self) -> None:
        """Ask the first question: install the shipped rewards first if the model has none yet."""
        paths, base = self._library_paths(), self._engine.base
        shipped = None if paths else self._shipped()
        self.pages.setCurrentIndex(1)
        if shipped is None or base is None:
            self._load_survey(paths)
            return
        self._set_waiting("Setting up the style rewards…")
        model_path, folder = Path(base.path), self._paths.library(base.path)
        run_in_background(
            lambda: install_shipped_library(shipped, model_path, folder),
            self._load_survey,
            partial(self._install_failed, model_path),
        )

    def _install_failed(self, model_path: Path, message: str) -> None:
        """Back to the intro, which offers the build instead."""
        self._shipped_refused.add(model_path)
        self._set_waiting("")
        if self.isVisible():
            self.show_intro()
            self.build_label.setText(message)

    def _load_survey(self, paths: list[Path]) -> None:
        if not self.isVisible():  # closed while the rewards were installed
            return
        self._labels = {
            info.name: (info.card.label or info.name)
            for info in self._engine.describe_rewards(paths)
            if info.card is not None
        }
        self._set_waiting("Loading the style rewards…")
        run_in_background(
            lambda: self._engine.run_exclusive(
                lambda base: self._survey_factory(base, paths, questions=self._questions)
            ),
            self._survey_ready,
            self._failed,
        )

    def _survey_ready(self, survey: StyleSurvey) -> None:
        self._survey = survey
        if self.isVisible():  # not closed while the rewards loaded
            self._next_question()

    def _next_question(self) -> None:
        """Ask the best unasked pair at once if a round is written, else wait for the round being written."""
        survey = self._ready_survey
        if self._round_running or not survey.unasked:
            self._show_when_written = True
            self._set_waiting("Writing replies…")
            if not self._round_running:
                self._write_round()
        else:
            self._show_question(survey.pick_question())

    def _write_round(self) -> None:
        survey = self._ready_survey
        self._round_running, self._round_owed = True, False
        run_in_background(
            lambda: self._engine.run_exclusive(lambda _base: survey.write_round(progress=self._relay.progress.emit)),
            self._round_written,
            self._failed,
        )

    def _round_written(self, _result: object = None) -> None:
        self._round_running = False
        if self._show_when_written and self.pages.currentIndex() == 1:
            self._show_when_written = False
            self._show_question(self._ready_survey.pick_question())
        elif self._round_owed:
            self._write_round()

    def _show_question(self, question: StyleQuestion) -> None:
        """Show it, then write the next round while the user reads (the pair is picked after the answer)."""
        survey = self._ready_survey
        self._question = question
        number = len(survey.answered) + 1
        self.counter_label.setText(f"<b>Question {number} of {survey.questions}</b>")
        self.prompt_label.setText(f"Prompt: {question.prompt}")
        for view, reply in zip(self.reply_views, (question.first, question.second)):
            view.setPlainText(reply.text or "(an empty reply)")
        self._set_waiting("")
        if number < survey.questions:
            self._round_owed = self._round_running  # the first question is shown while its round still runs
            if not self._round_running:
                self._write_round()

    def answer(self, answer: str) -> None:
        if self._question is None:
            return
        survey = self._ready_survey  # a question is shown only once the survey loaded
        survey.answer(self._question, answer)
        self._question = None
        if survey.finished:
            self.finish()
        else:
            self._next_question()

    def finish(self) -> None:
        """Save the profile from the answers so far and set the dials."""
        if self._survey is None or not self._survey.answered:
            return
        self._survey.cancel()  # a round written ahead is not needed any more
        profile = save_profile(self._store, self._survey, PROFILE_NAME)
        self._store.set_setting(SURVEY_SETTING, "done")
        answered = len(self._survey.answered)
        self.result_label.setText(
            f"<b>Your style, from {answered} answer{'s' if answered != 1 else ''}</b><br><br>"
            + dials_text(profile, self._labels).replace("\n", "<br>")
            + "<br><br>The style dials in the Rewards panel are set to these weights (below 0: away from that "
            "style). Move them any time, or answer again with “Retune my style…”. Your picks are also kept as "
            "feedback for tuning."
        )
        self.pages.setCurrentIndex(2)
        self.profile_saved.emit()

    def _set_waiting(self, message: str) -> None:
        """While ``message`` is shown (non-empty) the user waits for replies and nothing can be answered."""
        waiting = self._waiting = bool(message)
        if waiting:
            for view in self.reply_views:
                view.clear()
        for button in self.answer_buttons.values():
            button.setEnabled(not waiting)
        self.finish_button.setEnabled(not waiting and bool(self._survey and self._survey.answered))
        self.writing_bar.setVisible(waiting)
        self.writing_bar.setRange(0, 0)
        self.writing_label.setText(message)

    def _show_writing(self, done: int, total: int) -> None:
        if not self._waiting:  # a round written ahead, while the user reads
            return
        survey = self._survey
        if self._show_when_written and survey is not None and not survey.answered and survey.unasked:
            self._show_when_written = False  # the first question: its first pair, without waiting for the third reply
            self._show_question(survey.pick_question())
            return
        self.writing_bar.setRange(0, total)
        self.writing_bar.setValue(done)
        self.writing_label.setText(f"Writing replies: {done} of {total}…")

    def _failed(self, message: str) -> None:
        self._round_running = False
        if self.pages.currentIndex() == 2 or not self.isVisible():  # e.g. the round written ahead, cancelled
            return
        self.result_label.setText(f"<b>The questions stopped.</b><br><br>{message}")
        self.pages.setCurrentIndex(2)

    # -- closing --------------------------------------------------------------------
    def done(self, result: int) -> None:
        """Closing (Skip, Close, Esc) cancels a build; a first-run offer closed unanswered counts as skipped."""
        self._build.cancel()
        self._build.wait(5000)
        if self._survey is not None:
            self._survey.cancel()  # stops the replies being written, which hold the model
        if first_run_pending(self._store):
            self._store.set_setting(SURVEY_SETTING, "skipped")
        super().done(result)


def _page(*widgets: QWidget, buttons: list[QPushButton], stretch: bool = False) -> QWidget:
    """The widgets in a column (a QVBoxLayout), then the buttons in a row on the right."""
    page = QWidget()
    layout = QVBoxLayout(page)
    for widget in widgets:
        layout.addWidget(widget)
    if stretch:
        layout.addStretch(1)
    row = QHBoxLayout()
    row.addStretch(1)
    for button in buttons:
        row.addWidget(button)
    layout.addLayout(row)
    return page
