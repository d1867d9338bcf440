"""The style survey on a real tiny GGUF with real ONNX rewards: questions, features, a simulated user, storage."""

from __future__ import annotations

import numpy as np
import pytest

from engine.app.onboarding import MIX_SIZE, StyleSurvey, reward_totals, save_profile, saved_profile
from engine.app.pref import cosine
from engine.app.store import Store
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import VocabularyMismatchError
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import RewardModel
from engine.runtime.steering import SamplingConfig
from tiny_models import small_reward_shape, write_reward

VOCAB = 49152


@pytest.fixture
def reward_paths(tmp_path, tiny_base):
    """Two rewards strong enough that the mix changes the tiny model's replies."""
    shape = small_reward_shape(VOCAB)
    return [
        write_reward(
            tmp_path / f"style{seed}.onnx",
            random_reward_weights(shape, seed=seed, scale=1.0),
            vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
            base_name=tiny_base.name,
        )
        for seed in (1, 2)
    ]


def test_reward_totals_equal_the_rewards_scored_token_by_token(tiny_base, reward_paths):
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Hello there."}])
    slots = attach_rewards(tiny_base, [(path, 0.5) for path in reward_paths])
    result = Generation(
        tiny_base, prompt, rewards=slots, config=SamplingConfig(temperature=0.7, seed=3, max_tokens=12)
    ).run()
    expected = []
    for path in reward_paths:
        reward = RewardModel(path)
        expected.append(
            sum(
                reward.sync(prompt + result.token_ids[:position], [token])[0]
                for position, token in enumerate(result.token_ids)
            )
        )
    assert len(result.token_ids) == 12
    np.testing.assert_allclose(reward_totals(result, 2), expected, atol=1e-4)


def test_questions_pair_two_replies_to_one_prompt_written_under_different_mixes(tiny_base, reward_paths):
    survey = StyleSurvey(tiny_base, reward_paths, questions=3, reply_tokens=16)
    reported, asked = [], []
    while not survey.finished:
        question = survey.next_question(progress=lambda done, total: reported.append((done, total)))
        assert question.first.text != question.second.text and question.first.mix != question.second.mix
        assert max(abs(w) for w in question.first.mix) == pytest.approx(MIX_SIZE)
        assert question.difference.shape == (2,) and np.all(np.isfinite(question.difference))
        asked.append((question.prompt, question.first.text, question.second.text))
        survey.answer(question, "a")
    # each question writes 3 replies to a new prompt; the pair asked may be left over from an earlier prompt
    assert reported == [(1, 3), (2, 3), (3, 3)] * 3 and len(set(asked)) == 3
    assert len(survey.posterior.observations) == 3
    with pytest.raises(ValueError, match="all 3 questions"):
        survey.next_question()
    with pytest.raises(ValueError, match="answer must be one of"):
        survey.answer(question, "both")


def test_a_consistent_user_is_found_on_the_real_model(tiny_base, reward_paths):
    hidden = np.array([1.0, -0.5])
    survey = StyleSurvey(tiny_base, reward_paths, questions=6, reply_tokens=16)
    while not survey.finished:
        question = survey.next_question()
        survey.answer(question, "a" if hidden @ question.difference > 0 else "b")
    profile = survey.profile("mine")
    found = np.array([profile.weights[name] for name in survey.reward_names])
    assert cosine(hidden, found) > 0.9, (found, [q.difference for q, _ in survey.answered])
    assert max(abs(found)) == pytest.approx(1.0)


def test_the_result_is_stored_with_its_picks_and_sets_the_dials(tmp_path, tiny_base, reward_paths):
    survey = StyleSurvey(tiny_base, reward_paths, questions=3, reply_tokens=16)
    answers = iter(["a", "none", "b"])
    questions = []
    while not survey.finished:
        questions.append(survey.next_question())
        survey.answer(questions[-1], next(answers))
    with Store(tmp_path / "chats.db") as store:
        profile = save_profile(store, survey, "My style")
        assert saved_profile(store) == profile
        stored = store.setting("style_profile")["questions"]
        assert [entry["answer"] for entry in stored] == ["a", "none", "b"] and stored[0]["a"] == questions[0].first.text
        picks = store.feedback()
        assert [(pick.kind, pick.chosen, pick.rejected) for pick in picks] == [
            ("pick", questions[0].first.text, questions[0].second.text),
            ("pick", questions[2].second.text, questions[2].first.text),
        ]
        dials = {entry.name: entry.weight for entry in store.rewards()}
        assert dials == pytest.approx({name: MIX_SIZE * weight for name, weight in profile.weights.items()})
        assert max(map(abs, profile.weights.values())) == pytest.approx(1.0)


def test_nothing_is_saved_before_a_question_is_answered(tmp_path, tiny_base, reward_paths):
    with Store(tmp_path / "chats.db") as store:
        store.add_reward(reward_paths[0], "style1")
        store.set_reward_state(reward_paths[0], weight=0.7)  # a dial the user set before the survey
        survey = StyleSurvey(tiny_base, reward_paths, questions=2, reply_tokens=8)
        survey.next_question()  # written and shown, not answered
        with pytest.raises(ValueError, match="answer at least one question"):
            save_profile(store, survey, "Untouched")
        assert saved_profile(store) is None and store.feedback() == []
        assert [(entry.name, entry.enabled, entry.weight) for entry in store.rewards()] == [("style1", True, 0.7)]


def test_rewards_for_another_vocabulary_are_refused(tmp_path, tiny_base):
    other = write_reward(
        tmp_path / "other.onnx",
        random_reward_weights(small_reward_shape(VOCAB), seed=1),
        vocabulary_fingerprint="f" * 64,
        base_name="another-model",
    )
    with pytest.raises(VocabularyMismatchError, match="another-model"):
        StyleSurvey(tiny_base, [other])
    with pytest.raises(ValueError, match="at least one base reward"):
        StyleSurvey(tiny_base, [])


@pytest.mark.parametrize("stored", [[1, 2], "a profile", 3.5, None])
def test_a_stored_profile_of_another_shape_reads_as_none(tmp_path, stored):
    with Store(tmp_path / "chats.db") as store:
        store.set_setting("style_profile", stored)
        assert saved_profile(store) is None
