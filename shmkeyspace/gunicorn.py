"""gunicorn integration: one writer per master, one read-only Reader per worker.

In a gunicorn config file (one line, plus settings)::

    from shmkeyspace.gunicorn import *   # on_starting, post_fork, worker_exit, on_exit
    configure(name="services", prefix="/services", endpoints="10.0.0.1:2379", decoder="json")

or leave out ``configure`` and set ``SHMKEYSPACE_NAME``, ``SHMKEYSPACE_PREFIX``,
``SHMKEYSPACE_ENDPOINTS``, ``SHMKEYSPACE_DECODER`` in the environment. In the app::

    from shmkeyspace.gunicorn import reader
    entry = reader().get("/services/api/instance-1")

What the hooks promise:

* ``on_starting`` (master, before any worker): unless ``SHMKEYSPACE_EXTERNAL_WRITER=1``,
  starts ``python -m shmkeyspace writer ...`` as a child and waits until that
  writer has published its first snapshot, so workers never boot empty. If
  another live writer already publishes the name (another gunicorn, a systemd
  unit, a master being replaced by SIGUSR2), it stands by instead and takes over
  when that writer exits. A monitor thread restarts a writer that dies, with
  exponential backoff (0.5 s doubling to 30 s, reset after 60 s of uptime),
  logging each exit through gunicorn's error log. Meanwhile workers keep
  answering from the last snapshot. The writer runs in its own session (a
  terminal's Ctrl-C reaches only the master, which then stops it in order) and
  with ``--exit-with-parent``, so a SIGKILLed master cannot leave it orphaned.
* Workers that drop privileges (gunicorn run as root with ``user``/``group``):
  ``on_starting`` reads gunicorn's ``uid``/``gid`` and, when they differ from
  the master's, starts the writer with ``--group GID`` so every segment it
  creates, in every generation, is root-owned, group GID and 0640. Workers
  attach in ``post_fork`` while still root and then drop to ``user``; without
  the group bit the first new generation would be unreadable to them. A group
  you set yourself (``SHMKEYSPACE_GROUP`` or ``--group`` in the writer args)
  wins.
* ``post_fork`` (each worker): attaches a Reader (waiting up to
  ``SHMKEYSPACE_WORKER_WAIT`` seconds, default 10, for an external writer);
  ``reader()`` returns it. The master never holds a Reader across fork.
* ``worker_exit`` closes the worker's Reader; ``on_exit`` stops the writer
  (SIGTERM, then SIGKILL after 10 s). Segments stay after exit, as with the
  standalone writer, unless ``SHMKEYSPACE_UNLINK_ON_EXIT=1``.

``reader()`` also works without the hooks (e.g. with an external writer and a
config that does not import them): it attaches lazily on first use in each
process and raises SegmentNotFoundError while there is nothing to attach to.

Other settings (env var / ``configure`` keyword): ``SHMKEYSPACE_APPLY_DELAY`` /
``apply_delay_ms``; ``SHMKEYSPACE_WRITER_ARGS`` / ``writer_args`` (extra writer
flags, e.g. ``--group www-data --cacert /etc/etcd/ca.pem``; the writer also reads
its own ``SHMKEYSPACE_*`` variables, such as ``SHMKEYSPACE_ETCD_PASSWORD``, from
the inherited environment); ``SHMKEYSPACE_START_TIMEOUT`` / ``start_timeout``
(seconds to wait for the first snapshot, default 120); ``SHMKEYSPACE_STATE_DIR`` /
``state_dir`` and ``SHMKEYSPACE_PERSIST_INTERVAL`` / ``persist_interval`` (fail
static: the writer keeps a copy of the snapshot there and, after a reboot,
publishes it at once, so ``on_starting`` returns and workers boot even while
etcd is unreachable; a warning says so in the log); ``SHMKEYSPACE_WRITER_UID`` /
``writer_uid`` (uid or user name of an external writer the workers trust; see
README, "Security": workers trust segments owned by root, by their own uid, by
this uid, and by the uid of the writer these hooks started, which they pass on).

Hooks you already have: call ours from yours, e.g.
``def post_fork(server, worker): shmkeyspace.gunicorn.post_fork(server, worker); ...``.
With ``--preload`` the app is imported in the master before ``on_starting``:
call ``reader()`` per request (or in ``post_fork``), not at import time.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Union

from .errors import InvalidSettingError, SegmentNotFoundError, WriterStartError
from .reader import Reader

__all__ = ["on_starting", "post_fork", "worker_exit", "on_exit", "configure", "reader"]

log = logging.getLogger(__name__)

RESTART_MIN = 0.5
RESTART_MAX = 30.0
STABLE_AFTER = 60.0


@dataclass(frozen=True)
class Settings:
    name: Optional[str] = None
    prefix: Optional[str] = None
    endpoints: str = "127.0.0.1:2379"
    decoder: str = "raw"
    external_writer: bool = False
    apply_delay_ms: Optional[float] = None
    writer_args: List[str] = field(default_factory=list)
    start_timeout: float = 120.0
    worker_wait: float = 10.0
    unlink_on_exit: bool = False
    state_dir: Optional[str] = None
    persist_interval: Optional[float] = None
    writer_uid: Union[int, str, None] = None  # uid or user name whose writer the workers trust


_overrides: Dict[str, Any] = {}
_supervisor: Optional["WriterSupervisor"] = None
_reader: Optional[Reader] = None
_reader_pid = 0
_reader_lock = threading.Lock()


def configure(**kwargs: Any) -> Settings:
    """Set any :class:`Settings` field (they win over the environment); returns the result."""
    unknown = set(kwargs) - set(Settings.__dataclass_fields__)
    if unknown:
        raise InvalidSettingError(f"unknown shmkeyspace setting(s): {', '.join(sorted(unknown))}")
    _overrides.update(kwargs)
    return settings()


def settings() -> Settings:
    """The effective settings: ``configure()`` values, else ``SHMKEYSPACE_*`` variables, else defaults."""
    env = os.environ.get
    s = Settings(
        name=env("SHMKEYSPACE_NAME") or None,
        prefix=env("SHMKEYSPACE_PREFIX") or None,
        endpoints=env("SHMKEYSPACE_ENDPOINTS") or Settings.endpoints,
        decoder=env("SHMKEYSPACE_DECODER") or Settings.decoder,
        external_writer=env("SHMKEYSPACE_EXTERNAL_WRITER", "") not in ("", "0", "false", "no"),
        apply_delay_ms=float(env("SHMKEYSPACE_APPLY_DELAY") or 0) if env("SHMKEYSPACE_APPLY_DELAY") else None,
        writer_args=shlex.split(env("SHMKEYSPACE_WRITER_ARGS", "")),
        start_timeout=float(env("SHMKEYSPACE_START_TIMEOUT") or Settings.start_timeout),
        worker_wait=float(env("SHMKEYSPACE_WORKER_WAIT") or Settings.worker_wait),
        unlink_on_exit=env("SHMKEYSPACE_UNLINK_ON_EXIT", "") not in ("", "0", "false", "no"),
        state_dir=env("SHMKEYSPACE_STATE_DIR") or None,
        persist_interval=float(env("SHMKEYSPACE_PERSIST_INTERVAL") or 0) or None,
        writer_uid=env("SHMKEYSPACE_WRITER_UID") or None,
    )
    return replace(s, **_overrides) if _overrides else s


def _require_name(s: Settings) -> str:
    if not s.name:
        raise InvalidSettingError(
            "shmkeyspace: no snapshot name: set SHMKEYSPACE_NAME or call "
            "configure(name=...) in the gunicorn config"
        )
    return s.name


# -- master side -----------------------------------------------------------------


class WriterSupervisor:
    """Runs the writer as a child of the gunicorn master and keeps it running."""

    def __init__(
        self,
        s: Settings,
        logger: Any = None,
        extra_path: Optional[List[str]] = None,
        group: Optional[int] = None,
    ) -> None:
        self.settings = s
        self.name = _require_name(s)
        if not s.prefix:
            raise InvalidSettingError(
                "shmkeyspace: no prefix to mirror: set SHMKEYSPACE_PREFIX or call "
                "configure(prefix=...) (or SHMKEYSPACE_EXTERNAL_WRITER=1)"
            )
        self.log = logger or log
        self.extra_path = [p for p in (extra_path or []) if p]
        #: gid the segments get (mode 0640) so workers running as another user can read them.
        self.group = group
        self.proc: Optional[subprocess.Popen] = None
        #: The uid the writer runs as (it is this master's child, without a user switch):
        #: workers trust segments it owns.
        self.writer_uid = os.geteuid()
        self.started_at = 0.0
        self.restarts = 0
        self._owner = os.getpid()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @property
    def pid(self) -> Optional[int]:
        p = self.proc
        return p.pid if p is not None and p.returncode is None else None

    def command(self) -> List[str]:
        s = self.settings
        cmd = [
            sys.executable,
            "-m",
            "shmkeyspace",
            "writer",
            "--name",
            self.name,
            "--prefix",
            s.prefix or "",
            "--endpoints",
            s.endpoints,
            "--decoder",
            s.decoder,
            "--exit-with-parent",
        ]
        if s.apply_delay_ms is not None:
            cmd += ["--apply-delay", f"{s.apply_delay_ms:g}"]
        if s.unlink_on_exit:
            cmd.append("--unlink-on-exit")
        if self.group is not None and not _group_chosen(s):
            cmd += ["--group", str(self.group)]
        if s.state_dir:
            cmd += ["--state-dir", s.state_dir]
        if s.persist_interval:
            cmd += ["--persist-interval", f"{s.persist_interval:g}"]
        return cmd + list(s.writer_args)

    def _spawn(self) -> None:
        env = dict(os.environ)
        # The master's import path (gunicorn --chdir/--pythonpath) for module:function decoders.
        path = self.extra_path + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if path:
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
        self.proc = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True
        )
        self.started_at = time.monotonic()
        self.log.info("shmkeyspace: started writer for %r (pid %d)", self.name, self.proc.pid)

    def start(self) -> None:
        """Start (or stand by for) the writer and wait for a snapshot; then monitor it."""
        from . import writerlock

        t0 = time.time()
        if writerlock.writer_is_running(self.name):
            self.log.warning(
                "shmkeyspace: another writer already publishes %r; standing by to take over if it exits",
                self.name,
            )
        else:
            self._spawn()
        self._wait_first_snapshot(t0)
        self._thread = threading.Thread(target=self._monitor, daemon=True, name="shmkeyspace-supervisor")
        self._thread.start()

    def _wait_first_snapshot(self, t0: float) -> None:
        deadline = time.monotonic() + self.settings.start_timeout
        r: Optional[Reader] = None
        try:
            while True:
                p = self.proc
                if p is not None and p.poll() is not None:
                    raise WriterStartError(
                        f"shmkeyspace: the writer for {self.name!r} {_how_it_ended(p.returncode)} "
                        "before publishing; its error is logged above"
                    )
                try:
                    if r is None:
                        r = Reader(self.name, writer_uid=_trusted_uid(self.settings, self.writer_uid))
                    h = r.health()
                    if p is None and h.writer_alive:
                        return  # another writer's snapshot
                    if p is not None and h.writer_pid == p.pid and h.published_at >= t0:
                        if h.source == "disk":
                            # Fail static: boot the workers on the persisted copy
                            # rather than wait for an etcd that may be down.
                            self.log.warning(
                                "shmkeyspace: %r published from the writer's state file (%d keys at "
                                "revision %d); workers start on it before the writer has caught up "
                                "with etcd (Reader.health().source says 'disk' until then)",
                                self.name,
                                h.keys,
                                h.revision,
                            )
                            return
                        self.log.info(
                            "shmkeyspace: %r published: %d keys at revision %d", self.name, h.keys, h.revision
                        )
                        return
                except SegmentNotFoundError:
                    pass
                if time.monotonic() > deadline:
                    raise WriterStartError(
                        f"shmkeyspace: no snapshot of {self.name!r} after "
                        f"{self.settings.start_timeout:g}s (SHMKEYSPACE_START_TIMEOUT)"
                    )
                time.sleep(0.05)
        finally:
            if r is not None:
                r.close()

    def _monitor(self) -> None:
        # This thread must outlive every writer it spawns: a writer started with
        # --exit-with-parent gets SIGTERM when the *thread* that forked it ends.
        state = {"backoff": RESTART_MIN}
        while not self._stop.wait(0.2):
            try:
                if self._check(state):
                    return
            except Exception:
                self.log.exception("shmkeyspace: writer supervisor error (continuing)")

    def _check(self, state: Dict[str, float]) -> bool:
        """One round of supervision; True when stopping."""
        from . import writerlock

        backoff = state["backoff"]
        try:
            with self._lock:
                p = self.proc
                if p is not None and p.poll() is None:
                    return False
                if p is not None:
                    uptime = time.monotonic() - self.started_at
                    if uptime >= STABLE_AFTER:
                        backoff = RESTART_MIN
                    self.log.error(
                        "shmkeyspace: writer for %r (pid %d) %s after %.1fs; restarting in "
                        "%.1fs; workers keep serving the last snapshot",
                        self.name,
                        p.pid,
                        _how_it_ended(p.returncode),
                        uptime,
                        backoff,
                    )
                    self.proc = None
                    delay, backoff = backoff, min(RESTART_MAX, backoff * 2)
                else:
                    delay = 0.0
        finally:
            state["backoff"] = backoff
        if delay and self._stop.wait(delay):
            return True
        with self._lock:
            if self._stop.is_set():
                return True
            if writerlock.writer_is_running(self.name):
                return False  # someone else's writer (or the old one still exiting): stand by
            try:
                self._spawn()
                self.restarts += 1
            except OSError as exc:
                self.log.error("shmkeyspace: cannot start the writer for %r: %s", self.name, exc)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Stop monitoring and the writer (SIGTERM, then SIGKILL). Only acts in the master."""
        if os.getpid() != self._owner:
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        with self._lock:
            p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log.warning(
                "shmkeyspace: writer (pid %d) ignored SIGTERM for %gs: killing it", p.pid, timeout
            )
            p.kill()
            p.wait(5)
        except ProcessLookupError:
            pass
        self.log.info("shmkeyspace: stopped writer for %r (pid %d)", self.name, p.pid)


def _group_chosen(s: Settings) -> bool:
    """True when the user picked the segments' group (or mode) already."""
    if os.environ.get("SHMKEYSPACE_GROUP") or os.environ.get("SHMKEYSPACE_MODE"):
        return True
    return any(a.split("=", 1)[0] in ("--group", "--mode") for a in s.writer_args)


def worker_group(cfg: Any) -> Optional[int]:
    """The gid gunicorn's workers will run as, if they drop to another user or group.

    gunicorn's ``cfg.uid``/``cfg.gid`` are the master's own ids unless ``user``
    or ``group`` is set; workers switch to them after ``post_fork``. None when
    they stay the master's (nothing to share).
    """
    uid, gid = getattr(cfg, "uid", None), getattr(cfg, "gid", None)
    if not isinstance(uid, int) or not isinstance(gid, int):
        return None
    if uid == os.geteuid() and gid == os.getegid():
        return None
    return gid


def _how_it_ended(rc: Optional[int]) -> str:
    if rc is not None and rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    if rc:
        return f"exited with code {rc}"
    # 0, or a status lost because gunicorn's master reaped the child itself (it
    # calls waitpid(-1) for every SIGCHLD); Popen then reports 0.
    return "exited"


def on_starting(server: Any) -> None:
    """gunicorn hook (master): start the writer, wait for the first snapshot, monitor it."""
    global _supervisor
    s = settings()
    name = _require_name(s)
    logger = getattr(server, "log", None) or log
    if s.external_writer:
        logger.info("shmkeyspace: using an external writer for %r", name)
        return
    if _supervisor is not None:
        return
    cfg = getattr(server, "cfg", None)
    extra = [os.getcwd()]
    if cfg is not None:
        extra.append(getattr(cfg, "chdir", None) or "")
        extra.extend(
            (getattr(cfg, "pythonpath", None) or "").split(",") if getattr(cfg, "pythonpath", None) else []
        )
    group = worker_group(cfg)
    if group is not None:
        logger.info(
            "shmkeyspace: workers run as uid %s gid %d: segments of %r get group %d, mode 0640",
            getattr(cfg, "uid", "?"),
            group,
            name,
            group,
        )
    sup = WriterSupervisor(s, logger, [p.strip() for p in extra], group=group)
    try:
        sup.start()
    except BaseException:
        sup.stop()
        raise
    _supervisor = sup


def on_exit(server: Any) -> None:
    """gunicorn hook (master, at shutdown): stop the writer."""
    global _supervisor
    sup, _supervisor = _supervisor, None
    if sup is not None:
        sup.stop()


# -- worker side ---------------------------------------------------------------------


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn hook (worker): attach this worker's Reader."""
    global _reader, _reader_pid
    _reader, _reader_pid = None, 0  # anything inherited belongs to the master
    s = settings()
    try:
        _attach(s, wait=s.worker_wait)
    except SegmentNotFoundError as exc:
        logger = getattr(server, "log", None) or log
        logger.warning(
            "shmkeyspace: worker %d has no snapshot yet (%s); reader() will retry", os.getpid(), exc
        )


def worker_exit(server: Any, worker: Any) -> None:
    """gunicorn hook (worker, on exit): close this worker's Reader."""
    global _reader, _reader_pid
    with _reader_lock:
        r, _reader, _reader_pid = _reader, None, 0
    if r is not None:
        r.close()


def _trusted_uid(s: Settings, started: Optional[int]) -> Union[int, str, None]:
    """The writer uid a Reader trusts: the configured one, else that of the writer we started."""
    return s.writer_uid if s.writer_uid is not None else started


def _attach(s: Settings, wait: float) -> Reader:
    global _reader, _reader_pid
    with _reader_lock:
        if _reader is None or _reader_pid != os.getpid():
            started = _supervisor.writer_uid if _supervisor is not None else None
            _reader = Reader(_require_name(s), wait=wait, writer_uid=_trusted_uid(s, started))
            _reader_pid = os.getpid()
        return _reader


def reader() -> Reader:
    """This process's Reader of the configured snapshot, attached on first use.

    Raises SegmentNotFoundError while no snapshot has been published yet.
    One Reader serves all threads of a worker (gthread, ``--threads N``): a
    Reader is safe to share between threads, with no lock on its hot path.
    """
    r = _reader
    if r is not None and _reader_pid == os.getpid():
        return r
    return _attach(settings(), wait=0.0)


def writer_pid() -> Optional[int]:
    """The pid of the writer this master supervises (None in workers or with an external writer)."""
    return _supervisor.pid if _supervisor is not None else None
