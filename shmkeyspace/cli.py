"""The ``shmkeyspace`` command: the standalone writer daemon and inspection tools.

Commands (``shmkeyspace COMMAND --help`` for each)::

    writer    mirror an etcd prefix into shared memory until SIGTERM/SIGINT
    get       one key            range     keys in [FROM, TO)
    prefixed  keys under PREFIX  stat      revision, size, writer health, lag
    list      snapshots on this host     unlink    remove a stopped snapshot
    demo      the whole thing on an embedded etcd (see shmkeyspace.demo)

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
import base64
import datetime
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import AbstractSet, Any, Dict, List, NoReturn, Optional, Sequence

from .errors import ShmKeyspaceError

log = logging.getLogger("shmkeyspace.cli")

PROG = "shmkeyspace"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
ENV = "SHMKEYSPACE_"


class CliError(ShmKeyspaceError):
    """An error reported as one line on stderr (exit code ``code``)."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    v = os.environ.get(ENV + name)
    return v if v not in (None, "") else default


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
        default=_env("ENDPOINTS", "127.0.0.1:2379"),
        metavar="HOST:PORT[,...]",
        help="etcd endpoints [SHMKEYSPACE_ENDPOINTS, default 127.0.0.1:2379]",
    )
    w.add_argument(
        "--prefix",
        default=_env("PREFIX"),
        help="key prefix to mirror: /services mirrors every key starting with /services (also "
        "/services-old/...), /services/ only the keys under /services/ [SHMKEYSPACE_PREFIX, required]",
    )
    w.add_argument(
        "--name", default=_env("NAME"), help="snapshot name readers attach to [SHMKEYSPACE_NAME, required]"
    )
    w.add_argument(
        "--decoder",
        default=_env("DECODER", "raw"),
        metavar="raw|utf8|json|msgpack|MODULE:FUNCTION|struct:MODULE:TYPE",
        help="how values are decoded before publishing (struct: a msgspec Struct, the typed extra) "
        "[SHMKEYSPACE_DECODER, default raw]",
    )
    w.add_argument(
        "--apply-delay",
        type=_non_negative_float,
        default=_env("APPLY_DELAY", "30"),
        metavar="MS",
        help="batch watch events for this long before publishing [SHMKEYSPACE_APPLY_DELAY, default 30]",
    )
    w.add_argument(
        "--group",
        default=_env("GROUP"),
        metavar="GROUP|GID",
        help="group owning the segments; makes them 0640 unless --mode [SHMKEYSPACE_GROUP]",
    )
    w.add_argument(
        "--mode",
        type=_octal,
        default=_env("MODE"),
        metavar="OCTAL",
        help="segment permissions [SHMKEYSPACE_MODE, default 0600, or 0640 with --group]",
    )
    w.add_argument("--user", default=_env("ETCD_USER"), help="etcd user [SHMKEYSPACE_ETCD_USER]")
    w.add_argument(
        "--password",
        default=None,
        help="etcd password (prefer the SHMKEYSPACE_ETCD_PASSWORD variable: "
        "command lines are visible to every local user)",
    )
    w.add_argument(
        "--cacert", default=_env("CACERT"), metavar="FILE", help="CA bundle: use TLS [SHMKEYSPACE_CACERT]"
    )
    w.add_argument(
        "--cert", default=_env("CERT"), metavar="FILE", help="client certificate [SHMKEYSPACE_CERT]"
    )
    w.add_argument(
        "--key",
        default=_env("CERT_KEY"),
        metavar="FILE",
        help="client certificate key [SHMKEYSPACE_CERT_KEY]",
    )
    w.add_argument(
        "--timeout",
        type=_positive_float,
        default=_env("TIMEOUT", "10"),
        metavar="S",
        help="etcd request timeout in seconds [SHMKEYSPACE_TIMEOUT, default 10]",
    )
    w.add_argument(
        "--client",
        choices=("auto", "pyetcd", "etcd3"),
        default=_env("CLIENT", "auto"),
        help="etcd client library [SHMKEYSPACE_CLIENT, default auto: pyetcd, else etcd3]",
    )
    w.add_argument(
        "--heartbeat",
        type=_positive_float,
        default=_env("HEARTBEAT", "0.5"),
        metavar="S",
        help="heartbeat interval in seconds [SHMKEYSPACE_HEARTBEAT, default 0.5]",
    )
    w.add_argument(
        "--state-dir",
        default=_env("STATE_DIR"),
        metavar="DIR",
        help="fail static: persist the snapshot to DIR/NAME.snap and, on start, publish it at once "
        "and resume etcd's watch from its revision (created 0700 if missing) [SHMKEYSPACE_STATE_DIR]",
    )
    w.add_argument(
        "--persist-interval",
        type=_positive_float,
        default=_env("PERSIST_INTERVAL", "5"),
        metavar="S",
        help="with --state-dir: write the state file at most this often when something changed, "
        "and on exit [SHMKEYSPACE_PERSIST_INTERVAL, default 5]",
    )
    w.add_argument(
        "--view-grace",
        type=_non_negative_float,
        default=_env("VIEW_GRACE", "0.1"),
        metavar="S",
        help="every snapshot view (Reader.snapshot()) stays valid at least this long; under sustained "
        "churn publications are spaced by it (0: as fast as possible) [SHMKEYSPACE_VIEW_GRACE, default 0.1]",
    )
    w.add_argument(
        "--watch-silence",
        type=_non_negative_float,
        default=_env("WATCH_SILENCE", "1800"),
        metavar="S",
        help="re-open a watch stream that delivered nothing, not even a progress notification, for "
        "this long while etcd answers reads (a dead stream behind a gRPC proxy); 0: no bound. Behind a "
        "proxy, set it to ~3x etcd's --experimental-watch-progress-notify-interval "
        "[SHMKEYSPACE_WATCH_SILENCE, default 1800]",
    )
    w.add_argument(
        "--stale-after",
        type=_positive_float,
        default=_env("STALE_AFTER", "5"),
        metavar="S",
        help="seconds without contact with etcd after which readers see the mirror as stale and "
        "the writer reconnects, to the next endpoint [SHMKEYSPACE_STALE_AFTER, default 5]",
    )
    w.add_argument(
        "--unlink-on-exit",
        action="store_true",
        default=_env("UNLINK_ON_EXIT") == "1",
        help="remove the segments when the writer stops [SHMKEYSPACE_UNLINK_ON_EXIT=1]",
    )
    w.add_argument(
        "--changes-keep",
        type=_non_negative_int,
        default=_env("CHANGES_KEEP", "1024"),
        metavar="N",
        help="publications the change feed keeps for Reader.changes/watch; 0 disables it "
        "[SHMKEYSPACE_CHANGES_KEEP, default 1024]",
    )
    w.add_argument(
        "--changes-bytes",
        type=_non_negative_int,
        default=_env("CHANGES_BYTES", "262144"),
        metavar="B",
        help="bytes of changed keys the change feed keeps (copied into every publication) "
        "[SHMKEYSPACE_CHANGES_BYTES, default 262144]",
    )
    w.add_argument(
        "--metrics-port",
        type=_positive_int,
        default=_env("METRICS_PORT"),
        metavar="PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (needs shmkeyspace[metrics]) "
        "[SHMKEYSPACE_METRICS_PORT]",
    )
    w.add_argument(
        "--metrics-addr",
        default=_env("METRICS_ADDR", "127.0.0.1"),
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
        default=_env("LOG_LEVEL", "info"),
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
        return _fail(_describe(exc))


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    one_line = " ".join(str(message).split())
    print(f"{PROG}: error: {one_line}", file=sys.stderr, flush=True)
    return code


def _describe(exc: BaseException) -> str:
    from .errors import ShmKeyspaceError

    msg = str(exc).strip()
    if (
        isinstance(
            exc,
            (ShmKeyspaceError, ConnectionError, ValueError, FileNotFoundError, PermissionError, ImportError),
        )
        and msg
    ):
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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


# -- writer -----------------------------------------------------------------------


class _Interrupted(BaseException):
    """Raised by the signal handler to abandon a long initial load.

    A BaseException, like KeyboardInterrupt: the load's retries (Writer.load,
    load.range_page) catch Exception and must not swallow it.
    """


def cmd_writer(args: argparse.Namespace) -> int:
    from . import decoders, segment

    missing = [f"--{n} (or {ENV}{n.upper()})" for n in ("prefix", "name") if not getattr(args, n)]
    if missing:
        raise CliError(
            "the writer needs " + " and ".join(missing) + f" (see '{PROG} writer --help')", EXIT_USAGE
        )
    name = segment.validate_name(args.name)
    decoder = decoders.resolve(args.decoder)
    gid = _resolve_group(args.group)
    mode = args.mode if args.mode is not None else (0o640 if gid is not None else 0o600)
    password = args.password if args.password is not None else _env("ETCD_PASSWORD")
    if (args.user is None) != (password is None):
        raise CliError(
            "etcd authentication needs both --user and a password (--password or SHMKEYSPACE_ETCD_PASSWORD)"
        )
    if args.exit_with_parent:
        _exit_with_parent()

    from .etcd import parse_endpoints
    from .writer import Writer, tune_heap

    tune_heap()  # the daemon's own process: keep a full load's garbage out of its RSS

    parse_endpoints(args.endpoints)  # a bad address is a usage error before any side effect
    connect_args = dict(
        client=args.client,
        timeout=args.timeout,
        user=args.user,
        password=password,
        ca_cert=args.cacert,
        cert_cert=args.cert,
        cert_key=args.key,
    )
    fresh = not os.path.exists(segment.shm_path(segment.ctrl_name(name)))
    writer = Writer(
        name,
        args.prefix,
        endpoints=args.endpoints,
        connect_args=connect_args,
        decoder=decoder,
        apply_delay=args.apply_delay / 1000.0,
        mode=mode,
        gid=gid,
        heartbeat_interval=args.heartbeat,
        unlink_on_exit=args.unlink_on_exit,
        state_dir=args.state_dir,
        persist_interval=args.persist_interval,
        decoder_name=args.decoder,
        changes_keep=args.changes_keep,
        changes_bytes=args.changes_bytes,
        stale_after=args.stale_after,
        watch_silence=args.watch_silence,
        view_grace=args.view_grace,
    )
    metrics_server = None
    if args.metrics_port:
        try:
            from .metrics import serve_writer_metrics
        except ImportError:
            writer.unlink_on_exit = fresh
            writer.stop()
            raise CliError(
                "--metrics-port needs prometheus_client: pip install 'shmkeyspace[metrics]'"
            ) from None
        try:
            metrics_server, _ = serve_writer_metrics(writer, args.metrics_port, args.metrics_addr)
        except OSError as exc:
            writer.unlink_on_exit = fresh
            writer.stop()
            raise CliError(
                f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}"
            ) from None
    stop = threading.Event()
    state = {"loading": True, "started": False}

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            return
        stop.set()
        log.info("%s: stopping", signal.Signals(signum).name)
        if state["loading"]:
            raise _Interrupted()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            # Fail static: a valid state file is published before etcd is asked
            # anything; then an unreachable etcd is waited for, not an error.
            restored = writer.restore()
            if restored:
                fresh = False
            else:
                writer.connect()  # fails fast, and quietly, on a wrong address
            state["started"] = True
            log.info(
                "writer %r (pid %d): mirroring %r from %s, decoder %s, apply delay %g ms, segments %04o%s",
                name,
                os.getpid(),
                args.prefix,
                args.endpoints,
                args.decoder,
                args.apply_delay,
                mode,
                f" group {gid}" if gid is not None else "",
            )
            if not restored:
                writer.load()
        except BaseException as exc:
            if fresh:
                # Nothing was ever published under this name: leave nothing behind.
                writer.unlink_on_exit = True
            if isinstance(exc, _Interrupted):
                return EXIT_OK
            raise
        finally:
            state["loading"] = False
        if stop.is_set():
            return EXIT_OK

        writer.start()  # loaded: runs the watch on the writer's own thread
        while not stop.wait(0.5):
            if writer.wait(0):
                break
        if writer.error is not None:
            raise CliError(f"writer {name!r} stopped: {_describe(writer.error)}")
        return EXIT_OK
    finally:
        writer.stop()
        if metrics_server is not None:
            metrics_server.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
        if state["started"]:
            log.info(
                "writer %r stopped; segments %s",
                name,
                "removed" if writer.unlink_on_exit else "kept (readers keep the last snapshot)",
            )


def _resolve_group(group: Optional[str]) -> Optional[int]:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise CliError(f"unknown group {group!r}") from None


def _exit_with_parent() -> None:
    """Ask Linux to send SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG)."""
    ppid = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError) as exc:
        log.warning("--exit-with-parent is not supported here (%s)", exc)
        return
    if os.getppid() != ppid or ppid == 1:  # the parent died before prctl took effect
        raise CliError("parent process exited before the writer started")


# -- read-side commands -----------------------------------------------------------


def _open_reader(name: str) -> Any:
    from .reader import Reader

    return Reader(name)


def cmd_get(args: argparse.Namespace) -> int:
    with _open_reader(args.name) as r:
        with r.snapshot() as snap:
            e = snap.get(args.key)
            rev = snap.revision
    if e is None:
        raise CliError(f"key {args.key!r} not found in snapshot {args.name!r} (revision {rev})")
    if args.json:
        _print_json(_entry_json(e))
    else:
        _print_table([e], None)
    return EXIT_OK


def cmd_range(args: argparse.Namespace) -> int:
    with _open_reader(args.name) as r:
        with r.snapshot() as snap:
            entries = snap.range(args.from_key, args.to_key or None)
    return _print_entries(entries, args)


def cmd_prefixed(args: argparse.Namespace) -> int:
    with _open_reader(args.name) as r:
        with r.snapshot() as snap:
            entries = snap.prefixed(args.prefix)
    return _print_entries(entries, args)


def _print_entries(entries: List[Any], args: argparse.Namespace) -> int:
    total = len(entries)
    if args.limit is not None:
        entries = entries[: args.limit]
    if args.json:
        _print_json([_entry_json(e) for e in entries])
    else:
        _print_table(entries, total)
    return EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    from . import procns
    from .errors import SegmentNotFoundError

    try:
        with _open_reader(args.name) as r:
            h = r.health()
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
        _print_json(info)
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
        ("bytes", f"{h.bytes}  ({_human_bytes(h.bytes)}, generation {h.generation})"),
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
    return EXIT_OK


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

    ctrl = segment.ControlView(args.name)
    try:
        w = ctrl.words
        pid, hb = w[segment.OFF_PID // 8], w[segment.OFF_HEARTBEAT // 8]
        age = (time.monotonic_ns() - hb) / 1e9 if hb else None
        state, keys, retries, restarts = load_words(w)
    finally:
        ctrl.close()
    alive = pid != 0 and age is not None and age < 5.0 and segment.writer_is_running(args.name)
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
        _print_json(info)
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
    from . import procns, segment

    rows = []
    for n in segment.snapshot_names():
        row: Dict[str, Any] = {"name": n, "writer_running": segment.writer_is_running(n)}
        try:
            with _open_reader(n) as r:
                h = r.health()
            row.update(revision=h.revision, keys=h.keys, bytes=h.bytes, writer_pid=h.writer_pid)
            where = procns.locate(h.writer_pid, h.writer_pidns)
            row.update(writer_pid_here=where.here, writer_pid_namespace=where.namespace)
        except Exception as exc:
            row["error"] = _describe(exc)
        rows.append(row)
    if args.json:
        _print_json(rows)
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
                _human_bytes(row["bytes"]) if "bytes" in row else row.get("error", "-"),
            )
        )
    _print_rows(table, right={2, 3})
    return EXIT_OK


def cmd_unlink(args: argparse.Namespace) -> int:
    from . import segment
    from .errors import WriterExistsError

    name = segment.validate_name(args.name)
    try:
        removed = segment.unlink_all(name)
    except WriterExistsError as exc:
        raise CliError(f"{exc}") from None
    if not removed:
        raise CliError(f"no shared memory segments for snapshot {name!r}")
    print(f"removed {removed} segment{'s' if removed != 1 else ''} of {name!r}")
    return EXIT_OK


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


# -- output helpers ---------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"base64": base64.b64encode(bytes(v)).decode("ascii")}
    if isinstance(v, dict):
        return {(k if isinstance(k, str) else json.dumps(_jsonable(k))): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)  # msgpack ext types and the like


def _entry_json(e: Any) -> Dict[str, Any]:
    return {
        "key": _jsonable(e.key),
        "value": _jsonable(e.decoded),
        "create_revision": e.create_revision,
        "mod_revision": e.mod_revision,
        "version": e.version,
        "lease": e.lease,
    }


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def summarize(value: Any, width: int = 60) -> str:
    """A one-line, truncated rendering of a decoded value for tables."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)
        try:
            text = b.decode("utf-8")
            s = text if text.isprintable() else repr(text)
        except UnicodeDecodeError:
            s = repr(b)
    elif isinstance(value, str):
        s = value if value.isprintable() else repr(value)
    else:
        try:
            s = json.dumps(_jsonable(value), separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError):
            s = repr(value)
    return s if len(s) <= width else s[: width - 1] + "…"


def _key_text(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


def _print_table(entries: List[Any], total: Optional[int]) -> None:
    rows = [("KEY", "MOD_REV", "VER", "VALUE")]
    for e in entries:
        rows.append((_key_text(e.key), str(e.mod_revision), str(e.version), summarize(e.decoded)))
    _print_rows(rows, right={1, 2})
    if total is not None:
        more = total - len(entries)
        print(
            f"({total} entr{'y' if total == 1 else 'ies'}" + (f", {more} not shown" if more else "") + ")",
            file=sys.stderr,
        )


def _print_rows(rows: Sequence[Sequence[str]], right: AbstractSet[int] = frozenset()) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        cells = [(c.rjust(widths[i]) if i in right else c.ljust(widths[i])) for i, c in enumerate(r)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
