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

import contextlib
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
MessageStatus = Literal["complete", "streaming", "stopped", "error", "interrupted"]
MESSAGE_STATUSES: tuple[MessageStatus, ...] = get_args(MessageStatus)
RUN_STATUSES = ("running", "done", "failed", "cancelled")
FEEDBACK_TEXTS = {  # the reply texts each kind of feedback needs, besides the prompt
    "thumbs_up": ("chosen",),
    "thumbs_down": ("rejected",),
    "pick": ("chosen", "rejected"),
    "edit": ("chosen", "rejected"),
}
ALTERNATIVE = "alternative"  # the kind of a pair read off regenerated replies (Store.training_feedback)
EXPORT_FORMAT = "prt-chat-export"
EXPORT_VERSION = 2  # 2: messages form a tree (alternatives, branches); presets
_TABLES = ("feedback", "messages", "conversations", "presets", "rewards", "tuning_runs", "settings")
INTERRUPTED_AFTER_S = 30.0  # a reply still "streaming" this long after its last write died with its process


@dataclass(frozen=True)
class Conversation:
    id: int
    uid: str  # stable across export/import
    title: str
    system_prompt: str
    model_name: str
    created: str
    updated: str
    preset_id: int | None  # the preset the chat uses, if any


@dataclass(frozen=True)
class Message:
    """One node of a conversation's tree: alternatives share a parent; the chat shows one path from a root."""

    id: int
    conversation_id: int
    position: int  # 0, 1, 2, ... in the order the conversation's messages were written; a child's is above its parent's
    parent_id: int | None  # the message it answers or follows; None for a first message
    role: str  # "user" | "assistant"
    content: str
    status: MessageStatus
    stats: dict  # e.g. {"tokens", "tokens_per_second", "finish_reason", "rewards": [names]}
    seen: bool  # shown to the user; an alternative never seen is never training data
    created: str
    updated: str


@dataclass(frozen=True)
class Feedback:
    id: int | None  # None for a pair read off the chats' alternatives (Store.training_feedback), not stored
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
class Preset:
    """A named bundle a chat can use: system prompt, reward dials, overall strength and sampling settings."""

    id: int
    name: str
    system_prompt: str
    dials: dict  # absolute reward path -> weight (0: off)
    strength: float
    sampling: dict  # the window's sampling settings by name (temperature, top_k, top_p, min_p, max_tokens, stop)
    created: str
    updated: str


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


def add_branches_presets_and_trash(db: sqlite_utils.Database) -> None:
    """Schema 3: messages form a tree (each has a parent; ``active`` marks the alternative shown among its
    siblings, ``seen`` whether it was ever shown), presets a chat can use, and conversations in the trash
    (``deleted``: when) until the app closes. Existing chats become single paths."""
    db.executescript("""
        CREATE TABLE presets (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            system_prompt TEXT NOT NULL DEFAULT '',
            dials TEXT NOT NULL DEFAULT '{}',
            strength REAL NOT NULL DEFAULT 1.0,
            sampling TEXT NOT NULL DEFAULT '{}',
            created TEXT NOT NULL,
            updated TEXT NOT NULL
        );
        ALTER TABLE conversations ADD COLUMN preset_id INTEGER REFERENCES presets (id) ON DELETE SET NULL;
        ALTER TABLE conversations ADD COLUMN deleted TEXT;
        ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages (id) ON DELETE CASCADE;
        ALTER TABLE messages ADD COLUMN active INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE messages ADD COLUMN seen INTEGER NOT NULL DEFAULT 1;
        UPDATE messages SET parent_id = (
            SELECT previous.id FROM messages previous
            WHERE previous.conversation_id = messages.conversation_id AND previous.position < messages.position
            ORDER BY previous.position DESC LIMIT 1
        );
        CREATE INDEX messages_by_parent ON messages (conversation_id, parent_id);
    """)


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    create_first_schema,
    add_search_and_settings,
    add_branches_presets_and_trash,
]
SCHEMA_VERSION = len(MIGRATIONS)

_SEARCH_SQL = """
    SELECT * FROM conversations
    WHERE deleted IS NULL
      AND (id IN (SELECT rowid FROM conversations_fts WHERE conversations_fts MATCH :query)
           OR id IN (SELECT conversation_id FROM messages
                     WHERE id IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH :query)))
    ORDER BY updated DESC, id DESC
"""
# assistant replies that have siblings, with the question they answer and whether the chat goes on after them
_ALTERNATIVES_SQL = """
    SELECT m.id, m.conversation_id, m.parent_id, m.content, m.status, m.seen, m.created,
           q.content AS prompt, c.system_prompt,
           EXISTS (SELECT 1 FROM messages after WHERE after.parent_id = m.id) AS continued
    FROM messages m
    JOIN messages q ON q.id = m.parent_id AND q.role = 'user'
    JOIN conversations c ON c.id = m.conversation_id AND c.deleted IS NULL
    WHERE m.role = 'assistant'
      AND (SELECT COUNT(*) FROM messages s WHERE s.parent_id = m.parent_id AND s.role = 'assistant') > 1
    ORDER BY m.parent_id, m.position
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
_CONVERSATION_COLUMNS = ("uid", "title", "system_prompt", "model_name", "created", "updated")
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
        self.closed = False
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
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if 0 < version < SCHEMA_VERSION:
            self._snapshot(self.path.with_name(f"{self.path.name}.schema-{version}.bak"))
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

    def _snapshot(self, target: Path) -> None:
        """A consistent copy of the database at ``target`` (SQLite's online backup), written whole or not at all."""
        partial = target.with_name(target.name + ".partial")
        try:
            with contextlib.closing(sqlite3.connect(partial)) as copy:
                self._conn.backup(copy)
            os.replace(partial, target)
        except (OSError, sqlite3.Error) as error:
            partial.unlink(missing_ok=True)
            raise StoreError(
                f"Cannot save a copy of {self.path} before upgrading it ({error}); free some disk space "
                "and start again. The database was not changed."
            ) from error

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
        self.closed = True

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
            rows = self._db.table("conversations").rows_where("deleted IS NULL", order_by="updated DESC, id DESC")
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
    def set_conversation_preset(self, conversation_id: int, preset_id: int | None) -> None:
        self._update("conversations", conversation_id, {"preset_id": preset_id})

    @_synchronized
    def delete_conversation(self, conversation_id: int) -> None:
        """Move it to the trash: hidden from the list and search until ``restore_conversation`` or
        ``empty_trash`` (the window empties it when it closes)."""
        self._update("conversations", conversation_id, {"deleted": self._now()})

    @_synchronized
    def restore_conversation(self, conversation_id: int) -> None:
        self._update("conversations", conversation_id, {"deleted": None})

    @_synchronized
    def empty_trash(self) -> int:
        """Delete the conversations in the trash for good: their messages go with them; their feedback stays
        (training data) with the links set to NULL. Returns how many were deleted."""
        with self._transaction():
            return self._db.execute("DELETE FROM conversations WHERE deleted IS NOT NULL").rowcount

    # messages: a tree per conversation; the chat shows one path through it

    @_synchronized
    def add_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        status: MessageStatus = "complete",
        stats: dict | None = None,
        alternative_to: int | None = None,
    ) -> int:
        """Add a message after the last one on the shown path, or, with ``alternative_to``, beside that message
        (a regenerated reply, an edited question: same parent). The new message is the one shown."""
        _check_choice("role", role, ROLES)
        _check_choice("status", status, MESSAGE_STATUSES)
        now = self._now()
        with self._transaction():
            self._get("conversations", conversation_id)  # a clear error if it was deleted meanwhile
            if alternative_to is None:
                path = self._path(conversation_id)
                parent_id = path[-1]["id"] if path else None
            else:
                parent_id = self._sibling_of(conversation_id, alternative_to)["parent_id"]
            position = self._db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?", [conversation_id]
            ).fetchone()[0]
            self._deactivate_children(conversation_id, parent_id)
            message_id = self._insert_message(
                conversation_id,
                {
                    "position": position,
                    "parent_id": parent_id,
                    "role": role,
                    "content": content,
                    "status": status,
                    "stats": stats or {},
                    "active": True,
                    "seen": False,
                    "created": now,
                    "updated": now,
                },
            )
            self._touch(conversation_id, now)
            return message_id

    def _sibling_of(self, conversation_id: int, message_id: int) -> dict:
        row = self._get("messages", message_id)
        if row["conversation_id"] != conversation_id:
            raise StoreError(f"Message {message_id} is not in conversation {conversation_id}; reload and try again.")
        return row

    def _deactivate_children(self, conversation_id: int, parent_id: int | None) -> None:
        self._db.execute(
            "UPDATE messages SET active = 0 WHERE conversation_id = ? AND parent_id IS ?", [conversation_id, parent_id]
        )

    def _insert_message(self, conversation_id: int, message: dict) -> int:
        columns = ("position", "parent_id", "role", "content", "status", "created", "updated")
        return _new_row_id(
            self._db.table("messages").insert(
                {
                    "conversation_id": conversation_id,
                    **{k: message[k] for k in columns},
                    "active": int(message["active"]),
                    "seen": int(message["seen"]),
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
        """The path the chat shows: from the first message, at each step the alternative chosen last."""
        return [_message(row) for row in self._path(conversation_id)]

    @_synchronized
    def message_tree(self, conversation_id: int) -> list[Message]:
        """Every message of the conversation, alternatives and branches included, in the order written."""
        rows = self._db.table("messages").rows_where("conversation_id = ?", [conversation_id], order_by="position")
        return [_message(row) for row in rows]

    def _path(self, conversation_id: int) -> list[dict]:
        rows = list(
            self._db.table("messages").rows_where("conversation_id = ?", [conversation_id], order_by="position")
        )
        children: dict[int | None, list[dict]] = {}
        for row in rows:
            children.setdefault(row["parent_id"], []).append(row)
        path: list[dict] = []
        below = children.get(None)
        while below:
            shown = [row for row in below if row["active"]] or below  # several active: a crash mid-update
            path.append(shown[-1])
            below = children.get(shown[-1]["id"])
        return path

    @_synchronized
    def message(self, message_id: int) -> Message:
        return _message(self._get("messages", message_id))

    @_synchronized
    def alternatives(self, message_id: int) -> list[Message]:
        """The message and its siblings (the replies regenerated for one question, or a question's edits), in the
        order written."""
        row = self._get("messages", message_id)
        rows = self._db.table("messages").rows_where(
            "conversation_id = ? AND parent_id IS ?", [row["conversation_id"], row["parent_id"]], order_by="position"
        )
        return [_message(sibling) for sibling in rows]

    @_synchronized
    def show_alternative(self, message_id: int) -> None:
        """Show this alternative instead of its siblings; below it, its own branch as it was last shown."""
        row = self._get("messages", message_id)
        with self._transaction():
            self._deactivate_children(row["conversation_id"], row["parent_id"])
            self._db.execute("UPDATE messages SET active = 1 WHERE id = ?", [message_id])

    @_synchronized
    def mark_seen(self, message_ids: Iterable[int]) -> None:
        """The messages were shown to the user (only an alternative the user saw becomes training data)."""
        ids = list(message_ids)
        if ids:
            with self._transaction():
                self._conn.executemany("UPDATE messages SET seen = 1 WHERE id = ? AND seen = 0", [[i] for i in ids])

    @_synchronized
    def mark_interrupted(self, *, older_than_s: float = INTERRUPTED_AFTER_S) -> int:
        """Replies still "streaming" though nothing has written them for ``older_than_s`` seconds were cut off
        by a crash or a kill: mark them "interrupted" (their text is kept). Returns how many."""
        cutoff = (datetime.now(timezone.utc) - timedelta(seconds=older_than_s)).isoformat(timespec="microseconds")
        with self._transaction():
            return self._db.execute(
                "UPDATE messages SET status = 'interrupted' WHERE status = 'streaming' AND updated < ?", [cutoff]
            ).rowcount

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
        """Stored feedback by kind, and "alternative": the pairs the chats' alternatives yield."""
        counts = dict.fromkeys(FEEDBACK_TEXTS, 0)
        counts.update(self._db.execute("SELECT kind, COUNT(*) FROM feedback GROUP BY kind").fetchall())
        return counts | {ALTERNATIVE: len(self._alternative_pairs())}

    @_synchronized
    def training_feedback(self) -> list[Feedback]:
        """What tuning learns from: the stored feedback, then the pairs read off the chats' alternatives."""
        return self.feedback() + self._alternative_pairs()

    def _alternative_pairs(self) -> list[Feedback]:
        """For each question answered more than once, the reply the user continued the chat from, over each
        other reply to it the user saw. No pair when no reply, or more than one, was continued from."""
        rows = self._db.query(_ALTERNATIVES_SQL)
        groups: dict[int, list[dict]] = {}
        for row in rows:
            groups.setdefault(row["parent_id"], []).append(row)
        pairs = []
        for replies in groups.values():
            continued = [reply for reply in replies if reply["continued"]]
            if len(continued) != 1:
                continue
            chosen = continued[0]
            pairs += [
                Feedback(
                    id=None,
                    conversation_id=chosen["conversation_id"],
                    message_id=chosen["id"],
                    kind=ALTERNATIVE,
                    prompt=chosen["prompt"],
                    system=chosen["system_prompt"],
                    chosen=chosen["content"],
                    rejected=other["content"],
                    created=max(chosen["created"], other["created"]),
                )
                for other in replies
                if other is not chosen and other["seen"] and other["content"].strip() and other["status"] != "error"
            ]
        return pairs

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

    @_synchronized
    def relocate_rewards(self, moved: Mapping[str, str]) -> None:
        """Reward files now at other paths (a restored backup): each old absolute path -> its new one, in the
        installed rewards and in every preset's dials."""
        with self._transaction():
            for old, new in moved.items():
                self._db.execute("UPDATE rewards SET path = ? WHERE path = ?", [os.path.abspath(new), old])
            for row in list(self._db.table("presets").rows):
                dials = _stored_json(row["dials"])
                relocated = {os.path.abspath(moved.get(path, path)): weight for path, weight in dials.items()}
                self._db.table("presets").update(row["id"], {"dials": _json(relocated, "dials")})

    # presets, by name

    @_synchronized
    def save_preset(
        self, name: str, *, system_prompt: str, dials: Mapping[str, float], strength: float, sampling: Mapping
    ) -> int:
        """Create the preset ``name``, or replace what it holds; returns its id."""
        if not name.strip():
            raise StoreError("A preset needs a name; type one.")
        weights = [strength, *dials.values()]
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
            raise ValueError(f"dial weights and strength must be finite numbers, got {dict(dials)!r}, {strength!r}")
        now = self._now()
        values = {
            "system_prompt": system_prompt,
            "dials": _json({os.path.abspath(path): weight for path, weight in dials.items()}, "dials"),
            "strength": strength,
            "sampling": _json(dict(sampling), "sampling"),
            "updated": now,
        }
        with self._transaction():
            self._db.execute(
                "INSERT INTO presets (name, system_prompt, dials, strength, sampling, created, updated) "
                "VALUES (:name, :system_prompt, :dials, :strength, :sampling, :updated, :updated) "
                "ON CONFLICT (name) DO UPDATE SET system_prompt = excluded.system_prompt, dials = excluded.dials, "
                "strength = excluded.strength, sampling = excluded.sampling, updated = excluded.updated",
                {"name": name.strip(), **values},
            )
            return self._db.execute("SELECT id FROM presets WHERE name = ?", [name.strip()]).fetchone()[0]

    @_synchronized
    def presets(self) -> list[Preset]:
        return [_preset(row) for row in self._db.table("presets").rows_where(order_by="name COLLATE NOCASE")]

    @_synchronized
    def preset(self, preset_id: int) -> Preset:
        return _preset(self._get("presets", preset_id))

    @_synchronized
    def delete_preset(self, preset_id: int) -> None:
        """Chats that used it keep their system prompt and go back to the current settings."""
        with self._transaction():
            self._db.execute("DELETE FROM presets WHERE id = ?", [preset_id])

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
        """Write every conversation (not those in the trash) with all its messages, the presets and all feedback
        to one JSON file (atomically)."""
        with self._transaction("BEGIN"):  # one snapshot, even if another process writes meanwhile
            data: dict[str, Any] = {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "exported": self._now(),
                "presets": [_exported_preset(row) for row in self._db.table("presets").rows_where(order_by="id")],
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
            "presets": len(data["presets"]),
        }

    def _exported_conversations(self) -> list[dict]:
        preset_names = dict(self._db.execute("SELECT id, name FROM presets").fetchall())
        conversations = {
            row["id"]: {
                **{k: row[k] for k in _CONVERSATION_COLUMNS},
                "preset": preset_names.get(row["preset_id"]),
                "messages": [],
            }
            for row in self._db.table("conversations").rows_where("deleted IS NULL", order_by="id")
        }
        positions = dict(self._db.execute("SELECT id, position FROM messages").fetchall())
        for row in self._db.table("messages").rows_where(order_by="conversation_id, position"):
            if row["conversation_id"] not in conversations:
                continue  # in the trash
            message = {k: row[k] for k in ("position", "role", "content", "status", "created", "updated")}
            conversations[row["conversation_id"]]["messages"].append(
                {
                    **message,
                    "parent": positions.get(row["parent_id"]),
                    "active": bool(row["active"]),
                    "seen": bool(row["seen"]),
                    "stats": _stored_json(row["stats"]),
                }
            )
        return list(conversations.values())

    @_synchronized
    def import_json(self, path: Path | str) -> dict[str, int]:
        """Add an export's presets (by name) and conversations (by uid: ones already here are skipped) and new
        feedback, all or nothing. Exports of version 1 (before alternatives) import as single paths.

        Returns {"conversations": added, "messages": added, "skipped": conversations already here,
        "feedback": added, "presets": added}.
        """
        data = _read_export(Path(path))
        added = {"conversations": 0, "messages": 0, "skipped": 0, "feedback": 0, "presets": 0}
        try:
            with self._transaction():
                for record in data.get("presets", []):
                    self._import_preset(record, added)
                for record in data["conversations"]:
                    self._import_conversation(record, added)
                for record in data["feedback"]:
                    self._import_feedback(record, added)
        except sqlite3.IntegrityError as error:  # e.g. two messages at one position
            raise _bad_export(path, error) from error
        return added

    def _import_preset(self, record: dict, added: dict[str, int]) -> None:
        if self._db.execute("SELECT 1 FROM presets WHERE name = ?", [record["name"]]).fetchone():
            return
        self._db.table("presets").insert(
            {
                **{k: record[k] for k in ("name", "system_prompt", "strength", "created", "updated")},
                "dials": _json(record["dials"], "dials"),
                "sampling": _json(record["sampling"], "sampling"),
            }
        )
        added["presets"] += 1

    def _import_conversation(self, record: dict, added: dict[str, int]) -> None:
        if self._db.execute("SELECT 1 FROM conversations WHERE uid = ?", [record["uid"]]).fetchone():
            added["skipped"] += 1
            return
        preset = self._db.execute("SELECT id FROM presets WHERE name = ?", [record.get("preset")]).fetchone()
        conversation_id = _new_row_id(
            self._db.table("conversations").insert(
                {**{k: record[k] for k in _CONVERSATION_COLUMNS}, "preset_id": preset[0] if preset else None}
            )
        )
        ids: dict[int, int] = {}  # position in the export -> new message id
        previous: int | None = None
        for message in record["messages"]:
            parent = message.get("parent", previous)  # version 1: each message follows the one before
            ids[message["position"]] = self._insert_message(
                conversation_id,
                {
                    "active": True,
                    "seen": True,
                    **message,
                    "parent_id": None if parent is None else ids[parent],
                },
            )
            previous = message["position"]
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
    return _record(Message, row, stats=_stored_json(row["stats"]), seen=bool(row["seen"]))


def _preset(row: dict) -> Preset:
    return _record(Preset, row, dials=_stored_json(row["dials"]), sampling=_stored_json(row["sampling"]))


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
        "presets": "preset",
    }[table]
    return StoreError(f"There is no {noun} {key} (it may have been deleted); reload and try again.")


def _not_a_chat_database(path: Path) -> str:
    return (
        f"{path} is not a chat database (or it is damaged); move it aside and restart, or choose another data folder."
    )


# what an export file holds: field -> JSON type(s); version 2 adds the *_V2 fields
_NULL = type(None)
_NUMBER = (int, float)
_FILE_FIELDS = {"version": int, "conversations": list, "feedback": list}
_FILE_FIELDS_V2 = {"presets": list}
_CONVERSATION_FIELDS = {
    "uid": str,
    "title": str,
    "system_prompt": str,
    "model_name": str,
    "created": str,
    "updated": str,
    "messages": list,
}
_CONVERSATION_FIELDS_V2 = {"preset": (str, _NULL)}
_MESSAGE_FIELDS = {
    "position": int,
    "role": str,
    "content": str,
    "status": str,
    "stats": dict,
    "created": str,
    "updated": str,
}
_MESSAGE_FIELDS_V2 = {"parent": (int, _NULL), "active": bool, "seen": bool}
_PRESET_FIELDS = {
    "name": str,
    "system_prompt": str,
    "dials": dict,
    "strength": _NUMBER,
    "sampling": dict,
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
_JSON_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
    _NULL: "null",
}
_MAX_INTEGER = 2**63 - 1  # SQLite's


def _exported_preset(row: dict) -> dict:
    return {
        **{k: row[k] for k in ("name", "system_prompt", "strength", "created", "updated")},
        "dials": _stored_json(row["dials"]),
        "sampling": _stored_json(row["sampling"]),
    }


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
    _check_fields(data, _FILE_FIELDS, "the file")
    if data["version"] not in (1, 2):
        raise ValueError(f"version {data['version']} is not one this app wrote")
    v2 = data["version"] == 2
    if v2:
        _check_fields(data, _FILE_FIELDS_V2, "the file")
        for i, preset in enumerate(data["presets"]):
            _check_preset(preset, f"presets[{i}]")
    first_with_uid: dict[str, int] = {}
    for i, conversation in enumerate(data["conversations"]):
        where = f"conversations[{i}]"
        _check_fields(conversation, _CONVERSATION_FIELDS | (_CONVERSATION_FIELDS_V2 if v2 else {}), where)
        first = first_with_uid.setdefault(conversation["uid"], i)
        if first != i:
            raise ValueError(f"{where} has the uid of conversations[{first}]")
        _check_messages(conversation["messages"], where, v2=v2)
    for i, feedback in enumerate(data["feedback"]):
        _check_fields(feedback, _FEEDBACK_FIELDS, f"feedback[{i}]")
        problem = _feedback_problem(feedback["kind"], feedback["prompt"], feedback["chosen"], feedback["rejected"])
        if problem:
            raise ValueError(f"feedback[{i}]: {problem}")


def _check_messages(messages: list, where: str, *, v2: bool) -> None:
    """Each message well formed; in version 2 each parent is a message listed before it (the messages form a tree)."""
    listed: set[int] = set()
    for j, message in enumerate(messages):
        at = f"{where}.messages[{j}]"
        _check_fields(message, _MESSAGE_FIELDS | (_MESSAGE_FIELDS_V2 if v2 else {}), at)
        _check_choice(f"{at}.role", message["role"], ROLES)
        _check_choice(f"{at}.status", message["status"], MESSAGE_STATUSES)
        if v2 and message["parent"] is not None and message["parent"] not in listed:
            raise ValueError(f"{at}.parent is {message['parent']}, not the position of a message listed before it")
        listed.add(message["position"])


def _check_preset(preset: Any, where: str) -> None:
    _check_fields(preset, _PRESET_FIELDS, where)
    weights = [preset["strength"], *preset["dials"].values()]
    if not all(isinstance(w, _NUMBER) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"{where} has a strength or a dial weight that is not a finite number")


def _check_fields(record: Any, expected: dict, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not an object")
    for name, types in expected.items():
        value = record.get(name)
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join(_JSON_NAMES[t] for t in allowed)
            raise ValueError(f"{where}.{name} is missing or not {names}")
        if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= _MAX_INTEGER:
            raise ValueError(f"{where}.{name} is {value}, not a whole number from 0 to {_MAX_INTEGER}")


def _bad_export(path: Path | str, problem: Any) -> StoreError:
    return StoreError(
        f"{path} is not a valid chat export ({problem}); nothing was imported. Choose a file made by Export."
    )
