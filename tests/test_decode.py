"""The steered decode loop on a tiny real GGUF with real ONNX rewards."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from engine.runtime.decode import Generation, StopStringMatcher, attach_rewards
from engine.runtime.errors import RewardRuntimeError
from engine.runtime.reward_graph import RewardNetworkShape, random_reward_weights, token_preference_weights
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import CandidateSelector, Sampler, SamplingConfig, log_normalizer
from tiny_models import small_reward_shape, write_reward

VOCAB = 49152
GREEDY = SamplingConfig(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture
def prompt(tiny_base):
    return tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me something."}])


@pytest.fixture
def unsteered(tiny_base, prompt):
    return Generation(tiny_base, prompt, config=GREEDY).run()


def make_reward(tmp_path, tiny_base, weights, name):
    return write_reward(
        tmp_path / f"{name}.onnx",
        weights,
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )


def preferred_token(unsteered) -> int:
    """A token the base ranks in its top-K at step 0 but never produces on its own."""
    first_step = unsteered.trace[0]
    return next(int(token) for token in first_step.candidate_ids[5:] if int(token) not in unsteered.token_ids)


def test_a_reward_that_prefers_a_token_makes_it_appear(tmp_path, tiny_base, prompt, unsteered):
    target = preferred_token(unsteered)
    path = make_reward(
        tmp_path,
        tiny_base,
        token_preference_weights(small_reward_shape(VOCAB), token=target, strength=50.0),
        "likes-target",
    )
    steered = Generation(tiny_base, prompt, rewards=attach_rewards(tiny_base, [(path, 1.0)]), config=GREEDY).run()
    assert target not in unsteered.token_ids
    assert steered.token_ids[0] == target
    assert steered.trace[0].rewards == {"likes-target": pytest.approx(50.0)}
    assert steered.trace[0].base_rank >= 5 and steered.trace[0].steered_rank == 0


def test_weight_zero_gives_the_unsteered_output(tmp_path, tiny_base, prompt, unsteered):
    target = preferred_token(unsteered)
    path = make_reward(
        tmp_path, tiny_base, token_preference_weights(small_reward_shape(VOCAB), token=target, strength=50.0), "muted"
    )
    muted = Generation(tiny_base, prompt, rewards=attach_rewards(tiny_base, [(path, 0.0)]), config=GREEDY).run()
    assert muted.token_ids == unsteered.token_ids


def test_trace_reports_the_reward_values_actually_used(tmp_path, tiny_base, prompt):
    path = make_reward(tmp_path, tiny_base, random_reward_weights(small_reward_shape(VOCAB), seed=7), "random")
    slots = attach_rewards(tiny_base, [(path, 0.7)])
    config = SamplingConfig(temperature=0.0, max_tokens=12, alpha=2.0, ignore_eos=True)
    result = Generation(tiny_base, prompt, rewards=slots, config=config).run()
    check = RewardModel(path)
    context = list(prompt)
    for step in result.trace:
        recomputed = check.sync(context, step.candidate_ids)  # an independent session over the same prefix
        np.testing.assert_allclose(step.reward_values[0], recomputed, atol=1e-4)
        np.testing.assert_allclose(step.scores, step.base_logprobs + 2.0 * 0.7 * recomputed, atol=1e-4)
        assert step.chosen == int(np.argmax(step.scores))
        context.append(step.token_id)


def test_two_rewards_mix_by_weight(tmp_path, tiny_base, prompt):
    shape = small_reward_shape(VOCAB)
    paths = [make_reward(tmp_path, tiny_base, random_reward_weights(shape, seed=seed), f"r{seed}") for seed in (1, 2)]
    slots = attach_rewards(tiny_base, [(paths[0], 1.5), (paths[1], -0.5)])
    step = Generation(tiny_base, prompt, rewards=slots, config=GREEDY).run().trace[0]
    np.testing.assert_allclose(
        step.scores, step.base_logprobs + 1.5 * step.reward_values[0] - 0.5 * step.reward_values[1], atol=1e-5
    )
    assert set(step.rewards) == {"r1", "r2"}


def test_weight_changes_apply_to_the_next_token(tmp_path, tiny_base, prompt, unsteered):
    target = preferred_token(unsteered)
    path = make_reward(
        tmp_path, tiny_base, token_preference_weights(small_reward_shape(VOCAB), token=target, strength=50.0), "dial"
    )
    slot = attach_rewards(tiny_base, [(path, 1.0)])[0]
    generation = Generation(tiny_base, prompt, rewards=[slot], config=GREEDY)
    events = iter(generation)
    assert next(events).token_id == target
    slot.weight = 0.0  # the user turns the dial down mid-reply
    list(events)
    assert generation.result.trace[1].scores.tolist() == generation.result.trace[1].base_logprobs.tolist()


def test_seeded_sampling_is_reproducible_and_seeds_differ(tiny_base, prompt):
    def sample(seed):
        config = SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=16, ignore_eos=True)
        return Generation(tiny_base, prompt, config=config).run().token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_max_tokens_and_streamed_text_add_up(tiny_base, prompt):
    generation = Generation(tiny_base, prompt, config=GREEDY)
    streamed = "".join(event.text for event in generation)
    assert generation.result.finish_reason == "length"
    assert len(generation.result.token_ids) == GREEDY.max_tokens
    assert streamed == generation.result.text == tiny_base.detokenize(generation.result.token_ids)


def test_stop_string_ends_the_reply_and_is_not_shown(tiny_base, prompt, unsteered):
    # the reply's text depends on the CPU's kernels: the stop is a visible token of this machine's reply, after the 3rd
    tokens = (tiny_base.detokenize([token]) for token in unsteered.token_ids[3:])
    stop = next(text for text in tokens if text.strip() and text in unsteered.text)  # not half a UTF-8 character
    config = SamplingConfig(temperature=0.0, max_tokens=24, stop=(stop,), ignore_eos=True)
    result = Generation(tiny_base, prompt, config=config).run()
    assert result.finish_reason == "stop"
    assert result.text == unsteered.text[: unsteered.text.index(stop)]


def test_end_of_generation_token_stops(tmp_path, tiny_base, prompt):
    im_end = tiny_base.tokenize("<|im_end|>", special=True)[0]
    path = make_reward(
        tmp_path,
        tiny_base,
        token_preference_weights(small_reward_shape(VOCAB), token=im_end, strength=1e4),
        "wants-to-end",
    )
    config = SamplingConfig(temperature=0.0, top_k=VOCAB, max_tokens=24)  # the whole vocabulary is a candidate
    result = Generation(tiny_base, prompt, rewards=attach_rewards(tiny_base, [(path, 1.0)]), config=config).run()
    assert result.finish_reason == "stop" and result.token_ids == [] and result.text == ""


def test_cancel_from_another_thread_stops_at_the_next_token(tiny_base, prompt):
    generation = Generation(tiny_base, prompt, config=SamplingConfig(temperature=0.0, max_tokens=400, ignore_eos=True))
    for count, _ in enumerate(generation, start=1):
        if count == 3:
            threading.Thread(target=generation.cancel).start()
            threading.Event().wait(0.2)
    assert generation.result.finish_reason == "cancelled"
    assert 3 <= len(generation.result.token_ids) <= 4


def test_an_exception_inside_scoring_reaches_the_caller(tmp_path, tiny_base, prompt):
    """A reward whose embedding is smaller than the vocabulary fails inside onnxruntime on a large token id."""
    small = random_reward_weights(RewardNetworkShape(vocab_size=1000, width=32, layers=1, heads=4), seed=0)
    path = make_reward(tmp_path, tiny_base, small, "too-small")
    generation = Generation(tiny_base, prompt, rewards=attach_rewards(tiny_base, [(path, 1.0)]), config=GREEDY)
    with pytest.raises(RewardRuntimeError, match="'too-small' failed at token"):
        generation.run()
    assert generation.result.finish_reason == "error"


def test_stop_string_matcher_holds_back_only_possible_starts():
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("x and more") == ("</enx and more", False)
    assert matcher.feed(" fine</end> tail") == (" fine", True)


def test_sampler_respects_min_p_and_top_p():
    scores = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    only_top = Sampler(SamplingConfig(temperature=1.0, top_p=0.5, min_p=0.0, seed=0))
    assert {only_top.pick(scores) for _ in range(50)} == {0}
    min_p = Sampler(SamplingConfig(temperature=1.0, top_p=1.0, min_p=0.2, seed=0))
    assert {min_p.pick(scores) for _ in range(300)} == {0, 1, 2}
    assert Sampler(SamplingConfig(temperature=0.0)).pick(scores) == 0


@pytest.mark.parametrize("n_vocab", [7, 40, 3000, 49152, 262144, 262144 + 1999])
def test_candidates_are_the_top_k_of_the_whole_row_ties_to_the_lower_id(n_vocab):
    rng = np.random.default_rng(n_vocab)
    select = CandidateSelector(n_vocab, 40)
    for _ in range(5):
        logits = rng.standard_normal(n_vocab).astype(np.float32) * 3
        logits[rng.integers(0, n_vocab, 6)] = logits.max()  # ties at the top
        logits[-1] = logits.max() + 1  # the best token past the last whole column
        boundary = np.sort(logits)[-min(40, n_vocab)]
        logits[rng.integers(0, n_vocab, 6)] = boundary  # ties at the K-th place
        expected = np.lexsort((np.arange(n_vocab), -logits))[: select.k]
        candidates = select(logits)
        assert candidates.token_ids.tolist() == expected.tolist()
        exact = np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) + logits.max()
        np.testing.assert_allclose(candidates.base_logprobs, logits[expected] - exact, atol=1e-5)
        assert abs(log_normalizer(logits) - exact) < 1e-5


def test_invalid_sampling_arguments_name_the_argument():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
