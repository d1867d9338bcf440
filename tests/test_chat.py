"""The desktop's engine facade through real parts: tiny GGUF, real onnxruntime rewards, a real SQLite store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import TINY_CONFIG
from engine.app.chat import ChatEngine, ReplyRecorder, tune_command
from engine.app.jobs import JobProgress, LibrarySummary, TuneSummary, summary_from, summary_json
from engine.app.store import Store
from engine.runtime.errors import PrtError, VocabularyMismatchError
from engine.runtime.reward_graph import random_reward_weights, token_preference_weights
from engine.runtime.steering import SamplingConfig
from tiny_models import small_reward_shape, write_reward

REPO = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0.0, max_tokens=12)
MESSAGES = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture
def engine(tiny_gguf):
    chat = ChatEngine()
    chat.load_model(tiny_gguf, TINY_CONFIG)
    yield chat
    chat.close()


def reward_for(path: Path, engine: ChatEngine, weights=None) -> Path:
    base = engine.base
    return write_reward(
        path,
        weights or random_reward_weights(small_reward_shape(base.n_vocab), seed=3),
        vocabulary_fingerprint=base.vocabulary_fingerprint,
        base_name=base.name,
    )


def test_a_reply_streams_and_is_recorded_in_the_store(tmp_path, engine):
    with Store(tmp_path / "chats.db") as store:
        conversation = store.create_conversation()
        store.add_message(conversation, "user", MESSAGES[0]["content"])
        reply_id = store.add_message(conversation, "assistant", "", status="streaming")
        recorder = ReplyRecorder(store, reply_id, interval=0.0)
        result = engine.run_locked(engine.reply(MESSAGES, GREEDY), recorder.feed)
        assert recorder.finish(result) == "complete"
        stored = store.message(reply_id)
        assert stored.content == result.text != "" and stored.stats["tokens"] == len(result.token_ids)


def test_a_preferred_token_dial_changes_the_reply_and_zero_restores_it(tmp_path, engine):
    plain = engine.reply(MESSAGES, GREEDY).run()
    wanted = int(plain.trace[0].candidate_ids[5])  # in the base's top-K, not its first choice
    shape = small_reward_shape(engine.base.n_vocab)
    reward = reward_for(tmp_path / "likes.onnx", engine, token_preference_weights(shape, token=wanted, strength=50.0))
    engine.set_active_rewards({reward: 1.0})
    assert engine.reply(MESSAGES, GREEDY).run().token_ids[0] == wanted
    engine.set_alpha(0.0)
    assert engine.reply(MESSAGES, GREEDY).run().token_ids == plain.token_ids
    engine.set_alpha(1.0)
    engine.set_active_rewards({reward: 0.0})
    assert engine.reply(MESSAGES, GREEDY).run().token_ids == plain.token_ids


def test_rewards_for_another_vocabulary_are_marked_and_refused(tmp_path, engine):
    good = reward_for(tmp_path / "good.onnx", engine)
    other = write_reward(
        tmp_path / "other.onnx",
        random_reward_weights(small_reward_shape(engine.base.n_vocab), seed=1),
        vocabulary_fingerprint="f" * 64,
        base_name="another-model",
    )
    described = {info.path.name: info for info in engine.describe_rewards([good, other, tmp_path / "gone.onnx"])}
    assert described["good.onnx"].compatible is True
    assert described["other.onnx"].compatible is False and "another-model" in described["other.onnx"].problem
    assert described["gone.onnx"].compatible is False and "missing" in described["gone.onnx"].problem
    engine.set_active_rewards({good: 1.0})
    with pytest.raises(VocabularyMismatchError):
        engine.set_active_rewards({good: 1.0, other: 1.0})
    assert engine.active_reward_names == ["good"]  # a refused change changes nothing


def test_replying_without_a_model_is_a_clear_error():
    with pytest.raises(PrtError, match="No model is loaded"):
        ChatEngine().reply(MESSAGES)


def test_tune_command_and_progress_lines_round_trip(tmp_path):
    argv = tune_command(
        model_path="m.gguf",
        out_path=tmp_path / "r.onnx",
        data_files=["a.jsonl"],
        feedback_db=tmp_path / "chats.db",
        name="mine",
    )
    assert argv[:4] == [sys.executable, "-m", "engine.cli", "tune"]
    assert {"--json", "--progress-json", "--feedback", "--data"} <= set(argv)
    progress = JobProgress("train", 3, 10, 12.5, "epoch 1")
    assert JobProgress.parse(progress.to_json()) == progress
    assert JobProgress.parse("prt: error: something") is None


def test_job_summaries_round_trip_and_a_summary_without_its_key_field_is_none():
    tuned = TuneSummary(path="r.onnx", held_out={"tokens": 3}, seconds=1.5, skipped={"count": 0})
    assert summary_from(f"some output\n{summary_json(tuned)}\n\n", TuneSummary) == tuned
    newer = '{"folder": "lib", "rewards": [], "from_a_newer_version": 1}'
    assert summary_from(newer, LibrarySummary) == LibrarySummary(folder="lib")
    for stdout in ('{"held_out": {}}', "[1, 2]", "not json", ""):
        assert summary_from(stdout, TuneSummary) is None


GENERATING_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from engine.runtime.base_model import BaseModelConfig
    from engine.app.chat import ChatEngine, ReplyRecorder
    from engine.runtime.steering import SamplingConfig
    from engine.app.store import Store

    store = Store({database!r})
    conversation = store.create_conversation()
    store.add_message(conversation, "user", "Tell me a long story.")
    reply = store.add_message(conversation, "assistant", "", status="streaming")
    engine = ChatEngine()
    engine.load_model({model!r}, BaseModelConfig(n_ctx=4096, n_threads=1, n_gpu_layers=0))
    recorder = ReplyRecorder(store, reply, interval=0.05)
    written = ""

    def on_event(event):
        global written
        recorder.feed(event)
        stored = store.message(reply).content
        if stored != written:  # tell the parent what is on disk now
            written = stored
            print(len(written), flush=True)

    config = SamplingConfig(temperature=1.0, seed=0, max_tokens=4000, ignore_eos=True)
    engine.run_locked(engine.reply([{{"role": "user", "content": "Tell me a long story."}}], config), on_event)
""")


@pytest.mark.subprocess
def test_a_generation_killed_mid_stream_keeps_the_prompt_and_the_partial_reply(tmp_path, tiny_gguf):
    database = tmp_path / "chats.db"
    script = GENERATING_CHILD.format(repo=str(REPO), database=str(database), model=str(tiny_gguf))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    reported = [int(child.stdout.readline()) for _ in range(3)]  # three flushes of partial text have landed
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with sqlite3.connect(database) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with Store(database) as store:
        conversation = store.conversations()[0]
        user, reply = store.messages(conversation.id)
        assert user.role == "user" and user.content == "Tell me a long story."
        assert reply.role == "assistant" and reply.status == "streaming"
        assert len(reply.content) >= reported[-1] > 0
