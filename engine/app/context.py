"""What of a chat is sent to the model: the context policy, so a long chat never dead-ends.

The system prompt (when it is the first message) and the most recent turns are sent; the oldest turns are left
out, whole (the history sent starts at a user message). The prompt's start stays the same from one turn to the
next, so llama.cpp and the rewards' KV state evaluate only what is new: the caller passes back the ``left_out``
of the last turn, and it is kept while the prompt fits with ``reply_room`` tokens free. When it no longer does,
more turns are left out at once, until the prompt takes at most about half the context, so the next several
turns reuse the cache again. The last user message is never left out; when it cannot fit (with the system prompt
and room for a reply), that is one ContextOverflowError the user can act on.

Tokens are counted with the model's own chat template (``BaseModel.chat_prompt_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.runtime.base_model import BaseModel, ChatMessage
from engine.runtime.errors import ContextOverflowError, PromptError

RAISE_CONTEXT = "raise the context size in Settings > Preferences (prt chat: --ctx)"


@dataclass(frozen=True)
class ContextUse:
    """How a reply's prompt uses the context."""

    left_out: int  # how many of the oldest non-system messages are not sent
    prompt_tokens: int  # tokens of the prompt sent
    context_size: int  # the model's n_ctx


def default_reply_room(n_ctx: int, max_tokens: int) -> int:
    """The tokens kept free for the reply: ``max_tokens``, but at most a quarter of the context (and at least 1),
    so a large ``max_tokens`` does not leave out most of the conversation."""
    return max(1, min(max_tokens, n_ctx // 4))


def continuation_prompt_tokens(base: BaseModel, messages: Sequence[ChatMessage]) -> list[int]:
    """The prompt that extends the last message, an assistant reply: the chat template of the messages before it
    with the generation prompt, then the tokens of the reply so far (no end of turn), so generation continues it.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise PromptError("There is no reply to continue: the last message is not the assistant's.")
    if base.chat_template is None:  # plain text continuation: the conversation as it is
        return base.chat_prompt_tokens(messages)
    return base.chat_prompt_tokens(messages[:-1]) + base.tokenize(messages[-1].get("content", ""))


def plan_context(
    base: BaseModel,
    messages: Sequence[ChatMessage],
    *,
    reply_room: int,
    left_out: int = 0,
    continue_last: bool = False,
) -> tuple[list[ChatMessage], ContextUse]:
    """The messages to send (the system prompt, then the history from a user message on) and how they use the
    context. ``left_out``: the last turn's (``ContextUse.left_out``), 0 for a new chat. ``continue_last``: the last
    message is an assistant reply to extend (``continuation_prompt_tokens``)."""
    kept, _, use = _plan(base, messages, reply_room=reply_room, left_out=left_out, continue_last=continue_last)
    return kept, use


def plan_prompt(
    base: BaseModel,
    messages: Sequence[ChatMessage],
    *,
    reply_room: int,
    left_out: int = 0,
    continue_last: bool = False,
) -> tuple[list[int], ContextUse]:
    """``plan_context``, giving the prompt's tokens instead of its messages (what a Generation starts from)."""
    _, tokens, use = _plan(base, messages, reply_room=reply_room, left_out=left_out, continue_last=continue_last)
    return tokens, use


def _plan(
    base: BaseModel, messages: Sequence[ChatMessage], *, reply_room: int, left_out: int, continue_last: bool
) -> tuple[list[ChatMessage], list[int], ContextUse]:
    if reply_room < 0 or left_out < 0:
        raise ValueError(f"reply_room and left_out must be >= 0, got {reply_room} and {left_out}")
    n_ctx = base.n_ctx
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    history = list(messages[len(system) :])
    users = [index for index, message in enumerate(history) if message.get("role") == "user"]
    # where the history sent may start: all of it, or a user message up to the last one
    starts = sorted({0, *users})
    counted: dict[int, list[int]] = {}

    def tokens_from(start: int) -> list[int]:
        if start not in counted:
            kept = system + history[start:]
            counted[start] = continuation_prompt_tokens(base, kept) if continue_last else base.chat_prompt_tokens(kept)
        return counted[start]

    def fits(start: int, free: int) -> bool:
        return len(tokens_from(start)) + free <= n_ctx

    start = next((s for s in starts if s >= left_out), starts[-1])  # a whole turn, never past the last user message
    if not fits(start, reply_room):
        later = [s for s in starts if s > start]
        target = min(n_ctx // 2, n_ctx - reply_room)  # the prompt after a move: about half the context
        # tokens only shrink as turns are left out: the first start under the target, by bisection
        low, high = 0, len(later)
        while low < high:
            middle = (low + high) // 2
            if len(tokens_from(later[middle])) <= target:
                high = middle
            else:
                low = middle + 1
        start = later[low] if low < len(later) else starts[-1]
        if not fits(start, reply_room):
            raise _too_long(len(tokens_from(start)), n_ctx, has_system=bool(system), continue_last=continue_last)
    tokens = tokens_from(start)
    return system + history[start:], tokens, ContextUse(left_out=start, prompt_tokens=len(tokens), context_size=n_ctx)


def _too_long(n_tokens: int, n_ctx: int, *, has_system: bool, continue_last: bool) -> ContextOverflowError:
    parts = ["your message"] + ["the system prompt"] * has_system + ["the reply so far"] * continue_last
    what = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    verb, pronoun = ("is", "it") if len(parts) == 1 else ("are", "them")
    return ContextOverflowError(
        f"{what[0].upper()}{what[1:]} {verb} {n_tokens} tokens, but this model's context holds {n_ctx} with room "
        f"for a reply; shorten {pronoun}, or {RAISE_CONTEXT}."
    )
