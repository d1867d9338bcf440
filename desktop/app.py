"""``prt app``: start the desktop app, or render its window to a PNG (``--screenshot``), optionally
with canned data and no model (``--demo``)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from PySide6.QtWidgets import QApplication, QMessageBox

from desktop.main_window import APP_TITLE, MainWindow
from desktop.settings import AppSettings, startup_paths
from desktop.workers import error_text
from engine.app.chat import ChatEngine
from engine.app.models import default_model_path
from engine.app.paths import AppPaths
from engine.app.store import Store
from engine.runtime.errors import PrtError

WINDOW_SIZE = (1280, 800)
NO_MODEL = (
    "No model installed yet: choose “Add a file…” in the model list, or run 'prt models fetch' "
    "to install the default one."
)


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="prt app", description="The PRT Chat desktop app.")
    parser.add_argument(
        "--model", metavar="PATH", help="the GGUF to load (default: the last one used, else the default model)"
    )
    parser.add_argument("--screenshot", metavar="FILE.png", help="render the window to a PNG and exit")
    parser.add_argument("--demo", action="store_true", help="a canned conversation and rewards, no model")
    parser.add_argument(
        "--data-folder",
        type=Path,
        default=None,
        metavar="DIR",
        help="the app's data folder (default: PRT_HOME, else the one set in Settings, else the OS's)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    # a screenshot needs no display: offscreen, unless QT_QPA_PLATFORM names a platform (as an option, which
    # would override it, not by changing the environment)
    platform = ["-platform", "offscreen"] if args.screenshot and "QT_QPA_PLATFORM" not in os.environ else []
    app = QApplication.instance() or QApplication([sys.argv[0], *platform])
    app.setApplicationName(APP_TITLE)
    with contextlib.ExitStack() as cleanup:
        try:
            window = _demo_window(cleanup) if args.demo else _real_window(cleanup, args.model, args.data_folder)
        except PrtError as error:
            return _fatal(str(error), interactive=not args.screenshot)
        cleanup.callback(window.close)
        cleanup.enter_context(_errors_shown_in(window))
        window.resize(*WINDOW_SIZE)
        window.show()
        if args.screenshot:
            return _save_screenshot(window, Path(args.screenshot))
        return app.exec()


def _real_window(cleanup: contextlib.ExitStack, model: str | None, data_folder: Path | None) -> MainWindow:
    paths = startup_paths(data_folder)
    store = cleanup.enter_context(Store(paths.store))
    engine = ChatEngine()
    cleanup.callback(engine.close)
    settings = AppSettings.load(store)
    window = MainWindow(engine, store, paths=paths, settings=settings, offer_style_survey=True)
    path = _model_to_load(model, settings, paths)
    if path is None:
        window.statusBar().showMessage(NO_MODEL)
    else:
        window.load_model(path)
    return window


def _model_to_load(model: str | None, settings: AppSettings, paths: AppPaths) -> Path | None:
    """--model, else the model used last (if it is still there), else the default model (if installed)."""
    if model:
        return Path(model)
    for candidate in (settings.last_model, default_model_path(paths)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _demo_window(cleanup: contextlib.ExitStack) -> MainWindow:
    from desktop.demo import demo_data

    demo = cleanup.enter_context(demo_data())
    window = MainWindow(demo.engine, demo.store, paths=demo.paths, settings=AppSettings())
    window.session.remember_tokens(demo.reply_id, demo.tokens)
    window.conversations.refresh()
    window.conversations.list.setCurrentRow(0)  # the demo conversation, the most recent
    window.token_view_action.trigger()
    return window


@contextlib.contextmanager
def _errors_shown_in(window: MainWindow):
    """An exception escaping a Qt slot is shown in the window (and its traceback printed), not lost."""
    previous = sys.excepthook

    def show(kind, error, trace):
        window.show_error(error_text(error.with_traceback(trace)))

    sys.excepthook = show
    try:
        yield
    finally:
        sys.excepthook = previous


def _save_screenshot(window: MainWindow, path: Path) -> int:
    for _ in range(5):  # let layouts and message heights settle
        QApplication.processEvents()
    if not window.grab().save(str(path)):
        return _fatal(f"Could not write the screenshot to {path}.", interactive=False)
    return 0


def _fatal(message: str, *, interactive: bool) -> int:
    print(f"prt: error: {message}", file=sys.stderr)
    if interactive:
        QMessageBox.critical(None, APP_TITLE, message)
    return 1


if __name__ == "__main__":
    sys.exit(main())
