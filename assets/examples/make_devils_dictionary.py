#!/usr/bin/env python3
"""Build devils-dictionary.jsonl from the Debian package dict-devil (Ambrose Bierce, The Devil's Dictionary, 1911).

Usage:
    python assets/examples/make_devils_dictionary.py [--deb PATH.deb | --dict PATH.dict.dz] --out assets/examples/devils-dictionary.jsonl

With neither --deb nor --dict it runs `apt-get download dict-devil` into a temporary folder and unpacks the package
with `dpkg-deb -x` (it is never installed). Standard library only. The output is deterministic: the same dictionary
gives the same bytes.

Each headword becomes one demonstration {"prompt": "Define \"Abasement\".", "response": "<Bierce's definition>"}, in
the dictionary's order. The response is the first paragraph of the entry with the headword, the part-of-speech tag
and a leading bracketed label such as "[Latin]" removed, its wrapped lines joined and its whitespace normalized. The
dictd conversion's markup is undone: "{WORD}" cross-references become WORD and "_italics_" lose their underscores;
a word the text wrapped after its own hyphen ("ill-" / "smelling") is joined back. A last sentence that only
introduces the verse left out ("... the following lines by Ambat Delaso:") is dropped. Bierce's wording and
punctuation are otherwise kept exactly. Entries left empty, shorter than 3 words or longer than 600 characters, and
repeated headwords, are dropped; the counts go to stderr.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

MAX_CHARS = 600
MIN_WORDS = 3
# Proper nouns after a hyphen in a headword: UN-AMERICAN -> Un-American (LOCK-AND-KEY -> Lock-and-key).
PROPER = {"AMERICAN", "ADAMITE"}

# Part-of-speech tags as the dictionary writes them (longest first, so "v.t." wins over "v.").
POS_TAGS = ("n.pl.", "v.t.", "v.i.", "p.p.", "interj.", "pron.", "prep.", "conj.", "adj.", "adv.", "pro.", "pp.")
POS_TAGS += ("n.", "v.", "x.", "p.")
_POS = "|".join(re.escape(tag) for tag in POS_TAGS)

# A headword: upper-case words, joined by spaces, commas, "or" and "(or ...)"; e.g. ABASEMENT, KING'S EVIL, LL.D.,
# BABE or BABY, CONFIDANT, CONFIDANTE, TZETZE (or TSETSE) FLY.
_WORD = r"[A-Z][A-Z'.\-]*"
_HEAD = rf"{_WORD}(?:(?:\s+|,\s*|\s+or\s+|\s+\(or\s+{_WORD}(?:\s+{_WORD})*\)\s+){_WORD})*"

# "HEAD, pos.  text" (also "HEAD,n." and "HEAD n."), "HEAD.  text", "HEAD?  text", or a lone "HEAD." / "HEAD, n.".
_HEAD_POS = re.compile(rf"^(?P<head>{_HEAD})\s*,?\s*(?P<pos>(?:{_POS})(?:\s+and\s+(?:{_POS}))?)(?:\s+|$)(?P<rest>.*)$")
_HEAD_PUNCT = re.compile(rf"^(?P<head>{_HEAD})(?P<punct>[.?])(?:\s{{2,}}|$)(?P<rest>.*)$")
# The letter entries begin with the letter inside the first sentence: "I is the first letter ...", "T, the twentieth letter", "W (double U) has".
_LETTER = re.compile(r"^(?P<head>[A-Z]),?\s+(?=[a-z(])(?P<rest>.*)$")
# A leading label in brackets before the definition: "[Latin]", "[from {ACADEME}]".
_LABEL = re.compile(r"^\[[^\]]*\]\s*")
# The end of a sentence: ". ", "? ", ".\" " before a capital, unless after a title or an initial (Dr. Jamrach, John A. Joyce).
_SENTENCE_END = re.compile(r"[.!?][\"')]*\s+(?=[\"'(]?[A-Z])")
_NOT_AN_END = re.compile(r"(?:\b(?:Dr|Mr|Mrs|Messrs|St|Rev|Prof|Gen|Col|Capt)|(?<![A-Za-z])[A-Z])\.[\"')]*\s+$")
# A last sentence that only introduces the quotation the definition leaves out ("... the following lines by X:").
_INTRODUCES = re.compile(
    r"(?:[:,]|--)[\"')]*$|\b(?:the following|following lines|lines following|as follows|here following|effect following|here given)\b|^Following (?:is|are)\b"
)
_XREF = re.compile(r"\{([^{}]*)\}")
_ITALIC = re.compile(r"(?<![A-Za-z0-9])_([^_]+)_(?![A-Za-z0-9])")


def _head_line(line: str) -> tuple[str, str] | None:
    """The (headword, rest of the line) if this line opens an entry, else None."""
    if not line or line[0] == " " or line.startswith("00-database"):
        return None
    for pattern in (_HEAD_POS, _HEAD_PUNCT, _LETTER):
        match = pattern.match(line.rstrip())
        if match:
            head = match.group("head")
            if pattern is _LETTER:
                return head, line.rstrip()  # the letter is the sentence's subject: keep it
            if pattern is _HEAD_PUNCT and (match.group("punct") == "?" or "." in head):
                head += match.group("punct")  # CUI BONO?, LL.D., R.I.P.
            return head, match.group("rest")
    return None


def join_lines(lines: list[str]) -> str:
    """Join wrapped lines with a space; a word broken after its own hyphen (ill-/smelling) is joined without one."""
    text = ""
    for line in lines:
        line = line.strip()
        if text.endswith("-") and not text.endswith("--") and text[-2:-1].isalpha():
            text += line
        else:
            text = f"{text} {line}" if text else line
    return text


def clean(text: str) -> str:
    """Undo the dictd markup and normalize whitespace, keeping the wording and punctuation."""
    text = _XREF.sub(r"\1", text)
    text = _ITALIC.sub(r"\1", text)
    return " ".join(text.split())


def drop_introduction(definition: str) -> str:
    """Remove a last sentence that introduces the omitted verse or anecdote; may leave nothing."""
    ends = [m.end() for m in _SENTENCE_END.finditer(definition) if not _NOT_AN_END.search(definition[: m.end()])]
    start = ends[-1] if ends else 0
    if _INTRODUCES.search(definition[start:]):
        return definition[:start].rstrip()
    return definition


def parse_entries(text: str) -> list[tuple[str, str]]:
    """(headword as printed, definition) for each entry of a dictd devil.dict, in order.

    An entry opens with a headword line at the left margin after a blank line. Its definition is its first paragraph
    (up to the first blank line), which is where verse quotations and illustrative anecdotes begin; the headword, the
    part-of-speech tag and a leading bracketed label are removed, and so is a last sentence that only introduces the
    quotation left out. The definition may be empty (an entry that is only a verse quotation).
    """
    entries: list[tuple[str, str]] = []
    lines = text.splitlines()
    previous_blank = True
    i = 0
    while i < len(lines):
        line = lines[i]
        opened = _head_line(line) if previous_blank else None
        previous_blank = not line.strip()
        i += 1
        if opened is None:
            continue
        head, rest = opened
        paragraph = [rest]
        while i < len(lines) and lines[i].strip() and not lines[i].startswith(" "):
            paragraph.append(lines[i])
            i += 1
        definition = _LABEL.sub("", clean(join_lines(paragraph)))
        definition = drop_introduction(definition)
        entries.append((" ".join(head.split()), definition))
    return entries


def title_case(headword: str) -> str:
    """ABASEMENT -> Abasement, KING'S EVIL -> King's Evil, BABE or BABY -> Babe or Baby; LL.D. and R.I.P. stay."""

    def word(w: str) -> str:
        if w == "or" or w == "(or":
            return w
        core = w.strip("(),?")
        if "." in core.rstrip("."):  # an abbreviation such as LL.D. or R.I.P.
            return w
        lead = w[: len(w) - len(w.lstrip("("))]
        body = w[len(lead) :]
        first, *others = body.split("-")
        parts = [first[:1].upper() + first[1:].lower()]
        parts += [part[:1].upper() + part[1:].lower() if part.upper() in PROPER else part.lower() for part in others]
        return lead + "-".join(parts)

    return " ".join(word(w) for w in headword.split())


def demonstrations(entries: list[tuple[str, str]], counts: Counter[str] | None = None) -> list[dict[str, str]]:
    """One {"prompt", "response"} per headword, in order; drops empty, short (<3 words), long (>600 chars) and
    duplicate-headword entries, tallying the reasons in counts."""
    counts = Counter() if counts is None else counts
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    for headword, definition in entries:
        key = headword.upper()
        if key in seen:
            counts["duplicate headword"] += 1
            continue
        seen.add(key)
        if not definition:
            counts["empty"] += 1
        elif len(definition.split()) < MIN_WORDS:
            counts[f"shorter than {MIN_WORDS} words"] += 1
        elif len(definition) > MAX_CHARS:
            counts[f"longer than {MAX_CHARS} characters"] += 1
        else:
            out.append({"prompt": f'Define "{title_case(headword)}".', "response": definition})
            counts["kept"] += 1
    return out


def read_dict(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # dictzip is gzip
        data = gzip.decompress(data)
    return data.decode("utf-8")


def dict_from_deb(deb: Path, workdir: Path) -> Path:
    target = workdir / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    found = sorted(target.rglob("devil.dict.dz")) or sorted(target.rglob("*.dict.dz")) or sorted(target.rglob("*.dict"))
    if not found:
        raise SystemExit(f"no .dict(.dz) file in {deb}")
    return found[0]


def download_deb(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "dict-devil"], check=True, cwd=workdir)
    debs = sorted(workdir.glob("dict-devil_*.deb"))
    if not debs:
        raise SystemExit("apt-get download dict-devil left no .deb")
    return debs[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--deb", type=Path, help="the dict-devil .deb (default: apt-get download dict-devil)")
    source.add_argument("--dict", type=Path, help="the devil.dict.dz (or unpacked devil.dict) file")
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.dict is not None:
            dict_path = args.dict
        else:
            deb = args.deb if args.deb is not None else download_deb(workdir)
            dict_path = dict_from_deb(deb, workdir)
        text = read_dict(dict_path)

    counts: Counter[str] = Counter()
    entries = parse_entries(text)
    rows = demonstrations(entries, counts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    print(f"{len(entries)} entries parsed, {counts['kept']} kept, written to {args.out}", file=sys.stderr)
    for reason, n in sorted(counts.items()):
        if reason != "kept":
            print(f"  dropped {n}: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
