"""The ``shmkeyspace`` command: the standalone writer daemon and inspection tools.

Commands (``shmkeyspace COMMAND --help`` for each)::

    writer    mirror an etcd prefix into shared memory until SIGTERM/SIGINT
    get       one key            range     keys in [FROM, TO)
    prefixed  keys under PREFIX  stat      revision, size, writer health, lag
    list      snapshots on this host     unlink    remove a stopped snapshot
    demo      the whole thing on an embedded etcd (see shmkeyspace.demo)

Layout: this module is the parser and the dispatch (and ``demo``); the commands
are in cli_writer.py (writer), cli_query.py (get, range, prefixed), cli_stat.py
(stat, list, unlink), and what they share in cli_common.py.

Promises: every failure the user can cause or fix (bad arguments, unreachable
etcd, unknown snapshot, a decoder that does not import, an invalid name, a
second writer) ends with ONE line ``shmkeyspace: error: ...`` on stderr and a
non-zero exit, never a traceback (``--log-level debug`` adds one).

Exit codes: 0 success; 1 error (including ``get`` of a missing key); 2 bad
usage; 130 interrupted demo. 3 and 4 are never used on purpose: gunicorn < 22
halts the whole server when a child it reaps exits with them, and the gunicorn
integration runs the writer as a child of the master.

Writer options also come from the environment (``SHMKEYSPACE_ENDPOINTS``,
``SHMKEYSPACE_PREFIX``, ``SHMKEYSPACE_NAME``, ``SHMKEYSPACE_DECODER``, ...; see
``shmkeyspace writer --help``) so that a systemd EnvironmentFile or a container
spec can configure it; a flag wins over its variable.

Writer exit: the segments stay. Readers keep answering from the last snapshot
and report the writer dead (``Reader.health().writer_alive``); a restarted
writer takes over in place. ``shmkeyspace unlink NAME`` removes them (refused
while a writer runs); ``--unlink-on-exit`` removes them when the writer stops.

``--json`` output: one JSON object per entry (a list for range/prefixed) with
``key``, ``value``, ``create_revision``, ``mod_revision``, ``version``, ``lease``.
Values are what the writer's decoder produced; bytes anywhere in a key or value
(e.g. every value under the default ``raw`` decoder) are written as
``{"base64": "<standard base64>"}``, so the output is lossless and unambiguous.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Optional, Sequence

from .cli_common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    describe,
    env,
    summarize,
)
from .cli_query import cmd_get, cmd_prefixed, cmd_range
from .cli_stat import cmd_list, cmd_stat, cmd_unlink
from .cli_writer import cmd_writer

__all__ = ["CliError", "build_parser", "main", "summarize"]

log = logging.getLogger("shmkeyspace.cli")


# -- argument parsing -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is one --help away)."""

    def error(self, message: str) -> "NoReturn":
        one_line = " ".join(message.split())
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Mirror an etcd prefix into POSIX shared memory: one writer per host, "
        "lock-free readers in every process.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    w = sub.add_parser(
        "writer",
        help="run the writer daemon for one prefix",
        description="Load every key under --prefix, publish it as snapshot --name, then follow "
        "etcd's watch until SIGTERM/SIGINT (exit 0). Each option defaults to the environment "
        "variable shown. On exit the segments stay: readers keep the last snapshot and see the "
        "writer dead; `shmkeyspace unlink NAME` (or --unlink-on-exit) removes them.",
    )
    w.add_argument(
        "--endpoints",
        default=env("ENDPOINTS", "127.0.0.1:2379"),
        metavar="HOST:PORT[,...]",
        help="etcd endpoints [SHMKEYSPACE_ENDPOINTS, default 127.0.0.1:2379]",
    )
    w.add_argument(
        "--prefix",
        default=env("PREFIX"),
        help="key prefix to mirror: /services mirrors every key starting with /services (also "
        "/services-old/...), /services/ only the keys under /services/ [SHMKEYSPACE_PREFIX, required]",
    )
    w.add_argument(
        "--name", default=env("NAME"), help="snapshot name readers attach to [SHMKEYSPACE_NAME, required]"
    )
    w.add_argument(
        "--decoder",
        default=env("DECODER", "raw"),
        metavar="raw|utf8|json|msgpack|MODULE:FUNCTION|struct:MODULE:TYPE",
        help="how values are decoded before publishing (struct: a msgspec Struct, the typed extra) "
        "[SHMKEYSPACE_DECODER, default raw]",
    )
    w.add_argument(
        "--transform",
        default=env("TRANSFORM"),
        metavar="MODULE:FUNCTION",
        help="a projection: FUNCTION(key, decoded) returns what readers get (e.g. the value without "
        "the fields no reader reads), run in the writer before packing; a key it raises for is left "
        "out and logged [SHMKEYSPACE_TRANSFORM]",
    )
    w.add_argument(
        "--account-depth",
        type=_non_negative_int,
        default=env("ACCOUNT_DEPTH"),
        metavar="N",
        help="keep keys and bytes per prefix (the key's directory, at most N path segments from the key's "
        "start: 2 groups /services/x/y under /services/x/) for the metrics "
        "(shmkeyspace_writer_prefix_bytes) [SHMKEYSPACE_ACCOUNT_DEPTH, default off]",
    )
    w.add_argument(
        "--apply-delay",
        type=_non_negative_float,
        default=env("APPLY_DELAY", "30"),
        metavar="MS",
        help="batch watch events for this long before publishing [SHMKEYSPACE_APPLY_DELAY, default 30]",
    )
    w.add_argument(
        "--group",
        default=env("GROUP"),
        metavar="GROUP|GID",
        help="group owning the segments; makes them 0640 unless --mode [SHMKEYSPACE_GROUP]",
    )
    w.add_argument(
        "--mode",
        type=_octal,
        default=env("MODE"),
        metavar="OCTAL",
        help="segment permissions [SHMKEYSPACE_MODE, default 0600, or 0640 with --group]",
    )
    w.add_argument("--user", default=env("ETCD_USER"), help="etcd user [SHMKEYSPACE_ETCD_USER]")
    w.add_argument(
        "--password",
        default=None,
        help="etcd password (prefer the SHMKEYSPACE_ETCD_PASSWORD variable: "
        "command lines are visible to every local user)",
    )
    w.add_argument(
        "--cacert", default=env("CACERT"), metavar="FILE", help="CA bundle: use TLS [SHMKEYSPACE_CACERT]"
    )
    w.add_argument(
        "--cert", default=env("CERT"), metavar="FILE", help="client certificate [SHMKEYSPACE_CERT]"
    )
    w.add_argument(
        "--key",
        default=env("CERT_KEY"),
        metavar="FILE",
        help="client certificate key [SHMKEYSPACE_CERT_KEY]",
    )
    w.add_argument(
        "--timeout",
        type=_positive_float,
        default=env("TIMEOUT", "10"),
        metavar="S",
        help="etcd request timeout in seconds [SHMKEYSPACE_TIMEOUT, default 10]",
    )
    w.add_argument(
        "--client",
        choices=("auto", "pyetcd", "etcd3"),
        default=env("CLIENT", "auto"),
        help="etcd client library [SHMKEYSPACE_CLIENT, default auto: pyetcd, else etcd3]",
    )
    w.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=env("HEARTBEAT", "0.5"),
        metavar="S",
        help="heartbeat interval in seconds [SHMKEYSPACE_HEARTBEAT, default 0.5]",
    )
    w.add_argument(
        "--state-dir",
        default=env("STATE_DIR"),
        metavar="DIR",
        help="fail static: persist the snapshot to DIR/NAME.snap and, on start, publish it at once "
        "and resume etcd's watch from its revision (created 0700 if missing) [SHMKEYSPACE_STATE_DIR]",
    )
    w.add_argument(
        "--persist-interval",
        type=_positive_float,
        default=env("PERSIST_INTERVAL", "5"),
        metavar="S",
        help="with --state-dir: write the state file at most this often when something changed, "
        "and on exit [SHMKEYSPACE_PERSIST_INTERVAL, default 5]",
    )
    w.add_argument(
        "--view-grace",
        type=_non_negative_float,
        default=env("VIEW_GRACE", "0.1"),
        metavar="S",
        help="every snapshot view (Reader.snapshot()) stays valid at least this long; under sustained "
        "churn publications are spaced by it (0: as fast as possible) [SHMKEYSPACE_VIEW_GRACE, default 0.1]",
    )
    w.add_argument(
        "--watch-silence",
        type=_non_negative_float,
        default=env("WATCH_SILENCE", "1800"),
        metavar="S",
        help="re-open a watch stream that delivered nothing, not even a progress notification, for "
        "this long while etcd answers reads (a dead stream behind a gRPC proxy); 0: no bound. Behind a "
        "proxy, set it to ~3x etcd's --experimental-watch-progress-notify-interval "
        "[SHMKEYSPACE_WATCH_SILENCE, default 1800]",
    )
    w.add_argument(
        "--stale-after",
        type=_positive_float,
        default=env("STALE_AFTER", "5"),
        metavar="S",
        help="seconds without contact with etcd after which readers see the mirror as stale and "
        "the writer reconnects, to the next endpoint [SHMKEYSPACE_STALE_AFTER, default 5]",
    )
    w.add_argument(
        "--unlink-on-exit",
        action="store_true",
        default=env("UNLINK_ON_EXIT") == "1",
        help="remove the segments when the writer stops [SHMKEYSPACE_UNLINK_ON_EXIT=1]",
    )
    w.add_argument(
        "--changes-keep",
        type=_non_negative_int,
        default=env("CHANGES_KEEP", "1024"),
        metavar="N",
        help="publications the change feed keeps for Reader.changes/watch; 0 disables it "
        "[SHMKEYSPACE_CHANGES_KEEP, default 1024]",
    )
    w.add_argument(
        "--changes-bytes",
        type=_non_negative_int,
        default=env("CHANGES_BYTES", "262144"),
        metavar="B",
        help="bytes of changed keys the change feed keeps (copied into every publication) "
        "[SHMKEYSPACE_CHANGES_BYTES, default 262144]",
    )
    w.add_argument(
        "--metrics-port",
        type=_positive_int,
        default=env("METRICS_PORT"),
        metavar="PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs shmkeyspace[metrics]) "
        "[SHMKEYSPACE_METRICS_PORT]",
    )
    w.add_argument(
        "--metrics-addr",
        default=env("METRICS_ADDR", "127.0.0.1"),
        metavar="ADDR",
        help="address the metrics server binds [SHMKEYSPACE_METRICS_ADDR, default 127.0.0.1]",
    )
    w.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit (cleanly) when the process that started this one dies; used by the "
        "gunicorn integration so an orphaned writer never blocks the next one (Linux)",
    )
    _log_level_arg(w)
    w.set_defaults(func=cmd_writer)

    g = sub.add_parser(
        "get", help="print one key", description="Print one key of snapshot NAME (exit 1 if it is missing)."
    )
    g.add_argument("name")
    g.add_argument("key")
    _json_arg(g)
    g.set_defaults(func=cmd_get)

    r = sub.add_parser(
        "range",
        help="print keys in [FROM, TO)",
        description="Print the keys FROM <= key < TO in key order; TO '' means to the end.",
    )
    r.add_argument("name")
    r.add_argument("from_key", metavar="FROM")
    r.add_argument("to_key", metavar="TO")
    _json_arg(r)
    _limit_arg(r)
    r.set_defaults(func=cmd_range)

    x = sub.add_parser(
        "prefixed",
        help="print keys starting with PREFIX",
        description="Print the keys starting with PREFIX in key order.",
    )
    x.add_argument("name")
    x.add_argument("prefix")
    _json_arg(x)
    _limit_arg(x)
    x.set_defaults(func=cmd_prefixed)

    s = sub.add_parser(
        "stat",
        help="revision, size, writer health and lag",
        description="Show the published snapshot and its writer. With --endpoints, also ask etcd for "
        "its current revision: the difference to the published revision counts every etcd write, "
        "while the published revision only moves when something under the prefix changes, so an "
        "idle prefix on a busy etcd shows a lag that is not staleness.",
    )
    s.add_argument("name")
    s.add_argument("--endpoints", default=None, metavar="HOST:PORT[,...]", help="etcd to compare with")
    s.add_argument("--timeout", type=_positive_float, default=5.0, metavar="S", help=argparse.SUPPRESS)
    s.add_argument(
        "--prefixes",
        type=_non_negative_int,
        default=None,
        metavar="DEPTH",
        help="also show keys and bytes per prefix: each key's directory, at most DEPTH path segments "
        "from its start (2: /services/x/ for /services/x/y); reads every key of the snapshot",
    )
    _json_arg(s)
    s.set_defaults(func=cmd_stat)

    ls = sub.add_parser(
        "list",
        help="list the snapshots on this host",
        description="List the snapshot names that have segments in /dev/shm.",
    )
    _json_arg(ls)
    ls.set_defaults(func=cmd_list)

    u = sub.add_parser(
        "unlink",
        help="remove the segments of a stopped snapshot",
        description="Remove every shared-memory segment of NAME. Refused while its writer "
        "runs. Attached readers keep their mappings until they close them.",
    )
    u.add_argument("name")
    u.set_defaults(func=cmd_unlink)

    d = sub.add_parser(
        "demo",
        help="run a self-contained demo on an embedded etcd",
        description="Start an embedded etcd, seed it, run a writer and reader processes, make live "
        "updates and print throughput, update-to-visible latency and memory. Cleans up everything.",
    )
    d.add_argument("--keys", type=_positive_int, default=None, help="keys to seed (default 100000)")
    d.add_argument("--readers", type=_positive_int, default=None, help="reader processes (default 4)")
    d.add_argument("--updates", type=_positive_int, default=None, help="live updates (default 20)")
    d.add_argument(
        "--seconds",
        type=_positive_float,
        default=None,
        help="seconds readers hammer before the updates (default 3)",
    )
    d.add_argument(
        "--apply-delay",
        type=_non_negative_float,
        default=30.0,
        metavar="MS",
        help="writer's apply delay (default 30)",
    )
    d.add_argument(
        "--short",
        action="store_true",
        help="a quick run: 5000 keys, 2 readers, 5 updates, 1 s (explicit options win)",
    )
    d.add_argument("--verbose", action="store_true", help="show the writer's log")
    d.set_defaults(func=cmd_demo)
    return p


def _log_level_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default=env("LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
        type=str.lower,
        help="[SHMKEYSPACE_LOG_LEVEL, default info]",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help='machine-readable output (bytes as {"base64": ...})')


def _limit_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=_positive_int, default=None, help="print at most this many entries")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def _non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    v = _non_negative_float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def _non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {s!r}")
    return v


def _octal(s: str) -> int:
    try:
        v = int(s, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {s!r} (e.g. 0640)") from None
    if not 0 <= v <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {s!r}")
    if v & 0o022:
        raise argparse.ArgumentTypeError(
            f"{v:04o} lets users other than the writer's write the snapshot, and readers refuse such "
            "segments: use 0600, or 0640 with --group"
        )
    return v


def _version() -> str:
    from . import __version__

    return __version__


# -- entry point ------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit code (see module doc)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # argparse prints usage and exits 2 on bad usage
        _setup_logging(getattr(args, "log_level", "warning"))
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse (usage, --help); returned, not raised, for callers of main()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else _fail(str(exc.code)))
    except CliError as exc:
        return _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `shmkeyspace prefixed ... | head`
        try:  # keep the interpreter's final flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Exception as exc:  # anything else: still one line, traceback on request
        log.debug("traceback", exc_info=True)
        return _fail(describe(exc))


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    one_line = " ".join(str(message).split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr, flush=True)
    return code


def _setup_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # grpc and the etcd clients are chatty at debug level only when asked.
    for noisy in ("grpc", "pyetcd", "etcd3"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        keys=args.keys,
        readers=args.readers,
        updates=args.updates,
        seconds=args.seconds,
        apply_delay_ms=args.apply_delay,
        short=args.short,
        verbose=args.verbose,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
