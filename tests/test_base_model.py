"""The base model through real llama.cpp: parity with llama-cpp-python, vocabulary, prompts, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY_CONFIG
from engine.runtime.base_model import BaseModel, common_prefix_length
from engine.runtime.decode import Generation
from engine.runtime.errors import ContextOverflowError, ModelFileError, PromptError
from engine.runtime.steering import SamplingConfig
from helpers import reference_greedy

GREEDY = SamplingConfig(temperature=0.0, max_tokens=40, ignore_eos=True)


@pytest.mark.parametrize("text", ["Hello there", "Write a poem about the sea, please."])
def test_greedy_decoding_equals_llama_cpp_python(tiny_base, text):
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": text}])
    expected = reference_greedy(tiny_base, prompt, GREEDY.max_tokens)
    ours = Generation(tiny_base, prompt, config=GREEDY).run()
    assert ours.token_ids == expected


def test_prefix_reuse_gives_the_same_logits_as_a_fresh_context(tiny_base, tiny_gguf):
    first = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Hi"}])
    second = tiny_base.chat_prompt_tokens(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "And now?"},
        ]
    )
    assert common_prefix_length(first, second) > 5
    tiny_base.sync(first)
    tiny_base.sync(second)  # reuses the shared prefix
    reused = tiny_base.last_logits().copy()
    with BaseModel(tiny_gguf, config=TINY_CONFIG) as fresh:
        fresh.sync(second)
        np.testing.assert_allclose(reused, fresh.last_logits(), rtol=1e-4, atol=1e-4)


def test_teacher_forcing_skips_a_held_prefix_and_gives_a_fresh_contexts_logits(tiny_base, tiny_gguf):
    def rows(base: BaseModel, tokens: list[int], first: int) -> np.ndarray:
        return np.stack([logits.copy() for _, logits in base.next_token_logits(tokens, first)])

    opening = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me about tea"}])
    reply = tiny_base.tokenize(" It is a warm drink.")
    other = tiny_base.chat_prompt_tokens([{"role": "user", "content": "Tell me about rivers"}])
    rows(tiny_base, other + reply, len(other))
    assert common_prefix_length(tiny_base.evaluated_tokens, opening) > 3
    reused = rows(tiny_base, opening + reply, len(opening))  # keeps the chat template's shared opening
    assert tiny_base.evaluated_tokens == opening + reply
    with BaseModel(tiny_gguf, config=TINY_CONFIG) as fresh:
        np.testing.assert_allclose(reused, rows(fresh, opening + reply, len(opening)), rtol=1e-4, atol=1e-4)


def test_models_of_one_vocabulary_share_a_fingerprint_and_the_default_model_has_it(
    tiny_base, tiny_gguf_other_seed, default_model_path
):
    with (
        BaseModel(tiny_gguf_other_seed, config=TINY_CONFIG) as other,
        BaseModel(default_model_path, config=TINY_CONFIG) as real,
    ):
        assert other.vocabulary_fingerprint == tiny_base.vocabulary_fingerprint == real.vocabulary_fingerprint
        prompt = [{"role": "user", "content": "Hello"}]
        assert other.chat_prompt_tokens(prompt) == tiny_base.chat_prompt_tokens(prompt)
        assert not np.allclose(_logits_after(other, prompt), _logits_after(tiny_base, prompt))


def _logits_after(base: BaseModel, messages) -> np.ndarray:
    base.sync(base.chat_prompt_tokens(messages))
    return base.last_logits().copy()


def test_chat_template_is_the_ggufs_own(tiny_base):
    tokens = tiny_base.chat_prompt_tokens(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    text = tiny_base.llama.detokenize(tokens, special=True).decode()
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("text", ["    if ready:\n" + " " * 40 + "go()", "#" * 60 + "\n"])
def test_detokenize_gives_back_text_whose_tokens_are_longer_than_32_bytes(tiny_base, text):
    assert tiny_base.detokenize(tiny_base.tokenize(text)) == text


def test_end_of_generation_tokens(tiny_base):
    im_end = tiny_base.tokenize("<|im_end|>", special=True)
    assert len(im_end) == 1 and tiny_base.is_end_of_generation(im_end[0])
    assert not tiny_base.is_end_of_generation(tiny_base.tokenize("hello")[0])


def test_empty_prompt_is_refused(tiny_base):
    with pytest.raises(PromptError, match="empty"):
        tiny_base.chat_prompt_tokens([{"role": "user", "content": "   "}])


def test_context_overflow_is_one_clear_error(tiny_base):
    long_text = "word " * (TINY_CONFIG.n_ctx + 10)
    prompt = tiny_base.chat_prompt_tokens([{"role": "user", "content": long_text}])
    with pytest.raises(ContextOverflowError, match=r"context holds 512"):
        Generation(tiny_base, prompt, config=GREEDY).run()


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        BaseModel(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        BaseModel(path)


def test_truncated_gguf(tmp_path, tiny_gguf):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt"):
        BaseModel(path, config=TINY_CONFIG)


def test_corrupt_gguf_header(tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[8:24] = b"\xff" * 16  # tensor and metadata counts
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="could not load"):
        BaseModel(path, config=TINY_CONFIG)


def test_a_closed_model_says_so_instead_of_reaching_freed_memory(tiny_gguf):
    base = BaseModel(tiny_gguf, config=TINY_CONFIG)
    base.close()
    base.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="is closed"):
        base.tokenize("hello")
