"""``prt`` as a user runs it: real files, exit codes and one-line errors (in this process, see tests/helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.cli import parse_reward_spec
from engine.runtime.reward_graph import random_reward_weights
from helpers import assert_one_line_error, prt
from tiny_models import small_reward_shape, write_reward


@pytest.fixture
def reward_file(tmp_path, tiny_base):
    return write_reward(
        tmp_path / "style.onnx",
        random_reward_weights(small_reward_shape(49152), seed=4),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )


def test_generate_json_has_text_counts_speed_and_trace(tiny_gguf, reward_file):
    result = prt(
        "generate",
        "--model",
        str(tiny_gguf),
        "--prompt",
        "Hello",
        "--reward",
        f"{reward_file}:0.5",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "--ctx",
        "512",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["completion_tokens"] == len(output["trace"]) <= 6
    assert output["tokens_per_second"] > 0 and output["prompt_tokens"] > 0
    assert output["rewards"] == [{"name": "style", "path": str(reward_file), "weight": 0.5}]
    step = output["trace"][0]
    assert set(step) >= {
        "token_id",
        "text",
        "base_logprob",
        "rewards",
        "base_rank",
        "steered_rank",
        "rank_change",
        "top_base",
        "top_steered",
    }
    assert set(step["rewards"]) == {"style"}
    assert output["text"] == "".join(s["text"] for s in output["trace"])


def test_generate_streams_plain_text_and_reports_speed(tiny_gguf):
    result = prt(
        "generate", "--model", str(tiny_gguf), "--prompt", "Hi", "--max-tokens", "5", "--ctx", "512", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "tok/s" in result.stderr


def test_chat_keeps_history_across_turns(tiny_gguf):
    result = prt(
        "chat",
        "--model",
        str(tiny_gguf),
        "--max-tokens",
        "4",
        "--ctx",
        "512",
        "--temperature",
        "0",
        stdin="Hello\nAnd again\n/quit\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("bot> ") == 2
    assert result.stderr.count("tok/s") == 2


@pytest.mark.parametrize(
    "model_arg, fragment",
    [
        ("missing.gguf", "Model file not found"),
        ("notes.gguf", "is not a GGUF model"),
    ],
)
def test_bad_model_files_give_one_line(tmp_path, model_arg, fragment):
    (tmp_path / "notes.gguf").write_text("not a model")
    result = prt("generate", "--model", str(tmp_path / model_arg), "--prompt", "Hi")
    assert_one_line_error(result, fragment)


def test_truncated_model_gives_one_line(tmp_path, tiny_gguf):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:1_000_000])
    assert_one_line_error(prt("generate", "--model", str(truncated), "--prompt", "Hi"), "truncated, corrupt")


def test_empty_prompt_gives_one_line(tiny_gguf):
    assert_one_line_error(prt("generate", "--model", str(tiny_gguf), "--prompt", "  ", "--ctx", "512"), "empty")


def test_context_overflow_gives_one_line(tiny_gguf):
    result = prt("generate", "--model", str(tiny_gguf), "--prompt", "word " * 600, "--ctx", "512")
    assert_one_line_error(result, "context holds 512")


def test_unreadable_reward_gives_one_line(tmp_path, tiny_gguf, reward_file):
    reward_file.write_bytes(b"garbage")
    result = prt("generate", "--model", str(tiny_gguf), "--prompt", "Hi", "--reward", str(reward_file), "--ctx", "512")
    assert_one_line_error(result, "truncated or changed")


def test_bad_sampling_argument_gives_one_line(tiny_gguf):
    result = prt("generate", "--model", str(tiny_gguf), "--prompt", "Hi", "--top-p", "0", "--ctx", "512")
    assert_one_line_error(result, "top_p")


def test_models_add_then_list_and_use_by_name(tiny_gguf):
    added = prt("models", "add", str(tiny_gguf), "--json")
    assert added.returncode == 0, added.stderr
    listed = json.loads(prt("models", "--json").stdout)
    assert {
        "name": "tiny-a",
        "path": str(tiny_gguf.resolve()),
        "size": tiny_gguf.stat().st_size,
        "default": False,
    } in listed
    by_name = prt("generate", "--model", "tiny-a", "--prompt", "Hi", "--max-tokens", "2", "--ctx", "512")
    assert by_name.returncode == 0, by_name.stderr


def test_models_add_refuses_a_non_gguf(tmp_path):
    (tmp_path / "x.gguf").write_text("nope")
    assert_one_line_error(prt("models", "add", str(tmp_path / "x.gguf")), "is not a GGUF model")


def test_bench_json_reports_both_speeds_their_ratio_reward_cost_and_memory(tiny_gguf):
    result = prt(
        "bench",
        "--model",
        str(tiny_gguf),
        "--tokens",
        "8",
        "--rounds",
        "1",
        "--long-context",
        "64",
        "--ctx",
        "512",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    speeds = report["tokens_per_second"]
    assert speeds["plain"] > 0 and speeds["steered"] > 0 and speeds["engine"] > 0
    assert 0 < report["ratio_steered_over_plain"] < 10
    assert report["reward_ms_per_step_at_16"] > 0 and report["reward_ms_per_step_at_64"] > 0
    assert report["reward"]["width"] == 128 and report["reward"]["layers"] == 2
    assert report["peak_rss_mb"] > 10


def test_bench_with_a_library_decodes_with_its_rewards_merged_and_separately(tiny_gguf, tiny_base, tmp_path):
    shape = small_reward_shape(tiny_base.n_vocab)
    for seed in (1, 2):
        write_reward(
            tmp_path / f"style{seed}.onnx",
            random_reward_weights(shape, seed=seed),
            vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
            base_name=tiny_base.name,
        )
    result = prt(
        "bench",
        "--model",
        str(tiny_gguf),
        "--tokens",
        "8",
        "--rounds",
        "1",
        "--long-context",
        "64",
        "--ctx",
        "512",
        "--library",
        str(tmp_path),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["library"]["rewards"] == ["style1", "style2"]
    assert report["tokens_per_second"]["library_merged"] > 0 and report["tokens_per_second"]["library_separate"] > 0
    assert 0 < report["library"]["ratio_merged_over_separate"] < 10
    (tmp_path / "style2.onnx").unlink()
    too_few = prt("bench", "--model", str(tiny_gguf), "--ctx", "512", "--library", str(tmp_path))
    assert_one_line_error(too_few, "--library needs at least 2 rewards to mix")


def test_reward_spec_parsing_keeps_windows_paths():
    assert parse_reward_spec("r.onnx") == (Path("r.onnx"), 1.0)
    assert parse_reward_spec("dir/r.onnx:0.25") == (Path("dir/r.onnx"), 0.25)
    assert parse_reward_spec("C:\\rewards\\r.onnx") == (Path("C:\\rewards\\r.onnx"), 1.0)
    assert parse_reward_spec("C:\\rewards\\r.onnx:-1.5") == (Path("C:\\rewards\\r.onnx"), -1.5)
    assert parse_reward_spec("D:/rewards/r.onnx:2") == (Path("D:/rewards/r.onnx"), 2.0)


def test_reward_for_another_vocabulary_gives_one_line_naming_both_models(tmp_path, tiny_gguf):
    foreign = write_reward(
        tmp_path / "gemma-style.onnx",
        random_reward_weights(small_reward_shape(49152), seed=1),
        vocabulary_fingerprint="sha256:" + "0" * 64,
        base_name="gemma-3-270m",
    )
    result = prt("generate", "--model", str(tiny_gguf), "--prompt", "Hi", "--reward", str(foreign), "--ctx", "512")
    assert_one_line_error(result, "different vocabulary")
    assert "gemma-3-270m" in result.stderr and "tiny-a" in result.stderr
