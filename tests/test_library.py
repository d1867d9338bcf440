"""The base reward library: markers, build on a tiny GGUF, check, the CLI, and cards with labels."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from engine.app.onboarding import (
    ShippedLibraryError,
    install_shipped_library,
    shipped_library,
)
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import RewardFileError
from engine.runtime.mixing import scoring_groups
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import CARD_FORMAT_VERSION, RewardCard, RewardModel, card_path, write_card
from engine.runtime.steering import SamplingConfig
from helpers import assert_one_line_error, prt
from rewards_onnx import library
from rewards_onnx.data import Demonstration
from rewards_onnx.distill import MORE_TOPICS, TOPICS, example_prompts
from rewards_onnx.library import (
    CHECK_TOPICS,
    PACK_FOLDER,
    STYLES,
    LibraryError,
    MarkerCheck,
    build_library,
    check_library,
    check_prompts,
    list_line_share,
    mean_word_length,
    pack_library,
    personal_words_per_100_words,
    word_count,
)
from rewards_onnx.train import TuneConfig
from tiny_models import small_reward_shape, write_reward

TINY_TUNE = TuneConfig(epochs=1, width=32, layers=1, heads=4, held_out_fraction=0.5)


def fake_distill(base, system, count, **options):
    """A tiny random GGUF never ends an answer on its own, so distillation proper has nothing to keep:
    stand in with answers the teacher could have given (distill itself is tested in test_training.py)."""
    options["progress"](count, count)
    return [
        Demonstration(prompt, f"A short answer {index}.", teacher_system=system, teacher_temperature=0.7)
        for index, prompt in enumerate(example_prompts(0)[:count])
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("library")
    progress = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(library, "distill", fake_distill)
        entries = build_library(tiny_base, folder, count=4, config=TINY_TUNE, on_progress=progress.append)
    return folder, entries, progress


def test_markers_on_hand_written_replies():
    assert word_count("One short sentence here.") == 4
    assert list_line_share("Here you go:\n- tea\n* milk\n\n1. sugar\n2) lemon\nEnjoy.") == pytest.approx(4 / 6)
    assert list_line_share("-not an item\nplain prose") == 0 and list_line_share("") == 0
    assert mean_word_length("I saw a big dog.") == pytest.approx(2.2) and mean_word_length("...") == 0
    assert personal_words_per_100_words("I'm sure you'll like my tea. Iris met Yourk.") == pytest.approx(100 * 3 / 9)
    assert personal_words_per_100_words("") == 0


def test_check_prompts_are_never_training_prompts():
    prompts = check_prompts(50)
    assert len(set(prompts)) == 50
    assert not set(prompts) & set(example_prompts(0))
    assert not set(CHECK_TOPICS) & set(TOPICS + MORE_TOPICS)
    with pytest.raises(ValueError, match="prompts must be between 1 and"):
        check_prompts(0)


def test_build_makes_one_labelled_reward_per_style(built, tiny_base):
    folder, entries, progress = built
    assert [entry.path for entry in entries] == [folder / f"{style.name}.onnx" for style in STYLES]
    for entry in entries:
        card = RewardCard.load(card_path(entry.path))
        assert card.name == entry.style.name and card.label == entry.style.label
        assert entry.style.system in card.description
        assert card.metrics["held_out"]["tokens"] > 0 and card.metrics["library"]["direction"] == entry.style.direction
        assert card.training_data["demonstrations"] == 4 and card.format_version == CARD_FORMAT_VERSION
        assert card.metrics["config"]["train_embedding"] is False  # so that the styles share it and run merged
    assert json.loads(json.dumps(entries[0].to_json()))["label"] == STYLES[0].label
    assert {p.phase for p in progress} == {"distill", "teacher", "train", "export"}
    assert any(p.message.startswith("casual") for p in progress if p.phase == "train")
    rewards = [RewardModel(entry.path) for entry in entries]  # one tune seed: one shared embedding, one session
    assert [group.indices for group in scoring_groups(rewards)] == [tuple(range(len(STYLES)))]


def test_a_full_build_writes_its_pack_which_installs_as_built(built, tiny_base, tiny_gguf, tmp_path):
    folder, entries, _ = built
    pack = folder / PACK_FOLDER
    assert sorted(path.name for path in pack.iterdir()) == [f"{tiny_gguf.stem}.bin", f"{tiny_gguf.stem}.json"]
    shipped = shipped_library(tiny_gguf, folder=pack)
    assert shipped is not None and shipped.reward_names == [style.name for style in STYLES]
    installed = install_shipped_library(shipped, tiny_gguf, tmp_path / "library")
    assert installed == [tmp_path / "library" / f"{style.name}.onnx" for style in STYLES]
    assert sorted(p.name for p in (tmp_path / "library").iterdir()) == sorted(
        name for path in installed for name in (path.name, path.with_suffix(".json").name)
    )  # and no staging folder
    for entry, path in zip(entries, installed):
        built_card, card = RewardCard.load(card_path(entry.path)), RewardCard.load(card_path(path))
        assert (card.name, card.label) == (entry.style.name, entry.style.label)
        assert card.metrics["held_out"] == built_card.metrics["held_out"]
        assert card.description.startswith(built_card.description) and "shipped library" in card.description


@pytest.fixture(scope="module")
def random_library(tmp_path_factory, tiny_base):
    """Rewards as a build leaves them (one per style, the embedding frozen at the base's projection), with random
    weights elsewhere, so that they say something (the tiny build's one epoch leaves them at about 0)."""
    folder = tmp_path_factory.mktemp("random-library")
    shape = replace(small_reward_shape(tiny_base.n_vocab), layers=1)
    embedding = library.projected_base_embedding(tiny_base.path, shape.width, seed=0)
    paths = []
    for seed, style in enumerate(STYLES, start=1):
        weights = replace(random_reward_weights(shape, seed=seed, scale=0.2), embedding=embedding)
        path = write_reward(
            folder / f"{style.name}.onnx",
            weights,
            vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
            base_name=tiny_base.name,
        )
        card = RewardCard.load(card_path(path))
        card.label = style.label
        write_card(path, card)
        paths.append(path)
    return folder, paths


def reward_values(paths, tokens, candidates) -> np.ndarray:
    """Each reward's values for the candidates after every prefix of ``tokens``: [rewards, prefixes, K]."""
    values = []
    for path in paths:
        with RewardModel(path) as reward:
            values.append([reward.sync(tokens[:length], candidates) for length in range(1, len(tokens) + 1)])
    return np.array(values)


def test_the_pack_rebuilds_the_same_rewards_from_the_gguf(random_library, tiny_base, tmp_path):
    folder, paths = random_library
    manifest = pack_library(tiny_base, folder, tmp_path / "pack")
    size = sum(path.stat().st_size for path in (tmp_path / "pack").iterdir())
    assert size < 0.5 * sum(path.stat().st_size for path in paths)  # no embedding, half-size floats
    shipped = shipped_library(tiny_base.path, folder=manifest.parent)
    installed = install_shipped_library(shipped, tiny_base.path, tmp_path / "library")
    rng = np.random.default_rng(0)
    tokens, candidates = rng.integers(0, tiny_base.n_vocab, 24).tolist(), rng.integers(0, tiny_base.n_vocab, 40)
    original, rebuilt = reward_values(paths, tokens, candidates), reward_values(installed, tokens, candidates)
    assert np.abs(original).mean() > 0.1  # rewards that say something
    np.testing.assert_allclose(rebuilt, original, atol=2e-3 * np.abs(original).max())
    rewards = [RewardModel(path) for path in installed]  # one shared embedding still: merged into one session
    assert [group.indices for group in scoring_groups(rewards)] == [tuple(range(len(STYLES)))]


def test_packing_the_same_rewards_again_gives_the_same_bytes(built, tiny_base, tiny_gguf, tmp_path):
    """What makes `prt library build` reproduce the shipped pack: the same rewards give the same files."""
    folder, _, _ = built
    again = pack_library(tiny_base, folder, tmp_path, seed=TINY_TUNE.seed)
    for suffix in (".json", ".bin"):
        assert (
            again.with_suffix(suffix).read_bytes() == (folder / PACK_FOLDER / f"{tiny_gguf.stem}{suffix}").read_bytes()
        )


def test_a_pack_installs_only_for_its_own_model_file_and_intact(
    built, tiny_base, tiny_gguf, tiny_gguf_other_seed, tmp_path
):
    folder, _, _ = built
    pack = tmp_path / "pack"
    pack.mkdir()
    for suffix in (".json", ".bin"):
        (pack / f"{tiny_gguf.stem}{suffix}").write_bytes(
            (folder / PACK_FOLDER / f"{tiny_gguf.stem}{suffix}").read_bytes()
        )
    shorter = tmp_path / "shorter" / tiny_gguf.name
    shorter.parent.mkdir()
    shorter.write_bytes(tiny_gguf.read_bytes()[:-1])
    assert shipped_library(shorter, folder=pack) is None
    assert shipped_library(tiny_gguf, folder=tmp_path) is None
    shipped = shipped_library(tiny_gguf, folder=pack)
    other = tmp_path / "other" / tiny_gguf.name  # same name, size and vocabulary, other weights
    other.parent.mkdir()
    other.write_bytes(tiny_gguf_other_seed.read_bytes())
    with pytest.raises(ShippedLibraryError, match="its sha256 differs"):
        install_shipped_library(shipped, other, tmp_path / "library")
    weights = pack / f"{tiny_gguf.stem}.bin"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ShippedLibraryError, match="damaged"):
        install_shipped_library(shipped, tiny_gguf, tmp_path / "library")
    assert not (tmp_path / "library").exists() or not any((tmp_path / "library").iterdir())


def replies(base, prompts: list[str], *, system: str | None = None, reward=None) -> list[str]:
    """The replies a check compares, written here one by one: prompt i sampled with seed i."""
    config = SamplingConfig(temperature=library.TEACHER_TEMPERATURE, max_tokens=6)
    texts = []
    for seed, prompt in enumerate(prompts):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        slots = attach_rewards(base, [(reward, 1.0)]) if reward else []
        generation = Generation(
            base, base.chat_prompt_tokens(messages), rewards=slots, config=replace(config, seed=seed)
        )
        texts.append(generation.run().text)
    return texts


def test_check_measures_each_reward_with_and_without_it(tmp_path, tiny_base):
    """Each style's marker on the same prompts and seeds: the bare model, the model with that style's reward (a
    strong random one here, so that the replies change), and the model under the style's system prompt."""
    for seed, style in enumerate(STYLES, start=1):
        write_reward(
            tmp_path / f"{style.name}.onnx",
            random_reward_weights(small_reward_shape(tiny_base.n_vocab), seed=seed, scale=1.0),
            vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
            base_name=tiny_base.name,
        )
    checks = check_library(tiny_base, tmp_path, prompts=2, max_tokens=6)
    prompts = check_prompts(2)
    plain = replies(tiny_base, prompts)
    assert [check.style for check in checks] == list(STYLES)
    for check in checks:
        marker, steered = check.style.marker, replies(tiny_base, prompts, reward=tmp_path / f"{check.style.name}.onnx")
        assert steered != plain, check.style.name
        assert check.without == [marker(text) for text in plain]
        assert check.steered == [marker(text) for text in steered]
        assert check.teacher == [marker(text) for text in replies(tiny_base, prompts, system=check.style.system)]
    assert any(check.steered != check.without for check in checks)


def test_moved_means_the_intended_direction_beyond_noise():
    concise = next(style for style in STYLES if style.direction < 0)
    shorter = MarkerCheck(concise, without=[80, 60, 70], steered=[52, 30, 38], teacher=[20, 30, 25])
    assert shorter.moved and shorter.shift == -30 and shorter.shift_standard_error == pytest.approx(2 / np.sqrt(3))
    noisy = MarkerCheck(concise, without=[80, 60], steered=[40, 50], teacher=[20, 30])
    assert noisy.shift == -25 and noisy.shift_standard_error == pytest.approx(15) and not noisy.moved
    assert not MarkerCheck(concise, without=[80, 70], steered=[90, 85], teacher=[20, 20]).moved


def test_cli_check_prints_json_and_refuses_an_empty_folder(built, tiny_gguf, tmp_path):
    folder, _, _ = built
    checked = prt(
        "library",
        "check",
        "--model",
        str(tiny_gguf),
        "--library",
        str(folder),
        "--prompts",
        "1",
        "--max-tokens",
        "4",
        "--ctx",
        "512",
        "--json",
    )
    assert checked.returncode == 0, checked.stderr
    assert [check["reward"] for check in json.loads(checked.stdout)["checks"]] == [style.name for style in STYLES]
    empty = prt("library", "check", "--model", str(tiny_gguf), "--library", str(tmp_path), "--ctx", "512")
    assert_one_line_error(empty, "No base rewards in")


def test_cli_features_saves_one_row_per_reply_for_pref_bench(built, tiny_gguf, tmp_path):
    folder, _, _ = built
    out = tmp_path / "features.npy"
    saved = prt(
        "library",
        "features",
        "--model",
        str(tiny_gguf),
        "--library",
        str(folder),
        "--replies",
        "3",
        "--max-tokens",
        "4",
        "--ctx",
        "512",
        "--out",
        str(out),
        "--json",
    )
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout) == {
        "path": str(out),
        "rewards": sorted(style.name for style in STYLES),
        "replies": 3,
    }
    features = np.load(out)
    assert features.shape == (3, len(STYLES)) and np.all(np.isfinite(features))  # values: test_onboarding.py
    wrong = prt(
        "library",
        "features",
        "--model",
        str(tiny_gguf),
        "--library",
        str(folder),
        "--ctx",
        "512",
        "--out",
        str(tmp_path / "features.txt"),
    )
    assert_one_line_error(wrong, "--out must name a .npy file")
    empty = prt(
        "library",
        "features",
        "--model",
        str(tiny_gguf),
        "--library",
        str(tmp_path / "none"),
        "--ctx",
        "512",
        "--out",
        str(out),
    )
    assert_one_line_error(empty, "No base rewards in")


def test_one_style_can_be_rebuilt_and_unknown_styles_are_refused(tiny_gguf):
    assert [style.name for style in library.styles_named(["casual", "concise"])] == ["concise", "casual"]
    unknown = prt("library", "build", "--model", str(tiny_gguf), "--style", "pirate", "--ctx", "512")
    assert_one_line_error(unknown, "Unknown style pirate; the styles are casual, concise, simple, structured.")


def test_check_refuses_a_folder_without_rewards(tmp_path, tiny_base):
    with pytest.raises(LibraryError, match="prt library build"):
        check_library(tiny_base, tmp_path)


def test_cards_of_format_1_load_without_a_label_and_newer_formats_ask_for_an_update(tmp_path):
    old = {
        "name": "old",
        "vocabulary_fingerprint": "sha256:x",
        "vocabulary_size": 3,
        "base_model_name": "m",
        "format_version": 1,
    }
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert RewardCard.load(tmp_path / "old.json").label == ""
    (tmp_path / "new.json").write_text(json.dumps({**old, "format_version": CARD_FORMAT_VERSION + 1, "colour": "red"}))
    with pytest.raises(RewardFileError, match="Update the app"):
        RewardCard.load(tmp_path / "new.json")


@pytest.mark.subprocess
def test_the_cli_parser_and_checking_need_no_torch():
    code = "import sys, engine.cli, rewards_onnx.library; engine.cli.build_parser(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
