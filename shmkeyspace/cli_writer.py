"""``shmkeyspace writer``: the standalone writer daemon.

Owns turning the writer's command line (and its ``SHMKEYSPACE_*`` variables)
into a :class:`Writer`, running it until SIGTERM/SIGINT, and the exit paths.
Promises: a usage error or a refused start is one line on stderr (CliError);
the segments stay after the writer exits unless ``--unlink-on-exit``; with
``--exit-with-parent`` the writer stops when its parent dies.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import Any, Optional

from .cli_common import (
    ENV,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    CliError,
    describe,
    env,
)

log = logging.getLogger("shmkeyspace.cli")


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
    transform = decoders.resolve_function(args.transform, "transform") if args.transform else None
    gid = _resolve_group(args.group)
    mode = args.mode if args.mode is not None else (0o640 if gid is not None else 0o600)
    password = args.password if args.password is not None else env("ETCD_PASSWORD")
    if (args.user is None) != (password is None):
        raise CliError(
            "etcd authentication needs both --user and a password (--password or SHMKEYSPACE_ETCD_PASSWORD)"
        )
    if args.exit_with_parent:
        _exit_with_parent()

    from .etcd import parse_endpoints
    from .heap import tune_heap
    from .writer import Writer

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
        transform=transform,
        transform_name=args.transform,
        account_depth=args.account_depth,
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
            raise CliError(f"writer {name!r} stopped: {describe(writer.error)}")
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
