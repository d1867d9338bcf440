"""Portable Reward Tuning on a tiny real GGUF: data, teacher pass, training, export parity, eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.errors import RewardFileError, VocabularyMismatchError
from engine.runtime.reward_graph import RewardNetworkShape, read_reward_weights
from engine.runtime.rewards import RewardCard, RewardModel, card_path
from engine.runtime.steering import CandidateSelector, SamplingConfig
from helpers import assert_one_line_error, other_prompts, prt
from rewards_onnx.data import DatasetError, Demonstration, PreferencePair, load_jsonl, read_documents, read_jsonl
from rewards_onnx.evaluate import compare_replies, evaluate_reward, sentence_count
from rewards_onnx.metrics import reply_part
from rewards_onnx.network import RewardNet
from rewards_onnx.teacher import TRAIN_TOP_K, response_sequence, teacher_pass
from rewards_onnx.train import ExportParityError, TuneConfig, _initial_model, check_export_parity, split_held_out, tune
from tiny_models import small_reward_shape, write_reward

pytestmark = pytest.mark.slow

TEST_PROMPT = "Tell me about your day."
GREEDY = SamplingConfig(temperature=0.0, max_tokens=8)
FAST = TuneConfig(
    epochs=30, patience=5, held_out_fraction=0.2, width=32, layers=1, heads=4, learning_rate=1e-2, batch_size=16
)


def phrase_in_top_k(base, prompt_tokens, rank: int, length: int = 5) -> list[int]:
    """A phrase the base would not say but that stays within its top-K: follow the rank-th candidate."""
    select, phrase = CandidateSelector(base.n_vocab, TRAIN_TOP_K), []
    for _ in range(length):
        base.sync(prompt_tokens + phrase)
        phrase.append(int(select(base.last_logits()).token_ids[rank]))
    return phrase


@pytest.fixture
def prompt_tokens(tiny_base):
    return tiny_base.chat_prompt_tokens([{"role": "user", "content": TEST_PROMPT}])


def test_a_reward_trained_on_a_fixed_phrase_makes_the_model_say_it(tmp_path, tiny_base, prompt_tokens):
    phrase = tiny_base.detokenize(phrase_in_top_k(tiny_base, prompt_tokens, rank=2))
    examples = [Demonstration(prompt, phrase) for prompt in [TEST_PROMPT, *other_prompts(19)]]
    report = tune(tiny_base, examples, tmp_path / "phrase.onnx", config=FAST)
    plain = Generation(tiny_base, prompt_tokens, config=GREEDY).run()
    steered = Generation(
        tiny_base, prompt_tokens, rewards=attach_rewards(tiny_base, [(report.path, 1.0)]), config=GREEDY
    ).run()
    assert phrase not in plain.text
    assert steered.text.startswith(phrase)
    assert report.held_out.steered_nll < 0.1 * report.held_out.base_nll
    assert report.parity_max_abs_diff < 1e-3


def test_the_embedding_is_trained_and_the_file_holds_exactly_the_trained_one(tmp_path, tiny_base, prompt_tokens):
    phrase = tiny_base.detokenize(phrase_in_top_k(tiny_base, prompt_tokens, rank=2))
    examples = [Demonstration(prompt, phrase) for prompt in other_prompts(10)]
    config = replace(FAST, epochs=3)
    report = tune(tiny_base, examples, tmp_path / "embedding.onnx", config=config)
    saved = read_reward_weights(onnx.load(report.path)).embedding
    initial = _initial_model(tiny_base, config).embedding.detach().numpy()
    assert not np.allclose(saved, initial)  # the embedding moved ...
    assert report.parity_max_abs_diff < 1e-5  # ... and was rounded to int8 before the figures and the export


def test_training_on_the_bases_own_samples_learns_nothing(tmp_path, tiny_base):
    sampling = SamplingConfig(temperature=1.0, top_k=TRAIN_TOP_K, top_p=1.0, min_p=0.0, max_tokens=12, ignore_eos=True)
    examples = []
    for index, prompt in enumerate(other_prompts(40)):
        tokens = tiny_base.chat_prompt_tokens([{"role": "user", "content": prompt}])
        config = SamplingConfig(**{**sampling.__dict__, "seed": index})
        examples.append(Demonstration(prompt, Generation(tiny_base, tokens, config=config).run().text))
    report = tune(tiny_base, examples, tmp_path / "nothing.onnx", config=FAST)
    held = report.held_out
    assert held.tokens > 50
    assert abs(held.steered_nll - held.base_nll) < 0.02 * held.base_nll  # within noise: no spurious gain or loss


def test_preference_pairs_train_the_reward_toward_the_chosen_reply(tmp_path, tiny_base, prompt_tokens):
    chosen_ids = phrase_in_top_k(tiny_base, prompt_tokens, rank=3)
    rejected_ids = phrase_in_top_k(tiny_base, prompt_tokens, rank=1)
    chosen, rejected = tiny_base.detokenize(chosen_ids), tiny_base.detokenize(rejected_ids)
    examples = [PreferencePair(prompt, chosen, rejected) for prompt in [TEST_PROMPT, *other_prompts(19)]]
    report = tune(tiny_base, examples, tmp_path / "pairs.onnx", config=FAST)
    assert report.held_out.pairs == 4 and report.held_out.pair_accuracy == 1.0
    # The base ranks the rejected reply's first token above the chosen one's; the steered model, the other way round.
    tiny_base.sync(prompt_tokens)
    top = CandidateSelector(tiny_base.n_vocab, TRAIN_TOP_K)(tiny_base.last_logits())
    base_logprob = dict(zip(top.token_ids.tolist(), top.base_logprobs.tolist()))
    first = np.array([chosen_ids[0], rejected_ids[0]])
    rewards = RewardModel(report.path).sync(prompt_tokens, first)
    assert base_logprob[chosen_ids[0]] < base_logprob[rejected_ids[0]]
    assert base_logprob[chosen_ids[0]] + rewards[0] > base_logprob[rejected_ids[0]] + rewards[1]


def test_export_equals_torch_through_the_engines_kv_path(tmp_path, tiny_base):
    shape = RewardNetworkShape(vocab_size=tiny_base.n_vocab, width=64, layers=2, heads=4)
    torch.manual_seed(0)
    model = RewardNet(shape, np.random.default_rng(0).standard_normal((shape.vocab_size, shape.width)))
    with torch.no_grad():  # a trained-looking reward: nonzero head and biases
        model.head.normal_(0, 0.1)
        model.token_bias.normal_(0, 1.0)
    path = write_reward(
        tmp_path / "export.onnx",
        model.export(),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )
    assert check_export_parity(model, path, seed=1) < 1e-3
    with torch.no_grad():
        model.token_bias.add_(0.01)  # the file no longer matches the model: the check must say so
    with pytest.raises(ExportParityError, match="differs from the trained model"):
        check_export_parity(model, path, seed=1)


def test_reward_file_is_small_relative_to_the_base(tmp_path, tiny_base, prompt_tokens):
    examples = [Demonstration(prompt, "Hello there.") for prompt in other_prompts(6)]
    report = tune(tiny_base, examples, tmp_path / "size.onnx", config=TuneConfig(epochs=1))
    size = report.path.stat().st_size
    assert size < 0.1 * 98_362_432  # the goal: <= 10% of the default GGUF
    card = RewardCard.load(card_path(report.path))
    # the tiny GGUF is 15 MB for 49,152 tokens, too small for a full-width embedding: the smallest rank
    assert card.network == {"width": 128, "layers": 2, "heads": 4, "embedding_rank": 64, "top_k": TRAIN_TOP_K}
    assert card.training_data["demonstrations"] == 6 and card.base_model_sha256
    assert card.metrics["held_out"]["tokens"] > 0


def test_teacher_pass_keeps_top_k_plus_target(tiny_base):
    example = Demonstration("Hi", "Hello there, friend.")
    data = teacher_pass(tiny_base, [example])
    sequence = data.demonstrations[0]
    tokens, first = response_sequence(tiny_base, [{"role": "user", "content": "Hi"}], example.response)
    assert sequence.first_target == first and sequence.tokens.tolist() == tokens
    assert tiny_base.is_end_of_generation(int(sequence.tokens[-1]))  # the reply's end is a target too
    assert sequence.candidate_ids.shape == (len(tokens) - first, TRAIN_TOP_K + 1)
    for row, target in enumerate(sequence.tokens[first:]):
        assert sequence.candidate_ids[row, sequence.target_index[row]] == target
    assert np.all(sequence.base_logprobs[:, :TRAIN_TOP_K] <= 0)


@pytest.fixture(scope="module")
def phrase_reward(tmp_path_factory, tiny_base):
    """(a reward trained to say a phrase the base would not, the phrase, held-out demonstrations of it)"""
    prompt_tokens = tiny_base.chat_prompt_tokens([{"role": "user", "content": TEST_PROMPT}])
    phrase = tiny_base.detokenize(phrase_in_top_k(tiny_base, prompt_tokens, rank=2))
    examples = [Demonstration(prompt, phrase) for prompt in other_prompts(10)]
    report = tune(tiny_base, examples, tmp_path_factory.mktemp("phrase") / "eval.onnx", config=FAST)
    held_out = [Demonstration(prompt, phrase) for prompt in ["A new question?", "Another one, please."]]
    return report.path, phrase, held_out


def test_eval_through_onnx_matches_the_training_figures(tiny_base, phrase_reward):
    path, _, held_out = phrase_reward
    evaluated, data = evaluate_reward(tiny_base, RewardModel(path), held_out, teacher_system="Say the phrase.")
    assert len(data.examples) == len(held_out) and not data.skipped
    assert evaluated.tokens > 0
    assert evaluated.steered_nll < 0.2 * evaluated.base_nll
    assert evaluated.teacher_nll is not None
    assert evaluated.gap_closed == pytest.approx(
        (evaluated.base_nll - evaluated.steered_nll) / (evaluated.base_nll - evaluated.teacher_nll)
    )
    parts = evaluated.parts  # where the gap lies: the parts add up to the whole
    assert parts["last"].tokens == len(held_out) and sum(p.tokens for p in parts.values()) == evaluated.tokens
    for figure in ("base_nll", "steered_nll", "teacher_nll"):
        weighted = sum(getattr(p, figure) * p.tokens for p in parts.values()) / evaluated.tokens
        assert weighted == pytest.approx(getattr(evaluated, figure), rel=1e-5)
    assert sum(p.gap_share for p in parts.values()) == pytest.approx(1.0)


def test_replies_compared_on_the_same_prompts_through_the_real_parts(tiny_base, phrase_reward):
    path, phrase, _ = phrase_reward
    asked = [Demonstration(TEST_PROMPT, phrase)] * 2  # the phrase is in the base's top-K after this prompt
    replies = compare_replies(
        tiny_base, RewardModel(path), asked, count=2, max_tokens=12, teacher_system="Say the phrase."
    )
    assert list(replies) == ["data", "base", "steered", "teacher"]
    assert replies["data"].texts == [phrase] * 2 and replies["data"].ended is None
    assert replies["data"].mean_tokens == len(tiny_base.tokenize(phrase))
    assert all(text.startswith(phrase) for text in replies["steered"].texts)
    assert not any(text.startswith(phrase) for text in replies["base"].texts)
    assert replies["base"].mean_tokens == 12 and replies["base"].ended == 0.0  # a random tiny model never stops
    unsteered = compare_replies(tiny_base, RewardModel(path), asked, count=2, max_tokens=12, alpha=0.0)
    assert list(unsteered) == ["data", "base", "steered"]  # no teacher known
    assert unsteered["steered"] == unsteered["base"]  # one seed per prompt, shared


def test_sentences_are_counted_at_their_ends():
    assert [sentence_count(text) for text in ("", "One.", "It costs 3.5 euros. Fine! Right", " Yes?  No. ")] == [
        0,
        1,
        3,
        2,
    ]


def test_reply_parts_are_the_first_token_the_next_three_the_body_and_the_last():
    assert [reply_part(position, 7) for position in range(7)] == ["first"] + ["early"] * 3 + ["body"] * 2 + ["last"]
    assert reply_part(0, 1) == "last"  # a reply that is only its end of turn


def test_eval_refuses_a_reward_for_another_vocabulary(tmp_path, tiny_base):
    from engine.runtime.reward_graph import random_reward_weights

    path = write_reward(
        tmp_path / "foreign.onnx",
        random_reward_weights(small_reward_shape(49152), seed=0),
        vocabulary_fingerprint="sha256:" + "1" * 64,
        base_name="another-family",
    )
    with pytest.raises(VocabularyMismatchError, match="another-family"):
        evaluate_reward(tiny_base, RewardModel(path), [Demonstration("Hi", "Hello")])


@pytest.mark.parametrize(
    "line, where, reason",
    [
        ('{"prompt": "hi", "response": "yo"', ":1, column 34", "not valid JSON"),
        ('["prompt", "response"]', ":1", "not a JSON object"),
        ('{"prompt": "hi"}', ":1", "'chosen' is missing"),
        ('{"prompt": "hi", "response": ""}', ":1", "'response' is empty or not a string"),
        ('{"prompt": "hi", "response": "yo", "extra": 1}', ":1, fields 'extra'", "has unknown fields"),
        ('{"prompt": "hi", "response": "yo", "chosen": "a", "rejected": "b"}', ":1", "has both 'response' and"),
        ('{"prompt": "hi", "response": "yo", "teacher_temperature": 0.7}', ":1", "'teacher_temperature' is not a"),
        (
            '{"prompt": "hi", "response": "yo", "teacher_system": "s", "teacher_temperature": -1}',
            ":1",
            "'teacher_temperature' is not a number from 0.01 to 100",
        ),
    ],
)
def test_a_malformed_line_is_skipped_naming_the_line_and_the_problem(tmp_path, line, where, reason):
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    [skipped] = read_jsonl(path).skipped
    assert skipped.where == f"{path}{where}" and skipped.reason.startswith(reason)
    with pytest.raises(DatasetError) as error:  # the strict reader, for files that must be wholly good
        load_jsonl(path)
    assert str(error.value).startswith(f"{path}{where}: {reason}")


def test_a_bad_line_is_skipped_with_its_line_number_and_the_good_ones_kept(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": 3}\n{"prompt": "c", "response": "d"}\n'
    )
    source = read_jsonl(path)
    assert source.examples == [Demonstration("a", "b"), Demonstration("c", "d")]
    assert source.places == [f"{path}:1", f"{path}:4"]
    assert [str(skipped) for skipped in source.skipped] == [f"{path}:3: 'response' is empty or not a string"]


def test_empty_data_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="has no examples"):
        load_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "docs").mkdir()
    with pytest.raises(DatasetError, match="has no .txt or .md files"):
        read_documents(tmp_path / "docs")


def test_too_few_examples_to_hold_one_out(tmp_path, tiny_base):
    with pytest.raises(DatasetError, match="at least 2 examples"):
        tune(tiny_base, [Demonstration("a", "b")], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_all_answers_to_a_prompt_fall_on_one_side_of_the_held_out_split():
    examples = [Demonstration(f"question {q}", f"answer {a}") for a in range(3) for q in range(40)]
    examples += [PreferencePair("question 7", "good", "bad"), Demonstration("question 7", "x", system="be brief")]
    train, held = split_held_out(examples, TuneConfig())
    held_prompts = {(e.system, e.prompt) for e in held}
    assert held_prompts and not held_prompts & {(e.system, e.prompt) for e in train}
    assert sorted(map(repr, train + held)) == sorted(map(repr, examples))
    assert round(len(examples) * 0.1) <= len(held) < round(len(examples) * 0.1) + 4  # whole prompts, about 10%


def test_answers_to_one_single_prompt_are_still_split():
    examples = [Demonstration("the only question", f"answer {a}") for a in range(20)]
    train, held = split_held_out(examples, TuneConfig())
    assert len(held) == 2 and len(train) == 18


def test_documents_become_prompt_and_continuation_windows(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    paragraph = "I write short sentences. I like the sea. The wind is cold here. " * 4
    (folder / "journal.md").write_text("\n\n".join([paragraph] * 12))
    (folder / "ignored.pdf").write_bytes(b"%PDF")
    [journal] = read_documents(folder)
    assert len(journal.examples) >= 2
    assert all(e.prompt.startswith("Continue this text") and e.response for e in journal.examples)
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    journal_again, latin1 = read_documents(folder)  # the file that is not UTF-8 is skipped, the other one kept
    assert journal_again == journal and not latin1.examples
    assert [str(skipped) for skipped in latin1.skipped] == [f"{folder / 'latin1.txt'}, byte 4: not UTF-8 text"]


def test_cli_tune_and_eval_json(tmp_path, tiny_gguf):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": "Fine, thanks."}) for p in other_prompts(8)))
    out = tmp_path / "cli.onnx"
    tuned = prt(
        "tune",
        "--model",
        str(tiny_gguf),
        "--data",
        str(data),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--ctx",
        "512",
        "--json",
    )
    assert tuned.returncode == 0, tuned.stderr
    summary = json.loads(tuned.stdout)
    assert summary["path"] == str(out) and out.exists() and card_path(out).exists()
    assert summary["parity_max_abs_diff"] < 1e-3 and summary["held_out"]["tokens"] > 0
    evaluated = prt(
        "eval", "--model", str(tiny_gguf), "--reward", str(out), "--data", str(data), "--ctx", "512", "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout)) >= {
        "tokens",
        "base_nll",
        "steered_nll",
        "teacher_nll",
        "gap_closed",
        "parts",
    }
    taught = prt(
        "eval",
        "--model",
        str(tiny_gguf),
        "--reward",
        str(out),
        "--data",
        str(data),
        "--ctx",
        "512",
        "--teacher-system",
        "Say it is fine.",
        "--samples",
        "2",
        "--sample-tokens",
        "6",
    )
    assert taught.returncode == 0, taught.stderr
    lines = taught.stdout.splitlines()
    assert "teacher_nll" in lines[0] and "of the gap" in lines[-11]
    assert lines[-10].startswith("Replies to the first 2 prompts") and lines[-5].startswith("The first prompt's")
    assert [line.split()[0] for line in lines[-9:-5] + lines[-4:]] == ["data", "base", "steered", "teacher"] * 2
    sampled = prt(
        "eval",
        "--model",
        str(tiny_gguf),
        "--reward",
        str(out),
        "--data",
        str(data),
        "--ctx",
        "512",
        "--samples",
        "1",
        "--sample-tokens",
        "4",
        "--json",
    )
    assert sampled.returncode == 0, sampled.stderr
    replies = json.loads(sampled.stdout)["replies"]
    assert list(replies) == ["data", "base", "steered"] and len(replies["base"]["texts"]) == 1


def test_cli_tune_with_too_few_good_lines_says_what_was_skipped(tmp_path, tiny_gguf):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    result = prt(
        "tune", "--model", str(tiny_gguf), "--data", str(data), "--out", str(tmp_path / "r.onnx"), "--ctx", "512"
    )
    assert_one_line_error(
        result, f"needs at least 2 usable examples; skipped 1 of 2 examples: 1 not valid JSON ({data}:2, column 1)"
    )
    assert not (tmp_path / "r.onnx").exists()


@pytest.mark.subprocess
def test_ctrl_c_during_tuning_leaves_no_file(tmp_path, tiny_gguf):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(  # enough distinct replies that training still runs when the signal comes
            json.dumps({"prompt": p, "response": f"A reply of a few words here, the {i}th."})
            for i, p in enumerate(other_prompts(400))
        )
    )
    out = tmp_path / "cancelled.onnx"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "tune",
            "--model",
            str(tiny_gguf),
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "200",
            "--ctx",
            "512",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PRT_PROGRESS": "1"},
    )
    seen = ""
    deadline = time.monotonic() + 120
    while "train" not in seen and time.monotonic() < deadline:
        seen += process.stderr.read(1)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert "train" in seen
    assert list(tmp_path.glob("cancelled*")) == [] and list(tmp_path.glob(".cancelled*")) == []


def test_teacher_pass_progress_counts_every_evaluation_of_the_base(tiny_base):
    examples = [
        Demonstration("Hi", "Hello."),
        Demonstration("Hey", "Hi!", teacher_system="Be brief."),
        PreferencePair("Yo", "Hello there.", "Go away."),
    ]
    reports = []
    data = teacher_pass(tiny_base, examples, progress=lambda done, total: reports.append((done, total)))
    assert reports == [(1, 5), (2, 5), (4, 5), (5, 5)]  # a pair is two replies; the teacher's context comes last
    assert data.demonstrations[1].teacher_logprobs is not None and data.demonstrations[0].teacher_logprobs is None


def test_distilled_examples_carry_the_teachers_distribution_on_the_same_support(tiny_base):
    plain, distilled = teacher_pass(
        tiny_base,
        [
            Demonstration("Hi", "Hello there, friend."),
            Demonstration("Hi", "Hello there, friend.", teacher_system="Be a pirate."),
        ],
    ).demonstrations
    assert plain.teacher_logprobs is None
    teacher = distilled.teacher_logprobs
    assert teacher.shape == distilled.base_logprobs.shape
    assert np.array_equal(np.isneginf(teacher), np.isneginf(distilled.base_logprobs))
    finite = ~np.isneginf(teacher)
    assert np.all(teacher[finite] <= 0) and np.abs(teacher[finite] - distilled.base_logprobs[finite]).max() > 1e-3


def test_distill_refuses_to_write_nothing(tiny_base):
    from rewards_onnx.distill import distill

    with pytest.raises(DatasetError, match="No teacher answer ended within 4 tokens"):
        distill(tiny_base, "Be brief.", 2, max_tokens=4)


def test_example_prompts_never_repeat_and_keep_the_first_topics_first():
    from rewards_onnx.distill import MORE_TOPICS, QUESTION_FORMS, TOPICS, example_prompts

    prompts = example_prompts(0)
    assert len(set(prompts)) == len(prompts) == (len(TOPICS) + len(MORE_TOPICS)) * len(QUESTION_FORMS)
    first = {form.format(topic) for topic in TOPICS for form in QUESTION_FORMS}
    assert set(prompts[: len(first)]) == first  # data distilled from the first prompts is unchanged by MORE_TOPICS
    assert prompts == example_prompts(0) != example_prompts(1)


def test_a_bad_destination_is_refused_before_any_work(tmp_path, tiny_base):
    examples = [Demonstration("a", "b"), Demonstration("c", "d")]
    with pytest.raises(RewardFileError, match="must end in .onnx"):
        tune(tiny_base, examples, tmp_path / "reward.txt")
    with pytest.raises(RewardFileError, match="does not exist"):
        tune(tiny_base, examples, tmp_path / "missing" / "reward.onnx")


def test_distilled_targets_are_the_teachers_distribution_at_its_sampling_temperature(tiny_base):
    from rewards_onnx.train import _target_distribution

    example = Demonstration("Hi", "Hello there.", teacher_system="Be a pirate.", teacher_temperature=0.5)
    sequence = teacher_pass(tiny_base, [example]).demonstrations[0]
    assert sequence.teacher_temperature == 0.5
    wanted = _target_distribution([sequence], TRAIN_TOP_K + 1).numpy()
    expected = torch.from_numpy(sequence.teacher_logprobs / 0.5).softmax(-1).numpy()
    np.testing.assert_allclose(wanted, expected, atol=1e-6)
    np.testing.assert_allclose(wanted.sum(-1), 1.0, atol=1e-5)


def test_cli_tunes_from_the_apps_feedback_with_json_progress(tmp_path, tiny_gguf):
    from engine.app.jobs import JobProgress
    from engine.app.store import Store

    database = tmp_path / "chats.db"
    with Store(database) as store:
        for prompt in other_prompts(6):
            store.add_feedback("thumbs_up", prompt=prompt, chosen="Fine, thanks.")
            store.add_feedback("edit", prompt=prompt, chosen="Fine.", rejected="Well, let me think about it.")
    out = tmp_path / "from-feedback.onnx"
    tuned = prt(
        "tune",
        "--model",
        str(tiny_gguf),
        "--feedback",
        str(database),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--ctx",
        "512",
        "--json",
        "--progress-json",
    )
    assert tuned.returncode == 0, tuned.stderr
    progress = [JobProgress.parse(line) for line in tuned.stderr.splitlines()]
    assert progress and all(progress), tuned.stderr  # every stderr line is a progress record
    assert [p.phase for p in progress][0] == "teacher" and progress[-1].phase == "export"
    assert progress[-1].done == progress[-1].total
    summary = json.loads(tuned.stdout)
    assert summary["path"] == str(out) and summary["held_out"]["pairs"] + summary["held_out"]["tokens"] > 0
    card = RewardCard.load(card_path(out))
    assert card.training_data["demonstrations"] == 12 and card.training_data["preference_pairs"] == 6


def test_cli_tune_without_a_chat_database_says_so(tmp_path, tiny_gguf):
    result = prt(
        "tune", "--model", str(tiny_gguf), "--feedback", str(tmp_path / "none.db"), "--out", str(tmp_path / "r.onnx")
    )
    assert_one_line_error(result, "No chat database")
