"""The app's local SQLite store: conversations, messages, feedback, installed rewards, tuning runs, settings.

One SQLite file (``chats.db`` in the app folder), reached through sqlite-utils. The schema
grows by numbered migrations: ``MIGRATIONS[i]`` upgrades schema ``i`` to ``i + 1``, each in
its own transaction, and ``PRAGMA user_version`` records where a file stands. Every write
is one committed transaction (WAL, synchronous=NORMAL): a crash or a kill keeps everything
written before it, including a streamed reply's partial text.

The desktop calls one Store from the GUI thread and from workers, so the store holds one
connection and an RLock that every public method takes; SQLite's busy timeout covers
other processes (the CLI) using the same file. Timestamps are ISO-8601 UTC.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, cast, get_args

import sqlite_utils
from sqlite_utils.db import NotFoundError

from engine.app.paths import AppPaths
from engine.runtime.errors import StoreError
from engine.runtime.files import write_atomically
from engine.runtime.user_json import parse_user_json

BUSY_TIMEOUT_S = 10.0
ROLES = ("user", "assistant")
MessageStatus = Literal["complete", "streaming", "stopped", "error"]
MESSAGE_STATUSES: tuple[MessageStatus, ...] = get_args(MessageStatus)
RUN_STATUSES = ("running", "done", "failed", "cancelled")
FEEDBACK_TEXTS = {  # the reply texts each kind of feedback needs, besides the prompt
    "thumbs_up": ("chosen",),
    "thumbs_down": ("rejected",),
    "pick": ("chosen", "rejected"),
    "edit": ("chosen", "rejected"),
}
EXPORT_FORMAT = "prt-chat-export"
EXPORT_VERSION = 1
_TABLES = ("feedback", "messages", "conversations", "rewards", "tuning_runs", "settings")


@dataclass(frozen=True)
class Conversation:
    id: int
    uid: str  # stable across export/import
    title: str
    system_prompt: str
    model_name: str
    created: str
    updated: str


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    position: int  # 0, 1, 2, ... within the conversation
    role: str  # "user" | "assistant"
    content: str
    status: MessageStatus
    stats: dict  # e.g. {"tokens", "tokens_per_second", "finish_reason", "rewards": [names]}
    created: str
    updated: str


@dataclass(frozen=True)
class Feedback:
    id: int
    conversation_id: int | None  # None once the conversation is deleted: the texts stay as training data
    message_id: int | None
    kind: str  # "thumbs_up" | "thumbs_down" | "pick" | "edit"
    prompt: str
    system: str
    chosen: str | None
    rejected: str | None
    created: str


@dataclass(frozen=True)
class RewardEntry:
    path: str  # absolute path of the reward's ONNX file
    name: str
    enabled: bool
    weight: float
    added: str


@dataclass(frozen=True)
class TuningRun:
    id: int
    started: str
    finished: str | None
    status: str  # "running" | "done" | "failed" | "cancelled"
    sources: dict
    reward_path: str | None
    metrics: dict
    error: str | None


def create_first_schema(db: sqlite_utils.Database) -> None:
    """Schema 1: the core tables."""
    db.executescript("""
        CREATE TABLE conversations (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,
            title TEXT NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            model_name TEXT NOT NULL DEFAULT '',
            created TEXT NOT NULL,
            updated TEXT NOT NULL
        );
        CREATE INDEX conversations_by_updated ON conversations (updated);
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            status TEXT NOT NULL,
            stats TEXT NOT NULL DEFAULT '{}',
            created TEXT NOT NULL,
            updated TEXT NOT NULL,
            UNIQUE (conversation_id, position)
        );
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            conversation_id INTEGER REFERENCES conversations (id) ON DELETE SET NULL,
            message_id INTEGER REFERENCES messages (id) ON DELETE SET NULL,
            kind TEXT NOT NULL,
            prompt TEXT NOT NULL,
            system TEXT NOT NULL DEFAULT '',
            chosen TEXT,
            rejected TEXT,
            created TEXT NOT NULL
        );
        CREATE INDEX feedback_by_conversation ON feedback (conversation_id);
        CREATE INDEX feedback_by_message ON feedback (message_id);
        CREATE TABLE rewards (
            path TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 1,
            weight REAL NOT NULL DEFAULT 1.0,
            added TEXT NOT NULL
        );
        CREATE TABLE tuning_runs (
            id INTEGER PRIMARY KEY,
            started TEXT NOT NULL,
            finished TEXT,
            status TEXT NOT NULL,
            sources TEXT NOT NULL DEFAULT '{}',
            reward_path TEXT,
            metrics TEXT NOT NULL DEFAULT '{}',
            error TEXT
        );
    """)


def add_search_and_settings(db: sqlite_utils.Database) -> None:
    """Schema 2: full-text search over titles and message texts (FTS5, kept current by triggers); settings."""
    db.table("conversations").enable_fts(["title"], create_triggers=True)
    db.table("messages").enable_fts(["content"], create_triggers=True)
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [create_first_schema, add_search_and_settings]
SCHEMA_VERSION = len(MIGRATIONS)

_SEARCH_SQL = """
    SELECT * FROM conversations
    WHERE id IN (SELECT rowid FROM conversations_fts WHERE conversations_fts MATCH :query)
       OR id IN (SELECT conversation_id FROM messages
                 WHERE id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH :query))
    ORDER BY updated DESC, id DESC
"""
_EXPORT_FEEDBACK_SQL = """
    SELECT f.kind, f.prompt, f.system, f.chosen, f.rejected, f.created,
           c.uid AS conversation_uid, m.position AS message_position
    FROM feedback f
    LEFT JOIN conversations c ON c.id = f.conversation_id
    LEFT JOIN messages m ON m.id = f.message_id
    ORDER BY f.id
"""
_SAME_FEEDBACK_SQL = """
    SELECT 1 FROM feedback WHERE kind = :kind AND prompt = :prompt AND system = :system AND chosen IS :chosen
                             AND rejected IS :rejected AND created = :created
"""
_LOCATE_SQL = """
    SELECT c.id, m.id FROM conversations c
    LEFT JOIN messages m ON m.conversation_id = c.id AND m.position = ?
    WHERE c.uid = ?
"""


def default_store_path() -> Path:
    """The default data folder's store (AppPaths.store); the app passes its own AppPaths instead."""
    return AppPaths.resolve().store


def _synchronized(method):
    """Hold the store's lock for the whole call (one connection, shared by the GUI thread and workers), and turn
    what a damaged, locked or full database raises into a StoreError."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            try:
                return method(self, *args, **kwargs)
            except Exception as error:
                if not _is_database_failure(error):
                    raise
                raise StoreError(
                    f"The chat database {self.path} failed ({error}); close other programs using it "
                    "and free disk space, or, if it is damaged, move it aside and restart."
                ) from error

    return locked


def _is_database_failure(error: Exception) -> bool:
    """Whether the file or its disk is at fault: damaged pages, text that is not UTF-8, a damaged JSON column,
    a lock held elsewhere, a full disk. Constraint and API misuse errors stay bugs."""
    return (
        isinstance(error, (sqlite3.OperationalError, sqlite3.DataError, UnicodeDecodeError, _DamagedColumn))
        or type(error) is sqlite3.DatabaseError
    )  # "database disk image is malformed"


class _DamagedColumn(Exception):
    """A JSON column that does not decode: the database file was changed outside the app."""


def _stored_json(text: Any) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError) as error:
        raise _DamagedColumn(f"a stored JSON value does not decode: {error}") from None


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._last_stamp = datetime.min.replace(tzinfo=timezone.utc)
        self._conn = self._connect()
        try:
            self._db = sqlite_utils.Database(self._conn, execute_plugins=False)
            self._db.enable_wal()
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.OperationalError as error:  # locked by another program, read-only, disk full
            self._conn.close()
            raise StoreError(
                f"Cannot open the chat database {self.path} ({error}); close other programs using it, "
                "or choose another data folder."
            ) from error
        except (sqlite3.DatabaseError, UnicodeDecodeError) as error:
            self._conn.close()
            raise StoreError(_not_a_chat_database(self.path)) from error
        except StoreError:
            self._conn.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: no implicit transactions; every write goes through _transaction()
            return sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreError(
                f"Cannot open the chat database {self.path} ({error}); "
                "check that its folder is writable, or choose another data folder."
            ) from error

    def _migrate(self) -> None:
        while True:
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} was written by a newer version of the app (schema {version}; "
                        f"this one knows up to {SCHEMA_VERSION}); update the app."
                    )
                if version < 0 or (version == 0 and self._db.table_names()):
                    raise StoreError(_not_a_chat_database(self.path))
                if version == SCHEMA_VERSION:
                    return
                MIGRATIONS[version](self._db)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[None]:
        """One committed transaction; IMMEDIATE takes the write lock up front, so other processes wait, not fail."""
        with self._lock:
            self._conn.execute(begin)
            try:
                yield
                self._conn.execute("COMMIT")
            except BaseException as error:
                self._db.rollback()
                if _is_disk_full(error):
                    raise StoreError(
                        f"The disk is full: the chat database {self.path} could not save the last "
                        "change (everything saved before is kept); free some space, then try "
                        "again."
                    ) from error
                raise

    def _now(self) -> str:
        """UTC now, strictly later than this store's previous stamp: 'most recently updated' never ties."""
        stamp = max(datetime.now(timezone.utc), self._last_stamp + timedelta(microseconds=1))
        self._last_stamp = stamp
        return stamp.isoformat(timespec="microseconds")

    @_synchronized
    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # conversations, most recently updated first

    @_synchronized
    def create_conversation(self, title: str = "New chat", system_prompt: str = "", model_name: str = "") -> int:
        now = self._now()
        with self._transaction():
            return _new_row_id(
                self._db.table("conversations").insert(
                    {
                        "uid": uuid.uuid4().hex,
                        "title": title,
                        "system_prompt": system_prompt,
                        "model_name": model_name,
                        "created": now,
                        "updated": now,
                    }
                )
            )

    @_synchronized
    def conversation(self, conversation_id: int) -> Conversation:
        return _record(Conversation, self._get("conversations", conversation_id))

    @_synchronized
    def conversations(self, search: str = "") -> list[Conversation]:
        """All, or those whose title or one of whose messages holds every word of search (as word prefixes)."""
        rows: Iterable[dict[str, Any]]
        if not search.strip():
            rows = self._db.table("conversations").rows_where(order_by="updated DESC, id DESC")
        else:
            query = _fts_query(search)
            rows = self._db.query(_SEARCH_SQL, {"query": query}) if query else []
        return [_record(Conversation, row) for row in rows]

    @_synchronized
    def rename_conversation(self, conversation_id: int, title: str) -> None:
        self._update("conversations", conversation_id, {"title": title})

    @_synchronized
    def set_system_prompt(self, conversation_id: int, text: str) -> None:
        self._update("conversations", conversation_id, {"system_prompt": text})

    @_synchronized
    def set_model_name(self, conversation_id: int, model_name: str) -> None:
        self._update("conversations", conversation_id, {"model_name": model_name})

    @_synchronized
    def delete_conversation(self, conversation_id: int) -> None:
        """Its messages go with it; its feedback stays (training data) with the links set to NULL."""
        with self._transaction():
            self._db.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])

    # messages, ordered by position

    @_synchronized
    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        status: MessageStatus = "complete",
        stats: dict | None = None,
    ) -> int:
        _check_choice("role", role, ROLES)
        _check_choice("status", status, MESSAGE_STATUSES)
        now = self._now()
        with self._transaction():
            self._get("conversations", conversation_id)  # a clear error if it was deleted meanwhile
            position = self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", [conversation_id]
            ).fetchone()[0]
            message_id = self._insert_message(
                conversation_id,
                {
                    "position": position,
                    "role": role,
                    "content": content,
                    "status": status,
                    "stats": stats or {},
                    "created": now,
                    "updated": now,
                },
            )
            self._touch(conversation_id, now)
            return message_id

    def _insert_message(self, conversation_id: int, message: dict) -> int:
        columns = ("position", "role", "content", "status", "created", "updated")
        return _new_row_id(
            self._db.table("messages").insert(
                {
                    "conversation_id": conversation_id,
                    **{k: message[k] for k in columns},
                    "stats": _json(message["stats"], "stats"),
                }
            )
        )

    def _touch(self, conversation_id: int, now: str) -> None:
        self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", [now, conversation_id])

    @_synchronized
    def update_message(
        self,
        message_id: int,
        *,
        content: str | None = None,
        status: MessageStatus | None = None,
        stats: dict | None = None,
    ) -> None:
        """Change what is given; committed at once, so a streamed reply keeps its text through a crash."""
        if status is not None:
            _check_choice("status", status, MESSAGE_STATUSES)
        values = {"content": content, "status": status, "stats": None if stats is None else _json(stats, "stats")}
        values = {name: value for name, value in values.items() if value is not None}
        if values:
            self._update("messages", message_id, {**values, "updated": self._now()})

    @_synchronized
    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._db.table("messages").rows_where("conversation_id = ?", [conversation_id], order_by="position")
        return [_message(row) for row in rows]

    @_synchronized
    def message(self, message_id: int) -> Message:
        return _message(self._get("messages", message_id))

    @_synchronized
    def delete_messages_from(self, conversation_id: int, position: int) -> None:
        """Delete the messages at position and after (an edited or regenerated turn replaces them)."""
        with self._transaction():
            self._db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND position >= ?", [conversation_id, position]
            )
            self._touch(conversation_id, self._now())

    # feedback: the user's judgements, kept as training data

    @_synchronized
    def add_feedback(
        self,
        kind: str,
        *,
        prompt: str,
        system: str = "",
        chosen: str | None = None,
        rejected: str | None = None,
        conversation_id: int | None = None,
        message_id: int | None = None,
    ) -> int:
        problem = _feedback_problem(kind, prompt, chosen, rejected)
        if problem:
            raise StoreError(problem)
        now = self._now()
        with self._transaction():
            return _new_row_id(
                self._db.table("feedback").insert(
                    {
                        "conversation_id": conversation_id,
                        "message_id": message_id,
                        "kind": kind,
                        "prompt": prompt,
                        "system": system,
                        "chosen": chosen,
                        "rejected": rejected,
                        "created": now,
                    }
                )
            )

    @_synchronized
    def save_style_profile(
        self, profile: dict, *, picks: Sequence[tuple[str, str, str]], dials: Mapping[Path | str, tuple[str, float]]
    ) -> None:
        """All or nothing: the profile (setting 'style_profile'), each (prompt, chosen, rejected) pick as 'pick'
        feedback, and each base reward installed with its dial set to the profile's weight (off at 0)."""
        problems = [
            problem
            for prompt, chosen, rejected in picks
            if (problem := _feedback_problem("pick", prompt, chosen, rejected))
        ]
        if problems:
            raise StoreError(problems[0])
        if not all(math.isfinite(weight) for _name, weight in dials.values()):
            raise ValueError(f"dial weights must be finite numbers, got {dict(dials)!r}")
        now = self._now()
        with self._transaction():
            self._db.table("settings").upsert(
                {"key": "style_profile", "value": _json(profile, "style_profile")}, pk="key"
            )
            self._db.table("feedback").insert_all(
                {"kind": "pick", "prompt": prompt, "chosen": chosen, "rejected": rejected, "created": now}
                for prompt, chosen, rejected in picks
            )
            for path, (name, weight) in dials.items():
                self._db.execute(
                    "INSERT INTO rewards (path, name, enabled, weight, added) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (path) DO UPDATE SET name = excluded.name, enabled = excluded.enabled, "
                    "weight = excluded.weight",
                    [os.path.abspath(path), name, weight != 0, weight, now],
                )

    @_synchronized
    def remove_feedback(self, feedback_id: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM feedback WHERE id = ?", [feedback_id])

    @_synchronized
    def feedback(self, *, message_id: int | None = None) -> list[Feedback]:
        """Oldest first; all of it, or what was given on one message."""
        where, args = ("message_id = ?", [message_id]) if message_id is not None else (None, None)
        return [_record(Feedback, row) for row in self._db.table("feedback").rows_where(where, args, order_by="id")]

    @_synchronized
    def feedback_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(FEEDBACK_TEXTS, 0)
        counts.update(self._db.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall())
        return counts

    # rewards the user installed, with their dial state; keyed by absolute path

    @_synchronized
    def add_reward(self, path: Path | str, name: str) -> None:
        """Install a reward (enabled, weight 1), or rename one already installed keeping its dial state."""
        with self._transaction():
            self._db.execute(
                "INSERT INTO rewards (path, name, added) VALUES (?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET name = excluded.name",
                [os.path.abspath(path), name, self._now()],
            )

    @_synchronized
    def rewards(self) -> list[RewardEntry]:
        rows = self._db.table("rewards").rows_where(order_by="added, path")
        return [_record(RewardEntry, row, enabled=bool(row["enabled"])) for row in rows]

    @_synchronized
    def set_reward_state(self, path: Path | str, *, enabled: bool | None = None, weight: float | None = None) -> None:
        if weight is not None and not math.isfinite(weight):
            raise ValueError(f"weight must be a finite number, got {weight!r}")
        values = {"enabled": enabled, "weight": weight}
        self._update("rewards", os.path.abspath(path), {k: v for k, v in values.items() if v is not None})

    @_synchronized
    def remove_reward(self, path: Path | str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM rewards WHERE path = ?", [os.path.abspath(path)])

    # tuning runs, newest first

    @_synchronized
    def start_tuning_run(self, sources: dict) -> int:
        with self._transaction():
            return _new_row_id(
                self._db.table("tuning_runs").insert(
                    {"started": self._now(), "status": "running", "sources": _json(sources, "sources")}
                )
            )

    @_synchronized
    def finish_tuning_run(
        self,
        run_id: int,
        *,
        status: str,
        reward_path: Path | str | None = None,
        metrics: dict | None = None,
        error: str | None = None,
    ) -> None:
        _check_choice("status", status, RUN_STATUSES[1:])
        self._update(
            "tuning_runs",
            run_id,
            {
                "finished": self._now(),
                "status": status,
                "reward_path": None if reward_path is None else str(reward_path),
                "metrics": _json(metrics or {}, "metrics"),
                "error": error,
            },
        )

    @_synchronized
    def tuning_runs(self) -> list[TuningRun]:
        rows = self._db.table("tuning_runs").rows_where(order_by="id DESC")
        return [
            _record(TuningRun, row, sources=_stored_json(row["sources"]), metrics=_stored_json(row["metrics"]))
            for row in rows
        ]

    # settings: any JSON value under a key

    @_synchronized
    def setting(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return default if row is None else _stored_json(row[0])

    @_synchronized
    def set_setting(self, key: str, value: Any) -> None:
        with self._transaction():
            self._db.table("settings").upsert({"key": key, "value": _json(value, key)}, pk="key")

    # the whole store

    @_synchronized
    def export_json(self, path: Path | str) -> dict[str, int]:
        """Write every conversation with its messages, and all feedback, to one JSON file (atomically)."""
        with self._transaction("BEGIN"):  # one snapshot, even if another process writes meanwhile
            data: dict[str, Any] = {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "exported": self._now(),
                "conversations": self._exported_conversations(),
                "feedback": list(self._db.query(_EXPORT_FEEDBACK_SQL)),
            }
        try:
            write_atomically(Path(path), json.dumps(data, ensure_ascii=False, indent=1))
        except OSError as error:
            raise StoreError(f"Cannot write {path} ({error.strerror}); choose another location.") from error
        return {
            "conversations": len(data["conversations"]),
            "messages": sum(len(c["messages"]) for c in data["conversations"]),
            "feedback": len(data["feedback"]),
        }

    def _exported_conversations(self) -> list[dict]:
        columns = ("uid", "title", "system_prompt", "model_name", "created", "updated")
        conversations = {
            row["id"]: {**{k: row[k] for k in columns}, "messages": []}
            for row in self._db.table("conversations").rows_where(order_by="id")
        }
        for row in self._db.table("messages").rows_where(order_by="conversation_id, position"):
            message = {k: row[k] for k in ("position", "role", "content", "status", "created", "updated")}
            conversations[row["conversation_id"]]["messages"].append({**message, "stats": _stored_json(row["stats"])})
        return list(conversations.values())

    @_synchronized
    def import_json(self, path: Path | str) -> dict[str, int]:
        """Add an export's conversations (by uid: ones already here are skipped) and new feedback, all or nothing.

        Returns {"conversations": added, "messages": added, "skipped": conversations already here,
        "feedback": added}.
        """
        data = _read_export(Path(path))
        added = {"conversations": 0, "messages": 0, "skipped": 0, "feedback": 0}
        try:
            with self._transaction():
                for record in data["conversations"]:
                    self._import_conversation(record, added)
                for record in data["feedback"]:
                    self._import_feedback(record, added)
        except sqlite3.IntegrityError as error:  # e.g. two messages at one position
            raise _bad_export(path, error) from error
        return added

    def _import_conversation(self, record: dict, added: dict[str, int]) -> None:
        if self._db.execute("SELECT 1 FROM conversations WHERE uid = ?", [record["uid"]]).fetchone():
            added["skipped"] += 1
            return
        columns = ("uid", "title", "system_prompt", "model_name", "created", "updated")
        conversation_id = _new_row_id(self._db.table("conversations").insert({k: record[k] for k in columns}))
        for message in record["messages"]:
            self._insert_message(conversation_id, message)
        added["conversations"] += 1
        added["messages"] += len(record["messages"])

    def _import_feedback(self, record: dict, added: dict[str, int]) -> None:
        texts = {k: record[k] for k in ("kind", "prompt", "system", "chosen", "rejected", "created")}
        if self._db.execute(_SAME_FEEDBACK_SQL, texts).fetchone():
            return
        located = self._db.execute(_LOCATE_SQL, [record["message_position"], record["conversation_uid"]]).fetchone()
        conversation_id, message_id = located or (None, None)
        self._db.table("feedback").insert({**texts, "conversation_id": conversation_id, "message_id": message_id})
        added["feedback"] += 1

    @_synchronized
    def delete_all(self) -> None:
        """Delete every row of every table, then compact the file so the deleted text does not linger on disk."""
        with self._transaction():
            for table in _TABLES:
                self._db.execute(f"DELETE FROM {table}")
            for index in ("conversations_fts", "messages_fts"):
                self._db.execute(f"INSERT INTO {index} ({index}) VALUES ('delete-all')")
        self._db.vacuum()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # helpers shared by the methods above

    def _get(self, table: str, key: Any) -> dict:
        try:
            return self._db.table(table).get(key)
        except NotFoundError:
            raise _missing(table, key) from None

    def _update(self, table: str, key: Any, values: dict) -> None:
        with self._transaction():
            try:
                self._db.table(table).update(key, values)
            except NotFoundError:
                raise _missing(table, key) from None


def _record(cls, row: dict, **decoded):
    """A dataclass from a row: its own fields taken from the row, JSON or boolean columns passed decoded."""
    return cls(**{f.name: row[f.name] for f in fields(cls)} | decoded)


def _message(row: dict) -> Message:
    return _record(Message, row, stats=_stored_json(row["stats"]))


def _json(value: Any, name: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be JSON-serializable: {error}") from error


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _feedback_problem(kind: Any, prompt: Any, chosen: Any, rejected: Any) -> str | None:
    """What is wrong with a piece of feedback, or None."""
    if kind not in FEEDBACK_TEXTS:
        return f"Feedback kind must be one of {', '.join(FEEDBACK_TEXTS)}; got {kind!r}."
    texts = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    needed = ("prompt",) + FEEDBACK_TEXTS[kind]
    missing = [name for name in needed if not (isinstance(texts[name], str) and texts[name].strip())]
    if missing:
        return (
            f"Cannot record '{kind}' feedback: the {' and '.join(missing)} text is empty; wait for a reply with text."
        )
    extra = [name for name in ("chosen", "rejected") if name not in needed and texts[name] is not None]
    if extra:
        return f"'{kind}' feedback takes no {' or '.join(extra)} text."
    return None


def _new_row_id(table: sqlite_utils.db.Table) -> int:
    """The id of the row ``table.insert`` just wrote (sqlite-utils types it as optional; after an insert it is set)."""
    return cast(int, table.last_pk)


def _fts_query(text: str) -> str:
    """Each word of the user's text as a quoted prefix phrase, so quotes and FTS5 operators in it mean nothing."""
    words = [word for word in text.split() if re.search(r"[^\W_]", word)]  # skip words with no letter or digit
    return " ".join('"' + word.replace('"', '""') + '"*' for word in words)


def _is_disk_full(error: BaseException) -> bool:
    """SQLite's SQLITE_FULL ("database or disk is full": it could not grow the file or its journal)."""
    return isinstance(error, sqlite3.OperationalError) and "database or disk is full" in str(error)


def _missing(table: str, key: Any) -> StoreError:
    noun = {
        "conversations": "conversation",
        "messages": "message",
        "rewards": "installed reward",
        "tuning_runs": "tuning run",
    }[table]
    return StoreError(f"There is no {noun} {key} (it may have been deleted); reload and try again.")


def _not_a_chat_database(path: Path) -> str:
    return (
        f"{path} is not a chat database (or it is damaged); move it aside and restart, or choose another data folder."
    )


# what an export file holds: field -> JSON type(s)
_NULL = type(None)
_CONVERSATION_FIELDS = {
    "uid": str,
    "title": str,
    "system_prompt": str,
    "model_name": str,
    "created": str,
    "updated": str,
    "messages": list,
}
_MESSAGE_FIELDS = {
    "position": int,
    "role": str,
    "content": str,
    "status": str,
    "stats": dict,
    "created": str,
    "updated": str,
}
_FEEDBACK_FIELDS = {
    "kind": str,
    "prompt": str,
    "system": str,
    "chosen": (str, _NULL),
    "rejected": (str, _NULL),
    "created": str,
    "conversation_uid": (str, _NULL),
    "message_position": (int, _NULL),
}
_JSON_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", _NULL: "null"}
_MAX_INTEGER = 2**63 - 1  # SQLite's


def _read_export(path: Path) -> dict:
    try:
        data = parse_user_json(path.read_bytes())
    except OSError as error:
        raise StoreError(f"Cannot read {path} ({error.strerror}); check the file and try again.") from error
    except ValueError as error:  # not UTF-8, not JSON, too deep
        raise _bad_export(path, error) from error
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise _bad_export(path, f'no "format": "{EXPORT_FORMAT}" at the top')
    if isinstance(data.get("version"), int) and data["version"] > EXPORT_VERSION:
        raise StoreError(f"{path} was exported by a newer version of the app; update the app to import it.")
    try:
        _check_export(data)
    except ValueError as problem:
        raise _bad_export(path, problem) from None
    return data


def _check_export(data: dict) -> None:
    _check_fields(data, {"version": int, "conversations": list, "feedback": list}, "the file")
    if data["version"] != EXPORT_VERSION:
        raise ValueError(f"version {data['version']} is not one this app wrote")
    first_with_uid: dict[str, int] = {}
    for i, conversation in enumerate(data["conversations"]):
        _check_fields(conversation, _CONVERSATION_FIELDS, f"conversations[{i}]")
        first = first_with_uid.setdefault(conversation["uid"], i)
        if first != i:
            raise ValueError(f"conversations[{i}] has the uid of conversations[{first}]")
        for j, message in enumerate(conversation["messages"]):
            where = f"conversations[{i}].messages[{j}]"
            _check_fields(message, _MESSAGE_FIELDS, where)
            _check_choice(f"{where}.role", message["role"], ROLES)
            _check_choice(f"{where}.status", message["status"], MESSAGE_STATUSES)
    for i, feedback in enumerate(data["feedback"]):
        _check_fields(feedback, _FEEDBACK_FIELDS, f"feedback[{i}]")
        problem = _feedback_problem(feedback["kind"], feedback["prompt"], feedback["chosen"], feedback["rejected"])
        if problem:
            raise ValueError(f"feedback[{i}]: {problem}")


def _check_fields(record: Any, expected: dict, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not an object")
    for name, types in expected.items():
        value = record.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(_JSON_NAMES[t] for t in (types if isinstance(types, tuple) else (types,)))
            raise ValueError(f"{where}.{name} is missing or not {names}")
        if isinstance(value, int) and not 0 <= value <= _MAX_INTEGER:
            raise ValueError(f"{where}.{name} is {value}, not a whole number from 0 to {_MAX_INTEGER}")


def _bad_export(path: Path | str, problem: Any) -> StoreError:
    return StoreError(
        f"{path} is not a valid chat export ({problem}); nothing was imported. Choose a file made by Export."
    )
