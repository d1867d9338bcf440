"""Several rewards in one onnxruntime session: same rewards, same tokens, one run per step."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_CONFIG
from engine.app.chat import ChatEngine
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import RewardRuntimeError, VocabularyMismatchError
from engine.runtime.mixing import MergedSessions, scoring_groups
from engine.runtime.reward_graph import (
    RewardNetworkShape,
    build_reward_model,
    random_reward_weights,
    read_reward_weights,
)
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
        paths.append(
            write_reward(
                tmp_path / f"r{seed}-e{embedding_seed}.onnx",
                weights,
                base_name=base.name,
                vocabulary_fingerprint=base.vocabulary_fingerprint,
            )
        )
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
        both(lambda runtime, position=position: runtime.advance([tokens[position]], candidates[position]))
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
    other_shape = sharing_rewards(
        tmp_path, tiny_base, seeds=(4,), shape=RewardNetworkShape(vocab_size=VOCAB, width=32, layers=1, heads=4)
    )
    rewards = [RewardModel(path) for path in [shared[0], *other_embedding, shared[1], *other_shape]]
    with MergedSessions() as cache:
        groups = cache.groups(rewards)
        assert sorted(group.indices for group in groups) == [(0, 2), (1,), (3,)]
        assert cache.groups(rewards) == groups  # cached: merged sessions keep their KV state between replies
        assert [len(group.indices) for group in cache.groups(rewards, merge=False)] == [1, 1, 1, 1]


def test_a_generation_mixing_merged_and_single_rewards_keeps_the_slot_order(tmp_path, tiny_base, prompt):
    shared = sharing_rewards(tmp_path, tiny_base, seeds=(1, 2))
    single = sharing_rewards(tmp_path, tiny_base, seeds=(3,), embedding_seed=7)
    specs = [(shared[0], 1.0), (single[0], 0.5), (shared[1], -1.0)]
    merged, separate = (
        Generation(
            tiny_base, prompt, rewards=attach_rewards(tiny_base, specs), config=GREEDY, merge_rewards=merge
        ).run()
        for merge in (True, False)
    )
    assert merged.token_ids == separate.token_ids
    np.testing.assert_allclose(merged.trace[3].reward_values, separate.trace[3].reward_values, atol=1e-5)


def foreign_reward(tmp_path):
    """A reward trained for another vocabulary."""
    return write_reward(
        tmp_path / "foreign.onnx",
        random_reward_weights(small_reward_shape(VOCAB), seed=2),
        vocabulary_fingerprint="sha256:" + "1" * 64,
        base_name="another-family",
    )


def test_a_reward_for_another_vocabulary_is_still_refused(tmp_path, tiny_base):
    (good,) = sharing_rewards(tmp_path, tiny_base, seeds=(1,))
    foreign = foreign_reward(tmp_path)
    with pytest.raises(
        VocabularyMismatchError, match="'foreign' was trained for 'another-family'.*different vocabulary"
    ):
        attach_rewards(tiny_base, [(good, 1.0), (foreign, 1.0)])


def test_a_refused_reward_closes_the_rewards_loaded_with_it(tmp_path, tiny_base, monkeypatch):
    (good,) = sharing_rewards(tmp_path, tiny_base, seeds=(1,))
    opened = []

    class Recorded(RewardModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr("engine.runtime.decode.RewardModel", Recorded)
    with pytest.raises(VocabularyMismatchError):
        attach_rewards(tiny_base, [(good, 1.0), (foreign_reward(tmp_path), 1.0)])
    assert len(opened) == 2 and all(reward.closed for reward in opened)


def test_a_plan_pushed_out_of_the_cache_is_closed_and_the_rewards_own_sessions_stay_open(tmp_path, tiny_base):
    first, shared, last = (RewardModel(path) for path in sharing_rewards(tmp_path, tiny_base, seeds=(1, 2, 3)))
    with MergedSessions(capacity=1) as cache:
        (old,) = cache.groups([first, shared])
        (new,) = cache.groups([shared, last])
        assert old.session.closed and not new.session.closed and cache.cached_plans == 1
        with pytest.raises(RewardRuntimeError, match="cannot score: it was closed"):
            old.session.sync([1, 2, 3], np.array([5, 6]))
    assert new.session.closed and cache.cached_plans == 0
    assert not any(reward.closed for reward in (first, shared, last))


@pytest.fixture
def engine(tiny_gguf):
    chat = ChatEngine()
    chat.load_model(tiny_gguf, TINY_CONFIG)
    yield chat
    chat.close()


def merged_reply(engine: ChatEngine, paths) -> list[RewardModel]:
    """Reply with ``paths`` switched on; the rewards it used."""
    engine.set_active_rewards({path: 1.0 for path in paths})
    generation = engine.reply([{"role": "user", "content": "Tell me something."}], GREEDY)
    engine.run_locked(generation, lambda _event: None)
    return [slot.reward for slot in generation.rewards]


def test_a_model_switch_closes_the_rewards_and_their_merged_sessions(tmp_path, engine, tiny_gguf_other_seed):
    rewards = merged_reply(engine, sharing_rewards(tmp_path, engine.base, seeds=(1, 2)))
    (group,) = engine.merged_sessions.groups(rewards)  # the plan the reply used, from the engine's cache
    assert group.merged and engine.merged_sessions.cached_plans == 1
    engine.load_model(tiny_gguf_other_seed, TINY_CONFIG)
    assert engine.merged_sessions.cached_plans == 0 and group.session.closed
    assert all(reward.closed for reward in rewards) and engine.active_reward_names == []


def test_a_reward_switched_off_is_closed_when_the_reply_ends(tmp_path, engine):
    paths = sharing_rewards(tmp_path, engine.base, seeds=(1, 2, 3))
    first, dropped, third = merged_reply(engine, paths)
    (merged_before,) = engine.merged_sessions.groups([first, dropped, third])
    still_on = merged_reply(engine, [paths[0], paths[2]])  # the reply runs; at its end the switched-off one closes
    assert dropped.closed and merged_before.session.closed and not any(reward.closed for reward in still_on)
    assert still_on == [first, third] and engine.merged_sessions.cached_plans == 1


def test_closing_the_engine_twice_is_safe(tmp_path, engine):
    rewards = merged_reply(engine, sharing_rewards(tmp_path, engine.base, seeds=(1, 2)))
    engine.close()
    engine.close()
    assert engine.base is None and engine.merged_sessions.cached_plans == 0
    assert all(reward.closed for reward in rewards)


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
