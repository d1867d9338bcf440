"""The main window: conversations on the left, the chat in the middle, rewards and tuning docked on the
right, the model picker in the toolbar, speed and active rewards in the status bar."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QCoreApplication, Qt
from PySide6.QtGui import QAction, QCloseEvent, QGuiApplication, QKeySequence
from PySide6.QtWidgets import (
    QDialog,
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QSplitter,
)

from desktop.chat_session import ChatSession
from desktop.chat_view import ChatView
from desktop.conversation_list import ConversationList
from desktop.formatting import speed_text
from desktop.model_picker import ModelPicker
from desktop.presets import PresetPicker
from desktop.rewards_panel import RewardsPanel
from desktop.settings import AppSettings, save_data_folder
from desktop.settings_dialog import SettingsDialog
from desktop.style_dialog import StyleDialog, first_run_pending
from desktop.tune_panel import TunePanel
from desktop.workers import run_in_background, wait_for_background_work
from engine.app.backend import ChatBackend
from engine.app.backup import BackupSummary, create_backup, restore_backup
from engine.app.paths import AppPaths
from engine.app.store import Preset, Store

APP_TITLE = "PRT Chat"


class MainWindow(QMainWindow):
    def __init__(
        self,
        engine: ChatBackend,
        store: Store,
        *,
        paths: AppPaths | None = None,
        settings: AppSettings | None = None,
        tune_command_factory: Callable[..., list[str]] | None = None,
        offer_style_survey: bool = False,
    ) -> None:
        """``paths``: the app's, built at start-up (None: resolved here, from PRT_HOME or the OS's folder).
        ``offer_style_survey``: open "Find your style" after the first model loads, until answered or skipped."""
        super().__init__()
        self.setWindowTitle(APP_TITLE)
        self.engine, self.store = engine, store
        self.paths = paths or AppPaths.resolve()
        self.settings = AppSettings.load(store) if settings is None else settings
        self.conversations = ConversationList(store)
        self.chat_view = ChatView()
        self.session = ChatSession(engine, store, self.chat_view, lambda seed: self.settings.sampling(seed))
        self.rewards_panel = RewardsPanel(engine, store, strength=self.settings.alpha)
        self.tune_panel = TunePanel(engine, store, paths=self.paths, command_factory=tune_command_factory)
        self.model_picker = ModelPicker(self.paths)
        self.preset_picker = PresetPicker(store)
        self.style_dialog: StyleDialog | None = None
        self._shut_down = False
        self._deleted: list[int] = []  # chats in the trash, the last deleted last: Undo brings them back
        self._offer_style_survey = offer_style_survey
        self.error_box = QMessageBox(QMessageBox.Icon.Warning, APP_TITLE, "", QMessageBox.StandardButton.Ok, self)
        self._build_layout()
        self._build_status_bar()
        self._build_actions()
        self._connect()
        store.empty_trash()  # what a crash left there: deleting is undone only within one run
        store.mark_interrupted()
        self.conversations.refresh()
        self.session.open(None)
        self.rewards_panel.refresh()
        self.model_picker.show_current(self._model_path())

    # -- building ------------------------------------------------------------------
    def _build_layout(self) -> None:
        splitter = QSplitter()
        splitter.addWidget(self.conversations)
        splitter.addWidget(self.chat_view)
        splitter.setStretchFactor(1, 1)
        splitter.setSizes([220, 780])
        self.setCentralWidget(splitter)
        self.rewards_dock = self._dock("Rewards", self.rewards_panel)
        self.tune_dock = self._dock("Tune", self.tune_panel)
        self.tabifyDockWidget(self.rewards_dock, self.tune_dock)
        self.rewards_dock.raise_()
        self.resizeDocks([self.rewards_dock], [340], Qt.Orientation.Horizontal)

    def _dock(self, title: str, widget) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, dock)
        return dock

    def _build_status_bar(self) -> None:
        self.busy_bar = QProgressBar(maximumWidth=120, visible=False)
        self.busy_bar.setRange(0, 0)  # busy, no percentage: llama.cpp does not report load progress
        self.model_label = QLabel()
        self.rewards_label = QLabel()
        self.speed_label = QLabel()
        self.context_label = QLabel()
        self.context_label.setToolTip(
            "Tokens this conversation takes in the model's context; when it is full, the oldest turns are left out"
        )
        for widget in (self.busy_bar, self.model_label, self.rewards_label, self.context_label, self.speed_label):
            self.statusBar().addPermanentWidget(widget)
        self._show_model_and_rewards()

    def _action(self, menu, text: str, slot, shortcut=None, *, checkable: bool = False) -> QAction:
        action = QAction(text, self, checkable=checkable)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _build_actions(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self.new_chat_action = self._action(file_menu, "&New chat", self.new_chat, QKeySequence.StandardKey.New)
        self._action(file_menu, "Add a &model file…", self.model_picker.add_file)
        self._action(file_menu, "Add a &reward file…", self.rewards_panel.choose_reward_file)
        file_menu.addSeparator()
        self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        chat_menu = bar.addMenu("&Chat")
        self._action(chat_menu, "&Find chats", self.conversations.focus_search, QKeySequence.StandardKey.Find)
        self._action(chat_menu, "&Stop the reply", self.session.stop, Qt.Key.Key_Escape)
        self._action(chat_menu, "&Regenerate", self.session.regenerate, "Ctrl+R")
        self._action(chat_menu, "C&ontinue the reply", self.session.continue_reply, "Ctrl+Shift+R")
        self.undo_delete_action = self._action(chat_menu, "&Undo delete", self.undo_delete, "Ctrl+Shift+Z")
        self.undo_delete_action.setEnabled(False)
        chat_menu.addSeparator()
        self._action(chat_menu, "Find or retune my st&yle…", self.open_style_dialog)
        view_menu = bar.addMenu("&View")
        self.token_view_action = self._action(
            view_menu, "&Token view", self.chat_view.set_token_view, "Ctrl+T", checkable=True
        )
        self.token_view_action.setToolTip(
            "Tint each token by how much the rewards raised (green) or lowered (red) "
            "it; hover a token for the candidates before and after (Ctrl+T)"
        )
        view_menu.addAction(self.rewards_dock.toggleViewAction())
        view_menu.addAction(self.tune_dock.toggleViewAction())
        settings_menu = bar.addMenu("&Settings")
        self._action(settings_menu, "&Preferences…", self.open_settings, QKeySequence.StandardKey.Preferences)
        self._action(settings_menu, "&Export all conversations…", self.export_conversations)
        self._action(settings_menu, "&Import conversations…", self.import_conversations)
        self._action(settings_menu, "&Back up everything…", self.back_up)
        self._action(settings_menu, "&Restore from a backup…", self.restore)
        settings_menu.addSeparator()
        self._action(settings_menu, "&Delete all data…", self.delete_all_data)
        toolbar = self.addToolBar("Main")
        toolbar.setObjectName("Main")
        toolbar.addWidget(QLabel(" Model "))
        toolbar.addWidget(self.model_picker)
        toolbar.addAction(self.new_chat_action)
        toolbar.addAction(self.token_view_action)
        toolbar.addSeparator()
        toolbar.addWidget(QLabel(" Preset "))
        toolbar.addWidget(self.preset_picker)

    def _connect(self) -> None:
        self.conversations.conversation_selected.connect(self.session.open)
        self.conversations.conversation_deleted.connect(self._conversation_deleted)
        self.session.conversations_changed.connect(lambda: self.conversations.refresh(self.session.conversation_id))
        self.session.feedback_changed.connect(self.tune_panel.refresh_counts)
        self.session.conversations_changed.connect(self.tune_panel.refresh_counts)  # pairs from alternatives
        self.session.speed_changed.connect(lambda speed: self.speed_label.setText(speed_text(speed)))
        self.session.context_changed.connect(self._show_context)
        self.session.conversation_opened.connect(self._conversation_opened)
        self.preset_picker.preset_chosen.connect(self.choose_preset)
        self.preset_picker.save_requested.connect(self.save_preset)
        self.preset_picker.delete_requested.connect(self.delete_preset)
        self.session.error.connect(self.show_error)
        self.rewards_panel.changed.connect(self._show_model_and_rewards)
        self.rewards_panel.strength_changed.connect(self._save_strength)
        self.rewards_panel.error.connect(self.show_error)
        self.rewards_panel.style_requested.connect(self.open_style_dialog)
        self.tune_panel.reward_tuned.connect(lambda _path: self.rewards_panel.refresh())
        self.model_picker.model_chosen.connect(self.load_model)
        self.model_picker.error.connect(self.show_error)
        QGuiApplication.styleHints().colorSchemeChanged.connect(self._color_scheme_changed)

    # -- model -----------------------------------------------------------------------
    def _model_path(self) -> Path | None:
        return self.engine.base.path if self.engine.base is not None else None

    def load_model(self, path: Path | str) -> None:
        """Load a GGUF on the thread pool; the chat waits (with a busy bar) until it is in."""
        path, config = Path(path), self.settings.model_config()
        self._show_loading(f"Loading {path.stem}…")
        run_in_background(
            lambda: self.engine.load_model(path, config), lambda _base: self._model_loaded(path), self._model_failed
        )

    def _model_loaded(self, path: Path) -> None:
        self._show_loading("")
        self.settings = replace(self.settings, last_model=str(path))
        self.settings.save(self.store)
        self.model_picker.show_current(path)
        self.rewards_panel.refresh()  # badges and active rewards, for the new vocabulary
        self.statusBar().showMessage(f"Loaded {path.stem}", 5000)
        if self._offer_style_survey and first_run_pending(self.store):
            self.open_style_dialog()

    def _model_failed(self, message: str) -> None:
        self._show_loading("")
        self.model_picker.show_current(self._model_path())
        self.show_error(message)

    def _show_loading(self, message: str) -> None:
        loading = bool(message)
        self.session.model_ready = not loading
        self.busy_bar.setVisible(loading)
        self.model_picker.setEnabled(not loading)
        self.statusBar().showMessage(message)
        self._show_model_and_rewards()

    def _show_model_and_rewards(self) -> None:
        base = self.engine.base
        self.model_label.setText(f"Model: {base.name}" if base is not None else "No model loaded")
        names = ", ".join(self.engine.active_reward_names) or "none"
        self.rewards_label.setText(f"Rewards: {names} (strength {self.engine.alpha:.2f})")

    # -- chats ---------------------------------------------------------------------------
    def new_chat(self) -> None:
        self.conversations.clear_selection()
        self.session.open(None)
        self.chat_view.input.setFocus()

    def _conversation_deleted(self, conversation_id: int) -> None:
        self._deleted.append(conversation_id)
        self.undo_delete_action.setEnabled(True)
        title = self.store.conversation(conversation_id).title
        self.statusBar().showMessage(f"Deleted “{title}”. Chat › Undo delete (Ctrl+Shift+Z) brings it back.", 15000)
        if self.session.conversation_id == conversation_id:
            self.session.open(None)

    def undo_delete(self) -> None:
        """Bring back the chat deleted last (possible until the app closes)."""
        if not self._deleted:
            return
        conversation_id = self._deleted.pop()
        self.store.restore_conversation(conversation_id)
        self.undo_delete_action.setEnabled(bool(self._deleted))
        self.conversations.refresh(conversation_id)
        self.session.open(conversation_id)

    def _show_context(self, used: int, size: int) -> None:
        self.context_label.setText(f"Context: {used} / {size}")

    # -- presets ---------------------------------------------------------------------------
    def choose_preset(self, preset_id: int | None) -> None:
        """Use a preset in this chat: its system prompt, dials, strength and sampling settings."""
        self.session.set_preset(preset_id)
        if preset_id is not None:
            preset = self.store.preset(preset_id)
            self.chat_view.set_system_prompt(preset.system_prompt)
            self.session.set_system_prompt(preset.system_prompt)
            self._apply_preset(preset)
        self.preset_picker.refresh(preset_id)

    def _conversation_opened(self, preset_id: int | None) -> None:
        """A chat with a preset brings its dials and sampling back; its system prompt is the chat's own."""
        if preset_id is not None:
            self._apply_preset(self.store.preset(preset_id))
        self.preset_picker.refresh(preset_id)

    def _apply_preset(self, preset: Preset) -> None:
        self.rewards_panel.apply_dials(preset.dials, preset.strength)
        self.settings = replace(self.settings.with_sampling(preset.sampling), alpha=preset.strength)
        self.settings.save(self.store)

    def save_preset(self, name: str) -> None:
        preset_id = self.store.save_preset(
            name,
            system_prompt=self.chat_view.system_prompt.text(),
            dials=self.rewards_panel.dials(),
            strength=self.rewards_panel.strength,
            sampling=self.settings.sampling_values(),
        )
        self.choose_preset(preset_id)
        self.statusBar().showMessage(f"Saved the preset “{name}”; this chat uses it.", 10000)

    def delete_preset(self, preset_id: int) -> None:
        self.store.delete_preset(preset_id)
        if self.session.preset_id == preset_id:
            self.session.preset_id = None
        self.preset_picker.refresh(None)

    # -- style -----------------------------------------------------------------------------
    def open_style_dialog(self) -> None:
        """ "Find your style": window-modal, so the chat waits while the questions use the model."""
        if self.style_dialog is not None and self.style_dialog.isVisible():
            self.style_dialog.raise_()
            return
        self.style_dialog = StyleDialog(self.engine, self.store, self, paths=self.paths)
        self.style_dialog.profile_saved.connect(self.rewards_panel.refresh)
        self.style_dialog.open()

    # -- settings and data -----------------------------------------------------------------
    def _save_strength(self, strength: float) -> None:
        self.settings = replace(self.settings, alpha=strength)
        self.settings.save(self.store)

    def open_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self.paths.data, self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        old, self.settings = self.settings, dialog.settings()
        self.settings.save(self.store)
        if dialog.chosen_data_folder() != self.paths.data:
            save_data_folder(dialog.chosen_data_folder())
            self.statusBar().showMessage("The new data folder is used from the next start.", 10000)
        if self.settings.model_config() != old.model_config() and self.engine.base is not None:
            self.load_model(self.engine.base.path)

    def export_conversations(self) -> None:
        path, _filter = QFileDialog.getSaveFileName(self, "Export all conversations", "chats.json", "JSON (*.json)")
        if path:
            counts = self.store.export_json(path)
            self.statusBar().showMessage(
                f"Exported {counts['conversations']} conversations, {counts['messages']} "
                f"messages and {counts['feedback']} feedback items to {path}",
                10000,
            )

    def import_conversations(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "Import conversations", "", "JSON (*.json)")
        if path:
            counts = self.store.import_json(path)
            self.statusBar().showMessage(
                f"Imported {counts['conversations']} conversations ({counts['skipped']} "
                f"already here) and {counts['feedback']} feedback items",
                10000,
            )
            self.conversations.refresh()
            self.tune_panel.refresh_counts()

    def back_up(self) -> None:
        path, _filter = QFileDialog.getSaveFileName(
            self, "Back up everything", "prt-chat-backup.zip", "Backups (*.zip)"
        )
        if path:
            self._run_backup_job("Backing up…", lambda: create_backup(self.paths, Path(path)))

    def restore(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "Restore from a backup", "", "Backups (*.zip)")
        if path:
            self._run_backup_job("Restoring…", lambda: restore_backup(Path(path), self.paths), restored=True)

    def _run_backup_job(self, message: str, job: Callable[[], BackupSummary], *, restored: bool = False) -> None:
        self._show_loading(message)

        def done(summary: BackupSummary) -> None:
            self._show_loading("")
            if restored:
                self._reload_everything()
            self.statusBar().showMessage(summary.describe(), 20000)

        def failed(error: str) -> None:
            self._show_loading("")
            self.show_error(error)

        run_in_background(job, done, failed)

    def _reload_everything(self) -> None:
        """After a restore: settings, chats, presets, rewards and counts from the store."""
        self.settings = AppSettings.load(self.store)
        self.conversations.refresh()
        self.preset_picker.refresh(None)
        self.new_chat()
        self.rewards_panel.refresh()
        self.tune_panel.refresh_counts()

    def delete_all_data(self) -> None:
        if self.session.busy:
            self.show_error("Stop the reply before deleting data.")
            return
        answer = QMessageBox.warning(
            self,
            "Delete all data",
            "Delete every conversation, all feedback, the list of installed rewards, the "
            "tuning history, the saved teacher passes and the settings? Model and reward files stay on disk. "
            "This cannot be undone.",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return
        self.store.delete_all()
        self.paths.teacher_cache.unlink(missing_ok=True)  # it holds the tokens of every text tuned on
        self.new_chat()
        self.conversations.refresh()
        self.rewards_panel.refresh()
        self.tune_panel.refresh_counts()

    # -- errors, theme, shutdown ---------------------------------------------------------------
    def show_error(self, message: str) -> None:
        """A readable message, in the status bar and in a (non-blocking) dialog."""
        self.statusBar().showMessage(message, 15000)
        self.error_box.setText(message)
        self.error_box.open()

    def _color_scheme_changed(self) -> None:
        self.rewards_panel.refresh()  # the badges' colors; token tints follow their own palette change

    def closeEvent(self, event: QCloseEvent) -> None:
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Stop the reply and any tuning, wait for the workers, and let their results reach the store; once."""
        if self._shut_down:
            return
        self._shut_down = True
        self.session.stop()
        self.tune_panel.shutdown()
        if self.style_dialog is not None:
            self.style_dialog.reject()  # cancels its build or replies
        wait_for_background_work()
        QCoreApplication.sendPostedEvents()
        if not self.store.closed:  # closed first by its owner: the next start empties the trash
            self.store.empty_trash()  # no reply writes into a deleted chat any more
