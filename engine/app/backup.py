"""One file with everything: back up a data folder to a zip, and restore it into a new data folder.

The API, for ``prt backup create|restore`` (engine/backup_commands.py) and the window's "Back up everything…" and
"Restore from a backup…" (call them off the GUI thread; each takes seconds for a large library):

    create_backup(paths, out)      -> BackupSummary   write the zip ``out`` (atomically) from the data folder ``paths``
    restore_backup(archive, paths) -> BackupSummary   restore ``archive`` into the data folder ``paths``
    summary.describe()             -> str              what happened, in a few sentences for the user
    summary.to_json()              -> dict             the same as JSON (``--json``)

Every problem the user can cause or fix is one PrtError (StoreError; DiskFullError for a full disk) whose message
says what to do, and then no file is left half-written: a backup appears whole at ``out`` or not at all, and a
restore that fails writes nothing (one that is killed leaves at most reward files and no database, or a whole
database that opens). A reward file that is missing or unreadable is left out of a backup and listed in
``summary.skipped``; one bad file never stops a backup.

The window may keep its Store open on the data folder while backing up: the database is copied with SQLite's
online backup API, a consistent snapshot even while the app writes. A restore replaces the database through the
same API, so a Store the window holds sees the restored chats (reload the lists); it is refused unless the data
folder has no chats (a new data folder, or one after "delete all data").

The format (BACKUP_FORMAT, version BACKUP_VERSION), a zip of:
    manifest.json  {"format", "version", "schema_version" (the app's database schema, SCHEMA_VERSION), "created",
                    "data_folder" and "rewards_folder" (where they were), "members": [{"name", "size", "sha256"}]
                    for every other member, "rewards": [{"path": an installed reward's absolute path when backed up,
                    "member": its ONNX file's member}], "models": [the model names the chats used],
                    "skipped": [{"path", "reason"}]}
    chats.db       the chat database: conversations, messages, feedback, presets, installed rewards with their
                   dials, tuning runs, settings (the style profile among them)
    rewards/...    everything under the data folder's rewards folder (the style library rewards/library/<model>)
    external/...   each installed reward that lived outside that folder, its .onnx with its .json card; restored
                   to <data>/rewards/restored/...
Not in it: the models (GGUFs: too large; "models" names them, and a restore says which are not installed) and the
teacher cache (derived data, rebuilt by the next ``prt tune``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sqlite3
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.app.models import installed_models
from engine.app.paths import STORE_FILE, AppPaths
from engine.app.store import BUSY_TIMEOUT_S, SCHEMA_VERSION, RewardEntry, Store
from engine.runtime.errors import DiskFullError, PrtError, StoreError
from engine.runtime.files import is_disk_full, write_atomically
from engine.runtime.rewards import card_path
from engine.runtime.user_json import parse_user_json

BACKUP_FORMAT = "prt-chat-backup"
BACKUP_VERSION = 1
MANIFEST = "manifest.json"
DATABASE_MEMBER = "chats.db"
REWARDS_PREFIX = "rewards/"  # the data folder's rewards folder, as it was
EXTERNAL_PREFIX = "external/"  # rewards installed outside it
RESTORED_FOLDER = "restored"  # where a restore puts those: <data>/rewards/restored/...
MAX_MANIFEST_BYTES = 64 << 20
_CHUNK = 1 << 20
_RESTORE_SCRATCH = ".restore.partial"  # a folder in the data folder while a restore runs
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass(frozen=True)
class BackupSummary:
    action: str  # "backup" | "restore"
    archive: str
    data_folder: str
    created: str  # when the backup was made (ISO-8601 UTC)
    conversations: int  # the trash included
    messages: int  # every alternative and branch included
    feedback: int
    presets: int
    rewards: int  # installed rewards whose file is in the backup
    files: int  # files backed up or restored, the database included
    bytes: int  # their size
    models: tuple[str, ...]  # the models the chats used (a backup leaves the GGUFs out)
    missing_models: tuple[str, ...]  # restore: those of them not installed in the data folder
    skipped: tuple[SkippedFile, ...]  # files a backup left out, and why

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        contents = (
            f"{_count(self.conversations, 'chat')} ({_count(self.messages, 'message')}), "
            f"{_count(self.feedback, 'piece')} of feedback, {_count(self.presets, 'preset')} and "
            f"{_count(self.rewards, 'installed reward')}: {_count(self.files, 'file')}, {_size(self.bytes)}"
        )
        if self.action == "backup":
            lines = [f"Backed up {contents}, to {self.archive}."]
            if self.models:
                lines.append(f"Models are not in a backup; the chats used {', '.join(self.models)}.")
        else:
            lines = [f"Restored {contents}, from {self.archive} into {self.data_folder}."]
            if self.missing_models:
                lines.append(
                    f"The chats used models not installed here: {', '.join(self.missing_models)}; add them in "
                    "the model picker or with 'prt models add PATH'."
                )
        if self.skipped:
            left_out = "; ".join(f"{file.path} ({file.reason})" for file in self.skipped)
            lines.append(f"Left out of the backup, missing or unreadable: {left_out}.")
        return " ".join(lines)


# -- creating a backup -----------------------------------------------------------------------------------------
def create_backup(paths: AppPaths, out: Path) -> BackupSummary:
    """Write one zip at ``out`` with the data folder's database, its rewards folder and every installed reward.

    Written beside ``out`` and renamed into place: a failure (a full disk: DiskFullError; an unwritable folder:
    StoreError) leaves ``out`` as it was and no partial file.
    """
    out = Path(out)
    if not paths.data.is_dir():
        raise StoreError(f"There is no data folder at {paths.data}; nothing to back up. Choose the data folder.")
    if out.is_dir():
        raise StoreError(f"{out} is a folder; give the backup a file name, e.g. {out / 'prt-backup.zip'}.")
    partial = out.with_name(f".{out.name}.partial")
    scratch = out.with_name(f".{out.name}.snapshot.partial")
    try:
        _remove(partial, scratch)
        scratch.mkdir()
        snapshot = scratch / STORE_FILE
        _snapshot_database(paths.data / STORE_FILE, snapshot)
        live = str(paths.data / STORE_FILE)
        with _opened(snapshot, lambda error: StoreError(str(error).replace(str(snapshot), live))) as store:
            installed = store.rewards()
        counts, models = _contents(snapshot)
        summary = _write_archive(partial, snapshot, paths, installed, counts, models)
        os.replace(partial, out)
    except (OSError, sqlite3.Error, PrtError) as error:
        if _is_full(error):
            raise _disk_full(out.parent) from error
        if isinstance(error, PrtError):
            raise
        if isinstance(error, OSError):
            raise _write_error(out, error) from error
        raise StoreError(
            f"Cannot back up the chat database {paths.data / STORE_FILE} ({error}); close other programs using "
            "it, or, if it is damaged, move it aside and restart."
        ) from error
    finally:
        _remove(partial, scratch)
    return BackupSummary(**{**summary, "archive": str(out)})


def _snapshot_database(source: Path, target: Path) -> None:
    """A consistent copy of the live database (SQLite's online backup: the app may have it open and write)."""
    if not source.exists():
        return  # a data folder with no chats yet: the snapshot is a new empty database
    version = _user_version(source)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{source} was written by a newer version of the app (schema {version}; this one knows up to "
            f"{SCHEMA_VERSION}); back it up with that version."
        )
    with contextlib.closing(sqlite3.connect(source, timeout=BUSY_TIMEOUT_S)) as live:
        with contextlib.closing(sqlite3.connect(target)) as copy:
            live.backup(copy)


def _user_version(database: Path) -> int:
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)) as connection:
            return connection.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as error:
        if isinstance(error, sqlite3.OperationalError):
            raise
        raise StoreError(
            f"{database} is not a chat database (or it is damaged); move it aside and restart, or choose another "
            "data folder."
        ) from error


@contextlib.contextmanager
def _opened(database: Path, refused: Callable[[StoreError], PrtError]) -> Iterator[Store]:
    """The store on a scratch copy of a database (migrated if older), its refusal told as ``refused`` tells it;
    afterwards the copy is one self-contained file again."""
    try:
        store = Store(database)
    except StoreError as error:
        raise refused(error) from error
    try:
        yield store
    finally:
        store.close()
    with contextlib.closing(sqlite3.connect(database)) as connection:  # self-contained: no -wal file beside it
        connection.execute("PRAGMA journal_mode = DELETE")


def _contents(database: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """How many rows of each kind the database holds, and the names of the models its chats used."""
    with contextlib.closing(sqlite3.connect(database)) as connection:
        counts = {
            table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            for table in ("conversations", "messages", "feedback", "presets")
        }
        rows = connection.execute("SELECT DISTINCT model_name FROM conversations WHERE model_name != ''")
        return counts, tuple(sorted(name for (name,) in rows))


def _write_archive(
    partial: Path,
    snapshot: Path,
    paths: AppPaths,
    installed: list[RewardEntry],
    counts: dict[str, int],
    models: tuple[str, ...],
) -> dict[str, Any]:
    rewards_folder = Path(os.path.abspath(paths.data / "rewards"))
    skipped: list[SkippedFile] = []
    members: list[dict[str, Any]] = []
    backed_up_rewards: list[dict[str, str]] = []
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with open(partial, "wb") as handle:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:

            def add(name: str, data: bytes) -> None:
                archive.writestr(name, data)
                members.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})

            add(DATABASE_MEMBER, snapshot.read_bytes())
            tree = _files_under(rewards_folder, skipped)
            for relative, path in tree.items():
                data = _read(path, skipped)
                if data is not None:
                    add(REWARDS_PREFIX + relative, data)
            names = {member["name"] for member in members}
            external_names = {REWARDS_PREFIX + relative for relative in tree}  # where a restore puts them
            for reward in installed:
                path = Path(reward.path)
                inside = _relative_to(path, rewards_folder)
                if inside is not None:  # its file is in the rewards folder, backed up above
                    if REWARDS_PREFIX + inside in names:
                        backed_up_rewards.append({"path": reward.path, "member": REWARDS_PREFIX + inside})
                    elif not any(file.path == str(path) for file in skipped):
                        skipped.append(SkippedFile(str(path), "missing"))
                    continue
                data = _read(path, skipped)
                if data is None:
                    continue
                stem = _free_stem(path.stem, external_names)
                add(f"{EXTERNAL_PREFIX}{stem}.onnx", data)
                backed_up_rewards.append({"path": reward.path, "member": f"{EXTERNAL_PREFIX}{stem}.onnx"})
                card = _read(card_path(path), skipped)
                if card is not None:
                    add(f"{EXTERNAL_PREFIX}{stem}.json", card)
            manifest = {
                "format": BACKUP_FORMAT,
                "version": BACKUP_VERSION,
                "schema_version": SCHEMA_VERSION,
                "created": created,
                "data_folder": os.path.abspath(paths.data),
                "rewards_folder": str(rewards_folder),
                "members": members,
                "rewards": backed_up_rewards,
                "models": list(models),
                "skipped": [asdict(file) for file in skipped],
            }
            archive.writestr(MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    return {
        "action": "backup",
        "data_folder": str(paths.data),
        "created": created,
        **counts,
        "rewards": len(backed_up_rewards),
        "files": len(members),
        "bytes": sum(member["size"] for member in members),
        "models": models,
        "missing_models": (),
        "skipped": tuple(skipped),
    }


def _files_under(folder: Path, skipped: list[SkippedFile]) -> dict[str, Path]:
    """Every file under ``folder`` (symbolic links to files followed, to folders not), by its path relative to it
    with "/" between the parts; what cannot be listed, or named in a zip, is skipped."""
    found: dict[str, Path] = {}

    def unlistable(error: OSError) -> None:
        skipped.append(SkippedFile(str(error.filename), _reason(error)))

    for top, folders, files in os.walk(folder, onerror=unlistable):
        folders[:] = sorted(name for name in folders if not _is_partial(name))
        for name in folders:
            if os.path.islink(os.path.join(top, name)):
                skipped.append(SkippedFile(os.path.join(top, name), "a link to a folder, not followed"))
        for name in sorted(files):
            path = Path(top, name)
            if _is_partial(name):
                continue
            relative = path.relative_to(folder).as_posix()
            if not _safe_name(REWARDS_PREFIX + relative):
                skipped.append(SkippedFile(str(path), "a name a backup cannot hold"))
                continue
            found[relative] = path
    return found


def _is_partial(name: str) -> bool:
    """A file being written (engine/runtime/files.py's temp files, this module's), or one left half-written."""
    return name.startswith(".") and name.endswith(".partial")


def _read(path: Path, skipped: list[SkippedFile]) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError as error:
        skipped.append(SkippedFile(str(path), _reason(error)))
        return None


def _reason(error: OSError) -> str:
    if isinstance(error, FileNotFoundError):
        return "missing"
    return (error.strerror or str(error)).lower()


def _relative_to(path: Path, folder: Path) -> str | None:
    """``path`` below ``folder`` ("/" between the parts), as written or with links resolved; None if it is not."""
    for candidate, root in ((Path(os.path.abspath(path)), folder), (path.resolve(), folder.resolve())):
        with contextlib.suppress(ValueError):
            return candidate.relative_to(root).as_posix()
    return None


def _free_stem(stem: str, taken: set[str]) -> str:
    """A name for an outside reward's files that no other restored file has."""
    stem = re.sub(r"[\\/:\x00-\x1f]", "_", stem)
    if not _safe_name(f"{EXTERNAL_PREFIX}{stem}.onnx"):
        stem = "reward"
    for n in range(1, len(taken) + 2):
        candidate = stem if n == 1 else f"{stem}-{n}"
        names = {f"{REWARDS_PREFIX}{RESTORED_FOLDER}/{candidate}{suffix}" for suffix in (".onnx", ".json")}
        if not names & taken:
            taken.update(names)
            return candidate
    raise AssertionError("unreachable: one of len(taken) + 1 names is free")


# -- restoring a backup ----------------------------------------------------------------------------------------
def restore_backup(archive: Path, paths: AppPaths) -> BackupSummary:
    """Restore the backup ``archive`` into the data folder ``paths``, which must hold no chats.

    The archive is checked whole first (its manifest, every member's name, size and sha256); a bad one is one
    StoreError and nothing is written. Then the reward files are written (each atomically), and last the database,
    its reward paths (installed rewards, presets' dials) moved to the new files.
    """
    archive = Path(archive)
    _check_empty(paths.data / STORE_FILE)
    with _open_archive(archive) as zipped:
        manifest = _verified_manifest(zipped, archive)
        targets = _targets(manifest, paths.data)
        moved = _moved(manifest, targets)
        scratch = paths.data / _RESTORE_SCRATCH
        made: list[Path] = []  # the files and folders this restore made, removed again if it fails
        try:
            _remove(scratch)
            _make_folder(scratch, made)
            database = scratch / STORE_FILE
            write_atomically(database, _member_bytes(zipped, manifest, DATABASE_MEMBER, archive))

            def refused(error: StoreError) -> PrtError:
                if _is_full(error):
                    return _disk_full(paths.data)
                return _not_a_backup(archive, f"its {DATABASE_MEMBER} is not a chat database this app can open")

            with _opened(database, refused) as store:
                store.relocate_rewards(moved)
            counts, _models = _contents(database)
            for name, target in targets.items():
                _restore_file(_member_bytes(zipped, manifest, name, archive), target, made)
            live = paths.data / STORE_FILE
            _check_empty(live)  # still: nothing wrote a chat meanwhile
            if not live.exists():  # a failed install leaves no database either
                made.extend(Path(f"{live}{suffix}") for suffix in ("", "-journal", "-wal", "-shm"))
            _install_database(database, live)
        except BaseException as error:
            _remove(scratch)
            for path in reversed(made):  # files, then the folders they were in
                with contextlib.suppress(OSError):
                    path.rmdir() if path.is_dir() else path.unlink()
            if _is_full(error):
                raise _disk_full(paths.data) from error
            if isinstance(error, OSError):
                raise _restore_error(paths.data, error) from error
            if isinstance(error, sqlite3.Error):
                raise StoreError(
                    f"Cannot restore into {paths.data / STORE_FILE} ({error}); nothing was restored."
                ) from error
            raise
        finally:
            _remove(scratch)
    members = manifest["members"]
    models = tuple(manifest["models"])
    return BackupSummary(
        action="restore",
        archive=str(archive),
        data_folder=str(paths.data),
        created=manifest["created"],
        **counts,
        rewards=len(manifest["rewards"]),
        files=len(members),
        bytes=sum(member["size"] for member in members),
        models=models,
        missing_models=_missing_models(paths, models),
        skipped=tuple(SkippedFile(file["path"], file["reason"]) for file in manifest["skipped"]),
    )


def _check_empty(database: Path) -> None:
    """A restore replaces the database: only one with no conversations (none in the trash either)."""
    if not database.exists():
        return
    Store(database).close()  # a clear error for a damaged or newer database; migrates an older one
    with contextlib.closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_S)) as connection:
        (conversations,) = connection.execute("SELECT COUNT(*) FROM conversations").fetchone()
    if conversations:
        raise StoreError(
            f"The data folder {database.parent} already holds {_count(conversations, 'chat')}; restore into a "
            "new data folder, or delete all data first."
        )


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[zipfile.ZipFile]:
    try:
        zipped = zipfile.ZipFile(archive)
    except OSError as error:
        raise StoreError(f"Cannot read {archive} ({error.strerror or error}); check the file and try again.") from error
    except _ARCHIVE_ERRORS as error:
        raise _not_a_backup(archive, "not a zip file, or a damaged or cut-off one") from error
    with zipped:
        yield zipped


def _verified_manifest(zipped: zipfile.ZipFile, archive: Path) -> dict[str, Any]:
    """The manifest, after checking it and every member: names, sizes and sha256s. Reads the whole archive."""
    entries = zipped.infolist()
    names = [entry.filename for entry in entries]
    if MANIFEST not in names:
        raise _not_a_backup(archive, f"it has no {MANIFEST}")
    unsafe = [name for name in names if not _safe_name(name)]
    if unsafe:
        raise _not_a_backup(archive, f"it holds a file named {unsafe[0]!r}, outside any folder it may write to")
    if len(set(names)) != len(names):
        raise _not_a_backup(archive, "it holds two files of one name")
    manifest_entry = zipped.getinfo(MANIFEST)
    if manifest_entry.file_size > MAX_MANIFEST_BYTES:
        raise _not_a_backup(archive, f"its {MANIFEST} is too large")
    try:
        manifest = parse_user_json(_read_member(zipped, MANIFEST, MAX_MANIFEST_BYTES))
    except ValueError as error:
        raise _not_a_backup(archive, f"its {MANIFEST} is not valid: {error}") from error
    except _ARCHIVE_ERRORS as error:
        raise _not_a_backup(archive, f"its {MANIFEST} is damaged ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != BACKUP_FORMAT:
        raise _not_a_backup(archive, f'no "format": "{BACKUP_FORMAT}" in its {MANIFEST}')
    for key, newest, what in (
        ("version", BACKUP_VERSION, "backup format"),
        ("schema_version", SCHEMA_VERSION, "database schema"),
    ):
        value = manifest.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > newest:
            raise StoreError(
                f"{archive} was made by a newer version of the app ({what} {value}; this one reads up to {newest}); "
                "update the app to restore it. Nothing was restored."
            )
    problem = _manifest_problem(manifest)
    if problem:
        raise _not_a_backup(archive, f"its {MANIFEST} {problem}")
    listed = {member["name"] for member in manifest["members"]}
    extra = sorted(set(names) - listed - {MANIFEST})
    missing = sorted(listed - set(names))
    if extra or missing:
        which = f"holds {extra[0]}, which its manifest does not list" if extra else f"lacks {missing[0]}"
        raise _not_a_backup(archive, f"it {which}")
    for member in manifest["members"]:
        if zipped.getinfo(member["name"]).file_size != member["size"]:
            raise _not_a_backup(archive, f"{member['name']} is not the size its manifest gives")
        _member_bytes(zipped, manifest, member["name"], archive, keep=False)
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What is wrong with a manifest of this format's version, or None."""
    expected = {
        "version": int,
        "schema_version": int,
        "created": str,
        "data_folder": str,
        "rewards_folder": str,
        "members": list,
        "rewards": list,
        "models": list,
        "skipped": list,
    }
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            return f'has no "{key}" of the right type'
    if manifest["version"] != BACKUP_VERSION:
        return f"has version {manifest['version']}, not one this app wrote"
    if manifest["schema_version"] < 1:
        return f"has schema_version {manifest['schema_version']}"
    names = set()
    for member in manifest["members"]:
        if not (
            isinstance(member, dict)
            and isinstance(member.get("name"), str)
            and isinstance(member.get("size"), int)
            and not isinstance(member.get("size"), bool)
            and member["size"] >= 0
            and isinstance(member.get("sha256"), str)
            and _SHA256.fullmatch(member["sha256"])
        ):
            return f"lists a member without a name, size and sha256: {member!r:.200}"
        name = member["name"]
        if name in names or name == MANIFEST or not _safe_name(name):
            return f"lists the member {name!r} twice or under a name it may not have"
        names.add(name)
    if DATABASE_MEMBER not in names:
        return f"lists no {DATABASE_MEMBER}"
    for reward in manifest["rewards"]:
        if not (
            isinstance(reward, dict)
            and isinstance(reward.get("path"), str)
            and reward.get("member") in names
            and str(reward["member"]).endswith(".onnx")
        ):
            return f"lists a reward without its path and a member for it: {reward!r:.200}"
    if not all(isinstance(name, str) for name in manifest["models"]):
        return "lists a model name that is not a text"
    for file in manifest["skipped"]:
        if not (isinstance(file, dict) and isinstance(file.get("path"), str) and isinstance(file.get("reason"), str)):
            return f"lists a skipped file without its path and reason: {file!r:.200}"
    return None


def _safe_name(name: str) -> bool:
    """A member name a backup may hold: the manifest, the database, or a relative path under rewards/ or
    external/ ("/" between the parts; no empty, "." or ".." part, no backslash, drive or control character)."""
    if name in (MANIFEST, DATABASE_MEMBER):
        return True
    if not name.startswith((REWARDS_PREFIX, EXTERNAL_PREFIX)) or re.search(r"[\\:\x00-\x1f]", name):
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not text (bytes kept as surrogates)
        return False
    parts = name.split("/")
    return len(parts) >= 2 and all(part not in ("", ".", "..") for part in parts)


def _read_member(zipped: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A member's bytes, at most ``limit`` + 1 of them (a member larger than it claims never fills memory)."""
    with zipped.open(name) as member:
        return member.read(limit + 1)


def _member_bytes(
    zipped: zipfile.ZipFile, manifest: dict[str, Any], name: str, archive: Path, *, keep: bool = True
) -> bytes:
    """A member's bytes, checked against the size and sha256 the manifest gives (``keep=False``: only checked)."""
    [member] = [member for member in manifest["members"] if member["name"] == name]
    digest, size, chunks = hashlib.sha256(), 0, []
    try:
        with zipped.open(name) as stream:
            while size <= member["size"] and (chunk := stream.read(min(_CHUNK, member["size"] + 1 - size))):
                digest.update(chunk)
                size += len(chunk)
                if keep:
                    chunks.append(chunk)
    except OSError as error:
        raise StoreError(f"Cannot read {archive} ({error.strerror or error}); check the file and try again.") from error
    except _ARCHIVE_ERRORS as error:
        raise _not_a_backup(archive, f"{name} is damaged ({error})") from error
    if size != member["size"] or digest.hexdigest() != member["sha256"]:
        raise _not_a_backup(archive, f"{name} does not match the sha256 its manifest gives")
    return b"".join(chunks)


def _targets(manifest: dict[str, Any], data: Path) -> dict[str, Path]:
    """Where each reward member goes in the data folder (the database member is not among them)."""
    rewards = data / "rewards"
    targets: dict[str, Path] = {}
    for member in manifest["members"]:
        name = member["name"]
        if name.startswith(REWARDS_PREFIX):
            targets[name] = rewards.joinpath(*name[len(REWARDS_PREFIX) :].split("/"))
        elif name.startswith(EXTERNAL_PREFIX):
            targets[name] = rewards.joinpath(RESTORED_FOLDER, *name[len(EXTERNAL_PREFIX) :].split("/"))
    return targets


def _moved(manifest: dict[str, Any], targets: dict[str, Path]) -> dict[str, str]:
    """Old absolute path -> new one: every reward file of the old rewards folder, every installed reward."""
    moved = {}
    old_rewards = Path(manifest["rewards_folder"])
    for name, target in targets.items():
        if name.startswith(REWARDS_PREFIX) and name.endswith(".onnx"):
            old = old_rewards.joinpath(*name[len(REWARDS_PREFIX) :].split("/"))
            moved[str(old)] = os.path.abspath(target)
    for reward in manifest["rewards"]:
        moved[reward["path"]] = os.path.abspath(targets[reward["member"]])
    return moved


def _restore_file(data: bytes, target: Path, made: list[Path]) -> None:
    """Write one restored file atomically (replacing one of that name); ``made`` gets it and the folders made
    for it, unless it was there before."""
    if target.is_file() and target.read_bytes() == data:
        return
    _make_folder(target.parent, made)
    existed = target.exists()
    write_atomically(target, data)
    if not existed:
        made.append(target)


def _make_folder(folder: Path, made: list[Path]) -> None:
    """``folder`` and any missing folder above it; ``made`` gets those it made, outermost first."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        made.append(path)


def _install_database(source: Path, target: Path) -> None:
    """Replace the database at ``target`` with ``source``'s in one SQLite transaction (a kill leaves the old one or
    the new one), through the online backup API, so a Store open on ``target`` sees the new contents."""
    if not target.exists():  # files a database left beside it; they would be read as the new one's
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as restored:
        with contextlib.closing(sqlite3.connect(target, timeout=BUSY_TIMEOUT_S)) as live:
            restored.backup(live)


def _missing_models(paths: AppPaths, models: tuple[str, ...]) -> tuple[str, ...]:
    try:
        installed = {model.name for model in installed_models(paths)}
    except PrtError:  # a damaged model list: none of them counts as installed
        installed = set()
    return tuple(name for name in models if name not in installed)


# -- helpers -----------------------------------------------------------------------------------------------------
def _remove(*paths: Path) -> None:
    """Remove scratch files and folders, as far as one can (what cannot be removed was never written)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _not_a_backup(archive: Path, problem: str) -> StoreError:
    return StoreError(
        f"{archive} is not a PRT Chat backup ({problem}); nothing was restored. Choose a file made by "
        "'Back up everything' or 'prt backup create'."
    )


def _disk_full(where: Path) -> DiskFullError:
    return DiskFullError(
        f"The disk is full: no room in {where} (nothing there was changed); free some space or choose another "
        "folder, then try again."
    )


def _is_full(error: BaseException) -> bool:
    """A full disk, as the OS, SQLite ("database or disk is full") or the store ("The disk is full: ...") says it."""
    return is_disk_full(error) or (isinstance(error, (sqlite3.Error, PrtError)) and "disk is full" in str(error))


def _write_error(out: Path, error: OSError) -> PrtError:
    return StoreError(
        f"Cannot write the backup {out} ({error.strerror or error}); nothing was written. Choose another folder."
    )


def _restore_error(data: Path, error: OSError) -> PrtError:
    return StoreError(
        f"Cannot restore into {data} ({error.strerror or error}: {error.filename}); nothing was restored. "
        "Choose another data folder."
    )
