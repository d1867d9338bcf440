"""Several rewards in one onnxruntime session: same rewards, same tokens, one run per step."""

from __future__ import annotations

import numpy as np
import pytest

from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import VocabularyMismatchError
from engine.runtime.mixing import scoring_groups
from engine.runtime.reward_graph import (RewardNetworkShape, build_reward_model, random_reward_weights,
                                 read_reward_weights)
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import SamplingConfig
from tiny_models import small_reward_shape, write_reward

VOCAB = 49152
GREEDY = SamplingConfig(temperature=0.0, max_tokens=16, ignore_eos=True)


def sharing_rewards(tmp_path, base, seeds, *, shape=None, embedding_seed=100):
    """Rewards with their own weights and one shared embedding, as rewards tuned for one base with one seed."""
    shape = shape or small_reward_shape(VOCAB)
    embedding = random_reward_weights(shape, seed=embedding_seed).embedding
    paths = []
    for seed in seeds:
        weights = random_reward_weights(shape, seed=seed, scale=0.2)
        weights.embedding = embedding
        paths.append(write_reward(tmp_path / f"r{seed}-e{embedding_seed}.onnx", weights, base_name=base.name,
                                  vocabulary_fingerprint=base.vocabulary_fingerprint))
    return paths


@pytest.fixture
def prompt(tiny_base):
    return tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me something."}])


def test_a_merged_session_equals_separate_sessions_through_the_kv_path(tmp_path, tiny_base):
    rewards = [RewardModel(path) for path in sharing_rewards(tmp_path, tiny_base, seeds=(1, 2, 3))]
    (group,) = scoring_groups(rewards)
    merged = group.session
    assert group.indices == (0, 1, 2) and merged.rows == 3
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, 40).tolist()
    candidates = rng.integers(0, VOCAB, (len(tokens), 40))

    def both(step):
        separate = np.stack([step(reward) for reward in rewards])
        together = step(merged)
        np.testing.assert_allclose(together.reshape(separate.shape), separate, atol=1e-5)

    both(lambda runtime: runtime.sync(tokens[:12], candidates[11]))  # prefill
    for position in range(12, 30):  # one token per step
        both(lambda runtime: runtime.advance([tokens[position]], candidates[position]))
    edited = tokens[:20] + tokens[30:]  # rewind to a common prefix, then a different continuation
    both(lambda runtime: runtime.sync(edited, candidates[-1]))
    assert merged.n_past == len(edited)


def test_merged_and_separate_rewards_give_the_same_tokens_with_live_weights(tmp_path, tiny_base, prompt):
    paths = sharing_rewards(tmp_path, tiny_base, seeds=(1, 2, 3))
    plain = Generation(tiny_base, prompt, config=GREEDY).run()

    def generate(merge):
        slots = attach_rewards(tiny_base, [(paths[0], 2.0), (paths[1], 0.0), (paths[2], -1.5)])
        generation = Generation(tiny_base, prompt, rewards=slots, config=GREEDY, merge_rewards=merge)
        for count, _ in enumerate(generation, start=1):
            if count == 6:  # the user turns the dials mid-reply
                slots[0].weight, slots[1].weight = 0.0, 3.0
        return generation.result

    separate, merged = generate(False), generate(True)
    assert merged.token_ids == separate.token_ids != plain.token_ids
    for ours, theirs in zip(merged.trace, separate.trace):
        np.testing.assert_allclose(ours.reward_values, theirs.reward_values, atol=1e-5)
        assert ours.reward_names == theirs.reward_names


def test_only_rewards_of_one_shape_and_embedding_are_merged(tmp_path, tiny_base):
    shared = sharing_rewards(tmp_path, tiny_base, seeds=(1, 2))
    other_embedding = sharing_rewards(tmp_path, tiny_base, seeds=(3,), embedding_seed=7)
    other_shape = sharing_rewards(tmp_path, tiny_base, seeds=(4,),
                                  shape=RewardNetworkShape(vocab_size=VOCAB, width=32, layers=1, heads=4))
    rewards = [RewardModel(path) for path in [shared[0], *other_embedding, shared[1], *other_shape]]
    groups = scoring_groups(rewards)
    assert sorted(group.indices for group in groups) == [(0, 2), (1,), (3,)]
    assert scoring_groups(rewards) == groups  # cached: merged sessions keep their KV state between replies
    assert [len(group.indices) for group in scoring_groups(rewards, merge=False)] == [1, 1, 1, 1]


def test_a_generation_mixing_merged_and_single_rewards_keeps_the_slot_order(tmp_path, tiny_base, prompt):
    shared = sharing_rewards(tmp_path, tiny_base, seeds=(1, 2))
    single = sharing_rewards(tmp_path, tiny_base, seeds=(3,), embedding_seed=7)
    specs = [(shared[0], 1.0), (single[0], 0.5), (shared[1], -1.0)]
    merged, separate = (Generation(tiny_base, prompt, rewards=attach_rewards(tiny_base, specs), config=GREEDY,
                                   merge_rewards=merge).run() for merge in (True, False))
    assert merged.token_ids == separate.token_ids
    np.testing.assert_allclose(merged.trace[3].reward_values, separate.trace[3].reward_values, atol=1e-5)


def test_a_reward_for_another_vocabulary_is_still_refused(tmp_path, tiny_base):
    (good,) = sharing_rewards(tmp_path, tiny_base, seeds=(1,))
    foreign = write_reward(tmp_path / "foreign.onnx", random_reward_weights(small_reward_shape(VOCAB), seed=2),
                           vocabulary_fingerprint="sha256:" + "1" * 64, base_name="another-family")
    with pytest.raises(VocabularyMismatchError, match="'foreign' was trained for 'another-family'.*different vocabulary"):
        attach_rewards(tiny_base, [(good, 1.0), (foreign, 1.0)])


def test_reading_a_reward_graph_gives_back_its_weights():
    weights = random_reward_weights(RewardNetworkShape(vocab_size=300, width=16, layers=2, heads=2), seed=4)
    model = build_reward_model(weights)
    assert build_reward_model(read_reward_weights(model)).SerializeToString() == model.SerializeToString()
    model.graph.initializer.pop()  # no token_bias: not a graph of this builder
    with pytest.raises(ValueError, match="not a reward graph of this builder"):
        read_reward_weights(model)


def test_the_merge_bench_reports_both_ways_and_the_saving():
    from engine.app.bench import run_merge_bench

    report = run_merge_bench(rewards=2, vocab_size=500, top_k=8, long_context=20)
    assert set(report["ms_per_step"]) == {"16", "20"}
    assert all(set(timings) == {"separate", "merged"} for timings in report["ms_per_step"].values())
    assert report["model_bytes"]["merged"] < report["model_bytes"]["separate"]
