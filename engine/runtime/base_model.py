"""The frozen base model: a GGUF file run through llama.cpp.

We own the decode loop instead of using llama-cpp-python's sampler chain:
``Llama.eval`` feeds tokens, and the last position's logits are read straight
from llama.cpp's buffer (``llama_get_logits_ith``), so no n_ctx x n_vocab array
is ever kept. The context keeps its KV cache between calls; ``sync`` reuses the
longest common prefix, so a chat turn only evaluates what is new.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import jinja2  # llama-cpp-python's own dependency, for its chat templates
import llama_cpp
import numpy as np
import psutil
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from engine.runtime.errors import ContextOverflowError, ModelFileError, PromptError
from engine.runtime.gguf_metadata import check_gguf_file

ChatMessage = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def default_thread_count() -> int:
    """llama.cpp is fastest with one thread per physical core; hyperthreads only add contention."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def default_gpu_layers() -> int:
    """Offload every layer when this llama.cpp build has a GPU backend (Metal, CUDA, Vulkan), else none."""
    return -1 if llama_cpp.llama_supports_gpu_offload() else 0


def vocabulary_fingerprint(tokens: Iterable[bytes]) -> str:
    """sha256 over the token list (length-prefixed, in id order): equal only for identical vocabularies."""
    digest = hashlib.sha256()
    for token in tokens:
        digest.update(len(token).to_bytes(4, "little"))
        digest.update(token)
    return "sha256:" + digest.hexdigest()


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    length = 0
    for a, b in zip(left, right):
        if a != b:
            break
        length += 1
    return length


@dataclass(frozen=True, kw_only=True)
class BaseModelConfig:
    n_ctx: int = 4096
    n_threads: int | None = None  # None: one per core
    n_gpu_layers: int | None = None  # None: all layers if there is a GPU backend; -1: all; 0: CPU only
    n_batch: int = 512

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError(f"n_ctx must be at least 16, got {self.n_ctx}")
        if self.n_threads is not None and self.n_threads < 1:
            raise ValueError(f"n_threads must be >= 1, got {self.n_threads}")
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {self.n_batch}")


class BaseModel:
    """A loaded GGUF with its tokenizer, chat template and a live context."""

    def __init__(self, path: Path | str, *, config: BaseModelConfig = BaseModelConfig()) -> None:
        self.path = check_gguf_file(Path(path))
        self.config = config
        self._llama = _load_llama(self.path, config)
        self._vocab = self._llama._model.vocab
        self.n_vocab = self._llama.n_vocab()
        self.n_ctx = self._llama.n_ctx()
        metadata = self._llama.metadata
        self.name = self.path.stem  # what the user sees in the file manager; general.name is often a build tag
        self.description = metadata.get("general.name", "")
        self.chat_template = metadata.get("tokenizer.chat_template")
        self._fingerprint: str | None = None
        self._chat_formatters: dict[bool, Jinja2ChatFormatter] = {}  # by add_generation_prompt: compiled once
        try:
            self._check_chat_template()
        except ModelFileError:
            self.close()
            raise

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def __enter__(self) -> "BaseModel":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def llama(self) -> llama_cpp.Llama:
        """The underlying llama-cpp-python object (for the reference benchmark and parity tests)."""
        return self._llama

    # -- vocabulary -------------------------------------------------------
    @property
    def vocabulary_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = vocabulary_fingerprint(
                llama_cpp.llama_vocab_get_text(self._vocab, token) for token in range(self.n_vocab))
        return self._fingerprint

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as nothing)."""
        return self._llama._model.token_to_piece(token, special=False).rstrip(b"\0")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(token) for token in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    # -- prompts ----------------------------------------------------------
    @property
    def end_of_turn_token(self) -> int:
        """The token that ends a reply: end-of-turn if the vocabulary has one, else end-of-sequence."""
        eot = self._llama._model.token_eot()
        return eot if eot >= 0 else self._llama.token_eos()

    def chat_prompt_tokens(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> list[int]:
        """Apply the GGUF's own chat template and tokenize; by default ready for the assistant's reply."""
        if not messages or not any(message.get("content", "").strip() for message in messages):
            raise PromptError("The prompt is empty; type a message first.")
        if self.chat_template is None:
            # A base model without a template: plain text continuation.
            text = "\n\n".join(message["content"] for message in messages)
            return self.tokenize(text, add_bos=True)
        try:
            rendered = self._render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # the template is code from the model file: whatever it raises
            raise PromptError(f"The chat template of {self.name} cannot format this conversation ({error}); change "
                              "the conversation (e.g. remove the system prompt) or pick another model.") from error
        return self.tokenize(rendered.prompt, add_bos=not rendered.added_special, special=True)

    def _render_chat(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool):
        formatter = self._chat_formatters.get(add_generation_prompt)
        if formatter is None:  # compiling the template was 3.5 ms of each 3.8 ms call
            formatter = self._chat_formatters[add_generation_prompt] = Jinja2ChatFormatter(
                template=self.chat_template,
                eos_token=self._token_text(self._llama.token_eos()),
                bos_token=self._token_text(self._llama.token_bos()),
                add_generation_prompt=add_generation_prompt,
            )
        return formatter(messages=[dict(message) for message in messages])

    def _check_chat_template(self) -> None:
        """A damaged template would fail at the first message; fail at load instead, naming the file."""
        if self.chat_template is None:
            return
        try:
            self._render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        except Exception as error:  # the template is code from the model file: whatever it raises
            raise _broken_template(self.path, error) from error

    def _token_text(self, token: int) -> str:
        return "" if token < 0 else llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------
    @property
    def n_past(self) -> int:
        """How many tokens the context currently holds."""
        return self._llama.n_tokens

    @property
    def evaluated_tokens(self) -> list[int]:
        return self._llama.input_ids[: self._llama.n_tokens].tolist()

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens >= self.n_ctx:
            raise ContextOverflowError(
                f"The prompt is {n_tokens} tokens but the context holds {self.n_ctx}; "
                "shorten the conversation or raise the context size (--ctx).")

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the context hold exactly ``tokens``, evaluating only what differs from now.

        At least the last token is always evaluated, so ``last_logits`` belongs to it.
        """
        if not tokens:
            raise PromptError("The prompt is empty; type a message first.")
        self.check_fits(len(tokens))
        keep = min(common_prefix_length(self.evaluated_tokens, tokens), len(tokens) - 1)
        self._llama.n_tokens = keep  # Llama.eval drops the KV cache beyond n_tokens
        self._llama.eval(list(tokens[keep:]))

    def append(self, token: int) -> None:
        """Feed one generated token; its logits become the next ``last_logits``."""
        self._llama.eval([token])

    def next_token_logits(self, tokens: Sequence[int], first_target: int) -> Iterator[tuple[int, np.ndarray]]:
        """Teacher forcing: for each target position t >= first_target, the logits that predict tokens[t].

        Evaluates ``tokens`` in batches, asking llama.cpp for logits only where a target
        follows, so memory stays at one batch of rows. A prefix the context already holds
        (the chat template's opening, shared by consecutive examples) is kept, not evaluated
        again. Each yielded row is a view valid until the next one is requested.
        """
        if not 1 <= first_target < len(tokens):
            raise ValueError(f"first_target must be in [1, {len(tokens)}), got {first_target}")
        self.check_fits(len(tokens))
        llama, batch = self._llama, self._llama._batch
        keep = min(common_prefix_length(self.evaluated_tokens, tokens), first_target - 1)
        llama.n_tokens = keep
        llama._ctx.kv_cache_seq_rm(-1, keep, -1)
        for start in range(keep, len(tokens), self.config.n_batch):
            chunk = list(tokens[start: start + self.config.n_batch])
            batch.set_batch(batch=chunk, n_past=start, logits_all=False)
            for index in range(len(chunk)):
                batch.batch.logits[index] = start + index + 1 >= first_target
            llama._ctx.decode(batch)
            llama.input_ids[start: start + len(chunk)] = chunk
            llama.n_tokens = start + len(chunk)
            for index in range(len(chunk)):
                target = start + index + 1
                if first_target <= target < len(tokens):
                    yield target, self._logits_row(index)

    def last_logits(self) -> np.ndarray:
        """Logits after the last evaluated token, as a view into llama.cpp's buffer.

        Valid until the next ``sync``/``append``; copy it to keep it.
        """
        return self._logits_row(-1)

    def _logits_row(self, batch_index: int) -> np.ndarray:
        """A view of llama.cpp's logits for one output of the last decoded batch."""
        pointer = llama_cpp.llama_get_logits_ith(self._llama._ctx.ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))


def _load_llama(path: Path, config: BaseModelConfig) -> llama_cpp.Llama:
    try:
        with _quiet_native_stderr():
            return llama_cpp.Llama(
                model_path=str(path),
                n_ctx=config.n_ctx,
                n_batch=config.n_batch,
                n_threads=config.n_threads or default_thread_count(),
                n_threads_batch=config.n_threads or default_thread_count(),
                n_gpu_layers=default_gpu_layers() if config.n_gpu_layers is None else config.n_gpu_layers,
                logits_all=False,
                verbose=False,
            )
    except jinja2.TemplateError as error:  # llama-cpp-python compiles the file's chat templates while loading
        raise _broken_template(path, error) from error
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelFileError(
            f"llama.cpp could not load {path} ({error}); the file is truncated, corrupt, or of an "
            "architecture this llama.cpp does not support. Re-download it or pick another GGUF."
        ) from error


def _broken_template(path: Path, error: Exception) -> ModelFileError:
    return ModelFileError(f"The chat template in {path} is broken ({error}); re-download the model or pick another GGUF.")


@contextlib.contextmanager
def _quiet_native_stderr():
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
