"""JSON from a file the user gave us (an export, a reward card, a settings file): any way it is bad is a ValueError."""

from __future__ import annotations

import json
from typing import Any


def parse_user_json(data: bytes) -> Any:
    """The decoded value; ValueError saying why for bytes that are not UTF-8, not JSON (a number of more than
    4300 digits included), nested deeper than Python's decoder goes, or holding a \\u escape of a lone
    surrogate (a text that cannot be written back as UTF-8)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text: {error}") from None
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except UnicodeEncodeError:
        raise ValueError("a text in it is not valid Unicode (a lone surrogate)") from None
    except ValueError as error:
        raise ValueError(f"not valid JSON: {error}") from None
    return value
