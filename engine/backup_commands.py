"""``prt backup create OUT.zip`` and ``prt backup restore IN.zip``: one file with everything (engine/app/backup.py).

Both take ``--data-folder`` like the other commands and ``--json`` for the summary (one JSON object on stdout);
an error is one ``prt: error: ...`` line and exit 1 (engine/app/jobs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.app.backup import BackupSummary, create_backup, restore_backup
from engine.cli import add_data_folder_argument


def register(commands: argparse._SubParsersAction) -> None:
    """Adds backup (create, restore) to `prt`."""
    backup = commands.add_parser(
        "backup", help="one file with the chats, feedback, settings and rewards (not the models); restore it"
    )
    actions = backup.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="back up the data folder to one zip file")
    create.add_argument("out", type=Path, metavar="OUT.zip", help="the backup file to write")
    restore = actions.add_parser(
        "restore", help="restore a backup into a data folder that has no chats yet (a new one, or after delete all)"
    )
    restore.add_argument("archive", type=Path, metavar="IN.zip", help="a file made by 'prt backup create'")
    for parser, handler in ((create, cmd_backup_create), (restore, cmd_backup_restore)):
        add_data_folder_argument(parser)
        parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
        parser.set_defaults(handler=handler)


def cmd_backup_create(args: argparse.Namespace) -> int:
    return _report(create_backup(args.paths, args.out), args.json)


def cmd_backup_restore(args: argparse.Namespace) -> int:
    return _report(restore_backup(args.archive, args.paths), args.json)


def _report(summary: BackupSummary, as_json: bool) -> int:
    if summary.skipped:  # on stderr either way, so a script reading --json's stdout still hears of them
        for file in summary.skipped:
            print(f"prt: skipped {file.path} ({file.reason})", file=sys.stderr)
    print(json.dumps(summary.to_json(), ensure_ascii=False) if as_json else summary.describe())
    return 0
