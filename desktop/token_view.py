"""The per-token view: each token of a reply tinted by how much the rewards moved it.

shift = steered log-prob - base log-prob of the chosen token: green where the rewards raised it,
red where they lowered it. Each token's tooltip lists the top candidates before and after steering.
TokenInfo is built on the worker thread (it needs the model's vocabulary), rendered on the GUI thread.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PySide6.QtGui import QTextCharFormat, QTextCursor, QTextDocument

from desktop.theme import lowered_color, raised_color
from engine.runtime.decode import StepTrace, TokenEvent
from engine.runtime.steering import log_softmax

FULL_TINT_SHIFT = 2.0  # a shift of this many nats (or more) gets the strongest tint
MIN_VISIBLE_SHIFT = 0.02


@dataclass(frozen=True)
class TokenInfo:
    text: str
    shift: float | None = None  # None: text without a token (the final flush of held-back text)
    tooltip: str = ""


def token_info(event: TokenEvent, token_text: Callable[[int], str]) -> TokenInfo:
    if event.trace is None:
        return TokenInfo(event.text)
    trace = event.trace
    return TokenInfo(event.text, trace.steered_logprob - trace.base_logprob, candidates_tooltip(trace, token_text))


def candidates_tooltip(trace: StepTrace, token_text: Callable[[int], str], top_n: int = 5) -> str:
    """Rich text: the chosen token's log-probs and ranks, rewards, and the top candidates before and after."""
    details = trace.to_dict(token_text, top_n=top_n)
    steered = dict(zip(trace.candidate_ids.tolist(), log_softmax(trace.scores).tolist()))
    rewards = ", ".join(f"{html.escape(name)} {value:+.2f}" for name, value in details["rewards"].items())
    rows = "".join(
        f"<tr><td>{_shown(before['text'])}</td><td align=right>{math.exp(before['base_logprob']):.0%}</td>"
        f"<td>&nbsp;&nbsp;</td><td>{_shown(after['text'])}</td>"
        f"<td align=right>{math.exp(steered[after['token_id']]):.0%}</td></tr>"
        for before, after in zip(details["top_base"], details["top_steered"])
    )
    return (
        f"<b>{_shown(details['text'])}</b>: log-prob {details['base_logprob']:.2f} → "
        f"{details['steered_logprob']:.2f}, rank {details['base_rank'] + 1} → {details['steered_rank'] + 1}"
        + (f"<br>rewards: {rewards}" if rewards else "")
        + f"<table><tr><th align=left colspan=2>before</th><th></th><th align=left colspan=2>after</th></tr>"
        f"{rows}</table>"
    )


def _shown(text: str) -> str:
    """Token text with its spaces and line breaks made visible."""
    return html.escape(text.replace(" ", "␣").replace("\n", "↵")) or "∅"


def tint(shift: float | None):
    """The background for a token, or None when the rewards barely moved it."""
    if shift is None or abs(shift) < MIN_VISIBLE_SHIFT:
        return None
    color = raised_color() if shift > 0 else lowered_color()
    color.setAlphaF(0.12 + 0.5 * min(abs(shift) / FULL_TINT_SHIFT, 1.0))
    return color


def write_tokens(document: QTextDocument, tokens: Sequence[TokenInfo]) -> None:
    """Replace the document's content with the tokens, each with its tint and tooltip."""
    document.clear()
    cursor = QTextCursor(document)
    for token in tokens:
        char_format = QTextCharFormat()
        background = tint(token.shift)
        if background is not None:
            char_format.setBackground(background)
        if token.tooltip:
            char_format.setToolTip(token.tooltip)
        cursor.insertText(token.text, char_format)
