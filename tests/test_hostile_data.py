"""Hostile and oversized training data: binary, non-UTF-8, malformed or huge lines, documents without blank
lines, examples longer than the context. Each is skipped and reported (where, why), or refused with one
DatasetError line when nothing usable is left; nothing else is ever raised and no job stops for one example."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import tempfile
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.app.chat import tune_command
from engine.app.models import teacher_cache_path
from engine.app.store import Store
from engine.runtime.reward_graph import random_reward_weights
from engine.runtime.rewards import RewardCard, RewardModel, card_path
from helpers import assert_one_line_error, prt
from rewards_onnx.data import (
    DOCUMENT_INSTRUCTION,
    DOCUMENT_MIN_CHARS,
    DOCUMENT_WINDOW_CHARS,
    MAX_LINE_BYTES,
    TEACHER_TEMPERATURES,
    Dataset,
    DatasetError,
    Demonstration,
    PreferencePair,
    Skipped,
    Source,
    load_jsonl,
    read_documents,
    read_feedback,
    read_jsonl,
)
from rewards_onnx.evaluate import evaluate_reward
from rewards_onnx.teacher import fitting, messages_for, response_sequence
from rewards_onnx.train import tune
from tiny_models import small_reward_shape, write_reward

PARSER_EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG_REPLY = "word " * 700  # about 700 tokens: more than the tests' 512-token context
TOO_LONG = "longer than the 512-token context"
SENTENCES = [
    "I walked to the harbour.",
    "The wind was cold!",
    "Did anyone notice?",
    "We kept going.",
    "Nobody said a word about it, and the boats rocked slowly in the grey water.",
]


def jsonl_file(folder: Path, lines: list[bytes]) -> Path:
    path = folder / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def good_line(prompt: str, response: str) -> bytes:
    return json.dumps({"prompt": prompt, "response": response}).encode()


def prose(characters: int, *, seed: int = 0) -> str:
    """Sentences without a single blank line, as people write notes."""
    rng, text = random.Random(seed), ""
    while len(text) < characters:
        text += rng.choice(SENTENCES) + " "
    return text.strip()


def window_texts(source: Source) -> list[str]:
    """Each window's text again: its prompt without the instruction, then its response."""
    return [e.prompt.removeprefix(DOCUMENT_INSTRUCTION) + " " + e.response for e in source.examples]


def without_whitespace(text: str) -> str:
    return "".join(text.split())


# -- JSONL: property tests -------------------------------------------------------------------------------
@PARSER_EXAMPLES
@given(st.binary(max_size=4096))
def test_random_bytes_are_skipped_or_refused_with_a_dataset_error_only(data):
    with tempfile.TemporaryDirectory() as folder:
        path = jsonl_file(Path(folder), [data])
        source = read_jsonl(path)
        assert all(skipped.where.startswith(f"{path}:") and skipped.reason for skipped in source.skipped)
        assert len(source.examples) + len(source.skipped) <= data.count(b"\n") + 1
        try:
            load_jsonl(path)
        except DatasetError as error:
            assert "\n" not in str(error)


good_texts = st.text(min_size=1, max_size=40).filter(str.strip)
good_records = st.one_of(
    st.builds(lambda p, r: {"prompt": p, "response": r}, good_texts, good_texts),
    st.builds(lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, good_texts, good_texts, good_texts),
)
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bad_lines = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"") + b"\xff"),  # never UTF-8
    st.text(max_size=60).map(lambda t: (t.replace("\n", " ") + " x").encode()),  # never JSON
    json_values.filter(lambda value: not isinstance(value, dict)).map(lambda v: json.dumps(v).encode()),
)


@PARSER_EXAMPLES
@given(st.lists(st.one_of(good_records.map(lambda r: ("good", r)), bad_lines.map(lambda b: ("bad", b))), max_size=25))
def test_every_good_line_survives_among_bad_ones_and_every_bad_one_is_skipped(lines):
    encoded = [json.dumps(item).encode() if kind == "good" else item for kind, item in lines]
    expected = [(number, record) for number, (kind, record) in enumerate(lines, start=1) if kind == "good"]
    with tempfile.TemporaryDirectory() as folder:
        path = jsonl_file(Path(folder), encoded)
        source = read_jsonl(path)
    assert source.places == [f"{path}:{number}" for number, _ in expected]
    assert [_fields(example) for example in source.examples] == [record for _, record in expected]
    bad = [number for number, (kind, _) in enumerate(lines, start=1) if kind == "bad"]
    assert [int(skipped.where.split(":")[1].split(",")[0]) for skipped in source.skipped] == bad


def _fields(example) -> dict:
    if isinstance(example, PreferencePair):
        return {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected}
    return {"prompt": example.prompt, "response": example.response}


@PARSER_EXAMPLES
@given(
    st.fixed_dictionaries(
        {"prompt": json_values | good_texts, "response": json_values | good_texts},
        optional={
            "system": json_values,
            "teacher_system": json_values | good_texts,
            "teacher_temperature": json_values,
            "chosen": json_values,
        },
    )
)
def test_wrong_types_nan_and_infinity_are_skipped_and_what_is_kept_is_well_formed(record):
    with tempfile.TemporaryDirectory() as folder:
        source = read_jsonl(jsonl_file(Path(folder), [json.dumps(record).encode()]))
    assert len(source.examples) + len(source.skipped) == 1
    for example in source.examples:
        assert isinstance(example.prompt, str) and example.prompt.strip() and example.response.strip()
        assert TEACHER_TEMPERATURES[0] <= example.teacher_temperature <= TEACHER_TEMPERATURES[1]
        assert example.system is None or (isinstance(example.system, str) and example.system.strip())


# -- JSONL: one hostile case each -------------------------------------------------------------------------
GOOD = good_line("Hi", "Hello.")


@pytest.mark.parametrize(
    "line, where, reason",
    [
        ("caf\xe9 au lait".encode("latin-1"), ":2, byte 4", "not UTF-8 text"),
        (b'{"prompt": "a\x00", "response": "b"}', ":2, byte 14", "has NUL bytes (a binary or UTF-16 file?)"),
        ('{"prompt": "hi", "response": "yo"}'.encode("utf-16-le"), ":2, byte 2", "has NUL bytes"),
        (b"[" * 100_000, ":2", "nested too deeply"),
        (b'{"prompt": "a", "response": ' * 50_000, ":2", "nested too deeply"),
        (
            b'{"prompt": "a", "response": "b", "teacher_system": "s", "teacher_temperature": NaN}',
            ":2",
            "'teacher_temperature' is not a number from 0.01 to 100",
        ),
        (
            b'{"prompt": "a", "response": "b", "teacher_system": "s", "teacher_temperature": Infinity}',
            ":2",
            "'teacher_temperature' is not a number from 0.01 to 100",
        ),
        (
            b'{"prompt": "a", "response": "b", "teacher_system": "s", "teacher_temperature": 5e-324}',
            ":2",
            "'teacher_temperature' is not a number from 0.01 to 100",
        ),
        (
            b'{"prompt": "a", "response": "b", "teacher_system": "s", "teacher_temperature": 1' + b"0" * 400 + b"}",
            ":2",
            "'teacher_temperature' is not a number from 0.01 to 100",
        ),
        (b'{"prompt": NaN, "response": "b"}', ":2", "'prompt' is empty or not a string"),
        (b'{"prompt": "a", "response": "\\ud800"}', ":2", "'response' is not valid Unicode (a lone surrogate)"),
        (b'{"prompt": "a", "response": "b", "count": ' + b"9" * 5000 + b"}", ":2", "has a number too long to read"),
        (b"NaN", ":2", "not a JSON object"),
        (b'{"prompt": "a", "response": "b", "' + b"k" * 500 + b'": 1}', ":2, fields 'kkkk", "has unknown fields"),
    ],
)
def test_one_hostile_line_among_good_ones_is_skipped_with_where_and_why(tmp_path, line, where, reason):
    path = jsonl_file(tmp_path, [GOOD, line, GOOD])
    source = read_jsonl(path)
    assert source.examples == [Demonstration("Hi", "Hello.")] * 2 and source.places == [f"{path}:1", f"{path}:3"]
    [skipped] = source.skipped
    assert skipped.where.startswith(f"{path}{where}") and skipped.reason.startswith(reason)
    assert len(str(skipped)) < len(str(path)) + 120  # a huge line never makes a huge message


@pytest.mark.parametrize("huge_line", [1, 2], ids=["first line", "second line"])
def test_a_line_longer_than_the_limit_is_skipped_without_being_held(tmp_path, huge_line):
    huge = b'{"prompt": "a", "response": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}'
    lines = [GOOD, GOOD]
    lines.insert(huge_line - 1, huge)
    source = read_jsonl(jsonl_file(tmp_path, lines))
    assert len(source.examples) == 2
    assert [(skipped.where, skipped.reason) for skipped in source.skipped] == [
        (f"{tmp_path / 'data.jsonl'}:{huge_line}", "longer than 4 MiB")
    ]
    assert source.places[-1].endswith(":3")  # the line count goes on after the huge line


def test_a_utf8_bom_and_windows_line_ends_are_read(tmp_path):
    path = tmp_path / "notepad.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + b"\r\n" + good_line("Hey", "Hi.") + b"\r\n")
    assert load_jsonl(path) == [Demonstration("Hi", "Hello."), Demonstration("Hey", "Hi.")]


def test_a_file_of_random_bytes_has_nothing_usable_and_says_so_in_one_line(tmp_path):
    path = tmp_path / "random.jsonl"
    path.write_bytes(random.Random(0).randbytes(1 << 16))
    data = Dataset([read_jsonl(path)])
    assert not data.examples and data.skipped
    assert set(data.skipped_by_reason()) <= {
        "not UTF-8 text",
        "has NUL bytes (a binary or UTF-16 file?)",
        "not valid JSON",
    }
    with pytest.raises(DatasetError) as error:
        data.require_examples()
    message = str(error.value)
    assert message.startswith("No usable examples (skipped") and str(path) in message and "\n" not in message


def test_a_binary_data_file_gives_one_error_line_from_prt_tune_and_prt_eval(tmp_path):
    path = tmp_path / "photo.jsonl"
    path.write_bytes(random.Random(1).randbytes(1 << 16))
    tuned = prt("tune", "--data", str(path), "--out", str(tmp_path / "r.onnx"))
    assert_one_line_error(tuned, "No usable examples (skipped")
    assert "not UTF-8 text" in tuned.stderr and str(path) in tuned.stderr
    evaluated = prt("eval", "--data", str(path), "--reward", str(tmp_path / "r.onnx"))
    assert_one_line_error(evaluated, "No usable examples (skipped")


# -- skipped examples: the record and its summaries -----------------------------------------------------
def test_skips_are_counted_by_reason_and_listed_with_where_they_are():
    source = Source(
        "data.jsonl",
        skipped=[
            Skipped("data.jsonl:2", "not valid JSON"),
            Skipped("data.jsonl:5", TOO_LONG),
            Skipped("data.jsonl:9", "not valid JSON"),
        ],
    )
    source.add(Demonstration("a", "b"), "data.jsonl:1")
    data = Dataset([source])
    assert data.skipped_by_reason() == {"not valid JSON": 2, TOO_LONG: 1}
    assert data.skipped_json()["count"] == 3 and data.skipped_json()["items"][1] == {
        "where": "data.jsonl:5",
        "reason": TOO_LONG,
    }
    assert data.skipped_summary(listed=1) == (
        f"skipped 3 of 4 examples: 2 not valid JSON (data.jsonl:2, ...); 1 {TOO_LONG} (data.jsonl:5)"
    )
    assert source.summary_line() == "data.jsonl: 1 examples, 3 skipped"
    assert source.to_json() == {"source": "data.jsonl", "examples": 1, "skipped": 3}


def test_feedback_that_cannot_become_an_example_is_skipped_not_fatal(tmp_path):
    with Store(tmp_path / "chats.db") as store:
        store.add_feedback("thumbs_down", prompt="Tell me a joke", rejected="No.")
        source = read_feedback(store, "chats.db")
        assert not source.examples
        assert [str(s) for s in source.skipped] == [
            "chats.db: thumbs down on 'Tell me a joke': thumbs down without a better reply to the same prompt"
        ]
        store.add_feedback("thumbs_up", prompt="Hi", chosen="Hello!")
        assert read_feedback(store, "chats.db").places == ["chats.db: thumbs up on 'Hi'"]


# -- documents ------------------------------------------------------------------------------------------
document_texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\x00\ufeff"), max_size=4000),
    st.lists(st.sampled_from(SENTENCES + [" ", "\n", "\n\n", "x" * 700, "\u3002", "voilà", "\t"]), max_size=400).map(
        "".join
    ),
)


@PARSER_EXAMPLES
@given(document_texts)
def test_every_non_whitespace_character_of_a_document_is_in_a_window_in_order(text):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "notes.txt").write_bytes(text.encode())
        [source] = read_documents(Path(folder))
    assert not source.skipped
    if len(text.strip()) < DOCUMENT_MIN_CHARS:
        assert source.examples == [] and source.characters == (len(text), 0)
        return
    windows = window_texts(source)
    assert without_whitespace("".join(windows)) == without_whitespace(text)  # all of it, once, in order
    assert all(
        len(e.prompt) - len(DOCUMENT_INSTRUCTION) + len(e.response) <= DOCUMENT_WINDOW_CHARS for e in source.examples
    )
    assert all(e.response.strip() for e in source.examples)
    assert source.characters[0] == len(text) and source.characters[1] >= len(without_whitespace(text))


def test_a_15_kb_file_without_blank_lines_gives_all_its_text_cut_at_sentence_ends(tmp_path):
    text = prose(15_000)
    (tmp_path / "journal.md").write_text(text)
    [source] = read_documents(tmp_path)
    read, used = source.characters
    assert read == len(text) and used >= 0.99 * read  # before: one 1200-character window, 8% of the text
    assert 12 <= len(source.examples) <= 15
    windows = window_texts(source)
    assert all(window.rstrip().endswith((".", "!", "?")) for window in windows)  # no sentence cut in two
    assert source.to_json() == {
        "source": str(tmp_path / "journal.md"),
        "examples": len(windows),
        "skipped": 0,
        "characters_read": read,
        "characters_used": used,
    }
    assert source.places[0] == f"{tmp_path / 'journal.md'}:1"


def test_text_without_sentence_ends_is_cut_between_words_and_text_without_spaces_anywhere(tmp_path):
    words = " ".join(f"word{i}" for i in range(1500))
    (tmp_path / "a.txt").write_text(words)
    (tmp_path / "b.txt").write_text("abcdefghij" * 500)
    spaced, solid = read_documents(tmp_path)
    assert all(set(window.split()) <= set(words.split()) for window in window_texts(spaced))  # no word cut
    assert without_whitespace("".join(window_texts(spaced))) == without_whitespace(words)
    assert without_whitespace("".join(window_texts(solid))) == "abcdefghij" * 500
    assert len(solid.examples) == 5


def test_a_document_that_is_not_text_is_skipped_and_the_others_used(tmp_path):
    (tmp_path / "good.md").write_text(prose(3000))
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me. ".encode("latin-1") * 100)
    (tmp_path / "utf16.txt").write_bytes(prose(1000).encode("utf-16"))
    (tmp_path / "short.txt").write_text("Too short.")
    good, latin1, short, utf16 = read_documents(tmp_path)
    assert len(good.examples) >= 3 and good.characters[1] >= 0.99 * len(prose(3000))
    assert [str(s) for s in latin1.skipped] == [f"{tmp_path / 'latin1.txt'}, byte 4: not UTF-8 text"]
    assert [s.reason for s in utf16.skipped] == ["not UTF-8 text"]  # its byte-order mark is no UTF-8
    assert short.examples == [] and short.characters == (10, 0)
    assert short.summary_line() == f"{tmp_path / 'short.txt'}: 0 windows from 0 of 10 characters"


# -- examples longer than the context, on a real tiny GGUF (n_ctx 512) ----------------------------------
def test_fitting_skips_what_does_not_fit_the_context_in_any_pass(tiny_base):
    data = Dataset.of(
        [
            Demonstration("Hi", "Hello."),
            Demonstration("Hi", LONG_REPLY),
            PreferencePair("Hi", "Fine.", LONG_REPLY),
            Demonstration("Hi", "Hello.", teacher_system=LONG_REPLY),  # too long only for its teacher
            Demonstration("Hey", "Hi there.", teacher_system="Be brief."),
        ]
    )
    fitted = fitting(tiny_base, data)
    assert fitted.examples == [data.examples[0], data.examples[4]]
    assert [str(s) for s in fitted.skipped] == [f"example {n}: {TOO_LONG}" for n in (2, 3, 4)]


def test_tune_refuses_in_one_line_when_too_few_examples_fit(tmp_path, tiny_base):
    with pytest.raises(DatasetError) as error:
        tune(tiny_base, [Demonstration("Hi", "Hello."), Demonstration("Hi", LONG_REPLY)], tmp_path / "r.onnx")
    assert str(error.value) == (
        f"Tuning needs at least 2 usable examples; skipped 1 of 2 examples: 1 {TOO_LONG} (example 2)."
    )
    assert not (tmp_path / "r.onnx").exists()


def test_eval_skips_a_long_example_and_evaluates_the_others(tmp_path, tiny_base):
    reward = write_reward(
        tmp_path / "r.onnx",
        random_reward_weights(small_reward_shape(tiny_base.n_vocab), seed=3),
        vocabulary_fingerprint=tiny_base.vocabulary_fingerprint,
        base_name=tiny_base.name,
    )
    examples = [Demonstration("Hi", "Hello there."), Demonstration("Hey", LONG_REPLY), Demonstration("Yo", "Hi!")]
    metrics, data = evaluate_reward(tiny_base, RewardModel(reward), examples)
    assert data.examples == [examples[0], examples[2]] and [str(s) for s in data.skipped] == [f"example 2: {TOO_LONG}"]
    targets = [response_sequence(tiny_base, messages_for(e.prompt, None), e.response) for e in data.examples]
    assert metrics.tokens == sum(len(tokens) - first for tokens, first in targets)  # the short replies' only
    with pytest.raises(DatasetError, match=f"No usable examples \\(skipped 1 of 1 examples: 1 {TOO_LONG}"):
        evaluate_reward(tiny_base, RewardModel(reward), examples[1:2])


def test_prt_tune_skips_a_long_and_a_bad_line_counts_them_and_trains_on_the_rest(tmp_path, tiny_gguf):
    prompts = [f"Question {i}: how was your day?" for i in range(6)]
    lines = [good_line(prompt, "Fine, thanks.") for prompt in prompts] + [
        good_line("Tell me all", LONG_REPLY),
        b"not json",
    ]
    data = jsonl_file(tmp_path, lines)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text(prose(2500))
    out = tmp_path / "r.onnx"
    tuned = prt(
        "tune",
        "--model",
        str(tiny_gguf),
        "--data",
        str(data),
        "--documents",
        str(tmp_path / "docs"),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--ctx",
        "512",
        "--json",
    )
    assert tuned.returncode == 0, tuned.stderr
    summary = json.loads(tuned.stdout)
    skipped = summary["skipped"]
    assert skipped["count"] == 2 and skipped["by_reason"] == {TOO_LONG: 1, "not valid JSON": 1}
    assert skipped["items"] == [
        {"where": f"{data}:8, column 1", "reason": "not valid JSON"},  # read, then fitted
        {"where": f"{data}:7", "reason": TOO_LONG},
    ]
    lines_source, notes = summary["sources"]
    assert lines_source == {"source": str(data), "examples": 6, "skipped": 2}
    assert notes["characters_read"] == len(prose(2500)) and notes["characters_used"] >= 0.99 * len(prose(2500))
    assert notes["examples"] >= 2 and notes["skipped"] == 0
    assert summary["train_examples"] + summary["held_out_examples"] == 6 + notes["examples"]
    [line] = tuned.stderr.strip().splitlines()
    assert line == (
        f"prt: skipped 2 of {8 + notes['examples']} examples: 1 not valid JSON ({data}:8, column 1); "
        f"1 {TOO_LONG} ({data}:7)"
    )
    card = RewardCard.load(card_path(out))
    assert card.training_data["skipped"] == 2 and card.training_data["skipped_by_reason"] == skipped["by_reason"]
    with sqlite3.connect(teacher_cache_path()) as cache:  # the skipped example was never passed nor cached
        assert cache.execute("SELECT COUNT(*) FROM passes").fetchone()[0] == 6 + notes["examples"]

    evaluated = prt(
        "eval", "--model", str(tiny_gguf), "--reward", str(out), "--data", str(data), "--ctx", "512", "--json"
    )
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["skipped"]["by_reason"] == {TOO_LONG: 1, "not valid JSON": 1} and result["tokens"] > 0


def test_the_tune_panel_says_how_many_examples_were_skipped_and_why(qtbot, tmp_path, tiny_gguf):
    from desktop.tune_panel import TunePanel

    data = jsonl_file(
        tmp_path,
        [good_line(f"Question {i}?", "Fine.") for i in range(4)] + [good_line("Tell me all", LONG_REPLY), b"\xff\xfe"],
    )
    with Store(tmp_path / "chats.db") as store:
        panel = TunePanel(
            SimpleNamespace(base=SimpleNamespace(path=tiny_gguf)),
            store,
            command_factory=lambda **kwargs: tune_command(**kwargs) + ["--ctx", "512", "--epochs", "1"],
        )
        qtbot.addWidget(panel)
        panel.add_data_files([data])
        panel.start()
        qtbot.waitUntil(lambda: not panel.running, timeout=240_000)
        text = panel.result_label.text()
        assert text.startswith("Saved my-style"), text
        assert f"2 examples skipped (1 {TOO_LONG}, 1 not UTF-8 text), e.g. {data}:6, byte 1." in text
        assert store.tuning_runs()[0].status == "done"
