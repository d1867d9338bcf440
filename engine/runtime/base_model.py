"""The frozen base model: a GGUF file run through llama.cpp (by way of engine.runtime.llama_adapter).

We own the decode loop instead of using llama-cpp-python's sampler chain: the
adapter feeds tokens, and the last position's logits are read straight from
llama.cpp's buffer, so no n_ctx x n_vocab array is ever kept. The context keeps
its KV cache between calls; ``sync`` reuses the longest common prefix, so a chat
turn only evaluates what is new.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from engine.runtime.errors import ContextOverflowError, ModelFileError, PromptError
from engine.runtime.gguf_metadata import check_gguf_file
from engine.runtime.llama_adapter import Llama, LlamaAdapter, broken_template_error, gpu_offload_supported

ChatMessage = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


def default_thread_count() -> int:
    """llama.cpp is fastest with one thread per physical core; hyperthreads only add contention."""
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def default_gpu_layers() -> int:
    """Offload every layer when this llama.cpp build has a GPU backend (Metal, CUDA, Vulkan), else none."""
    return -1 if gpu_offload_supported() else 0


def vocabulary_fingerprint(tokens: Iterable[bytes]) -> str:
    """sha256 over the token list (length-prefixed, in id order): equal only for identical vocabularies."""
    digest = hashlib.sha256()
    for token in tokens:
        digest.update(len(token).to_bytes(4, "little"))
        digest.update(token)
    return "sha256:" + digest.hexdigest()


def common_prefix_length(left: Sequence[int], right: Sequence[int]) -> int:
    length = 0
    for a, b in zip(left, right, strict=False):  # the shorter one ends it
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
        self.threads = config.n_threads or default_thread_count()
        # fewer llama.cpp threads than cores: a reward can run beside a decode (asked at every step; psutil is slow)
        self.leaves_a_core_free = self.threads < default_thread_count()
        self._open_adapter: LlamaAdapter | None = LlamaAdapter(
            self.path,
            n_ctx=config.n_ctx,
            n_batch=config.n_batch,
            n_threads=self.threads,
            n_gpu_layers=default_gpu_layers() if config.n_gpu_layers is None else config.n_gpu_layers,
        )
        self.n_vocab = self._adapter.n_vocab
        self.n_ctx = self._adapter.n_ctx
        self.name = self.path.stem  # what the user sees in the file manager; general.name is often a build tag
        self.description = self._adapter.metadata.get("general.name", "")
        self.chat_template = self._adapter.chat_template
        self._fingerprint: str | None = None
        try:
            self._check_chat_template()
        except ModelFileError:
            self.close()
            raise

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        if self._open_adapter is not None:
            self._open_adapter.close()
            self._open_adapter = None

    def __enter__(self) -> BaseModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def _adapter(self) -> LlamaAdapter:
        if self._open_adapter is None:
            raise RuntimeError(f"the model {self.name} is closed")
        return self._open_adapter

    @property
    def llama(self) -> Llama:
        """The underlying llama-cpp-python object (for the reference benchmark and parity tests)."""
        return self._adapter.llama

    # -- vocabulary -------------------------------------------------------
    @property
    def vocabulary_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = vocabulary_fingerprint(self._adapter.token_text(token) for token in range(self.n_vocab))
        return self._fingerprint

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        return self._adapter.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as nothing)."""
        return self._adapter.token_piece(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(token) for token in tokens).decode("utf-8", errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return self._adapter.is_end_of_generation(token)

    # -- prompts ----------------------------------------------------------
    @property
    def end_of_turn_token(self) -> int:
        """The token that ends a reply: end-of-turn if the vocabulary has one, else end-of-sequence."""
        eot = self._adapter.eot_token
        return eot if eot >= 0 else self._adapter.eos_token

    def chat_prompt_tokens(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> list[int]:
        """Apply the GGUF's own chat template and tokenize; by default ready for the assistant's reply."""
        if not messages or not any(message.get("content", "").strip() for message in messages):
            raise PromptError("The prompt is empty; type a message first.")
        if self.chat_template is None:
            # A base model without a template: plain text continuation.
            text = "\n\n".join(message["content"] for message in messages)
            return self.tokenize(text, add_bos=True)
        try:
            rendered = self._adapter.render_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # the template is code from the model file: whatever it raises
            raise PromptError(
                f"The chat template of {self.name} cannot format this conversation ({error}); change "
                "the conversation (e.g. remove the system prompt) or pick another model."
            ) from error
        return self.tokenize(rendered.text, add_bos=not rendered.added_special, special=True)

    def _check_chat_template(self) -> None:
        """A damaged template would fail at the first message; fail at load instead, naming the file."""
        if self.chat_template is None:
            return
        try:
            self._adapter.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        except Exception as error:  # the template is code from the model file: whatever it raises
            raise broken_template_error(self.path, error) from error

    # -- evaluation -------------------------------------------------------
    @property
    def n_past(self) -> int:
        """How many tokens the context currently holds."""
        return self._adapter.n_past

    @property
    def evaluated_tokens(self) -> list[int]:
        return self._adapter.evaluated_tokens

    def check_fits(self, n_tokens: int) -> None:
        if n_tokens >= self.n_ctx:
            raise ContextOverflowError(
                f"The prompt is {n_tokens} tokens but the context holds {self.n_ctx}; shorten it, or raise the "
                "context size (in the app: Settings > Preferences; on the command line: --ctx)."
            )

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the context hold exactly ``tokens``, evaluating only what differs from now.

        At least the last token is always evaluated, so ``last_logits`` belongs to it.
        """
        if not tokens:
            raise PromptError("The prompt is empty; type a message first.")
        self.check_fits(len(tokens))
        keep = self._keep_common_prefix(tokens, at_most=len(tokens) - 1)
        self._adapter.evaluate(tokens[keep:])

    def append(self, token: int) -> None:
        """Feed one generated token; its logits become the next ``last_logits``."""
        self._adapter.evaluate([token])

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
        keep = self._keep_common_prefix(tokens, at_most=first_target - 1)
        for position, logits in self._adapter.evaluate_rows(tokens[keep:], first_position=first_target - 1):
            if position + 1 < len(tokens):  # the last token's logits predict nothing here
                yield position + 1, logits

    def last_logits(self) -> np.ndarray:
        """Logits after the last evaluated token, as a view into llama.cpp's buffer.

        Valid until the next ``sync``/``append``; copy it to keep it.
        """
        return self._adapter.last_logits()

    def _keep_common_prefix(self, tokens: Sequence[int], *, at_most: int) -> int:
        """Keep what the context shares with ``tokens`` (at most ``at_most`` tokens); returns how many are kept."""
        return self._adapter.truncate(min(common_prefix_length(self.evaluated_tokens, tokens), at_most))
