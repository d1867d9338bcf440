#!/usr/bin/env python3
"""Build facts.jsonl, a probe of short factual questions, from data packages on PyPI.

Usage (in a throwaway virtual environment, not the app's):
    python3 -m venv /tmp/factsenv
    /tmp/factsenv/bin/pip install countryinfo==1.0.1 country_converter==1.3.2 periodictable==2.1.0
    /tmp/factsenv/bin/python assets/probes/make_facts.py --out assets/probes/facts.jsonl

Each line is {"prompt", "lead", "answer", "kind"}:
    capital          What is the capital of France? / The capital of France is / Paris
    element-symbol   What is the chemical symbol of gold? / The chemical symbol of gold is / Au
    element-name     Which element has the chemical symbol Fe? / The element with the chemical symbol Fe is / iron

Countries are the 193 member states of the United Nations (the UNmember column of country_converter's table), with
their names and capitals from countryinfo, joined on the ISO 3166 alpha-3 code. A country is skipped when countryinfo
has no capital for it, when the capital is not a plain name, or when the answer would be given away by the question
(Djibouti, Luxembourg, Monaco, Singapore). Elements 1-118 come from periodictable, names in lower case. The output is
sorted (countries by name, elements by atomic number) and deterministic.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import unicodedata
from pathlib import Path

import country_converter
import periodictable
from countryinfo import CountryInfo

# Where countryinfo's data is out of date; each is a fact checked by hand.
CAPITAL_FIXES = {"KAZ": "Astana"}  # renamed back from Nur-Sultan in September 2022
NAME_FIXES = {
    "SWZ": "Eswatini",
    "MKD": "North Macedonia",
}  # countryinfo: Swaziland (until 2018), Republic of Macedonia (until 2019)
# Left out: a capital whose recognition is itself in dispute has no single right answer to probe.
SKIP = {"ISR"}

# A capital as a plain name: letters, spaces, apostrophes, hyphens and dots (Washington D.C., St. George's).
_PLAIN_NAME = re.compile(r"[^\W\d_][\w .'\-]*[^\W_]\.?")


def given_away(answer: str, prompt: str) -> bool:
    """Whether the answer appears in the prompt as a whole word or phrase (case-insensitive)."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", prompt, re.IGNORECASE) is not None


_ARTICLE_WORDS = {"United", "Republic", "Islands", "States", "Kingdom"}
_ARTICLE_NAMES = {"Netherlands", "Philippines", "Maldives", "Comoros"}


def in_sentence(name: str) -> str:
    """A country's name inside a sentence: "The Bahamas" -> "the Bahamas", "United Kingdom" -> "the United Kingdom"."""
    if name.startswith("The "):
        return "the " + name[4:]
    if name in _ARTICLE_NAMES or _ARTICLE_WORDS & set(name.split()):
        return "the " + name
    return name


def sort_key(name: str) -> str:
    return unicodedata.normalize("NFKD", name.removeprefix("the ")).casefold()


def un_members() -> list[dict[str, str]]:
    table = Path(country_converter.__file__).with_name("country_data.tsv")
    with open(table, encoding="utf-8", newline="") as f:
        return [row for row in csv.DictReader(f, delimiter="\t") if row["UNmember"].strip()]


def capitals(skipped: dict[str, list[str]]) -> list[dict[str, str]]:
    # countryinfo may hold an alpha-3 code twice (MMR: "burma" and "myanmar"; GBR: "united kingdom" and "wales", the
    # latter without a capital): take the entry named as in country_converter, else the first with a capital.
    candidates: dict[str, list[tuple[str, object]]] = {}
    for key, info in sorted(CountryInfo.all().items()):
        iso = info.get("ISO") or {}
        iso3 = iso.get("alpha3") if isinstance(iso, dict) else None
        if iso3 and info.get("capital"):
            candidates.setdefault(iso3, []).append((info.get("name") or key, info["capital"]))
    rows = []
    for member in un_members():
        iso3 = member["ISO3"]
        if iso3 in SKIP:
            skipped["disputed capital"].append(iso3)
            continue
        if iso3 not in candidates:
            skipped["no capital in countryinfo"].append(iso3)
            continue
        named = [c for c in candidates[iso3] if c[0] in (member["name_short"], member["name_official"])]
        name, raw = (named or candidates[iso3])[0]
        name = in_sentence(NAME_FIXES.get(iso3, name))
        capital = CAPITAL_FIXES.get(iso3, raw.strip() if isinstance(raw, str) else "")
        if not _PLAIN_NAME.fullmatch(capital):
            skipped["capital not a plain name"].append(iso3)
            continue
        prompt = f"What is the capital of {name}?"
        if given_away(capital, prompt):
            skipped["capital named like the country"].append(iso3)
            continue
        rows.append(
            (
                sort_key(name),
                {"prompt": prompt, "lead": f"The capital of {name} is", "answer": capital, "kind": "capital"},
            )
        )
    return [row for _, row in sorted(rows, key=lambda r: (r[0], r[1]["prompt"]))]


def elements() -> list[dict[str, str]]:
    symbols, names = [], []
    for element in sorted((e for e in periodictable.elements if e.number > 0), key=lambda e: e.number):
        name, symbol = element.name.lower(), element.symbol
        symbols.append(
            {
                "prompt": f"What is the chemical symbol of {name}?",
                "lead": f"The chemical symbol of {name} is",
                "answer": symbol,
                "kind": "element-symbol",
            }
        )
        names.append(
            {
                "prompt": f"Which element has the chemical symbol {symbol}?",
                "lead": f"The element with the chemical symbol {symbol} is",
                "answer": name,
                "kind": "element-name",
            }
        )
    return symbols + names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)

    skipped: dict[str, list[str]] = {
        key: []
        for key in (
            "disputed capital",
            "no capital in countryinfo",
            "capital not a plain name",
            "capital named like the country",
        )
    }
    rows = capitals(skipped) + elements()
    for row in rows:
        assert all(isinstance(v, str) and v for v in row.values()), row
        assert not given_away(row["answer"], row["prompt"]) and not given_away(row["answer"], row["lead"]), row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    kinds: dict[str, int] = {}
    for row in rows:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    print(f"{len(rows)} items written to {args.out}: {kinds}", file=sys.stderr)
    for reason, isos in skipped.items():
        if isos:
            print(f"  skipped {len(isos)} ({reason}): {' '.join(isos)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
