"""Watch a real process tree at the OS level: internet sockets, host-name lookups, files written outside
the folders it may write.

strace follows every process and thread (``-f``) and records the system calls below; a seccomp filter
(``--seccomp-bpf``) stops the tracee only on those, so a traced ``prt tune`` runs at nearly full speed.
This sees what native code does (onnxruntime's telemetry is C++), which no Python-level socket patch or
audit hook can.
"""

from __future__ import annotations

import codecs
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NETWORK_CALLS = ("socket", "connect", "sendto", "sendmsg")
FILE_CALLS = (
    "open",
    "openat",
    "openat2",
    "creat",
    "mkdir",
    "mkdirat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "symlink",
    "symlinkat",
    "truncate",
)
PROCESS_CALLS = ("execve", "clone", "clone3", "fork", "vfork")
INTERNET_FAMILIES = ("AF_INET", "AF_INET6", "AF_PACKET")
# glibc reads these to resolve a host name; nothing else of ours has a reason to open them.
HOST_LOOKUP_FILES = ("/etc/resolv.conf", "/etc/hosts", "/etc/host.conf", "/etc/gai.conf")
RESOLVER_SOCKETS = ("/run/systemd/resolve/io.systemd.Resolve",)  # systemd-resolved: host names only
NSCD_SOCKETS = ("/var/run/nscd/socket", "/run/nscd/socket")  # nscd also answers user and group look-ups
NSCD_HOST_REQUESTS = {4, 5, 6, 7, 13, 14}  # nscd's GETHOSTBYNAME(v6), GETHOSTBYADDR(v6), GETFDHST, GETAI
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_TMPFILE")
ALWAYS_WRITABLE = ("/dev/", "/proc/")  # terminals, /dev/null, shared-memory semaphores: not files on disk
BYTECODE = re.compile(r"/__pycache__/[^/]+\.pyc(\.\d+)?$")  # the interpreter's own cache of compiled modules

QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')  # a C string as strace prints it
LINE = re.compile(r"^(?P<call>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>-?\d+|\?)(?P<rest>.*)$")
FD_PATH = re.compile(r"^<(?P<path>.*)>")
DIR_FD = re.compile(r"^(?:AT_FDCWD|\d+)<(?P<path>[^>]*)>$")


class WatchUnavailable(RuntimeError):
    """strace is missing or cannot trace here: the egress tests fail with this message, never skip."""


@dataclass(frozen=True)
class Finding:
    kind: str  # "internet socket", "host-name lookup" or "written outside"
    lineage: tuple[str, ...]  # the command lines from the watched process down to the one that did it
    call: str  # the strace line

    @property
    def program(self) -> str:
        return self.lineage[-1]


@dataclass
class Watched:
    returncode: int
    stdout: str
    stderr: str
    findings: list[Finding] = field(default_factory=list)
    calls_seen: int = 0  # traced calls recorded: a watcher that saw nothing did not watch

    def of_kind(self, kind: str) -> list[Finding]:
        return [finding for finding in self.findings if finding.kind == kind]

    def summary(self) -> str:
        return "\n".join(f"{f.kind} by {f.program!r}: {f.call}" for f in self.findings) or "nothing"


def strace_command() -> str:
    strace = shutil.which("strace")
    if strace is None or not sys.platform.startswith("linux"):
        raise WatchUnavailable(
            "the egress tests watch processes with strace, on Linux; install it "
            "(apt-get install strace; 'python3 dev.py test' does this on Debian and Ubuntu)"
        )
    return strace


def watch(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    writable: Sequence[Path],
    stdin: str | None = None,
    timeout: float = 600,
) -> Watched:
    """Run ``argv`` under strace and report what it did that a private app must not."""
    log_dir = Path(writable[0]) / ".strace"
    log_dir.mkdir(parents=True, exist_ok=True)
    calls = ",".join(NETWORK_CALLS + FILE_CALLS + PROCESS_CALLS)
    command = [
        strace_command(),
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-y",
        "-s",
        "4096",
        "-e",
        f"trace={calls}",
        "-e",
        "signal=none",
        "-ff",
        "-o",
        str(log_dir / "trace"),
        *argv,
    ]
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, env=dict(env), cwd=cwd, timeout=timeout
    )
    if result.returncode != 0 and "strace:" in result.stderr and "ptrace" in result.stderr:
        raise WatchUnavailable(f"strace cannot trace here: {result.stderr.strip().splitlines()[-1]}")
    traces = _read_traces(log_dir)
    shutil.rmtree(log_dir)
    allowed = [Path(os.path.realpath(folder)) for folder in writable]
    watched = Watched(result.returncode, result.stdout, result.stderr)
    lineages = _lineages(traces, " ".join(argv))
    for tid, lines in traces.items():
        watched.calls_seen += len(lines)
        watched.findings += [
            Finding(kind, lineages[tid], line)
            for kind, line in zip(judge_thread(lines, allowed, Path(cwd)), lines)
            if kind
        ]
    return watched


def judge_thread(lines: Sequence[str], allowed: Sequence[Path], cwd: Path) -> list[str | None]:
    """What is wrong with each of one thread's traced calls, in order (None: nothing)."""
    nscd_sockets: set[str] = set()
    return [_judge(line, allowed, cwd, nscd_sockets) for line in lines]


def _read_traces(log_dir: Path) -> dict[int, list[str]]:
    """One file per thread (``-ff``), so a call is never split by another thread's."""
    return {int(path.suffix[1:]): path.read_text(errors="replace").splitlines() for path in log_dir.glob("trace.*")}


def _lineages(traces: dict[int, list[str]], first: str) -> dict[int, tuple[str, ...]]:
    """Each thread's chain of programs from the watched one down to its own: threads and forks inherit their
    creator's, an execve adds one."""
    parent: dict[int, int] = {}
    own: dict[int, str] = {}
    for tid, lines in traces.items():
        for line in lines:
            match = LINE.match(line)
            if not match or match["result"] in ("?", "-1"):
                continue
            if match["call"] in ("clone", "clone3", "fork", "vfork"):
                parent[int(match["result"])] = tid
            elif match["call"] == "execve" and match["result"] == "0":
                own[tid] = " ".join(QUOTED.findall(match["args"].split("], ")[0])[1:])

    def lineage(tid: int, depth: int = 0) -> tuple[str, ...]:
        inherited = lineage(parent[tid], depth + 1) if tid in parent and depth < 1000 else ()
        return inherited + (own[tid],) if tid in own else inherited or (first,)

    return {tid: lineage(tid) for tid in traces}


def _judge(line: str, allowed: Sequence[Path], cwd: Path, nscd_sockets: set[str]) -> str | None:
    """What is wrong with one traced call, if anything; ``nscd_sockets``: this thread's sockets to nscd."""
    match = LINE.match(line)
    if not match:
        return None
    call, args, result, rest = match["call"], match["args"], match["result"], match["rest"]
    if call == "socket" and args.split(",")[0] in INTERNET_FAMILIES:
        return "internet socket"
    if call in ("connect", "sendto", "sendmsg"):
        return _judge_send(call, args, result, nscd_sockets)
    if call in ("open", "openat", "openat2", "creat"):
        return _judge_open(call, args, result, rest, allowed)
    if call in FILE_CALLS and result == "0":
        target = _target_path(call, args, cwd)
        if target is None or _may_write(target, allowed) or (call.startswith("mkdir") and _leads_to(target, allowed)):
            return None
        return "written outside"
    return None


def _judge_send(call: str, args: str, result: str, nscd_sockets: set[str]) -> str | None:
    if any(f"sa_family={family}" in args for family in INTERNET_FAMILIES):
        return "internet socket"
    if any(f'sun_path="{path}"' in args for path in RESOLVER_SOCKETS):
        return "host-name lookup"
    socket = args.split(",")[0]
    if call == "connect" and result == "0" and any(f'sun_path="{path}"' in args for path in NSCD_SOCKETS):
        nscd_sockets.add(socket)
    elif call == "sendto" and socket in nscd_sockets and _nscd_request(args) in NSCD_HOST_REQUESTS:
        return "host-name lookup"
    return None


def _nscd_request(args: str) -> int | None:
    """The request type in nscd's header (int32 version, int32 type, int32 key length)."""
    sent = _quoted(args)
    data = codecs.escape_decode(sent.encode())[0] if sent is not None else b""
    return struct.unpack("<ii", data[:8])[1] if len(data) >= 8 else None


def _judge_open(call: str, args: str, result: str, rest: str, allowed: Sequence[Path]) -> str | None:
    path = _quoted(args)
    if path in HOST_LOOKUP_FILES:
        return "host-name lookup"
    writes = call == "creat" or any(flag in args for flag in WRITE_FLAGS)
    opened = FD_PATH.match(rest.strip())
    if not writes or result.startswith("-") or not opened:
        return None
    return None if _may_write(Path(opened["path"]), allowed) else "written outside"


def _quoted(args: str, index: int = 0) -> str | None:
    strings = QUOTED.findall(args)
    return strings[index] if len(strings) > index else None


def _target_path(call: str, args: str, cwd: Path) -> Path | None:
    """The path a mkdir, rename, link, symlink or truncate creates or changes (the last path argument)."""
    parts = _split_arguments(args)
    if call in ("mkdir", "truncate"):
        return _absolute(parts[0], None, cwd)
    if call == "mkdirat":
        return _absolute(parts[1], parts[0], cwd)
    if call in ("rename", "link", "symlink"):
        return _absolute(parts[1], None, cwd)
    if call in ("renameat", "renameat2", "linkat"):
        return _absolute(parts[3], parts[2], cwd)
    if call == "symlinkat":
        return _absolute(parts[2], parts[1], cwd)
    return None


def _split_arguments(args: str) -> list[str]:
    """Top-level comma-separated arguments; strings may hold commas."""
    return [part.strip() for part in re.findall(r'"(?:[^"\\]|\\.)*"|[^,]+', args)]


def _absolute(quoted: str, dir_fd: str | None, cwd: Path) -> Path | None:
    if not quoted.startswith('"'):
        return None
    path = Path(quoted[1:-1])
    if path.is_absolute():
        return path
    base = DIR_FD.match(dir_fd) if dir_fd else None
    return Path(base["path"] if base else cwd) / path


def _leads_to(folder: Path, allowed: Sequence[Path]) -> bool:
    """Creating the data folder creates its parents (~/.local/share) too."""
    resolved = Path(os.path.realpath(folder))
    return any(resolved in target.parents for target in allowed)


def _may_write(path: Path, allowed: Sequence[Path]) -> bool:
    text = str(path)
    if text.startswith(ALWAYS_WRITABLE) or BYTECODE.search(text):
        return True
    resolved = Path(os.path.realpath(path))
    return any(resolved == folder or folder in resolved.parents for folder in allowed)
