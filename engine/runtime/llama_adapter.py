"""The only seam between the engine and llama.cpp: no other module in engine/ imports llama_cpp.

``LlamaAdapter`` loads a GGUF and offers the little the engine needs: tokens (tokenize, the bytes a token
stands for, the vocabulary's texts, the special tokens), the file's metadata and chat template, and one
context that evaluates tokens after what it holds, forgets a suffix (KV truncation, so a shared prefix is
reused) and hands out the logits row of the last decoded token as a numpy view. It stands on the public
surface of llama-cpp-python only: the high-level ``Llama`` (loading, tokenizing, and the record of evaluated
tokens, ``n_tokens``/``input_ids``, that ``Llama.generate`` reads too, so the reference benchmark and parity
tests share the context) and llama.h's functions on its ``ctx``/``model`` handles, with a batch of its own.
To upgrade llama-cpp-python, change its pin in pyproject.toml, fix this file where it no longer runs, and
re-run ``python3 dev.py test tests/test_llama_contract.py tests/test_base_model.py``: the contract test pins
prefix reuse, the logits row, KV truncation, the token round trip, the vocabulary and n_past.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2  # llama-cpp-python's own dependency, for its chat templates
import llama_cpp
import numpy as np
from llama_cpp import Llama
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engine.runtime.errors import ModelFileError

__all__ = ["Llama", "LlamaAdapter", "RenderedChat", "broken_template_error", "gpu_offload_supported"]

PIECE_BUFFER_BYTES = 32  # enough for all but a few tokens of a vocabulary
SEQUENCE = 0  # the context's one sequence


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend (Metal, CUDA, Vulkan)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def broken_template_error(path: Path, error: Exception) -> ModelFileError:
    return ModelFileError(
        f"The chat template in {path} is broken ({error}); re-download the model or pick another GGUF."
    )


@dataclass(frozen=True)
class RenderedChat:
    text: str
    added_special: bool  # the template wrote the special tokens (BOS included) itself


class LlamaAdapter:
    """One loaded GGUF and one context; close() frees both (also as a context manager)."""

    def __init__(self, path: Path, *, n_ctx: int, n_batch: int, n_threads: int, n_gpu_layers: int) -> None:
        self.llama = _load_llama(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, n_gpu_layers=n_gpu_layers)
        self._resources = contextlib.ExitStack()  # close() runs these once, last in first out
        self._resources.callback(self.llama.close)
        self.n_vocab = self.llama.n_vocab()
        self.n_ctx = self.llama.n_ctx()
        self.metadata: Mapping[str, str] = self.llama.metadata
        self.chat_template: str | None = self.metadata.get("tokenizer.chat_template")
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self._memory = llama_cpp.llama_get_memory(self.llama.ctx)
        self.bos_token = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos_token = llama_cpp.llama_vocab_eos(self._vocab)
        self.eot_token = llama_cpp.llama_vocab_eot(self._vocab)  # -1 when the vocabulary has no end-of-turn
        self._batch_size = self.llama.n_batch  # llama-cpp-python caps n_batch at n_ctx
        self._batch = llama_cpp.llama_batch_init(self._batch_size, 0, 1)
        self._resources.callback(llama_cpp.llama_batch_free, self._batch)
        self._chat_formatters: dict[bool, Jinja2ChatFormatter] = {}  # by add_generation_prompt: compiled once

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        """Free the batch, the context and the model; nothing may be called afterwards."""
        self._resources.close()

    def __enter__(self) -> LlamaAdapter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool, special: bool) -> list[int]:
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_piece(self, token: int) -> bytes:
        """The bytes ``token`` stands for in generated text (special tokens and a NUL byte render as nothing)."""
        size = PIECE_BUFFER_BYTES
        while True:
            buffer = ctypes.create_string_buffer(size)
            length = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, size, 0, False)
            if length >= 0:
                return buffer.raw[:length].rstrip(b"\0")
            size = -length  # too small (a run of spaces in code, a rule of '#'s): llama.cpp says what it needs

    def token_text(self, token: int) -> bytes:
        """The token's entry in the vocabulary, as the GGUF stores it (what the fingerprint hashes)."""
        return llama_cpp.llama_vocab_get_text(self._vocab, token)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- chat template ----------------------------------------------------
    def render_chat(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> RenderedChat:
        """The conversation through the GGUF's own template; raises whatever the template raises."""
        if self.chat_template is None:
            raise ValueError("this model has no chat template")
        formatter = self._chat_formatters.get(add_generation_prompt)
        if formatter is None:  # compiling the template was 3.5 ms of each 3.8 ms call
            formatter = self._chat_formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template=self.chat_template,
                eos_token=self._special_text(self.eos_token),
                bos_token=self._special_text(self.bos_token),
                add_generation_prompt=add_generation_prompt,
            )
        as_dicts = [dict(message) for message in messages]
        rendered = formatter(messages=as_dicts)  # type: ignore[arg-type]  # typed there as TypedDicts
        return RenderedChat(text=rendered.prompt, added_special=rendered.added_special)

    def _special_text(self, token: int) -> str:
        return "" if token < 0 else self.token_text(token).decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------
    @property
    def n_past(self) -> int:
        """How many tokens the context holds."""
        return self.llama.n_tokens

    @property
    def evaluated_tokens(self) -> list[int]:
        return self.llama.input_ids[: self.llama.n_tokens].tolist()

    def truncate(self, n_keep: int) -> int:
        """Forget every token after the first ``n_keep`` (KV cache and record); returns how many are kept.

        A memory that cannot keep just a prefix (a recurrent model's state) starts over instead: 0 is returned.
        """
        kept = self._forget_from(n_keep) and llama_cpp.llama_memory_seq_pos_max(self._memory, SEQUENCE) == n_keep - 1
        if not kept:
            self._forget_from(0)  # removing a whole sequence never fails
            n_keep = 0
        self.llama.n_tokens = n_keep
        return n_keep

    def evaluate(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after the ``n_past`` the context holds; ``last_logits`` then belongs to the last."""
        for chunk in self._chunks(tokens):
            self._decode(chunk, first_output=len(chunk) - 1)

    def evaluate_rows(self, tokens: Sequence[int], *, first_position: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate ``tokens`` like ``evaluate``, yielding ``(position, logits after the token there)`` for every
        position from ``first_position`` on (positions count from the context's start).

        llama.cpp computes logits only for those rows, a batch at a time; each row is a view valid until the
        next batch is decoded, so copy it to keep it.
        """
        for chunk in self._chunks(tokens):
            start = self.n_past
            first_row = max(first_position - start, 0)
            self._decode(chunk, first_output=first_row)
            for index in range(first_row, len(chunk)):
                yield start + index, self._logits_row(index)

    def last_logits(self) -> np.ndarray:
        """The logits after the last decoded token, a view into llama.cpp's buffer that the next decode
        overwrites; copy it to keep it."""
        return self._logits_row(-1)

    def _forget_from(self, position: int) -> bool:
        """Drop the KV cache from ``position`` on; False if this memory cannot drop only a suffix."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, SEQUENCE, position, -1))

    def _chunks(self, tokens: Sequence[int]) -> Iterator[list[int]]:
        for begin in range(0, len(tokens), self._batch_size):
            yield list(tokens[begin : begin + self._batch_size])

    def _decode(self, chunk: list[int], *, first_output: int) -> None:
        """Decode ``chunk`` after ``n_past``, with logits from ``first_output`` on (always for its last token)."""
        batch, start = self._batch, self.n_past
        self._forget_from(start)  # as Llama.eval: a cache left longer than the record (Llama.reset) is cut
        first_output = min(first_output, len(chunk) - 1)
        batch.n_tokens = len(chunk)
        for index, token in enumerate(chunk):
            batch.token[index] = token
            batch.pos[index] = start + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = SEQUENCE
            batch.logits[index] = index >= first_output
        status = llama_cpp.llama_decode(self.llama.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.llama.input_ids[start : start + len(chunk)] = chunk
        self.llama.n_tokens = start + len(chunk)

    def _logits_row(self, batch_index: int) -> np.ndarray:
        """A view of llama.cpp's logits for one output of the last decoded batch."""
        pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))


def _load_llama(path: Path, *, n_ctx: int, n_batch: int, n_threads: int, n_gpu_layers: int) -> Llama:
    try:
        with _quiet_native_stderr():
            return Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_threads=n_threads,
                n_threads_batch=n_threads,
                n_gpu_layers=n_gpu_layers,
                logits_all=False,
                verbose=False,
            )
    except jinja2.TemplateError as error:  # llama-cpp-python compiles the file's chat templates while loading
        raise broken_template_error(path, error) from error
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelFileError(
            f"llama.cpp could not load {path} ({error}); the file is truncated, corrupt, or of an "
            "architecture this llama.cpp does not support. Re-download it or pick another GGUF."
        ) from error


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """llama.cpp prints load errors from C straight to fd 2; our one-line error replaces them."""
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (e.g. a windowed app): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
