"""Fenced code blocks in a rendered reply: colours from pygments and a "Copy" link above each.

Qt's Markdown importer marks every line of a code block with the block properties BlockCodeLanguage (and
BlockCodeFence for a fenced one), but two fences in a row come out as one run of lines, and the lines it shows
are not quite the source (a tab becomes spaces, leading blank lines go). So before Qt reads the Markdown, each
fence's info string gets a tag with the fence's number, which Qt keeps as the block's language: that tells the
runs apart, and the Copy link copies the source's code exactly. Should a tag show up as text (a line that looked
like a fence here but not to Qt), the Markdown is read again as it is and the code is taken from what Qt shows
(as it is for an indented code block, which gets a Copy link too).

A code block is highlighted by what it shows, so the colours land on the right characters; the result is
kept per text, so a streamed reply only lexes the block that is still growing (and that one mostly by its
last lines: see CodeBlocks).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.styles import get_style_by_name
from pygments.token import _TokenType
from pygments.util import ClassNotFound
from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import (
    QColor,
    QDesktopServices,
    QFont,
    QGuiApplication,
    QPalette,
    QTextBlock,
    QTextBlockFormat,
    QTextCharFormat,
    QTextCursor,
    QTextDocument,
    QTextFormat,
    QTextLayout,
)

COPY_SCHEME = "copy-code"
LIGHT_STYLE = "default"
DARK_STYLE = "github-dark"
COPY_LABEL = "Copy"

_TAG = "prt-code-block-"
_TAG_LANGUAGE = re.compile(re.escape(_TAG) + r"(\d+)")
_OPENING = re.compile(r"(?P<quote>(?: {0,3}> ?)*)(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)")
_CLOSING = re.compile(r"(?P<indent> *)(?P<fence>`{3,}|~{3,})[ \t]*")
_QUOTE_MARK = re.compile(r" {0,3}> ?")
_PLAIN_CODE = re.compile(r"[^`~\x00-\x09\x0b-\x1f\x7f\u2028\u2029]*")  # text that Qt shows as it is in a code block
_CODE = QTextFormat.Property.BlockCodeLanguage
_FENCE = QTextFormat.Property.BlockCodeFence
_CACHE_SIZE = 32  # highlighted texts a message keeps; a reply rarely has more blocks


@dataclass(frozen=True)
class Fence:
    """A fenced code block of the Markdown source."""

    language: str  # the info string's first word, '' when it has none
    code: str  # the lines between the fences, less the fence's indentation; no final newline
    closed: bool  # False while a reply is still streaming it (or when the reply never closed it)
    shown: str = field(default="", compare=False, repr=False)  # the lines Qt shows, a partial closing fence too
    top_level: bool = field(default=False, compare=False, repr=False)  # not indented, not in a quote or a list


def copy_url(index: int) -> QUrl:
    return QUrl(f"{COPY_SCHEME}:{index}")


def copy_index(url: QUrl) -> int | None:
    """The code block number of a Copy link, or None for any other link."""
    if url.scheme() != COPY_SCHEME or not url.path().isdigit():
        return None
    return int(url.path())


def follow_link(url: QUrl, code_texts: Sequence[str]) -> None:
    """A Copy link puts its code on the clipboard; a web or mail link opens outside the app; any other does nothing.

    (Nothing opens inside a message: a relative link there would replace the reply with a file's contents.)
    """
    index = copy_index(url)
    if index is not None:
        if index < len(code_texts):
            QGuiApplication.clipboard().setText(code_texts[index])
    elif url.scheme().lower() in ("http", "https", "mailto"):
        QDesktopServices.openUrl(url)


def _strip_quote(line: str, depth: int) -> str | None:
    """The line without ``depth`` blockquote marks, or None when it has fewer (the quote, and a fence in it, ends)."""
    for _ in range(depth):
        mark = _QUOTE_MARK.match(line)
        if mark is None:
            return None
        line = line[mark.end() :]
    return line


def _dedent(line: str, indent: int) -> str:
    spaces = len(line) - len(line.lstrip(" "))
    return line[min(spaces, indent) :]


def tag_fences(markdown: str) -> tuple[str, list[Fence]]:
    """The Markdown with fence number N's info string starting with the tag N, and the fences in order.

    The fences are found as CommonMark does at the top level and in block quotes; in a list item the fence's own
    indentation stands for the item's. Where that guess is wrong, render() notices and falls back.
    """
    lines = markdown.split("\n")
    count = len(lines) - (lines[-1] == "")  # a final newline ends the last line; it starts no other
    tagged = list(lines)
    fences: list[Fence] = []
    i = 0
    while i < count:
        opening = _OPENING.fullmatch(lines[i].rstrip("\r"))
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        quote, indent, fence, info = opening["quote"], len(opening["indent"]), opening["fence"], opening["info"]
        tagged[i] = f"{quote}{opening['indent']}{fence}{_TAG}{len(fences)} {info}"
        depth = quote.count(">")
        body: list[str] = []
        closed = False
        i += 1
        while i < count:
            line = _strip_quote(lines[i].rstrip("\r"), depth)
            if line is None:
                break
            i += 1
            closing = _CLOSING.fullmatch(line)
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and len(closing["indent"]) <= indent + 3
            ):
                closed = True
                break
            body.append(_dedent(line, indent))
        code = body
        if not closed and i == len(lines) and body and re.fullmatch(f" *{re.escape(fence[0])}+", body[-1]):
            code = body[:-1]  # the closing fence, still streaming in
        words = info.split()
        language = words[0] if words else ""
        top_level = indent == 0 and depth == 0
        fences.append(Fence(language, "\n".join(code), closed, shown="\n".join(body), top_level=top_level))
    return "\n".join(tagged), fences


@lru_cache(maxsize=64)
def _lexer(language: str) -> Lexer | None:
    """The pygments lexer for a fence's language, or None (plain text) for none or one pygments does not know.

    No guessing from the text: pygments' guess is often wrong for short snippets, and its first call imports
    every lexer (a fifth of a second).
    """
    name = language.strip("{}.").lower()
    if not name:
        return None
    try:
        lexer = get_lexer_by_name(name, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None
    return None if lexer.name == "Text only" else lexer


@lru_cache(maxsize=4)
def _style_formats(style_name: str) -> Callable[[_TokenType], QTextCharFormat | None]:
    style = get_style_by_name(style_name)
    formats: dict[_TokenType, QTextCharFormat | None] = {}

    def format_of(token: _TokenType) -> QTextCharFormat | None:
        if token not in formats:
            spec = style.style_for_token(token)
            char_format = QTextCharFormat()
            if spec["color"]:
                char_format.setForeground(QColor(f"#{spec['color']}"))
            if spec["bold"]:
                char_format.setFontWeight(QFont.Weight.Bold)
            if spec["italic"]:
                char_format.setFontItalic(True)
            if spec["underline"]:
                char_format.setFontUnderline(True)
            styled = spec["color"] or spec["bold"] or spec["italic"] or spec["underline"]
            formats[token] = char_format if styled else None
        return formats[token]

    return format_of


def _utf16_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) // 2


def highlight_spans(text: str, language: str, style_name: str) -> list[tuple[int, int, QTextCharFormat]]:
    """(start, length, format) in UTF-16 units (a QTextDocument's positions) for ``text`` lexed as ``language``."""
    lexer = _lexer(language)
    if lexer is None or not text:
        return []
    format_of = _style_formats(style_name)
    spans: list[tuple[int, int, QTextCharFormat]] = []
    position = 0
    for token, value in lexer.get_tokens(text):
        length = _utf16_length(value)
        char_format = format_of(token)
        if char_format is not None and length:
            last = spans[-1] if spans else None
            if last is not None and last[2] is char_format and last[0] + last[1] == position:
                spans[-1] = (last[0], last[1] + length, char_format)
            else:
                spans.append((position, length, char_format))
        position += length
    if position != _utf16_length(text):  # a lexer that changed the text: its positions would be wrong
        return []
    return spans


@dataclass
class _Run:
    """The blocks of one code block in the document."""

    key: tuple[bool, str]  # (fenced, language as Qt stored it)
    blocks: list[QTextBlock]

    @property
    def text(self) -> str:
        return "\n".join(block.text() for block in self.blocks)


def _code_runs(document: QTextDocument) -> list[_Run]:
    runs: list[_Run] = []
    previous_was_code = False
    block = document.begin()
    while block.isValid():
        block_format = block.blockFormat()
        is_code = block_format.hasProperty(_CODE) or block_format.hasProperty(_FENCE)
        if is_code:
            key = (block_format.hasProperty(_FENCE), block_format.stringProperty(_CODE))
            if previous_was_code and runs[-1].key == key:
                runs[-1].blocks.append(block)
            else:
                runs.append(_Run(key, [block]))
        previous_was_code = is_code
        block = block.next()
    return runs


def _squash(text: str) -> str:
    return "".join(text.split())


def highlight_lines(text: str, language: str, style_name: str) -> list[list[QTextLayout.FormatRange]]:
    """highlight_spans() cut at the newlines: the format ranges of each line, as QTextLayout.setFormats takes them."""
    lines: list[list[QTextLayout.FormatRange]] = []
    line_start = 0
    spans = iter(highlight_spans(text, language, style_name))
    span = next(spans, None)
    for line in text.split("\n"):
        line_end = line_start + _utf16_length(line)
        ranges: list[QTextLayout.FormatRange] = []
        while span is not None and span[0] < line_end:
            start, length, char_format = span
            begin, end = max(start, line_start), min(start + length, line_end)
            if end > begin:
                format_range = QTextLayout.FormatRange()
                format_range.start, format_range.length, format_range.format = (
                    begin - line_start,
                    end - begin,
                    char_format,
                )
                ranges.append(format_range)
            if start + length > line_end:
                break  # the span goes on to the next line
            span = next(spans, None)
        lines.append(ranges)
        line_start = line_end + 1  # the newline
    return lines


def char_format_at(document: QTextDocument, position: int) -> QTextCharFormat:
    """The format the character at ``position`` is drawn with: its own, and the highlighting over it."""
    block = document.findBlock(position)
    cursor = QTextCursor(document)
    cursor.setPosition(position + 1)  # charFormat() describes the character before the cursor
    char_format = cursor.charFormat()
    offset = position - block.position()
    for format_range in block.layout().formats():
        if format_range.start <= offset < format_range.start + format_range.length:
            char_format.merge(format_range.format)
    return char_format


_Lines = list[list[QTextLayout.FormatRange]]
_Key = tuple[str, str, str]  # (language, style, text)


@dataclass
class _Lexed:
    """A code block's last highlighting, and when its last full lex was and how long that took."""

    key: _Key
    lines: _Lines
    full_at: float  # time.perf_counter() then
    full_seconds: float


def _palette_key(palette: QPalette) -> tuple[int, ...]:
    roles = (QPalette.ColorRole.Text, QPalette.ColorRole.Link, QPalette.ColorRole.PlaceholderText)
    return tuple(palette.color(role).rgba() for role in roles)


@dataclass(frozen=True)
class _Rendered:
    """What the document shows, when its last code block is one that a streamed reply may be adding to."""

    document: QTextDocument
    markdown: str
    fence: Fence  # the last one
    palette_key: tuple[int, ...]


class CodeBlocks:
    """The code blocks of one rendered message: what each Copy link copies, and the highlighting kept per text.

    The colours go on the blocks' layouts (as QSyntaxHighlighter puts them), not into the document: that is
    a few hundred calls for a long block instead of thousands of edits, and the document keeps the reply's
    own formats.

    A block that grows (a streamed reply) is lexed in full at most a tenth of the time (LEX_SHARE); in
    between, only its last line and what came after it are lexed, from the lexer's first state, and a full
    lex follows once the text stops changing. That guess is wrong only inside a multi-line string or
    comment, and only until the next full lex.
    """

    LEX_SHARE = 0.1
    QUICK_LEX_S = 0.005  # a lex this fast is always done in full

    def __init__(self) -> None:
        self.texts: list[str] = []  # what Copy link N copies
        self.languages: list[str] = []
        self._full: dict[_Key, _Lines] = {}
        self._last: dict[int, _Lexed] = {}  # by code block number
        self._document: QTextDocument | None = None
        self._style_name = LIGHT_STYLE
        self._timer: QTimer | None = None
        self._rendered: _Rendered | None = None

    def clear(self) -> None:
        self.texts = []
        self.languages = []
        self._rendered = None
        if self._timer is not None:
            self._timer.stop()

    def render(
        self, set_markdown: Callable[[str], None], document: QTextDocument, markdown: str, palette: QPalette
    ) -> None:
        """Render ``markdown`` with ``set_markdown`` (which fills ``document``), then highlight and link its code."""
        if self._extend(document, markdown, palette):
            return
        tagged, fences = tag_fences(markdown)
        set_markdown(tagged)
        if fences and _TAG in document.toPlainText():
            fences = []  # a tag that Qt did not read as an info string: read the Markdown as it is
            set_markdown(markdown)
        self.decorate(document, fences, palette)
        if fences and len(self.texts) == len(fences):
            self._rendered = _Rendered(document, markdown, fences[-1], _palette_key(palette))

    def _extend(self, document: QTextDocument, markdown: str, palette: QPalette) -> bool:
        """Add what a streamed reply added to its last, still open, code block straight to the document.

        That is what Qt would make of the whole reply again (the new text has no fence characters, tabs or
        line breaks other than newlines, and the block is at the top level), for the cost of the new text.
        """
        rendered = self._rendered
        if (
            rendered is None
            or rendered.document is not document
            or rendered.palette_key != _palette_key(palette)
            or rendered.fence.closed
            or not rendered.fence.top_level
            or not markdown.startswith(rendered.markdown)
        ):
            return False
        added = markdown[len(rendered.markdown) :]
        if not added or _PLAIN_CODE.fullmatch(added) is None:
            return False
        runs = _code_runs(document)
        if len(runs) != len(self.texts) or not runs:
            return False
        run = runs[-1]
        if run.blocks[-1] != document.lastBlock() or run.text != rendered.fence.shown:
            return False
        # The open block's text, as tag_fences() would find it: its lines; a final newline starts no line.
        content = rendered.fence.shown + ("\n" if rendered.markdown.endswith("\n") else "") + added
        shown = content[:-1] if content.endswith("\n") else content
        cursor = QTextCursor(run.blocks[0])
        char_format = cursor.charFormat()  # its first character's, for the new ones
        block_format = run.blocks[-1].blockFormat()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.beginEditBlock()
        try:
            for number, line in enumerate(shown[len(rendered.fence.shown) :].split("\n")):
                if number:
                    cursor.insertBlock(block_format, char_format)
                if line:
                    cursor.insertText(line, char_format)
            fence = Fence(rendered.fence.language, shown, closed=False, shown=shown, top_level=True)
            self.texts[-1] = fence.code
            self._highlight_all(document, full=False, only_last=True)
        finally:
            cursor.endEditBlock()
        self._rendered = _Rendered(document, markdown, fence, rendered.palette_key)
        return True

    def decorate(self, document: QTextDocument, fences: list[Fence], palette: QPalette) -> None:
        """Copy links and a tint for the code blocks Qt made of ``fences``, then their colours."""
        self.clear()
        runs = _code_runs(document)
        if not runs:
            return
        self._document = document
        dark = palette.color(QPalette.ColorRole.Text).lightness() >= 128
        self._style_name = DARK_STYLE if dark else LIGHT_STYLE
        cursor = QTextCursor(document)
        cursor.beginEditBlock()
        try:
            for run in runs:
                language = run.key[1]
                copied = run.text
                tag = _TAG_LANGUAGE.fullmatch(language)
                if tag is not None and int(tag[1]) < len(fences):
                    fence = fences[int(tag[1])]
                    language = fence.language
                    if _squash(copied) == _squash(fence.shown):
                        copied = fence.code
                    self._set_language(cursor, run, language)
                self.texts.append(copied)
                self.languages.append(language)
                self._tint(cursor, run, palette)
            for index in reversed(range(len(runs))):  # last first: an insertion moves what follows it
                self._insert_link(cursor, runs[index], index, palette)
            self._highlight_all(document, full=False)
        finally:
            cursor.endEditBlock()  # one layout for all of it

    def _highlight_all(self, document: QTextDocument, *, full: bool, only_last: bool = False) -> None:
        """Put each code block's colours on its lines' layouts.

        ``full``: lex each block in full (else a growing one may be lexed by its last lines); ``only_last``:
        the last block is the only one that changed, and its lines that kept their colours keep their layout.
        """
        runs = _code_runs(document)  # the blocks again: an insertion split each run's first block
        if len(runs) != len(self.languages):
            return
        guessed = False
        for index, (run, language) in enumerate(zip(runs, self.languages)):
            if only_last and index < len(runs) - 1:
                continue
            before = self._last.get(index)
            lines, exact = self._lines(index, (language, self._style_name, run.text), full=full)
            guessed = guessed or not exact
            if not (any(lines) or not exact or only_last):
                continue
            first = 0
            if only_last and before is not None:  # the lines a lex of the last lines left as they were
                while first < min(len(lines), len(before.lines)) and lines[first] is before.lines[first]:
                    first += 1
            for block, ranges in zip(run.blocks[first:], lines[first:]):
                block.layout().setFormats(ranges)
            if full or only_last:  # else decorate()'s edit block lays the runs out again anyway
                last = run.blocks[-1]
                start = run.blocks[min(first, len(run.blocks) - 1)].position()
                document.markContentsDirty(start, last.position() + last.length() - start)
        if guessed:
            self._refresh_later(document)

    def _lines(self, index: int, key: _Key, *, full: bool) -> tuple[_Lines, bool]:
        """The format ranges of each line of code block ``index``, and whether they come from a full lex."""
        lines = self._full.get(key)
        if lines is not None:
            return lines, True
        language, style_name, text = key
        _lexer(language)  # loaded, and its rules compiled, before the clock starts: that happens once
        now = time.perf_counter()
        last = self._last.get(index)
        if (
            not full
            and last is not None
            and last.key[:2] == key[:2]
            and last.full_seconds > self.QUICK_LEX_S
            and now - last.full_at < last.full_seconds / self.LEX_SHARE
        ):
            kept = last.key[2].rfind("\n") + 1  # the lines before the last one, which may have been cut short
            if text.startswith(last.key[2][:kept]):
                lines = last.lines[: last.key[2].count("\n")] + highlight_lines(text[kept:], language, style_name)
                self._last[index] = _Lexed(key, lines, last.full_at, last.full_seconds)
                return lines, False
        lines = highlight_lines(text, language, style_name)
        if len(self._full) >= _CACHE_SIZE:
            self._full.clear()
        self._full[key] = lines
        self._last[index] = _Lexed(key, lines, full_at=now, full_seconds=time.perf_counter() - now)
        return lines, True

    def _refresh_later(self, document: QTextDocument) -> None:
        if self._timer is None:
            self._timer = QTimer(document)  # goes with the document
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(self._refresh)
        longest = max((lexed.full_seconds for lexed in self._last.values()), default=0.0)
        self._timer.start(round(1000 * min(1.0, max(0.05, longest / self.LEX_SHARE))))

    def _refresh(self) -> None:
        """The full lex that the last render put off."""
        if self._document is not None:
            self._highlight_all(self._document, full=True)

    @staticmethod
    def _select(cursor: QTextCursor, run: _Run) -> None:
        last = run.blocks[-1]
        cursor.setPosition(run.blocks[0].position())
        cursor.setPosition(last.position() + last.length() - 1, QTextCursor.MoveMode.KeepAnchor)

    def _set_language(self, cursor: QTextCursor, run: _Run, language: str) -> None:
        """The fence's own language in place of its tag, so that the document reads as the reply."""
        block_format = QTextBlockFormat()
        block_format.setProperty(_CODE, language)
        self._select(cursor, run)
        cursor.mergeBlockFormat(block_format)

    def _tint(self, cursor: QTextCursor, run: _Run, palette: QPalette) -> None:
        """A faint background of the text colour, in light and dark alike."""
        tint = QColor(palette.color(QPalette.ColorRole.Text))
        tint.setAlpha(20)
        block_format = QTextBlockFormat()
        block_format.setBackground(tint)
        self._select(cursor, run)
        cursor.mergeBlockFormat(block_format)

    def _insert_link(self, cursor: QTextCursor, run: _Run, index: int, palette: QPalette) -> None:
        """A block above the run's first line: the language, if any, and the Copy link, at the right."""
        first = run.blocks[0]
        link_block = QTextBlockFormat(first.blockFormat())
        for code_property in (
            _CODE,
            _FENCE,
            QTextFormat.Property.BlockNonBreakableLines,
            QTextFormat.Property.BackgroundBrush,
        ):
            link_block.clearProperty(code_property)
        link_block.setAlignment(Qt.AlignmentFlag.AlignRight)
        link_block.setTopMargin(4)
        cursor.setPosition(first.position())
        cursor.insertBlock(first.blockFormat(), first.charFormat())  # the code moves down; an empty block stays
        cursor.movePosition(QTextCursor.MoveOperation.PreviousBlock)
        cursor.setBlockFormat(link_block)
        small = QTextCharFormat()
        small.setProperty(QTextFormat.Property.FontSizeAdjustment, -1)
        language = self.languages[index]
        if language:
            label = QTextCharFormat(small)
            label.setForeground(palette.color(QPalette.ColorRole.PlaceholderText))
            cursor.insertText(f"{language}  ", label)
        link = QTextCharFormat(small)
        link.setAnchor(True)
        link.setAnchorHref(copy_url(index).toString())
        link.setForeground(palette.color(QPalette.ColorRole.Link))
        link.setToolTip("Copy this code")
        cursor.insertText(COPY_LABEL, link)
