"""Contract version 2: embeddings narrower than the width, the query output and split steps; version 1 still read."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import RewardRuntimeError
from engine.runtime.mixing import scoring_groups
from engine.runtime.reward_graph import (
    QUERY,
    RewardNetworkShape,
    build_reward_model,
    embedding_rank_for,
    random_reward_weights,
    read_reward_weights,
)
from engine.runtime.rewards import RewardCard, RewardModel, save_reward
from engine.runtime.steering import SamplingConfig
from rewards_onnx.network import RewardNet
from tiny_models import small_reward_shape, write_reward

VOCAB = 49152
GEMMA_VOCAB, GEMMA_FILE_BYTES = 262144, 253_113_024  # Gemma 3 270M Q4_K_M
SMOLLM_VOCAB, SMOLLM_FILE_BYTES = 49152, 98_362_432  # SmolLM2-135M-Instruct Q4_1
GREEDY = SamplingConfig(temperature=0.0, max_tokens=20, ignore_eos=True)
LIFTED = RewardNetworkShape(vocab_size=VOCAB, width=32, layers=2, heads=4, embedding_rank=16)


def reward_file(tmp_path, tiny_base, weights, name="reward"):
    return write_reward(
        tmp_path / f"{name}.onnx",
        weights,
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )


def as_version_1(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph the version-1 builder made for the same full-width weights: no query output, version "1"."""
    old = onnx.ModelProto()
    old.CopyFrom(model)
    kept_outputs = [output for output in old.graph.output if output.name != QUERY]
    del old.graph.output[:]
    old.graph.output.extend(kept_outputs)
    kept_nodes = [node for node in old.graph.node if QUERY not in node.output]
    del old.graph.node[:]
    old.graph.node.extend(kept_nodes)
    properties = {entry.key: entry.value for entry in old.metadata_props} | {"prt_contract_version": "1"}
    del properties["embedding_rank"]
    del old.metadata_props[:]
    helper.set_model_props(old, properties)
    return old


def version_1_file(tmp_path, tiny_base, weights):
    card = RewardCard(
        name="old",
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        vocabulary_size=VOCAB,
        base_model_name=tiny_base.name,
        network={"width": weights.shape.width, "layers": weights.shape.layers, "heads": weights.shape.heads},
    )
    return save_reward(tmp_path / "old.onnx", as_version_1(build_reward_model(weights)), card)


def test_the_rank_keeps_a_262k_vocabulary_reward_under_a_tenth_of_its_gguf():
    assert embedding_rank_for(SMOLLM_VOCAB, 128, SMOLLM_FILE_BYTES) is None  # the default model: full width
    rank = embedding_rank_for(GEMMA_VOCAB, 128, GEMMA_FILE_BYTES)
    assert rank == 64
    weights = random_reward_weights(
        RewardNetworkShape(vocab_size=GEMMA_VOCAB, width=128, layers=2, heads=4, embedding_rank=rank), seed=0
    )
    size = len(build_reward_model(weights).SerializeToString())
    assert size <= 0.10 * GEMMA_FILE_BYTES, size
    full = RewardNetworkShape(vocab_size=GEMMA_VOCAB, width=128, layers=2, heads=4)
    assert len(build_reward_model(random_reward_weights(full, seed=0)).SerializeToString()) > 0.14 * GEMMA_FILE_BYTES


def test_a_lifted_embedding_scores_as_its_torch_network_does(tmp_path, tiny_base):
    rng = np.random.default_rng(0)
    net = RewardNet(LIFTED, rng.standard_normal((VOCAB, 16)).astype(np.float32))
    with torch.no_grad():  # a network that says something: random head, biases and lift
        net.head.normal_(0, 0.2)
        net.token_bias.normal_(0, 0.5)
        net.embedding_up.add_(torch.randn_like(net.embedding_up) * 0.3)
    reward = RewardModel(reward_file(tmp_path, tiny_base, net.export()))
    tokens, candidates = rng.integers(0, VOCAB, 12), rng.integers(0, VOCAB, 40)
    with torch.no_grad():
        expected = net.rewards(net.queries(torch.from_numpy(tokens)[None])[0, -1], torch.from_numpy(candidates))
    np.testing.assert_allclose(reward.sync(tokens.tolist(), candidates), expected.numpy(), atol=1e-4)
    assert read_reward_weights(onnx.load(reward.path)).embedding_up is not None  # and it can be merged


@pytest.mark.parametrize("shape", [small_reward_shape(VOCAB), LIFTED], ids=["full-width", "lifted"])
def test_split_steps_equal_whole_steps_and_a_full_recompute(tmp_path, tiny_base, shape):
    reward = RewardModel(reward_file(tmp_path, tiny_base, random_reward_weights(shape, seed=5)))
    fresh = RewardModel(reward.path)
    assert reward.session.candidate_rows is not None
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, VOCAB, 30).tolist()
    reward.sync(tokens[:6], rng.integers(0, VOCAB, 40))
    for end in range(7, len(tokens) + 1):
        candidates = rng.integers(0, VOCAB, 40)
        reward.session.prepare([tokens[end - 1]])
        split = reward.session.score_prepared(candidates)[0]
        fresh.reset()
        np.testing.assert_allclose(split, fresh.advance(tokens[:end], candidates), atol=1e-4)


@pytest.mark.parametrize("core_free", [True, False], ids=["beside-the-decode", "beside-the-candidates"])
def test_a_generation_with_split_steps_decodes_as_one_with_whole_steps(tmp_path, tiny_base, monkeypatch, core_free):
    monkeypatch.setattr(tiny_base, "leaves_a_core_free", core_free)
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me something."}])
    path = reward_file(tmp_path, tiny_base, random_reward_weights(small_reward_shape(VOCAB), seed=8))
    results = {}
    for split in (True, False):
        slots = attach_rewards(tiny_base, [(path, 1.0)])
        results[split] = Generation(tiny_base, prompt, rewards=slots, config=GREEDY, split_reward_steps=split).run()
        slots[0].reward.close()
    assert results[True].token_ids == results[False].token_ids
    for split_step, whole_step in zip(results[True].trace, results[False].trace, strict=True):
        np.testing.assert_allclose(split_step.reward_values, whole_step.reward_values, atol=1e-4)


def test_a_version_1_file_is_still_read_steps_whole_and_decodes_as_version_2(tmp_path, tiny_base):
    weights = random_reward_weights(small_reward_shape(VOCAB), seed=9)
    old_path, new_path = version_1_file(tmp_path, tiny_base, weights), reward_file(tmp_path, tiny_base, weights)
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me something."}])
    results = []
    for path in (old_path, new_path):
        slots = attach_rewards(tiny_base, [(path, 1.0)])
        results.append(Generation(tiny_base, prompt, rewards=slots, config=GREEDY).run())
        if path == old_path:
            assert slots[0].reward.session.candidate_rows is None  # no query output: one run per step, as before
        slots[0].reward.close()
    assert results[0].token_ids == results[1].token_ids
    np.testing.assert_allclose(results[0].trace[-1].reward_values, results[1].trace[-1].reward_values, atol=1e-4)
    old_weights = read_reward_weights(onnx.load(old_path))
    np.testing.assert_array_equal(old_weights.head, weights.head)


def test_version_1_and_2_rewards_of_one_embedding_merge_and_step_in_halves(tmp_path, tiny_base):
    shape = small_reward_shape(VOCAB)
    first = random_reward_weights(shape, seed=1)
    second = dataclasses.replace(random_reward_weights(shape, seed=2), embedding=first.embedding)
    rewards = [
        RewardModel(version_1_file(tmp_path, tiny_base, first)),
        RewardModel(reward_file(tmp_path, tiny_base, second)),
    ]
    (group,) = scoring_groups(rewards)
    assert group.merged and group.session.candidate_rows is not None
    rng = np.random.default_rng(4)
    tokens, candidates = rng.integers(0, VOCAB, 9).tolist(), rng.integers(0, VOCAB, 40)
    group.session.sync(tokens[:-1], candidates)
    group.session.prepare(tokens[-1:])
    merged = group.session.score_prepared(candidates)
    for row, reward in enumerate(rewards):
        np.testing.assert_allclose(merged[row], reward.sync(tokens, candidates), atol=1e-4)
    group.session.close()
    for reward in rewards:
        reward.close()


def test_a_split_step_with_rewards_that_are_not_finite_raises_and_takes_the_step_back(tmp_path, tiny_base):
    weights = random_reward_weights(small_reward_shape(VOCAB), seed=6)
    weights.token_bias[7] = np.nan  # a damaged row: only candidate 7 is not finite
    reward = RewardModel(reward_file(tmp_path, tiny_base, weights))
    reward.sync([1, 2], np.array([5, 6]))
    reward.session.prepare([3])
    with pytest.raises(RewardRuntimeError, match="not a finite number at token 2"):
        reward.session.score_prepared(np.array([5, 7]))
    assert reward.n_past == 2  # the state is as it was before the failed step
    reward.session.prepare([3])
    assert np.isfinite(reward.session.score_prepared(np.array([5, 6]))).all()
