"""End to end on the real default model (SmolLM2-135M-Instruct Q4_1), fetched from PyPI at set-up."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.app.models import DefaultModelManifest, installed_models, resolve_model
from engine.app.paths import AppPaths
from engine.runtime.base_model import BaseModel, BaseModelConfig
from engine.runtime.decode import Generation, attach_rewards
from engine.runtime.reward_graph import RewardNetworkShape, token_preference_weights
from engine.runtime.steering import SamplingConfig
from helpers import prt, reference_greedy
from tiny_models import write_reward

pytestmark = pytest.mark.slow

CONFIG = BaseModelConfig(n_ctx=1024, n_threads=2, n_gpu_layers=0)


@pytest.fixture(scope="module")
def smollm(default_model_path):
    with BaseModel(default_model_path, config=CONFIG) as base:
        yield base


def test_default_model_is_installed_and_verified(default_model_path):
    manifest = DefaultModelManifest.load()
    assert default_model_path.name == manifest.file and default_model_path.stat().st_size == manifest.size
    paths = AppPaths.resolve()  # the test's own folder (PRT_HOME), the default model linked in
    assert resolve_model(paths, "default").resolve() == default_model_path.resolve()
    assert any(model.is_default for model in installed_models(paths))


def top_candidates(base: BaseModel, tokens: list[int], count: int) -> list[int]:
    """The base model's ``count`` most likely next tokens after ``tokens``, best first."""
    base.sync(tokens)
    return np.argsort(-base.last_logits(), kind="stable")[:count].tolist()


# Greedy text of a 135M Q4_1 model depends on the CPU's kernels (AVX2 and AVX-512 answer this question
# differently), so these tests assert what holds on any CPU: ranks, and agreement with llama-cpp-python.
def test_the_default_model_knows_the_capital_of_france(smollm):
    paris = smollm.tokenize(" Paris")
    assert len(paris) == 1
    plain = smollm.tokenize("The capital of France is", add_bos=True)
    question = smollm.chat_prompt_tokens([{"role": "user", "content": "What is the capital of France?"}])
    answered = question + smollm.tokenize("The capital of France is")
    assert paris[0] in top_candidates(smollm, plain, 3)
    assert paris[0] in top_candidates(smollm, answered, 3)


def test_greedy_replies_equal_llama_cpp_pythons_own_on_this_machine(smollm):
    prompt = smollm.chat_prompt_tokens(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
    )
    ours = Generation(smollm, prompt, config=SamplingConfig(temperature=0.0, max_tokens=48)).run()
    reference = reference_greedy(smollm, prompt, 49)  # llama-cpp-python goes on past an end of turn
    assert ours.token_ids and ours.token_ids == reference[: len(ours.token_ids)]
    assert ours.finish_reason == ("stop" if smollm.is_end_of_generation(reference[len(ours.token_ids)]) else "length")


def test_a_reward_steers_the_default_model(tmp_path, smollm):
    prompt = smollm.chat_prompt_tokens([{"role": "user", "content": "Name a colour."}])
    greedy = SamplingConfig(temperature=0.0, max_tokens=16)
    plain = Generation(smollm, prompt, config=greedy).run()
    target = int(plain.trace[0].candidate_ids[3])
    weights = token_preference_weights(
        RewardNetworkShape(vocab_size=smollm.n_vocab, width=32, layers=1, heads=4), token=target, strength=30.0
    )
    reward = write_reward(
        tmp_path / "likes.onnx", weights, vocabulary_fingerprint=smollm.vocabulary_fingerprint, base_name=smollm.name
    )
    steered = Generation(smollm, prompt, rewards=attach_rewards(smollm, [(reward, 1.0)]), config=greedy).run()
    assert plain.token_ids[0] != target and steered.token_ids[0] == target
    assert steered.trace[0].base_rank == 3 and steered.trace[0].steered_rank == 0


def test_cli_generate_on_the_default_model(default_model_path):
    result = prt(
        "generate", "--model", "default", "--prompt", "Say hello.", "--temperature", "0", "--max-tokens", "12", "--json"
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    assert output["model"]["name"] == "SmolLM2-135M-Instruct.Q4_1" and output["text"].strip()


def test_distilled_example_data_is_reproducible_and_records_its_teacher(tmp_path, smollm):
    from rewards_onnx.data import load_jsonl
    from rewards_onnx.distill import distill, write_jsonl

    first = distill(smollm, "Answer in one short sentence.", 2, max_tokens=64)
    assert len(first) == 2 and first == distill(smollm, "Answer in one short sentence.", 2, max_tokens=64)
    write_jsonl(tmp_path / "d.jsonl", first)
    assert load_jsonl(tmp_path / "d.jsonl") == first
    assert all(
        e.teacher_system == "Answer in one short sentence." and e.teacher_temperature == 0.7 and e.system is None
        for e in first
    )
