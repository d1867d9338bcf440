"""Every folder and file the app keeps, under one data folder: resolved once at start-up, then passed down.

The data folder is, in this order: the one a ``--data-folder`` flag names; ``PRT_HOME``, the user's override
(read here, never written); the one chosen in the window's settings; the OS's app-data folder. The window
passes it to its child processes with ``--data-folder``. A folder is created when it is first asked for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from engine.runtime.errors import PrtError

APP_NAME = "prt-chat"
HOME_VARIABLE = "PRT_HOME"
STORE_FILE = "chats.db"
TEACHER_CACHE_FILE = "teacher-cache.sqlite"


@dataclass(frozen=True)
class AppPaths:
    data: Path  # the data folder, as resolved (not created until a path below it is asked for)

    @classmethod
    def resolve(cls, data_folder: Path | str | None = None, *, configured: Path | None = None) -> AppPaths:
        """``data_folder`` (a flag), else ``PRT_HOME``, else ``configured`` (the settings'), else the OS's folder."""
        override = os.environ.get(HOME_VARIABLE)
        chosen = (
            data_folder
            or (Path(override) if override else None)
            or configured
            or platformdirs.user_data_dir(APP_NAME, appauthor=False)
        )
        return cls(Path(chosen))

    def folder(self, *parts: str) -> Path:
        """The data folder, or a folder inside it, created if missing."""
        folder = self.data.joinpath(*parts)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file in the way, no permission, a name too long for the file system
            raise PrtError(
                f"Cannot use the data folder {folder} ({error.strerror}); choose another data folder "
                f"in Settings, or set {HOME_VARIABLE} to one."
            ) from error
        return folder

    @property
    def models(self) -> Path:
        """Installed GGUFs, and models.json: the ones added by path."""
        return self.folder("models")

    @property
    def rewards(self) -> Path:
        """Where tuned rewards are saved by default."""
        return self.folder("rewards")

    def library(self, model_path: Path | str) -> Path:
        """Where the base style rewards for a model live: rewards/library/<model file name>."""
        return self.rewards / "library" / Path(model_path).stem

    @property
    def store(self) -> Path:
        """The chats, feedback and settings (engine/app/store.py)."""
        return self.folder() / STORE_FILE

    @property
    def teacher_cache(self) -> Path:
        """Where ``prt tune`` keeps its teacher passes (rewards_onnx/teacher_cache.py): the tuned texts' tokens."""
        return self.folder() / TEACHER_CACHE_FILE
