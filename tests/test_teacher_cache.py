"""The teacher-pass cache on a tiny real GGUF and a real SQLite file: reuse, keys, resuming, damage, bounds."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from engine.app.models import teacher_cache_path
from engine.runtime.files import file_sha256
from helpers import other_prompts, prt
from rewards_onnx import teacher_cache
from rewards_onnx.data import Demonstration, PreferencePair
from rewards_onnx.teacher import TRAIN_TOP_K, TeacherData, teacher_pass
from rewards_onnx.teacher_cache import TeacherCache

EXAMPLES = [
    Demonstration("Hi", "Hello."),
    Demonstration("Hey", "Hi there!", teacher_system="Be brief."),
    PreferencePair("Yo", "Hello there.", "Go away."),
    Demonstration("Hello", "Good day to you."),
]


@pytest.fixture
def open_cache(tmp_path, tiny_base):
    def opened(**changes) -> TeacherCache:
        settings = {"model_sha256": file_sha256(tiny_base.path), "k": TRAIN_TOP_K} | changes
        return TeacherCache(tmp_path / "cache.sqlite", **settings)

    return opened


def passes_made(cache: TeacherCache, base, examples) -> tuple[TeacherData, int]:
    """The cache's teacher pass, and how many evaluations of the base it reported."""
    reports = [(0, 0)]
    data = cache.teacher_pass(base, examples, progress=lambda done, total: reports.append((done, total)))
    return data, reports[-1][1]


def sequences(data: TeacherData) -> list:
    return data.demonstrations + [sequence for pair in data.pairs for sequence in pair]


def assert_same_passes(left: TeacherData, right: TeacherData) -> None:
    assert (len(left.demonstrations), len(left.pairs)) == (len(right.demonstrations), len(right.pairs))
    for one, other in zip(sequences(left), sequences(right)):
        assert one.first_target == other.first_target and one.teacher_temperature == other.teacher_temperature
        for field in ("tokens", "candidate_ids", "base_logprobs", "target_index"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field))
        assert (one.teacher_logprobs is None) == (other.teacher_logprobs is None)
        if one.teacher_logprobs is not None:
            np.testing.assert_array_equal(one.teacher_logprobs, other.teacher_logprobs)


def test_a_second_pass_comes_from_the_file_without_the_base(open_cache, tiny_base, monkeypatch):
    fresh = teacher_pass(tiny_base, EXAMPLES)
    with open_cache() as cache:
        first, evaluated = passes_made(cache, tiny_base, EXAMPLES)
    assert evaluated == 6  # a pair is two replies, a distilled reply is passed in two contexts
    assert_same_passes(first, fresh)

    def no_base(*_):
        raise AssertionError("the base was evaluated")

    monkeypatch.setattr(tiny_base, "next_token_logits", no_base)
    with open_cache() as cache:
        again, evaluated = passes_made(cache, tiny_base, list(reversed(EXAMPLES)))
    assert evaluated == 0
    reordered = TeacherData(fresh.demonstrations[::-1], fresh.pairs)
    assert_same_passes(again, reordered)


def test_an_edited_example_another_model_or_another_k_is_passed_again(open_cache, tiny_base):
    with open_cache() as cache:
        passes_made(cache, tiny_base, EXAMPLES)
        edited = [*EXAMPLES[:3], Demonstration("Hello", "Good evening to you.")]
        assert passes_made(cache, tiny_base, edited)[1] == 1
    with open_cache(model_sha256="0" * 64) as cache:
        assert passes_made(cache, tiny_base, EXAMPLES)[1] == 6
    with open_cache(k=TRAIN_TOP_K - 1) as cache:
        data, evaluated = passes_made(cache, tiny_base, EXAMPLES)
    assert evaluated == 6 and data.demonstrations[0].candidate_ids.shape[1] == TRAIN_TOP_K


def test_a_stopped_pass_keeps_the_examples_it_finished(open_cache, tiny_base, monkeypatch):
    monkeypatch.setattr(teacher_cache, "WRITE_EVERY", 2)
    examples = [Demonstration(prompt, "A short reply.") for prompt in other_prompts(6)]

    def stop_after_three(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with open_cache() as cache, pytest.raises(KeyboardInterrupt):
        cache.teacher_pass(tiny_base, examples, progress=stop_after_three)
    with open_cache() as cache:
        assert passes_made(cache, tiny_base, examples)[1] == 4  # the first write held two examples


def test_a_damaged_file_or_entry_is_computed_again(open_cache, tiny_base, tmp_path):
    (tmp_path / "cache.sqlite").write_bytes(b"not a database at all" * 100)
    fresh = teacher_pass(tiny_base, EXAMPLES)
    with open_cache() as cache:
        assert_same_passes(passes_made(cache, tiny_base, EXAMPLES)[0], fresh)
    with sqlite3.connect(tmp_path / "cache.sqlite") as database:
        database.execute("UPDATE passes SET data = substr(data, 1, 40)")
    database.close()
    with open_cache() as cache:
        data, evaluated = passes_made(cache, tiny_base, EXAMPLES)
    assert evaluated == 6
    assert_same_passes(data, fresh)


def test_a_folder_that_cannot_hold_the_file_only_loses_the_reuse(tiny_base, tmp_path):
    with TeacherCache(tmp_path / "missing" / "cache.sqlite", model_sha256="1" * 64, k=TRAIN_TOP_K) as cache:
        assert passes_made(cache, tiny_base, EXAMPLES)[1] == 6
        assert passes_made(cache, tiny_base, EXAMPLES)[1] == 0  # within the run, still reused
    assert not (tmp_path / "missing").exists()


def test_the_file_keeps_within_its_bound_dropping_the_least_recently_used(open_cache, tiny_base, tmp_path):
    examples = [Demonstration(prompt, "A short reply.") for prompt in other_prompts(6)]
    with open_cache() as cache:
        passes_made(cache, tiny_base, examples)
    with sqlite3.connect(tmp_path / "cache.sqlite") as database:
        sizes = [size for (size,) in database.execute("SELECT length(data) FROM passes")]
    database.close()
    with open_cache(max_bytes=sum(sorted(sizes)[-2:])) as cache:
        passes_made(cache, tiny_base, examples[4:])  # the two most recently used
    with open_cache() as cache:
        assert passes_made(cache, tiny_base, examples[4:])[1] == 0
        assert passes_made(cache, tiny_base, examples[:4])[1] == 4


def test_cli_tune_reuses_its_teacher_passes_and_trains_the_same_reward(tmp_path, tiny_gguf):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "Fine, thanks."}) for p in other_prompts(8)))

    def tuned(name: str, *options: str) -> dict:
        result = prt(
            "tune",
            "--model",
            str(tiny_gguf),
            "--data",
            str(data),
            "--out",
            str(tmp_path / name),
            "--epochs",
            "2",
            "--ctx",
            "512",
            "--json",
            "--progress-json",
            *options,
        )
        assert result.returncode == 0, result.stderr
        teacher_lines = [line for line in result.stderr.splitlines() if '"teacher"' in line]
        return json.loads(result.stdout)["held_out"] | {"teacher_lines": len(teacher_lines)}

    uncached = tuned("plain.onnx", "--no-cache")
    assert not (teacher_cache_path()).exists()
    first, second = tuned("first.onnx"), tuned("second.onnx")
    assert (teacher_cache_path()).exists()
    assert first["teacher_lines"] == uncached["teacher_lines"] > 0 and second["teacher_lines"] == 0
    for result in (first, second, uncached):
        del result["teacher_lines"]
    assert first == second == uncached
