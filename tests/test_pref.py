"""PReF elicitation: the Laplace posterior, the question criterion, profiles, the simulated-user bench and its CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.app.pref import (
    PreferencePosterior,
    Profile,
    ProfileError,
    choose_question,
    cosine,
    informativeness,
    run_pref_bench,
)
from helpers import assert_one_line_error, prt


def test_posterior_converges_to_the_hidden_weights_with_many_noiseless_answers():
    rng = np.random.default_rng(0)
    hidden = np.array([0.7, -0.5, 0.1, 0.5])
    questions = rng.standard_normal((300, 4))
    answers = ["a" if v @ hidden > 0 else "b" for v in questions]
    posterior = PreferencePosterior(4, prior_var=10.0).fit(zip(questions, answers))
    assert cosine(hidden, posterior.mean) > 0.95


def test_laplace_map_and_covariance_match_brute_force_in_2d():
    questions = np.array([[1.0, 0.5], [-0.3, 2.0], [2.0, -1.0], [0.5, 0.5], [1.0, 1.0]])
    answers = ["a", "b", "a", "b", "none"]
    labels = np.array([1.0, 0.0, 1.0, 0.0, 0.5])
    prior_var = 2.0
    posterior = PreferencePosterior(2, prior_var=prior_var).fit(zip(questions, answers))

    def negative_log_posterior(weights):  # [..., 2] -> [...], written out independently of engine.app.pref
        z = weights @ questions.T
        log_p_a, log_p_b = -np.log1p(np.exp(-z)), -np.log1p(np.exp(z))
        return -(labels * log_p_a + (1 - labels) * log_p_b).sum(-1) + (weights**2).sum(-1) / (2 * prior_var)

    axis = np.linspace(-4, 4, 801)  # step 0.01
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), axis=-1)
    values = negative_log_posterior(grid)
    grid_map = grid[np.unravel_index(np.argmin(values), values.shape)]
    np.testing.assert_allclose(posterior.mean, grid_map, atol=0.01)

    step = 1e-4  # central differences for the Hessian at the MAP
    at = posterior.mean
    f = negative_log_posterior
    hessian = np.array(
        [
            [(f(at + a + b) - f(at + a - b) - f(at - a + b) + f(at - a - b)) / (4 * step**2) for b in np.eye(2) * step]
            for a in np.eye(2) * step
        ]
    )
    np.testing.assert_allclose(posterior.covariance, np.linalg.inv(hessian), rtol=1e-4)


def test_no_preference_is_a_half_observation_toward_a_tie():
    posterior = PreferencePosterior(2, prior_var=1.0)
    posterior.update([2.0, 0.0], "none")
    np.testing.assert_allclose(posterior.mean, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(posterior.covariance, np.diag([1 / (1 + 4 * 0.25), 1.0]))  # one answer's curvature
    posterior.update([1.0, 0.0], "a")
    prefers_a_only = PreferencePosterior(2, prior_var=1.0).fit([([1.0, 0.0], "a")])
    assert 0 < posterior.mean[0] < prefers_a_only.mean[0]  # the tie holds the estimate back


def test_bad_answers_and_questions_are_refused_and_change_nothing():
    posterior = PreferencePosterior(2).fit([([1.0, 0.0], "a")])
    mean = posterior.mean
    with pytest.raises(ValueError, match="answer must be one of"):
        posterior.update([1.0, 0.0], "A")
    with pytest.raises(ValueError, match="each v must be 2 finite numbers"):
        posterior.fit([([0.0, 1.0], "b"), ([1.0, 0.0, 3.0], "a")])
    assert len(posterior.observations) == 1
    np.testing.assert_array_equal(posterior.mean, mean)
    assert PreferencePosterior(2).fit([]).observations == []


def test_adaptive_asks_about_the_direction_not_yet_known():
    # Ten ties on e1 pin lambda_1 near 0 (precision 1 + 10 * 1/4) and leave the mean at 0, so sigma'(0) = 1/4
    # for every question and the criterion is (1/16) v^T Sigma v: e2 (variance 1) beats e1 (variance 1/3.5).
    posterior = PreferencePosterior(2, prior_var=1.0).fit([([1.0, 0.0], "none")] * 10)
    pool = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.5], [0.6, 0.6]])
    np.testing.assert_allclose(
        informativeness(posterior, pool), [1 / 16 / 3.5, 1 / 16, 0.25 / 16, 0.36 / 16 * (1 / 3.5 + 1)]
    )
    assert choose_question(posterior, pool, set()) == 1
    assert choose_question(posterior, pool, {1}) == 3


def test_adaptive_prefers_a_question_near_a_tie_under_the_current_mean():
    posterior = PreferencePosterior(2, prior_var=1.0).fit([([1.0, 0.0], "a")] * 5)  # lambda_1 clearly > 0
    known_direction = [1 / np.sqrt(posterior.covariance[0, 0]), 0.0]  # same v^T Sigma v (1) as e2 ...
    pool = np.array([known_direction, [0.0, 1.0]])  # ... but its answer is predictable: sigma' is smaller
    spread = np.einsum("nd,de,ne->n", pool, posterior.covariance, pool)
    np.testing.assert_allclose(spread, [1.0, 1.0])
    assert choose_question(posterior, pool, set()) == 1


@pytest.mark.parametrize("strategy", ["adaptive", "random"])
def test_a_question_is_never_asked_twice(strategy):
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((6, 3))
    posterior, asked = PreferencePosterior(3), set()
    for _ in range(len(pool)):
        index = choose_question(posterior, pool, asked, strategy=strategy, rng=rng)
        assert index not in asked
        asked.add(index)
        posterior.update(pool[index], "a")
    with pytest.raises(ValueError, match="every question"):
        choose_question(posterior, pool, asked, strategy=strategy, rng=rng)


def test_bench_is_deterministic_for_a_seed():
    first = run_pref_bench(users=4, questions=(5, 10), seed=3)
    assert first == run_pref_bench(users=4, questions=(5, 10), seed=3)
    assert first["cosine"] != run_pref_bench(users=4, questions=(5, 10), seed=4)["cosine"]


def test_adaptive_beats_random_at_ten_questions():
    report = run_pref_bench(users=100, questions=(10,), seed=0)
    adaptive, random = report["cosine"]["adaptive"]["10"], report["cosine"]["random"]["10"]
    assert adaptive["mean"] > random["mean"] + 0.08, report["cosine"]
    assert adaptive["ci95"][0] > random["ci95"][1]


def test_profile_round_trips_through_json():
    posterior = PreferencePosterior(3, prior_var=2.0).fit(
        [([1.0, -0.5, 0.2], "a"), ([0.3, 1.0, -1.0], "b"), ([0.5, 0.5, 0.5], "none")]
    )
    profile = Profile.from_posterior("concise", ["brevity", "warmth", "detail"], posterior)
    assert list(profile.weights) == ["brevity", "warmth", "detail"]
    assert max(abs(w) for w in profile.weights.values()) == pytest.approx(1.0)
    restored = Profile.from_json(profile.to_json())
    assert restored == profile
    np.testing.assert_allclose(restored.posterior().mean, posterior.mean)


def test_unreadable_profile_is_a_profile_error():
    with pytest.raises(ProfileError, match="Not a preference profile"):
        Profile.from_json(
            json.dumps(
                {
                    "name": "x",
                    "weights": {"a": 1.0},
                    "answers": [{"v": [1], "answer": "yes"}],
                    "prior_var": 1.0,
                    "format_version": 1,
                }
            )
        )


def test_cli_json_has_the_documented_keys():
    result = prt("pref-bench", "--users", "20", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {
        "users",
        "dims",
        "seed",
        "noise_scale",
        "prior_var",
        "agreement",
        "pool",
        "pool_questions",
        "questions",
        "cosine",
        "reference_questions",
        "random_questions_to_match_adaptive",
    }
    assert report["questions"] == [5, 10, 20, 30] and report["users"] == 20
    assert set(report["cosine"]) == {"adaptive", "random"}
    assert set(report["cosine"]["adaptive"]["10"]) == {"mean", "ci95"}


def test_cli_refuses_zero_users():
    assert_one_line_error(prt("pref-bench", "--users", "0"), "users must be >= 2")


def test_cli_refuses_features_of_the_wrong_shape(tmp_path):
    path = tmp_path / "features.npy"
    np.save(path, np.zeros(12))
    assert_one_line_error(prt("pref-bench", "--users", "5", "--features", str(path)), "features must be")
