"""The app's settings: model and sampling defaults live in the store; the data folder in a small JSON
in the OS config folder, because it must be known before the store is opened."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TypeGuard

import platformdirs

from engine.app.paths import APP_NAME, AppPaths
from engine.runtime.base_model import BaseModelConfig
from engine.runtime.errors import StoreError
from engine.runtime.files import write_atomically
from engine.runtime.steering import SamplingConfig
from engine.runtime.user_json import parse_user_json

_MODEL_DEFAULTS = BaseModelConfig()
_SAMPLING_DEFAULTS = SamplingConfig()
STORE_KEY = "desktop"


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    n_threads: int | None = _MODEL_DEFAULTS.n_threads  # None: one per core
    n_gpu_layers: int | None = _MODEL_DEFAULTS.n_gpu_layers  # None: all if there is a GPU backend
    n_ctx: int = _MODEL_DEFAULTS.n_ctx
    temperature: float = _SAMPLING_DEFAULTS.temperature
    top_k: int = _SAMPLING_DEFAULTS.top_k
    top_p: float = _SAMPLING_DEFAULTS.top_p
    min_p: float = _SAMPLING_DEFAULTS.min_p
    max_tokens: int = _SAMPLING_DEFAULTS.max_tokens
    stop: tuple[str, ...] = ()  # stop sequences: the reply ends before any of them
    alpha: float = 1.0  # overall reward strength
    last_model: str = ""

    @classmethod
    def load(cls, store) -> AppSettings:
        """The saved settings; unknown keys are ignored, missing or unusable values fall back to the defaults."""
        try:
            saved = store.setting(STORE_KEY, {})
        except StoreError:  # the saved value is damaged: start with the defaults, the next save replaces it
            saved = {}
        if not isinstance(saved, dict):
            return cls()
        known = {field.name for field in fields(cls)}
        usable = {key: value for key, value in saved.items() if key in known and _usable(key, value)}
        return cls(**usable | ({"stop": tuple(usable["stop"])} if "stop" in usable else {}))

    def save(self, store) -> None:
        store.set_setting(STORE_KEY, asdict(self))

    def model_config(self) -> BaseModelConfig:
        return BaseModelConfig(n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers)

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            max_tokens=self.max_tokens,
            stop=self.stop,
            seed=seed,
        )

    def sampling_values(self) -> dict:
        """The sampling settings by name, as a preset keeps them."""
        return {name: getattr(self, name) for name in SAMPLING_SETTINGS}

    def with_sampling(self, values: dict) -> AppSettings:
        """These settings with a preset's sampling values (those it holds that are usable)."""
        usable = {key: value for key, value in values.items() if key in SAMPLING_SETTINGS and _usable(key, value)}
        return replace(self, **usable | ({"stop": tuple(usable["stop"])} if "stop" in usable else {}))


SAMPLING_SETTINGS = ("temperature", "top_k", "top_p", "min_p", "max_tokens", "stop")
MAX_STOP_SEQUENCES = 8


# What the settings dialog and the strength slider can set; a saved value outside is not one the app wrote.
SETTING_RANGES = {
    "n_threads": (1, 256),
    "n_gpu_layers": (0, 999),
    "n_ctx": (256, 131072),
    "temperature": (0.0, 2.0),
    "top_k": (1, 1000),
    "top_p": (0.01, 1.0),
    "min_p": (0.0, 0.99),
    "max_tokens": (1, 32768),
    "alpha": (0.0, 3.0),
}
AUTOMATIC = ("n_threads", "n_gpu_layers")  # these may also be None: automatic


def _usable(key: str, value: object) -> bool:
    """Whether a saved value is one the app could have saved: of the field's type, in its range."""
    if key == "last_model":
        return isinstance(value, str)
    if key == "stop":
        return (
            isinstance(value, (list, tuple))
            and len(value) <= MAX_STOP_SEQUENCES
            and all(isinstance(text, str) and text for text in value)
        )
    if value is None:
        return key in AUTOMATIC
    low, high = SETTING_RANGES[key]
    number_types = int if isinstance(low, int) else (int, float)
    return isinstance(value, number_types) and not isinstance(value, bool) and low <= value <= high


# -- the data folder: read once at start-up, into the AppPaths the window passes down --------------------------
def data_folder_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "desktop.json"


def configured_data_folder() -> Path | None:
    """The folder desktop.json names; None (the default folder) if the file is missing or damaged."""
    try:
        saved = parse_user_json(data_folder_file().read_bytes())
    except (OSError, ValueError):
        return None
    folder = saved.get("data_folder") if isinstance(saved, dict) else None
    return Path(folder) if _usable_folder(folder) else None


def _usable_folder(folder: object) -> TypeGuard[str]:
    """An absolute path the OS can take: it becomes the data folder, and the engine creates it."""
    if not isinstance(folder, str) or "\0" in folder or not os.path.isabs(folder):
        return False
    try:
        os.fsencode(folder)
    except UnicodeEncodeError:
        return False
    return True


def save_data_folder(folder: Path) -> None:
    data_folder_file().parent.mkdir(parents=True, exist_ok=True)
    write_atomically(data_folder_file(), json.dumps({"data_folder": str(folder)}))


def startup_paths(data_folder: Path | None = None) -> AppPaths:
    """The window's paths: ``data_folder`` (--data-folder), else PRT_HOME, else the configured folder, else the OS's."""
    return AppPaths.resolve(data_folder, configured=configured_data_folder())
