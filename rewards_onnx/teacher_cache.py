"""Teacher passes kept on disk, so that tuning again (the app re-tunes as feedback grows, a user re-runs
``prt tune`` after adding a few lines) passes only the examples it has not seen with this model.

One SQLite file. An entry's key is a hash of the model file's SHA-256, the support size K and the example
itself, so an edited example or another model never matches an old entry. Entries are written every few
examples, so a tune stopped during its teacher pass resumes where it stopped. The file holds nothing that
cannot be computed again: an unreadable file or entry is dropped, a failed write (a full disk) only ends
caching for this run, and the least recently used entries go when the file outgrows its bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sqlite3
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.runtime.base_model import BaseModel
from rewards_onnx.data import Demonstration, Example, PreferencePair
from rewards_onnx.teacher import Progress, SequenceTargets, TeacherData, evaluations, teacher_pass

ENTRY_FORMAT = 1  # part of every key: a change to what an entry holds makes old entries unreachable
DEFAULT_MAX_BYTES = 1 << 30  # about 30,000 distilled replies of 50 tokens at K = 40
WRITE_EVERY = 16  # examples passed between writes: what a stopped tune loses at most

Passed = SequenceTargets | tuple[SequenceTargets, SequenceTargets]  # a demonstration's, or a pair's


class TeacherCache:
    """The teacher passes of one model at one K; use as a context manager, or call ``close``."""

    def __init__(self, path: Path, *, model_sha256: str, k: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path, self.model_sha256, self.k, self.max_bytes = Path(path), model_sha256, k, max_bytes
        self.writable = True
        try:
            self._db = _open_database(self.path)
        except sqlite3.DatabaseError:  # not a database, or damaged: it only held what can be computed again
            self.path.unlink(missing_ok=True)
            try:
                self._db = _open_database(self.path)
            except sqlite3.Error:  # cannot be created here (a read-only folder): cache for this run only
                self._db = _open_database(":memory:")

    def __enter__(self) -> TeacherCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._prune()
        self._db.close()

    def teacher_pass(
        self, base: BaseModel, examples: Sequence[Example], *, progress: Progress | None = None
    ) -> TeacherData:
        """What ``rewards_onnx.teacher.teacher_pass`` returns, in the same order, passing only the examples
        this cache lacks; progress counts those passes only."""
        keys = [self._key(example) for example in examples]
        passed: dict[str, Passed] = {}
        for key, example in zip(keys, examples):
            item = self._get(key, example)
            if item is not None:
                passed[key] = item
        self._write("UPDATE passes SET used = ? WHERE key = ?", [(time.time(), key) for key in keys if key in passed])
        missing = [(key, example) for key, example in zip(keys, examples) if key not in passed]
        total, done = sum(evaluations(example) for _, example in missing), 0
        for start in range(0, len(missing), WRITE_EVERY):
            chunk = missing[start : start + WRITE_EVERY]
            fresh = teacher_pass(
                base, [example for _, example in chunk], k=self.k, progress=_counted_from(done, total, progress)
            )
            demonstrations, pairs = iter(fresh.demonstrations), iter(fresh.pairs)
            for key, example in chunk:
                passed[key] = next(demonstrations) if isinstance(example, Demonstration) else next(pairs)
                done += evaluations(example)
            self._put({key: passed[key] for key, _ in chunk})
        return _in_order([passed[key] for key in keys])

    def _key(self, example: Example) -> str:
        fields = [ENTRY_FORMAT, self.model_sha256, self.k, type(example).__name__, dataclasses.asdict(example)]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def _get(self, key: str, example: Example) -> Passed | None:
        """The entry of ``example``, or None if there is none or it is damaged (then pass the example again)."""
        row = self._db.execute("SELECT data FROM passes WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            item = _decode(row[0])
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile):
            return None
        # a demonstration's entry is one sequence, a pair's two: anything else is damaged
        return item if isinstance(item, tuple) == isinstance(example, PreferencePair) else None

    def _put(self, entries: dict[str, Passed]) -> None:
        now = time.time()
        self._write(
            "INSERT OR REPLACE INTO passes (key, data, used) VALUES (?, ?, ?)",
            [(key, _encode(item), now) for key, item in entries.items()],
        )

    def _write(self, statement: str, rows: list[tuple]) -> None:
        """A cache that cannot be written (a full disk, a read-only folder) stops caching; tuning goes on."""
        if not self.writable:
            return
        try:
            with self._db:
                self._db.executemany(statement, rows)
        except sqlite3.Error:
            self.writable = False

    def _prune(self) -> None:
        """Drop the least recently used entries beyond ``max_bytes``."""
        kept, stale = 0, []
        for key, size in self._db.execute("SELECT key, length(data) FROM passes ORDER BY used DESC"):
            kept += size
            if kept > self.max_bytes:
                stale.append((key,))
        if stale:
            self._write("DELETE FROM passes WHERE key = ?", stale)


def _open_database(path: Path | str) -> sqlite3.Connection:
    database = sqlite3.connect(path, timeout=30)
    try:
        database.execute("CREATE TABLE IF NOT EXISTS passes (key TEXT PRIMARY KEY, data BLOB NOT NULL, used REAL)")
    except sqlite3.Error:
        database.close()
        raise
    return database


def _counted_from(before: int, total: int, progress: Progress | None) -> Progress | None:
    """One chunk's progress, counted within the whole pass."""
    if progress is None:
        return None
    return lambda done, _: progress(before + done, total)


def _in_order(passed: Sequence[Passed]) -> TeacherData:
    """The passes as ``teacher_pass`` returns them: a demonstration's (one sequence) or a pair's (two), in order."""
    data = TeacherData([], [])
    for item in passed:
        if isinstance(item, tuple):
            data.pairs.append(item)
        else:
            data.demonstrations.append(item)
    return data


def _encode(item: Passed) -> bytes:
    sequences = item if isinstance(item, tuple) else (item,)
    arrays = {
        f"{index}.{field.name}": np.asarray(getattr(sequence, field.name))
        for index, sequence in enumerate(sequences)
        for field in dataclasses.fields(sequence)
        if getattr(sequence, field.name) is not None
    }
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)  # numbers only, as _decode reads them
    return buffer.getvalue()


def _decode(blob: bytes) -> Passed:
    with np.load(io.BytesIO(blob), allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    count = 1 + max(int(name.split(".")[0]) for name in arrays)
    sequences = [
        _sequence({name.split(".", 1)[1]: value for name, value in arrays.items() if name.startswith(f"{index}.")})
        for index in range(count)
    ]
    if count == 1:
        return sequences[0]
    if count == 2:
        return sequences[0], sequences[1]
    raise ValueError(f"an entry holds one sequence or two, not {count}")


def _sequence(fields: dict[str, np.ndarray]) -> SequenceTargets:
    return SequenceTargets(
        tokens=fields["tokens"],
        first_target=int(fields["first_target"]),
        candidate_ids=fields["candidate_ids"],
        base_logprobs=fields["base_logprobs"],
        target_index=fields["target_index"],
        teacher_logprobs=fields.get("teacher_logprobs"),
        teacher_temperature=float(fields["teacher_temperature"]),
    )
