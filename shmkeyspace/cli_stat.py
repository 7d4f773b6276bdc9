"""``shmkeyspace stat | list | unlink``: what a host's snapshots are and removing one.

Owns the health report of one snapshot (``stat``), the list of the host's
snapshots (``list``) and ``unlink``. Promises: ``stat`` reads through a Reader
(the same view workers have) and never writes; ``unlink`` is refused while a
writer holds the name's lock.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from typing import Any, Dict, List, Tuple

from .cli_common import (
    EXIT_OK,
    CliError,
    describe,
    human_bytes,
    open_reader,
    print_json,
    print_rows,
)


def cmd_stat(args: argparse.Namespace) -> int:
    from . import procns
    from .errors import SegmentNotFoundError

    groups = None
    try:
        with open_reader(args.name) as r:
            h = r.health()
            if args.prefixes is not None:
                from . import accounting

                with r.snapshot(copy=True) as snap:
                    groups = accounting.top(accounting.account(snap.entry_sizes(), args.prefixes))
    except SegmentNotFoundError as exc:
        if "no publication yet" not in str(exc):
            raise
        return _stat_loading(args)
    info: Dict[str, Any] = dict(h._asdict())
    # writer_pid is the writer's pid in its own PID namespace (1 in a container).
    where = procns.locate(h.writer_pid, h.writer_pidns)
    info["writer_pid_here"] = where.here
    info["writer_pid_namespace"] = where.namespace
    # Which read path this installation uses ("c": compiled; "python": pure Python).
    info["reader_implementation"] = r.implementation
    if groups is not None:
        info["prefixes"] = [{"prefix": p, "keys": k, "bytes": b} for p, k, b in groups]
    if args.endpoints:
        from .etcd import connect

        c = connect(args.endpoints, timeout=args.timeout)
        try:
            # Any read returns the current revision in its header.
            now = int(c.get_response(b"\0shmkeyspace-stat").header.revision)
        finally:
            c.close()
        info["etcd_current_revision"] = now
        info["lag_behind_etcd"] = max(0, now - h.revision)
    if args.json:
        print_json(info)
        return EXIT_OK
    hb = "never" if h.heartbeat_age is None else f"{h.heartbeat_age:.1f} s ago"
    pid = procns.describe(h.writer_pid, where)
    writer = (
        f"alive ({pid}, heartbeat {hb})"
        if h.writer_alive
        else f"NOT RUNNING (last {pid}, heartbeat {hb}); serving the last snapshot"
    )
    age = time.time() - h.published_at
    published = datetime.datetime.fromtimestamp(h.published_at).isoformat(sep=" ", timespec="seconds")
    if h.etcd_contact_age is None:
        contact = "none yet" if h.writer_alive else "-"
    else:
        contact = f"{h.etcd_contact_age:.1f} s ago"
    rows = [
        ("name", h.name),
        ("writer", writer),
        ("etcd contact", f"{contact}  ({'STALE' if h.stale else 'fresh'})"),
        ("revision", f"{h.revision}  (published snapshot; history epoch {h.epoch})"),
        ("source", _SOURCE_TEXT.get(h.source, h.source)),
        ("etcd revision", f"{h.etcd_revision}  (last heard by the writer; lag {h.lag})"),
    ]
    if "etcd_current_revision" in info:
        rows.append(
            (
                "etcd now",
                f"{info['etcd_current_revision']}  (lag behind etcd "
                f"{info['lag_behind_etcd']}: counts writes outside the prefix too)",
            )
        )
    rows += [
        ("keys", str(h.keys)),
        ("bytes", f"{h.bytes}  ({human_bytes(h.bytes)}, generation {h.generation})"),
        ("published", f"{published}  ({age:.1f} s ago)"),
        ("publications", str(h.seq // 2)),
    ]
    if h.persists or h.persist_failures:
        rows.append(("state file", _persist_text(h)))
    if h.load_state != "idle" or h.load_page_retries or h.load_restarts:
        rows.append(
            ("full load", _load_text(h.load_state, h.load_keys, h.load_page_retries, h.load_restarts))
        )
    if h.retired:
        rows.append(("segments", "RETIRED: removed by their writer or unlink; no newer writer to follow yet"))
    rows += [
        ("read path", f"{r.implementation}  (SHMKEYSPACE_PURE_PYTHON=1 forces python)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if groups is not None:
        print()
        _print_prefixes(groups)
    return EXIT_OK


def _print_prefixes(groups: List[Tuple[str, int, int]]) -> None:
    """The ``stat --prefixes`` table: prefix, keys, bytes, share of the image's entries."""
    total = sum(b for _, _, b in groups) or 1
    pw = max([len("prefix")] + [len(p) for p, _, _ in groups])
    print(f"{'prefix':<{pw}}  {'keys':>10}  {'bytes':>12}  {'share':>6}")
    for p, k, b in groups:
        print(f"{p:<{pw}}  {k:>10}  {human_bytes(b):>12}  {100 * b / total:5.1f}%")


def _load_text(state: str, keys: int, retries: int, restarts: int) -> str:
    """The full-load row of ``stat``: its state, keys so far, retries and restarts."""
    what = {
        "loading": f"LOADING ({keys} keys so far)",
        "waiting": f"WAITING to retry (a slow page or a failed load; {keys} keys read)",
    }.get(state, "done")
    return f"{what}; {retries} pages retried, {restarts} loads restarted"


def _stat_loading(args: argparse.Namespace) -> int:
    """``stat`` of a name whose writer has not published yet: its control block only."""
    from . import segment
    from .reader import load_words
    from .writerlock import writer_is_running

    ctrl = segment.ControlView(args.name)
    try:
        w = ctrl.words
        pid, hb = w[segment.OFF_PID // 8], w[segment.OFF_HEARTBEAT // 8]
        age = (time.monotonic_ns() - hb) / 1e9 if hb else None
        state, keys, retries, restarts = load_words(w)
    finally:
        ctrl.close()
    alive = pid != 0 and age is not None and age < 5.0 and writer_is_running(args.name)
    info = {
        "name": args.name,
        "published": False,
        "writer_alive": alive,
        "writer_pid": pid,
        "heartbeat_age": age,
        "load_state": state,
        "load_keys": keys,
        "load_page_retries": retries,
        "load_restarts": restarts,
    }
    if args.json:
        print_json(info)
        return EXIT_OK
    hbt = "never" if age is None else f"{age:.1f} s ago"
    rows = [
        ("name", args.name),
        ("writer", f"{'alive' if alive else 'NOT RUNNING'} (pid {pid}, heartbeat {hbt})"),
        ("snapshot", "none published yet"),
        ("full load", _load_text(state, keys, retries, restarts)),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return EXIT_OK


def _persist_text(h: Any) -> str:
    """The state-file row of ``stat``: writes, and failures (the newest first if any)."""
    last = "-" if h.persist_age is None else f"last {h.persist_age:.1f} s ago"
    text = f"{h.persists} written ({last})"
    if h.persist_failures:
        ago = "" if h.persist_failure_age is None else f", last {h.persist_failure_age:.1f} s ago"
        text += f"; {h.persist_failures} FAILED{ago} (see the writer's log: disk full? permissions?)"
    return text


_SOURCE_TEXT = {
    "disk": "disk  (restored from the state file or the previous writer's memory; not yet caught up with etcd)",
    "etcd": "etcd  (current with etcd)",
}


def cmd_list(args: argparse.Namespace) -> int:
    from . import procns, segment, writerlock

    rows = []
    for n in segment.snapshot_names():
        row: Dict[str, Any] = {"name": n, "writer_running": writerlock.writer_is_running(n)}
        try:
            with open_reader(n) as r:
                h = r.health()
            row.update(revision=h.revision, keys=h.keys, bytes=h.bytes, writer_pid=h.writer_pid)
            where = procns.locate(h.writer_pid, h.writer_pidns)
            row.update(writer_pid_here=where.here, writer_pid_namespace=where.namespace)
        except Exception as exc:
            row["error"] = describe(exc)
        rows.append(row)
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no snapshots on this host", file=sys.stderr)
        return EXIT_OK
    table = [("NAME", "WRITER", "REVISION", "KEYS", "BYTES")]
    for row in rows:
        table.append(
            (
                row["name"],
                "running" if row["writer_running"] else "stopped",
                str(row.get("revision", "-")),
                str(row.get("keys", "-")),
                human_bytes(row["bytes"]) if "bytes" in row else row.get("error", "-"),
            )
        )
    print_rows(table, right={2, 3})
    return EXIT_OK


def cmd_unlink(args: argparse.Namespace) -> int:
    from . import segment, writerlock
    from .errors import WriterExistsError

    name = segment.validate_name(args.name)
    try:
        removed = writerlock.unlink_all(name)
    except WriterExistsError as exc:
        raise CliError(f"{exc}") from None
    if not removed:
        raise CliError(f"no shared memory segments for snapshot {name!r}")
    print(f"removed {removed} segment{'s' if removed != 1 else ''} of {name!r}")
    return EXIT_OK
