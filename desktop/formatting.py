"""Numbers in words: held-out figures, training data counts, durations, speeds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def held_out_text(held: Mapping[str, Any]) -> str:
    """'NLL/token 2.31 -> 2.05 (base -> steered) over 812 tokens, 45% of the gap closed; pair accuracy 80%'."""
    parts = []
    if held.get("tokens"):
        parts.append(
            f"held-out NLL/token {held['base_nll']:.3f} → {held['steered_nll']:.3f} "
            f"(base → steered) over {held['tokens']:,} tokens"
        )
    if held.get("gap_closed") is not None:
        parts.append(f"{held['gap_closed']:.0%} of the gap to the teacher closed")
    if held.get("pair_accuracy") is not None:
        parts.append(f"pair accuracy {held['pair_accuracy']:.0%} on {held.get('pairs', 0)} pairs")
    return "; ".join(parts) or "no held-out figures"


def sentence(text: str) -> str:
    """The text with its first letter capitalized (and the rest untouched, unlike str.capitalize)."""
    return text[:1].upper() + text[1:]


def training_data_text(counts: Mapping[str, Any]) -> str:
    """'120 demonstrations, 30 preference pairs' from a card's training_data."""
    labels = {"demonstrations": "demonstrations", "preference_pairs": "preference pairs"}
    parts = [f"{counts[key]:,} {label}" for key, label in labels.items() if counts.get(key)]
    return ", ".join(parts) or "no recorded training data"


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    return f"{seconds // 60} min {seconds % 60:02d} s"


def speed_text(tokens_per_second: float) -> str:
    return f"{tokens_per_second:.1f} tok/s" if tokens_per_second > 0 else ""
