"""``shmkeyspace get | range | prefixed``: queries of a published snapshot.

Owns the query commands and how their entries print (a table, or ``--json``).
Promises: ``get`` of a missing key exits 1; ``--limit`` bounds what prints, never
what is read under one publication.
"""

from __future__ import annotations

import argparse
from typing import Any, List

from .cli_common import (
    EXIT_OK,
    CliError,
    entry_json,
    open_reader,
    print_json,
    print_table,
)


def cmd_get(args: argparse.Namespace) -> int:
    with open_reader(args.name) as r:
        with r.snapshot() as snap:
            e = snap.get(args.key)
            rev = snap.revision
    if e is None:
        raise CliError(f"key {args.key!r} not found in snapshot {args.name!r} (revision {rev})")
    if args.json:
        print_json(entry_json(e))
    else:
        print_table([e], None)
    return EXIT_OK


def cmd_range(args: argparse.Namespace) -> int:
    with open_reader(args.name) as r:
        with r.snapshot() as snap:
            entries = snap.range(args.from_key, args.to_key or None)
    return _print_entries(entries, args)


def cmd_prefixed(args: argparse.Namespace) -> int:
    with open_reader(args.name) as r:
        with r.snapshot() as snap:
            entries = snap.prefixed(args.prefix)
    return _print_entries(entries, args)


def _print_entries(entries: List[Any], args: argparse.Namespace) -> int:
    total = len(entries)
    if args.limit is not None:
        entries = entries[: args.limit]
    if args.json:
        print_json([entry_json(e) for e in entries])
    else:
        print_table(entries, total)
    return EXIT_OK
