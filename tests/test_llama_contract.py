"""What the engine relies on from llama.cpp, pinned through its one adapter (engine/runtime/llama_adapter.py).

Run this file and tests/test_base_model.py after every llama-cpp-python upgrade. The reference is
llama-cpp-python's own high-level API on the same machine (``Llama.eval`` with every row's logits kept,
``Llama.generate``) and the GGUF's own token list; logits are compared within a tolerance, never exactly,
since llama.cpp's kernels round differently from one CPU to the next.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from engine.runtime.base_model import common_prefix_length, vocabulary_fingerprint
from engine.runtime.errors import ModelFileError
from engine.runtime.llama_adapter import LlamaAdapter, RenderedChat

SETTINGS = {"n_ctx": 256, "n_batch": 16, "n_threads": 2, "n_gpu_layers": 0}  # small batches: evaluations span several
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
SMOLLM2_FINGERPRINT = "sha256:26138422a23a00603102a66ecc9ba0a3a90bbef2072d8d183c700eaac5565e2e"  # in saved reward cards
OPENING = "The tea garden sits high on the hill, and the pickers start at dawn when the leaves are wet."
ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "naïve café: 日本語, emoji 🙂",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "def f():\n" + " " * 40 + "return 1",
    "#" * 60,
]  # the last two hold pieces over 32 bytes


@pytest.fixture
def adapter(tiny_gguf: Path) -> Iterator[LlamaAdapter]:
    with LlamaAdapter(tiny_gguf, **SETTINGS) as adapter:
        yield adapter


@pytest.fixture(scope="module")
def reference(tiny_gguf: Path) -> Iterator[llama_cpp.Llama]:
    """llama-cpp-python's high-level Llama on the same file, keeping the logits of every evaluated token."""
    llama = llama_cpp.Llama(
        model_path=str(tiny_gguf), n_ctx=SETTINGS["n_ctx"], n_threads=2, n_gpu_layers=0, logits_all=True, verbose=False
    )
    yield llama
    llama.close()


def reference_logits(reference: llama_cpp.Llama, tokens: list[int]) -> np.ndarray:
    """The logits after each of ``tokens``, evaluated fresh by ``Llama.eval``."""
    reference.reset()
    reference.eval(tokens)
    return reference.scores[: len(tokens)].copy()


def tokens_decoded_in_batches(adapter: LlamaAdapter, evaluate: Callable[[], None]) -> int:
    """How many tokens llama.cpp itself counts as evaluated in batches of several (its n_p_eval) while
    ``evaluate`` runs."""
    adapter.last_logits()  # llama.cpp adds a decode to its counts when its results are read
    llama_cpp.llama_perf_context_reset(adapter.llama.ctx)
    evaluate()
    adapter.last_logits()
    return llama_cpp.llama_perf_context(adapter.llama.ctx).n_p_eval


def greedy_continuation(adapter: LlamaAdapter, count: int) -> list[int]:
    tokens: list[int] = []
    for _ in range(count):
        tokens.append(int(np.argmax(adapter.last_logits())))
        adapter.evaluate(tokens[-1:])
    return tokens


def test_prefix_reuse_evaluates_only_the_rest_and_matches_a_fresh_evaluation(adapter, reference):
    first = adapter.tokenize(OPENING + " Tell me about tea.", add_bos=False, special=False)
    second = adapter.tokenize(OPENING + " Tell me about rivers and the sea.", add_bos=False, special=False)
    shared = common_prefix_length(first, second)
    assert SETTINGS["n_batch"] < shared < len(second) - 2
    adapter.evaluate(first)
    assert adapter.truncate(shared) == shared
    decoded = tokens_decoded_in_batches(adapter, lambda: adapter.evaluate(second[shared:]))
    assert decoded == len(second) - shared
    assert adapter.n_past == len(second) and adapter.evaluated_tokens == second
    np.testing.assert_allclose(adapter.last_logits(), reference_logits(reference, second)[-1], **TOLERANCE)


def test_the_logits_row_is_the_last_decoded_tokens_and_a_view_the_next_evaluation_overwrites(adapter, reference):
    tokens = adapter.tokenize(OPENING, add_bos=False, special=False)
    adapter.evaluate(tokens)
    row = adapter.last_logits()
    assert row.shape == (adapter.n_vocab,) and row.dtype == np.float32 and not row.flags.owndata
    expected = reference_logits(reference, tokens)
    np.testing.assert_allclose(row, expected[-1], **TOLERANCE)
    assert not np.allclose(row, expected[-2], **TOLERANCE)
    before = row.copy()
    following = int(np.argmax(before))
    adapter.evaluate([following])
    assert np.shares_memory(row, adapter.last_logits())
    assert not np.allclose(row, before, **TOLERANCE)  # the old view now shows the new row
    np.testing.assert_allclose(row, reference_logits(reference, tokens + [following])[-1], **TOLERANCE)


def test_rows_after_a_held_prefix_are_a_full_evaluations_rows_at_the_same_positions(adapter, reference):
    tokens = adapter.tokenize(OPENING + " They sort the leaves by noon.", add_bos=False, special=False)
    held, first_position = 5, 9
    adapter.evaluate(tokens[:held])
    rows = {
        position: row.copy() for position, row in adapter.evaluate_rows(tokens[held:], first_position=first_position)
    }
    assert sorted(rows) == list(range(first_position, len(tokens)))  # positions count from the context's start
    assert len(tokens) - held > SETTINGS["n_batch"]  # the rows span two batches
    expected = reference_logits(reference, tokens)
    np.testing.assert_allclose(
        np.stack([rows[position] for position in sorted(rows)]), expected[first_position:], **TOLERANCE
    )
    assert adapter.evaluated_tokens == tokens


def test_going_back_to_a_shorter_prefix_and_continuing_equals_evaluating_that_sequence_fresh(adapter, reference):
    opening = adapter.tokenize(OPENING, add_bos=False, special=False)
    old = adapter.tokenize(" Nobody minds the rain.", add_bos=False, special=False)
    new = adapter.tokenize(" The baskets fill quickly.", add_bos=False, special=False)
    adapter.evaluate(opening + old)
    assert adapter.truncate(len(opening)) == len(opening)
    assert adapter.n_past == len(opening) and adapter.evaluated_tokens == opening
    adapter.evaluate(new)
    np.testing.assert_allclose(adapter.last_logits(), reference_logits(reference, opening + new)[-1], **TOLERANCE)
    ours = greedy_continuation(adapter, 8)
    reference.reset()
    assert ours == list(itertools.islice(reference.generate(opening + new, top_k=1, temp=0.0, reset=False), 8))


def test_n_past_counts_what_the_context_holds_in_the_record_llama_cpp_python_shares(adapter, reference):
    assert adapter.n_past == 0 and adapter.evaluated_tokens == [] and adapter.n_ctx == SETTINGS["n_ctx"]
    tokens = adapter.tokenize("One two three four five", add_bos=False, special=False)
    adapter.evaluate(tokens)
    adapter.evaluate(tokens[:1])
    assert adapter.n_past == len(tokens) + 1 and adapter.evaluated_tokens == tokens + tokens[:1]
    assert adapter.truncate(2) == 2 and adapter.evaluated_tokens == tokens[:2]
    assert adapter.llama.n_tokens == 2  # Llama.generate reads the same record (the benchmark and parity tests)
    adapter.llama.reset()  # the record restarts; llama.cpp's KV cache still holds two tokens
    assert adapter.n_past == 0
    adapter.evaluate(tokens)
    np.testing.assert_allclose(adapter.last_logits(), reference_logits(reference, tokens)[-1], **TOLERANCE)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokens_round_trip_through_their_pieces(adapter, reference, text):
    tokens = adapter.tokenize(text, add_bos=False, special=False)
    assert b"".join(adapter.token_piece(token) for token in tokens) == text.encode("utf-8")
    short = [token for token in tokens if len(adapter.token_piece(token)) <= 32]  # llama-cpp-python cuts longer ones
    assert [adapter.token_piece(token) for token in short] == [reference.detokenize([token]) for token in short]


def test_special_tokens_are_the_ggufs_and_end_generation(adapter, tokenizer):
    assert (adapter.bos_token, adapter.eos_token) == (tokenizer.bos, tokenizer.eos)
    assert adapter.tokenize("<|im_end|>", add_bos=False, special=True) == [adapter.eos_token]
    assert len(adapter.tokenize("<|im_end|>", add_bos=False, special=False)) > 1  # plain text: several tokens
    assert adapter.token_piece(adapter.eos_token) == b""  # special tokens render as nothing
    assert adapter.is_end_of_generation(adapter.eos_token) and adapter.is_end_of_generation(adapter.eot_token)
    assert not adapter.is_end_of_generation(adapter.tokenize("hello", add_bos=False, special=False)[0])


def test_the_vocabulary_is_the_ggufs_token_list_and_its_fingerprint_is_pinned(adapter, tokenizer, tiny_base):
    texts = [adapter.token_text(token) for token in range(adapter.n_vocab)]
    assert texts == [token.encode("utf-8") for token in tokenizer.tokens]
    assert vocabulary_fingerprint(texts) == SMOLLM2_FINGERPRINT == tiny_base.vocabulary_fingerprint


def test_the_chat_template_and_metadata_are_the_ggufs(adapter, tokenizer):
    assert adapter.chat_template == tokenizer.chat_template
    assert adapter.metadata["general.name"] == "tiny-llama-seed1"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    conversation = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert adapter.render_chat(messages, add_generation_prompt=False) == RenderedChat(conversation, added_special=True)
    assert adapter.render_chat(messages, add_generation_prompt=True).text == conversation + "<|im_start|>assistant\n"


def test_a_file_llama_cpp_refuses_is_one_model_file_error_with_its_native_output_silenced(tmp_path, tiny_gguf, capfd):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt"):
        LlamaAdapter(path, **SETTINGS)
    assert capfd.readouterr().err == ""
