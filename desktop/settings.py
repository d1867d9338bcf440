"""The app's settings: model and sampling defaults live in the store; the data folder in a small JSON
in the OS config folder, because it must be known before the store is opened."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import platformdirs

from engine.base_model import BaseModelConfig
from engine.files import write_atomically
from engine.models import APP_NAME
from engine.steering import SamplingConfig

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
    alpha: float = 1.0  # overall reward strength
    last_model: str = ""

    @classmethod
    def load(cls, store) -> "AppSettings":
        """The saved settings; unknown or missing keys fall back to the defaults."""
        saved = store.setting(STORE_KEY, {}) or {}
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})

    def save(self, store) -> None:
        store.set_setting(STORE_KEY, asdict(self))

    def model_config(self) -> BaseModelConfig:
        return BaseModelConfig(n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers)

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              max_tokens=self.max_tokens, seed=seed)


# -- the data folder: read at start-up, before anything asks engine.models.app_data_dir() ---------------
def data_folder_file() -> Path:
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "desktop.json"


def configured_data_folder() -> Path | None:
    try:
        return Path(json.loads(data_folder_file().read_text(encoding="utf-8"))["data_folder"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_data_folder(folder: Path) -> None:
    data_folder_file().parent.mkdir(parents=True, exist_ok=True)
    write_atomically(data_folder_file(), json.dumps({"data_folder": str(folder)}))


def apply_data_folder() -> None:
    """Point the engine at the configured data folder, unless PRT_HOME already names one."""
    folder = configured_data_folder()
    if folder is not None and "PRT_HOME" not in os.environ:
        os.environ["PRT_HOME"] = str(folder)
