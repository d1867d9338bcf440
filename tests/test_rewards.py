"""Reward files and the onnxruntime runtime: KV-cached steps, the vocabulary check, bad files."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import TINY_CONFIG
from engine.runtime.base_model import BaseModel
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import RewardFileError, RewardRuntimeError, VocabularyMismatchError
from engine.runtime.reward_graph import random_reward_weights, token_preference_weights
from engine.runtime.rewards import RewardCard, RewardModel, card_path, save_reward
from engine.runtime.steering import SamplingConfig
from tiny_models import small_reward_shape, write_reward, write_tiny_llama

VOCAB = 49152


@pytest.fixture
def random_reward(tmp_path, tiny_base):
    weights = random_reward_weights(small_reward_shape(VOCAB), seed=3)
    return write_reward(
        tmp_path / "random.onnx",
        weights,
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )


def test_kv_cached_steps_equal_recomputing_the_whole_prefix(random_reward):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, 50).tolist()
    candidates = rng.integers(0, VOCAB, 40)
    incremental = RewardModel(random_reward)
    incremental.advance(tokens[:7], candidates)  # a prompt prefill, then one token per step
    fresh = RewardModel(random_reward)
    for end in range(8, len(tokens) + 1):
        stepped = incremental.advance([tokens[end - 1]], candidates)
        fresh.reset()
        recomputed = fresh.advance(tokens[:end], candidates)
        np.testing.assert_allclose(stepped, recomputed, atol=1e-4)
    assert incremental.n_past == len(tokens)


def test_rewind_and_sync_reuse_the_state_exactly(random_reward):
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, VOCAB, 30).tolist()
    candidates = rng.integers(0, VOCAB, 10)
    reward = RewardModel(random_reward)
    reward.sync(tokens, candidates)
    edited = tokens[:20] + rng.integers(0, VOCAB, 5).tolist()
    synced = reward.sync(edited, candidates)
    reward.reset()
    np.testing.assert_allclose(synced, reward.advance(edited, candidates), atol=1e-4)


def test_rewards_depend_on_context_and_candidates(random_reward):
    reward = RewardModel(random_reward)
    candidates = np.array([5, 6, 7, 8])
    first = reward.sync([1, 2, 3], candidates)
    second = reward.sync([4, 2, 3], candidates)
    assert first.shape == (4,) and np.abs(first - second).max() > 1e-3
    assert np.abs(first - first.mean()).max() > 1e-3


def test_a_closed_reward_refuses_to_score_and_closing_twice_is_safe(random_reward):
    candidates = np.array([5, 6, 7, 8])
    with RewardModel(random_reward) as reward:
        assert reward.sync([1, 2, 3], candidates).shape == (4,) and not reward.closed
    assert reward.closed
    reward.close()
    for score in (reward.sync, reward.advance):
        with pytest.raises(RewardRuntimeError, match="The reward 'random' cannot score: it was closed"):
            score([1, 2, 3], candidates)


def test_a_reward_for_the_same_vocabulary_is_portable_across_models(tmp_path, tiny_base, tiny_gguf_other_seed):
    """One reward file steers two different models of one vocabulary: each says the token it prefers."""
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me something."}])
    target = tiny_base.tokenize(" portable")[0]
    path = write_reward(
        tmp_path / "likes.onnx",
        token_preference_weights(small_reward_shape(VOCAB), token=target, strength=1e3),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )
    every_token = SamplingConfig(temperature=0.0, top_k=VOCAB, max_tokens=1, ignore_eos=True)
    with BaseModel(tiny_gguf_other_seed, config=TINY_CONFIG) as other:
        for base in (tiny_base, other):
            plain = Generation(base, prompt, config=every_token).run()
            steered = Generation(base, prompt, rewards=attach_rewards(base, [(path, 1.0)]), config=every_token).run()
            assert plain.token_ids != [target] and steered.token_ids == [target], base.name


def test_a_reward_for_another_vocabulary_is_refused_naming_both_models(tmp_path, tokenizer, tiny_base):
    tokens = list(tokenizer.tokens)
    tokens[1000], tokens[1001] = tokens[1001], tokens[1000]
    other_vocab = write_tiny_llama(tmp_path / "other-vocab.gguf", dataclasses.replace(tokenizer, tokens=tokens), seed=5)
    with BaseModel(other_vocab, config=TINY_CONFIG) as foreign:
        assert foreign.vocabulary_fingerprint != tiny_base.vocabulary_fingerprint
        path = write_reward(
            tmp_path / "foreign.onnx",
            random_reward_weights(small_reward_shape(VOCAB), seed=0),
            vocabulary_fingerprint=foreign.vocabulary_fingerprint,
            base_name=foreign.name,
        )
    with pytest.raises(VocabularyMismatchError) as refused:
        attach_rewards(tiny_base, [(path, 1.0)])
    message = str(refused.value)
    assert "other-vocab" in message and tiny_base.name in message and "different vocabulary" in message


def test_truncated_reward_file_is_refused(random_reward):
    random_reward.write_bytes(random_reward.read_bytes()[:5000])
    with pytest.raises(RewardFileError, match="truncated or changed"):
        RewardModel(random_reward)


def test_unreadable_onnx_is_refused_even_without_a_checksum(tmp_path, random_reward):
    card = RewardCard.load(card_path(random_reward))
    card.onnx_sha256 = ""
    card_path(random_reward).write_text(card.to_json())
    random_reward.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(RewardFileError, match="not a readable ONNX model"):
        RewardModel(random_reward)


def test_missing_card_is_refused(random_reward):
    card_path(random_reward).unlink()
    with pytest.raises(RewardFileError, match="card .* is missing"):
        RewardModel(random_reward)


def test_malformed_card_is_refused(random_reward):
    card_path(random_reward).write_text('{"name": "x", "unexpected": 1}')
    with pytest.raises(RewardFileError, match="not a valid card"):
        RewardModel(random_reward)


def test_onnx_that_breaks_the_contract_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "not_a_reward",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    card = RewardCard(name="identity", vocabulary_fingerprint="sha256:x", vocabulary_size=1, base_model_name="none")
    path = save_reward(tmp_path / "identity.onnx", model, card)
    with pytest.raises(RewardFileError, match="does not follow the reward contract"):
        RewardModel(path)


def test_saved_reward_records_its_checksum_and_the_contract_in_metadata(random_reward):
    card = RewardCard.load(card_path(random_reward))
    assert len(card.onnx_sha256) == 64
    properties = {p.key: p.value for p in onnx.load(random_reward).metadata_props}
    assert properties["prt_contract_version"] == "2" and properties["vocab_size"] == str(VOCAB)
