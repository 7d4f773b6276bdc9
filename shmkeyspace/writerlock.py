"""The writer lock of a snapshot name: who may write it, and removing a name.

Owns the lock file ``/dev/shm/.shmks.NAME.lock`` (:func:`lock_path`, mode 0600,
the writer's uid) and everything that asks about it: :func:`take_lock` (the
writer's ``flock(LOCK_EX)``, held for its whole life), :func:`writer_lock_held`
and :func:`writer_is_running` (probes, including /proc/locks for readers that
cannot open the file), and :func:`unlink_all` (retire and remove every segment
of a name while holding the lock).

Promises: one writer per name per host (a second one gets WriterExistsError
naming the first one's pid); no reader can take or hold the lock, because only
the writer's uid (and root) can open the file; the kernel drops the lock when the
writer dies, even on SIGKILL, so a restarted writer takes over without cleanup.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import time
from typing import Optional, Tuple

from . import futex, segment, trust
from .errors import SegmentPermissionError, UntrustedSegmentError, WriterExistsError
from .segment import (
    CTRL_MAGIC,
    CTRL_SIZE,
    LAYOUT_VERSION,
    OFF_HB_INTERVAL,
    OFF_HEARTBEAT,
    OFF_PID,
    OFF_PIDNS,
    OFF_SEQ,
    U64,
    ControlView,
    ctrl_name,
    pid_namespace,
    segment_files,
    shm_path,
    validate_name,
)


def lock_path(name: str) -> str:
    """The writer lock file of ``name``: ``/dev/shm/.shmks.NAME.lock``, mode 0600.

    Beside the segments (so containers sharing one directory at /dev/shm share the
    lock too), but not a segment: only the writer's uid (and root) can open it, so
    no reader can take or hold the lock that decides who writes.
    """
    return f"/dev/shm/.shmks.{validate_name(name)}.lock"


def take_lock(name: str, uid: int) -> Tuple[int, bool, Tuple[int, int]]:
    """Open (or create, 0600, owned by ``uid``) the lock file of ``name`` and take
    ``flock(LOCK_EX)``: (fd, created, the file's id). The writer keeps ``fd`` open for its life.

    The lock lives in its own file that only this uid (and root) can open, not
    on a segment readers map: a reader holding any lock on any segment cannot
    stop a writer (issue 21). The kernel drops the lock when the process dies,
    even on SIGKILL, so a restarted writer takes over without cleanup. A brief
    probe (:func:`writer_is_running`) may hold a shared lock: retried for 0.2 s.
    A file that was unlinked while we waited for it (``unlink``) is opened again.
    Raises WriterExistsError (naming the live writer's pid) when another holds it.
    """
    path = lock_path(name)
    what = f"snapshot {name!r}: writer lock file"
    remedy = f"remove it (as root or its owner: rm {path}) or choose another --name"
    for _ in range(5):
        fd, created = trust.open_owned(path, 0o600, uid, what=what, remedy=remedy)
        try:
            if uid != os.geteuid():
                os.fchown(fd, uid, -1)
            os.fchmod(fd, 0o600)
            deadline = time.monotonic() + 0.2
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise WriterExistsError(
                            f"snapshot {name!r} already has a live writer (pid {peek_pid(ctrl_name(name))}); "
                            "stop it first or choose another --name"
                        ) from None
                    time.sleep(0.01)
            if same_file(fd, path):
                return fd, created, segment.file_id(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # unlinked (or replaced) while we waited: lock what is there now
    raise WriterExistsError(f"snapshot {name!r}: its lock file {path} keeps being replaced")


def remove_lock_file(fd: int, name: str) -> None:
    """Unlink the lock file of ``name`` if it is still the file open as ``fd`` (its holder's)."""
    if same_file(fd, lock_path(name)):
        _unlink_path_quiet(lock_path(name))


def writer_lock_held(name: str) -> Optional[bool]:
    """Whether a process holds the writer lock of ``name``: True, False, or None (cannot tell).

    As the writer's uid or root: a shared-lock probe of the lock file (definitive).
    Otherwise (a reader of another uid cannot open it): the lock is looked up in
    /proc/locks by the file's device and inode; not found there is definitive only
    when the writer runs in this PID namespace (the kernel lists only locks of
    processes this namespace can see), else None. A syscall or two: not hot.
    """
    path = lock_path(name)
    try:
        fd = trust.open_nofollow(path, os.O_RDONLY, what="writer lock file", remedy="")
    except (FileNotFoundError, UntrustedSegmentError):
        return False
    except PermissionError:
        return _proc_locks_hold(name, path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # drops our shared lock too
    return False


def _proc_locks_hold(name: str, path: str) -> Optional[bool]:
    try:
        st = os.stat(path, follow_symlinks=False)
        with open("/proc/locks") as f:
            text = f.read()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        f_ = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:19:5678 0 EOF" (blocked waiters have "->")
        if len(f_) >= 6 and f_[1] == "FLOCK" and f_[3] == "WRITE" and f_[5] == want:
            return True
    try:
        with ControlView(name) as ctrl:
            ns = ctrl.words[OFF_PIDNS // 8]
    except Exception:
        return None
    return False if ns and ns == pid_namespace() else None


def writer_is_running(name: str) -> bool:
    """True iff a writer holds the lock of ``name`` (:func:`writer_lock_held`; not hot).

    Where this process cannot tell (None), a writer counts as running while the
    control block shows a pid and a heartbeat younger than five intervals (2 s at least).
    """
    held = writer_lock_held(name)
    if held is not None:
        return held
    try:
        with ControlView(name) as ctrl:
            w = ctrl.words
            pid, hb, interval = w[OFF_PID // 8], w[OFF_HEARTBEAT // 8], w[OFF_HB_INTERVAL // 8] / 1e9
    except Exception:
        return False
    return bool(pid and hb) and (time.monotonic_ns() - hb) / 1e9 < max(2.0, 5 * (interval or 0.5))


def unlink_all(name: str) -> int:
    """Remove the control segment, every data generation and the lock file of ``name``.

    Refuses (WriterExistsError) while a writer holds the lock; holds the lock
    itself meanwhile, so no writer starts half-way. The control segment is
    retired first (where this process may write it), so readers re-open the name
    when a writer starts again. Returns the number of segments removed.
    """
    path = lock_path(name)
    try:
        fd = trust.open_nofollow(path, os.O_RDONLY, what="writer lock file", remedy="")
    except (FileNotFoundError, UntrustedSegmentError):
        fd = -1
    except PermissionError:
        raise SegmentPermissionError(
            errno.EACCES, f"snapshot {name!r}: no permission to open its writer lock file {path}"
        ) from None
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                st = os.fstat(fd)
                if st.st_uid not in trust.trusted_writer_uids():
                    # A squatter can lock its own file: say whose it is rather than
                    # send the user looking for a writer that does not exist.
                    raise WriterExistsError(
                        f"snapshot {name!r}: a process holds the writer lock file {path}, which is "
                        f"{trust.describe(st)}, not a writer this user trusts: stop that process, or if "
                        f"the file is not your writer's, remove it with rm {path}"
                    ) from None
                raise WriterExistsError(
                    f"snapshot {name!r} has a running writer: stop it before unlinking"
                ) from None
        _retire_path(shm_path(ctrl_name(name)))
        removed = 0
        for shm_name, gen in segment_files(name):
            if gen:
                removed += segment.unlink_quiet(shm_name)
        removed += segment.unlink_quiet(ctrl_name(name))
        if fd >= 0:
            remove_lock_file(fd, name)
        return removed
    finally:
        if fd >= 0:
            os.close(fd)


def _retire_path(path: str) -> None:
    """Retire the control segment at ``path`` if this process may write it (best effort)."""
    try:
        fd = trust.open_nofollow(path, os.O_RDWR, what="control segment", remedy="")
    except (OSError, UntrustedSegmentError):
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < CTRL_SIZE:
            return
        mm = mmap.mmap(fd, CTRL_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:
        return
    finally:
        os.close(fd)
    try:
        if segment.CTRL_HEAD.unpack_from(mm, 0)[:2] == (CTRL_MAGIC, LAYOUT_VERSION):
            with memoryview(mm) as raw, raw.cast("Q") as words:
                segment.retire_block(mm, words, futex.address(mm, OFF_SEQ))
    finally:
        mm.close()


def same_file(fd: int, path: str) -> bool:
    """True if ``path`` (not followed) names the file open as ``fd``."""
    try:
        return segment.file_id(os.stat(path, follow_symlinks=False)) == segment.file_id(os.fstat(fd))
    except OSError:
        return False


def peek_pid(shm_name: str) -> int:
    """The PID word of a control segment (0 if unreadable): for error messages only."""
    try:
        with open(shm_path(shm_name), "rb") as f:
            f.seek(OFF_PID)
            return U64.unpack(f.read(8))[0]
    except (OSError, struct.error):
        return 0


def _unlink_path_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
