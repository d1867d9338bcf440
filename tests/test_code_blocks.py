"""Code blocks in a rendered reply: pygments colours and a Copy link above each (desktop/code_blocks.py)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import math

import pytest
from PySide6.QtCore import QPoint, Qt, QUrl
from PySide6.QtGui import QColor, QDesktopServices, QGuiApplication, QPalette, QTextCursor

from desktop.chat_view import MessageBody
from desktop.code_blocks import COPY_SCHEME, CodeBlocks, char_format_at, tag_fences
from desktop.token_view import TokenInfo

pytestmark = pytest.mark.gui

PYTHON = "def add(first, second):\n\treturn first + second  # a tab, kept"
UNKNOWN = "\nfoo <bar> & baz\n  two spaces"  # a leading blank line, which Qt does not show
REPLY = f"Two blocks:\n\n```python\n{PYTHON}\n```\n\nand\n\n```zzz-no-such-language\n{UNKNOWN}\n```\n\nDone."


@pytest.fixture
def body(qtbot):
    def make(text: str, **kwargs) -> MessageBody:
        widget = MessageBody(text, **kwargs)
        qtbot.addWidget(widget)
        widget.resize(600, 400)
        return widget

    return make


def copy_links(widget: MessageBody) -> list[tuple[int, str]]:
    """(position, href) of each Copy link in the document."""
    links = []
    block = widget.document().begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            href = fragment.charFormat().anchorHref()
            if href.startswith(f"{COPY_SCHEME}:"):
                links.append((fragment.position(), href))
            fragments += 1
        block = block.next()
    return links


def position_of(widget: MessageBody, text: str) -> int:
    found = widget.document().find(text)
    assert not found.isNull(), text
    return found.selectionStart()


def drawn_format(widget: MessageBody, text: str) -> tuple[int, int, bool]:
    """Foreground (as RGBA, or 0 for none: the palette's), weight and italics of the first character of ``text``."""
    return format_at(widget, position_of(widget, text))


def format_at(widget: MessageBody, position: int) -> tuple[int, int, bool]:
    char_format = char_format_at(widget.document(), position)
    brush = char_format.foreground()
    color = brush.color().rgba() if brush.style() != Qt.BrushStyle.NoBrush else 0
    return color, char_format.fontWeight(), char_format.fontItalic()


def layout_formats(widget: MessageBody) -> list[tuple[str, list[tuple[int, int, int, int]]]]:
    """Each block's text and the highlighting on its layout."""
    blocks = []
    block = widget.document().begin()
    while block.isValid():
        ranges = [
            (r.start, r.length, r.format.foreground().color().rgba(), r.format.fontWeight())
            for r in block.layout().formats()
        ]
        blocks.append((block.text(), ranges))
        block = block.next()
    return blocks


def click(qtbot, widget: MessageBody, position: int) -> None:
    """A real mouse click on the character at ``position``."""
    widget.show()
    qtbot.waitExposed(widget)
    cursor = QTextCursor(widget.document())
    cursor.setPosition(position)
    rect = widget.cursorRect(cursor)
    point = QPoint(rect.left() + 3, rect.center().y())
    qtbot.mouseClick(widget.viewport(), Qt.MouseButton.LeftButton, pos=point)


def test_each_block_has_a_copy_link_that_copies_its_exact_code(qtbot, body):
    widget = body(REPLY)
    links = copy_links(widget)
    assert [href for _, href in links] == ["copy-code:0", "copy-code:1"]
    assert widget.code_texts == [PYTHON, UNKNOWN]  # the source's: a tab stays a tab, the blank first line stays
    clipboard = QGuiApplication.clipboard()
    widget.anchorClicked.emit(QUrl("copy-code:1"))
    assert clipboard.text() == UNKNOWN
    click(qtbot, widget, links[0][0] + 1)  # the mouse, on the first link
    assert clipboard.text() == PYTHON
    assert widget.text == REPLY  # what the message's own Copy button copies
    assert "prt-code-block" not in widget.document().toPlainText()
    assert "prt-code-block" not in widget.document().toMarkdown()


def test_python_is_highlighted_and_an_unknown_language_is_plain(body):
    widget = body(REPLY)
    keyword, name, comment = drawn_format(widget, "def"), drawn_format(widget, "add"), drawn_format(widget, "# a tab")
    assert keyword != name
    assert comment not in (keyword, name)
    start = position_of(widget, "def")
    python_formats = {format_at(widget, position) for position in range(start, start + len(PYTHON))}
    assert len(python_formats) > 1
    assert widget.document().find("foo <bar>").block().layout().formats() == []  # no lexer, no colours
    prose = widget.document().find("Two blocks").block()
    assert prose.layout().formats() == []


def test_a_dark_palette_gets_the_dark_style(body):
    widget = body(REPLY)
    light = drawn_format(widget, "def")
    palette = widget.palette()
    palette.setColor(QPalette.ColorRole.Window, QColor(30, 30, 30))
    palette.setColor(QPalette.ColorRole.Text, QColor(230, 230, 230))
    widget.setPalette(palette)
    dark = drawn_format(widget, "def")
    assert dark != light
    assert dark != drawn_format(widget, "add")
    assert widget.code_texts == [PYTHON, UNKNOWN]


def test_two_fences_in_a_row_are_two_blocks(body):
    widget = body("```sh\nls -la\n```\n```sh\necho hi\n```\n~~~\n~~~\n")  # the last one empty: Qt shows nothing
    assert widget.code_texts == ["ls -la", "echo hi"]
    assert len(copy_links(widget)) == 2


def test_a_fence_in_a_list_and_in_a_quote(body):
    widget = body(
        "1. Install:\n\n   ```bash\n   pip install x\n     --quiet\n   ```\n2. Run.\n\n> ```\n> quoted\n> ```\n"
    )
    assert widget.code_texts == ["pip install x\n  --quiet", "quoted"]


def test_a_line_that_only_looks_like_a_fence_is_left_alone(body):
    text = "Indented code:\n\n    ```python\n    not a fence\n"  # an indented code block, showing backticks
    widget = body(text)
    shown = widget.document().toPlainText()
    assert "prt-code-block" not in shown
    assert "```python" in shown
    assert widget.code_texts == ["```python\nnot a fence"]


def test_a_streaming_fence_renders_and_copies_what_has_come(body):
    widget = body("", tokens=[])
    pieces = ["Here:\n\n``", "`pyt", "hon\n", "def f(x", "):\n    return x", "\n``"]
    expected_copies = [[], [], [], ["def f(x"], ["def f(x):\n    return x"], ["def f(x):\n    return x"]]
    for piece, copies in zip(pieces, expected_copies):
        widget.append_tokens([TokenInfo(piece)])
        assert widget.code_texts == copies, piece
    assert "prt-code-block" not in widget.document().toPlainText()
    widget.anchorClicked.emit(QUrl("copy-code:0"))
    assert QGuiApplication.clipboard().text() == "def f(x):\n    return x"  # not the half-arrived closing fence
    widget.append_tokens([TokenInfo("`\n\nAfter.")])
    assert widget.code_texts == ["def f(x):\n    return x"]
    assert widget.document().toPlainText().endswith("After.")


def test_streaming_into_a_block_shows_what_rendering_it_whole_shows(qtbot, body, monkeypatch):
    """A streamed block is extended in place, not rendered again; the result must not differ."""
    monkeypatch.setattr(CodeBlocks, "QUICK_LEX_S", math.inf)  # each lex in full, however slow this machine is
    text = 'Code:\n\n```python\nclass A:\n    """Doc\n    string."""\n\n    def m(self):  # 😀 a\n        return [1, 2]\n```\n'
    streamed = body("")
    for start in range(0, len(text), 3):
        streamed.append_tokens([TokenInfo(text[start : start + 3])])
    whole = body(text)
    assert streamed.document().toPlainText() == whole.document().toPlainText()
    assert streamed.code_texts == whole.code_texts
    assert layout_formats(streamed) == layout_formats(whole)


def test_while_lexing_is_put_off_the_colours_catch_up(qtbot, body, monkeypatch):
    """Every lex after the first only of the last lines (as when lexing is slow): then one full lex."""
    monkeypatch.setattr(CodeBlocks, "QUICK_LEX_S", 0.0)
    monkeypatch.setattr(CodeBlocks, "LEX_SHARE", 1e-9)  # a full lex only once the text stops changing
    text = 'Code:\n\n```python\nx = 1\ns = """a\nb = 2\nc"""\ndef f():\n    pass\n'  # no closing fence: still streaming
    streamed = body("")
    for start in range(0, len(text), 4):
        streamed.append_tokens([TokenInfo(text[start : start + 4])])
    assert any(ranges for _, ranges in layout_formats(streamed))  # colours already, if some wrong for now
    monkeypatch.setattr(CodeBlocks, "QUICK_LEX_S", math.inf)
    whole = body(text)
    qtbot.waitUntil(lambda: layout_formats(streamed) == layout_formats(whole), timeout=5000)
    assert streamed.code_texts == whole.code_texts


def test_a_user_message_is_plain_text(body):
    widget = body(REPLY, markdown=False)
    assert widget.document().toPlainText() == REPLY
    assert widget.code_texts == []
    assert copy_links(widget) == []


def test_the_token_view_has_no_copy_links(body):
    tokens = [TokenInfo(piece, shift=0.1) for piece in ("```py\n", "x = 1\n", "```\n")]
    widget = body("".join(token.text for token in tokens), tokens=tokens, token_view=True)
    assert copy_links(widget) == [] and widget.code_texts == []
    widget.set_token_view(False)
    assert len(copy_links(widget)) == 1 and widget.code_texts == ["x = 1"]


def test_web_links_open_outside_and_others_do_nothing(qtbot, body, monkeypatch):
    opened: list[str] = []
    monkeypatch.setattr(QDesktopServices, "openUrl", lambda url: opened.append(url.toString()) or True)
    widget = body("See [the docs](https://example.com/docs) or [a file](notes.html).\n\n```\ncode\n```\n")
    click(qtbot, widget, position_of(widget, "the docs") + 1)
    assert opened == ["https://example.com/docs"]
    widget.anchorClicked.emit(QUrl("notes.html"))  # relative: it would replace the message with a file
    widget.anchorClicked.emit(QUrl("copy-code:0"))
    widget.anchorClicked.emit(QUrl("copy-code:7"))  # none such: nothing
    assert opened == ["https://example.com/docs"]
    assert widget.document().toPlainText().startswith("See the docs or a file.")
    assert QGuiApplication.clipboard().text() == "code"


def test_tag_fences_finds_fences_as_commonmark_does():
    tagged, fences = tag_fences("a\n```py title\nx\n````\n  ~~~\n  y\n   z\n")
    assert [(fence.language, fence.code, fence.closed) for fence in fences] == [("py", "x", True), ("", "y\n z", False)]
    assert tagged.splitlines()[1] == "```prt-code-block-0 py title"
    assert tag_fences("``` a`b\nnot code\n")[1] == []  # a backtick in a backtick fence's info: not a fence
