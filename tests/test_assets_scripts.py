"""The data files under assets/examples and assets/probes, and the scripts that build them."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEVILS = ROOT / "assets" / "examples" / "devils-dictionary.jsonl"
FACTS = ROOT / "assets" / "probes" / "facts.jsonl"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and not raw.endswith(b"\n\n")
    return [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]


def test_devils_dictionary_file():
    rows = _lines(DEVILS)
    assert len(rows) >= 800
    for row in rows:
        assert set(row) == {"prompt", "response"}
        assert isinstance(row["prompt"], str) and row["prompt"].startswith('Define "') and row["prompt"].endswith('".')
        assert isinstance(row["response"], str) and 0 < len(row["response"]) <= 600
        assert len(row["response"].split()) >= 3
        assert row["response"] == " ".join(row["response"].split())  # whitespace normalized
        assert not re.search(r"[{}_]", row["response"])  # no dictd markup left
    prompts = [row["prompt"] for row in rows]
    assert len(set(prompts)) == len(prompts)
    first = {row["prompt"]: row["response"] for row in rows}
    assert first['Define "Abasement".'].startswith("A decent and customary mental attitude")
    assert first['Define "Bore".'] == "A person who talks when you wish him to listen."


# The layout of devil.dict in the dict-devil package: the dictfmt header and a preface, then entries at the left
# margin after a blank line, wrapped at 70 columns, with indented verse and a signature after the first paragraph.
SNIPPET = """\
00-database-short
     The Devil's Dictionary (1881-1906)

                              PREFACE

_The Devil's Dictionary_ was begun in a weekly paper in 1881.
                                                                  A.B.

ABDICATION, n.  An act whereby a sovereign attests his sense of the
high temperature of the throne.

    Poor Isabella's Dead, whose abdication
    Set all tongues wagging in the Spanish nation.
                                                                  G.J.

ABRACADABRA.

    By _Abracadabra_ we signify
        An infinite number of things.

ACADEMY, n.  [from {ACADEME}]   A modern school where football is
taught.

BOTANY, n.  The science of vegetables.  It deals largely with their
flowers, which are commonly inartistic in color, and ill-
smelling.

BRUTE, n.  See {HUSBAND}.

KING'S EVIL, n.  A malady that was formerly cured by the touch of the
sovereign.  Thus the most pious Edward used to lay his hand upon the
ailing subjects --

    Such sanctity hath Heaven given his hand,

as the "Doctor" in _Macbeth_ hath it.

REASON, v.i.  To weight probabilities in the scales of desire.

REASON, n.  Propensitate of prejudice.

TORTOISE, n.  A creature thoughtfully created to supply occasion for
the following lines by the illustrious Ambat Delaso:

                          TO MY PET TORTOISE

T, the twentieth letter of the English alphabet, was by the Greeks
absurdly called _tau_.

WHITE, adj. and n.  Black.
"""


def test_devils_dictionary_parser():
    module = _load(ROOT / "assets" / "examples" / "make_devils_dictionary.py")
    entries = module.parse_entries(SNIPPET)
    assert entries == [
        ("ABDICATION", "An act whereby a sovereign attests his sense of the high temperature of the throne."),
        ("ABRACADABRA", ""),
        ("ACADEMY", "A modern school where football is taught."),
        (
            "BOTANY",
            "The science of vegetables. It deals largely with their flowers, which are commonly inartistic in color, "
            "and ill-smelling.",
        ),
        ("BRUTE", "See HUSBAND."),
        ("KING'S EVIL", "A malady that was formerly cured by the touch of the sovereign."),
        ("REASON", "To weight probabilities in the scales of desire."),
        ("REASON", "Propensitate of prejudice."),
        ("TORTOISE", ""),
        ("T", "T, the twentieth letter of the English alphabet, was by the Greeks absurdly called tau."),
        ("WHITE", "Black."),
    ]
    counts = module.Counter()
    rows = module.demonstrations(entries, counts)
    assert rows == [
        {
            "prompt": 'Define "Abdication".',
            "response": "An act whereby a sovereign attests his sense of the high temperature of the throne.",
        },
        {"prompt": 'Define "Academy".', "response": "A modern school where football is taught."},
        {"prompt": 'Define "Botany".', "response": entries[3][1]},
        {
            "prompt": 'Define "King\'s Evil".',
            "response": "A malady that was formerly cured by the touch of the sovereign.",
        },
        {"prompt": 'Define "Reason".', "response": "To weight probabilities in the scales of desire."},
        {"prompt": 'Define "T".', "response": entries[9][1]},
    ]
    assert counts == {"kept": 6, "empty": 2, "shorter than 3 words": 2, "duplicate headword": 1}
    long_entry = [("VERBOSE", "word " * 130)]
    assert module.demonstrations(long_entry) == []
    assert module.title_case("LL.D.") == "LL.D." and module.title_case("UN-AMERICAN") == "Un-American"
    assert module.title_case("TZETZE (or TSETSE) FLY") == "Tzetze (or Tsetse) Fly"


def _given_away(answer: str, text: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE) is not None


def test_facts_file():
    rows = _lines(FACTS)
    kinds: dict[str, int] = {}
    for row in rows:
        assert set(row) == {"prompt", "lead", "answer", "kind"}
        assert all(isinstance(value, str) and value.strip() == value and value for value in row.values())
        assert row["prompt"].endswith("?")
        assert not _given_away(row["answer"], row["prompt"])
        # The lead opens the answer sentence, so the answer is what comes next and is not in it yet.
        assert row["lead"][0].isupper() and not row["lead"].endswith((".", "?", " "))
        assert not _given_away(row["answer"], row["lead"])
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    assert set(kinds) == {"capital", "element-symbol", "element-name"}
    assert kinds["capital"] >= 100 and kinds["element-symbol"] >= 100 and kinds["element-name"] >= 100
    assert len({row["prompt"] for row in rows}) == len(rows)
    facts = {row["prompt"]: row["answer"] for row in rows}
    assert facts["What is the capital of France?"] == "Paris"
    assert facts["What is the chemical symbol of gold?"] == "Au"
    assert facts["Which element has the chemical symbol Fe?"] == "iron"
