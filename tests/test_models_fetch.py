"""Fetching a catalog model (``prt models fetch ID``): one or more pinned PyPI wheels, checked, assembled, moved in.

The first tests are hermetic: small wheels built here and served to the real ``pip download`` from a folder
(``PIP_NO_INDEX`` + ``PIP_FIND_LINKS``, which pip reads from the environment), with the catalog pointed at them. The
slow ones fetch the real Gemma 3 270M from PyPI (once, into the user's model folder, see conftest.gemma_model_path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import pytest

from engine.app import models
from engine.app.models import CatalogModel, ModelCatalog, WheelPart, ensure_model, installed_models, resolve_model
from engine.app.paths import AppPaths
from engine.runtime.base_model import BaseModel, BaseModelConfig
from engine.runtime.decode import attach_rewards
from engine.runtime.errors import ModelFetchError, VocabularyMismatchError
from engine.runtime.files import file_sha256
from engine.runtime.reward_graph import random_reward_weights
from helpers import assert_one_line_error, prt, prt_process
from tiny_models import small_reward_shape, write_reward

PIECES = [b"first piece " * 1000, b"second piece " * 700, b"third and last piece " * 300]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_wheel(folder: Path, number: int, payload: bytes) -> WheelPart:
    """A minimal real wheel ``tiny-model-part<number>==1.0`` holding ``payload``, and its catalog part."""
    dist, module = f"tiny-model-part{number}", f"tiny_model_part{number}"
    wheel = folder / f"{module}-1.0-py3-none-any.whl"
    member = f"{module}/data/tiny.gguf.part{number:02d}"
    info = f"{module}-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return WheelPart(requirement=f"{dist}==1.0", wheel=wheel.name, wheel_sha256=file_sha256(wheel), member=member)


@pytest.fixture
def served(tmp_path, monkeypatch) -> Path:
    """A folder pip downloads from instead of PyPI."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def use_catalog(monkeypatch, *entries: CatalogModel) -> None:
    monkeypatch.setattr(models, "load_catalog", lambda: ModelCatalog(entries))


def tiny_entry(parts: list[WheelPart], *, content: bytes, **changes: Any) -> CatalogModel:
    entry = CatalogModel(
        id="tiny",
        name="Tiny",
        file="tiny.gguf",
        sha256=sha256(content),
        size=len(content),
        license="test",
        parts=tuple(parts),
        is_default=True,
    )
    return dataclasses.replace(entry, **changes)


@pytest.fixture
def model_folder(isolated_app_folder) -> Path:
    return AppPaths.resolve().models


def assert_nothing_left(folder: Path) -> None:
    assert sorted(os.listdir(folder)) == [], "a failed fetch left files in the model folder"


def test_the_parts_are_downloaded_checked_and_joined_in_order(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    use_catalog(monkeypatch, tiny_entry(parts, content=b"".join(PIECES)))
    said: list[str] = []
    path = ensure_model(AppPaths.resolve(), "tiny", progress=said.append)
    assert path == model_folder / "tiny.gguf" and path.read_bytes() == b"".join(PIECES)
    assert sorted(os.listdir(model_folder)) == ["tiny.gguf"]  # no wheels, no scratch folder
    assert said[0] == "Fetching the default model Tiny (0 MB, 3 wheels) from PyPI ..."
    assert said[1:4] == [f"  wheel {n} of 3: tiny-model-part{n}==1.0" for n in (1, 2, 3)]
    assert said[4].startswith(f"Installed Tiny at {path}")

    for wheel in served.iterdir():
        wheel.unlink()  # installed: a second fetch must not need pip at all
    assert ensure_model(AppPaths.resolve(), "default", progress=said.append) == path and len(said) == 5
    assert resolve_model(AppPaths.resolve(), "tiny") == path
    [listed] = installed_models(AppPaths.resolve())
    assert listed.catalog_id == "tiny" and listed.is_default


def test_a_wheel_whose_sha256_differs_stops_the_fetch(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    parts[1] = WheelPart(parts[1].requirement, parts[1].wheel, "0" * 64, parts[1].member)
    use_catalog(monkeypatch, tiny_entry(parts, content=b"".join(PIECES)))
    with pytest.raises(ModelFetchError, match=f"the downloaded wheel {parts[1].wheel} is .*, expected 0000"):
        ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None)
    assert_nothing_left(model_folder)


def test_an_assembled_file_whose_sha256_differs_is_not_installed(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    wrong_order = PIECES[1] + PIECES[0] + PIECES[2]  # the same size: only the sha256 tells
    use_catalog(monkeypatch, tiny_entry(parts, content=wrong_order))
    with pytest.raises(ModelFetchError, match="The sha256 of the assembled model tiny.gguf is .*corrupt"):
        ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None)
    assert_nothing_left(model_folder)


def test_an_assembled_file_of_the_wrong_size_is_not_installed(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    use_catalog(monkeypatch, tiny_entry(parts[:2], content=b"".join(PIECES)))
    with pytest.raises(ModelFetchError, match=f"tiny.gguf is {len(PIECES[0] + PIECES[1])} bytes, expected"):
        ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None)
    assert_nothing_left(model_folder)


def test_a_part_pip_cannot_find_stops_the_fetch_and_leaves_nothing(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    (served / parts[2].wheel).unlink()
    use_catalog(monkeypatch, tiny_entry(parts, content=b"".join(PIECES)))
    with pytest.raises(ModelFetchError, match=r"Could not download tiny-model-part3==1\.0 from PyPI"):
        ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None)
    assert_nothing_left(model_folder)


def test_a_wrong_file_of_the_same_name_is_replaced(served, monkeypatch, model_folder):
    parts = [build_wheel(served, 1, PIECES[0])]
    use_catalog(monkeypatch, tiny_entry(parts, content=PIECES[0]))
    (model_folder / "tiny.gguf").write_bytes(b"half a file")
    assert ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None).read_bytes() == PIECES[0]


def test_a_scratch_folder_left_by_a_killed_fetch_goes_at_the_next_fetch(served, monkeypatch, model_folder):
    parts = [build_wheel(served, 1, PIECES[0])]
    use_catalog(monkeypatch, tiny_entry(parts, content=PIECES[0]))
    stale, live = model_folder / ".fetch-killed", model_folder / ".fetch-running"
    for scratch in (stale, live):
        (scratch / "wheel-x").mkdir(parents=True)
        (scratch / "tiny.gguf.partial").write_bytes(b"half")
    hours_ago = os.stat(stale).st_mtime - 2 * models.STALE_SCRATCH_SECONDS
    for entry in [stale, *stale.rglob("*")]:
        os.utime(entry, (hours_ago, hours_ago))
    ensure_model(AppPaths.resolve(), "tiny", progress=lambda message: None)
    assert sorted(os.listdir(model_folder)) == [".fetch-running", "tiny.gguf"]  # another fetch may still be at work


def test_an_unknown_id_names_the_ones_there_are(model_folder):
    with pytest.raises(ModelFetchError) as raised:
        ensure_model(AppPaths.resolve(), "gemma-9000", progress=lambda message: None)
    assert "There is no model 'gemma-9000' to fetch" in str(raised.value)
    assert "smollm2-135m, gemma3-270m" in str(raised.value)
    assert_one_line_error(prt("models", "fetch", "gemma-9000"), "the models that can be fetched are: smollm2-135m")
    assert_nothing_left(model_folder)


def test_the_cli_fetches_by_id_and_lists_it(served, monkeypatch, model_folder):
    parts = [build_wheel(served, number, piece) for number, piece in enumerate(PIECES, start=1)]
    other = tiny_entry(parts[:1], content=PIECES[0], id="other", name="Other", file="other.gguf", is_default=False)
    use_catalog(monkeypatch, tiny_entry(parts, content=b"".join(PIECES)), other)
    result = prt("models", "fetch", "other", "--json")
    assert result.returncode == 0, result.stderr
    [listed] = json.loads(result.stdout)
    assert (listed["id"], listed["default"], listed["path"]) == ("other", False, str(model_folder / "other.gguf"))
    assert "Fetching Other (0 MB) from PyPI ..." in result.stderr  # one wheel: no per-wheel lines
    assert prt("models").stdout.startswith("other (other)\t")


def test_the_shipped_catalog_pins_every_part():
    catalog = models.load_catalog()
    assert catalog.default.id == "smollm2-135m" and catalog.ids == ["smollm2-135m", "gemma3-270m"]
    gemma = catalog.get("gemma3-270m")
    assert (gemma.size, len(gemma.parts)) == (253_113_024, 4) and "Gemma Terms of Use" in gemma.license
    assert [part.member[-6:] for part in gemma.parts] == ["part00", "part01", "part02", "part03"]
    for model in catalog.models:
        assert len(model.sha256) == 64 and all(len(part.wheel_sha256) == 64 for part in model.parts)
        assert all("==" in part.requirement for part in model.parts)  # pinned


# -- the real Gemma 3 270M, from PyPI ---------------------------------------------------------------------------

CONFIG = BaseModelConfig(n_ctx=512, n_threads=2, n_gpu_layers=0)


@pytest.fixture
def smollm_reward(tmp_path, default_model_path) -> Path:
    """A reward made for the default model (SmolLM2's 49152-token vocabulary)."""
    with BaseModel(default_model_path, config=CONFIG) as smollm:
        weights = random_reward_weights(small_reward_shape(smollm.n_vocab), seed=3)
        return write_reward(
            tmp_path / "smollm.onnx",
            weights,
            vocabulary_fingerprint=smollm.vocabulary_fingerprint,
            base_name=smollm.name,
        )


@pytest.mark.slow
def test_gemma_is_installed_verified_and_loads_with_its_vocabulary(gemma_model_path):
    gemma = models.load_catalog().get("gemma3-270m")
    assert gemma_model_path.name == gemma.file and gemma_model_path.stat().st_size == gemma.size
    assert file_sha256(gemma_model_path) == gemma.sha256
    with BaseModel(gemma_model_path, config=CONFIG) as base:
        assert base.n_vocab == 262_144


@pytest.mark.slow
def test_a_reward_for_the_default_model_is_refused_on_gemma(gemma_model_path, smollm_reward):
    with BaseModel(gemma_model_path, config=CONFIG) as base:
        with pytest.raises(VocabularyMismatchError) as refused:
            attach_rewards(base, [(smollm_reward, 1.0)])
    assert "'SmolLM2-135M-Instruct.Q4_1'" in str(refused.value) and "'gemma-3-270m-q4_k_m'" in str(refused.value)


@pytest.mark.slow
def test_the_cli_runs_gemma_by_id_and_refuses_a_default_model_reward(gemma_model_path, smollm_reward, model_folder):
    os.symlink(gemma_model_path, model_folder / gemma_model_path.name)  # installed here: nothing is fetched again
    listed = json.loads(prt("models", "--json").stdout)
    assert [(m["name"], m["id"]) for m in listed] == [  # the default model is linked in for the reward's fixture
        ("SmolLM2-135M-Instruct.Q4_1", "smollm2-135m"),
        ("gemma-3-270m-q4_k_m", "gemma3-270m"),
    ]
    assert resolve_model(AppPaths.resolve(), "gemma3-270m").resolve() == gemma_model_path.resolve()
    # a child process, as a user runs it: in this process llama.cpp's log callback would write a load notice into
    # the captured sys.stderr, which a real process's stderr never shows (fd 2 is silenced while a model loads)
    result = prt_process(
        "generate", "--model", "gemma3-270m", "--reward", str(smollm_reward), "--prompt", "Hi", "--ctx", "512"
    )
    assert_one_line_error(result, "was trained for 'SmolLM2-135M-Instruct.Q4_1'")
    assert "'gemma-3-270m-q4_k_m' has a different vocabulary" in result.stderr
