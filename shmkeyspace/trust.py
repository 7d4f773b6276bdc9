"""Who may write what shmkeyspace reads: ownership and mode checks on shared files.

Owns the host-local trust rules (README, "Security"). /dev/shm is world-writable
with the sticky bit, like /tmp: any local user can create a file under a name a
writer or a reader is about to use, and keep a descriptor to it open. So:

* a writer creates what it writes exclusively (``O_CREAT|O_EXCL|O_NOFOLLOW``,
  :func:`create_fresh`); the one file it reuses across restarts (the control
  segment) is used only if fstat says it is a regular file owned by the writer's
  uid (or the uid it publishes for) and writable by nobody else (:func:`open_owned`);
  a leftover it replaces is unlinked and created again exclusively, never opened;
* a reader trusts a control segment only if it is a regular file, not writable by
  group or others, and owned by root, by the reader's own effective uid, or by the
  writer uid it was told to trust (``Reader(name, writer_uid=...)`` or
  ``SHMKEYSPACE_WRITER_UID``, :func:`trusted_writer_uids`); a data segment only if
  it passes the same mode rule and has the control segment's owner.

Root and the reader's own uid are trusted without being named because either can
rewrite the reader's memory anyway; any other owner is a choice the deployment
makes. Every check is an fstat of the descriptor that is then mapped or written,
so nothing can be swapped in between check and use (no TOCTOU); paths are opened
with ``O_NOFOLLOW`` (a symlink is refused, never followed) and ``O_NONBLOCK`` (a
FIFO planted under the name cannot hang the open). All of it runs when a file is
opened (a few syscalls), never on a query path.

Other files a feature writes (state files, sockets) use the same functions:
:func:`create_fresh` for a file written anew, :func:`open_owned` for one reused,
:func:`check_owned` on an ``os.fstat`` of anything else opened.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import stat
from typing import AbstractSet, FrozenSet, Optional, Tuple, Union

from .errors import InvalidSettingError, UntrustedSegmentError

log = logging.getLogger(__name__)

#: Environment variable naming the uid (number or user name) whose writer readers trust.
WRITER_UID_ENV = "SHMKEYSPACE_WRITER_UID"

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_REPLACE_TRIES = 3


def user_name(uid: int) -> str:
    """The login name of ``uid``, or ``?`` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "?"


def describe(st: os.stat_result) -> str:
    """``owned by uid 65534 (nobody), mode 0666``: what an error message shows of a file."""
    return f"owned by uid {st.st_uid} ({user_name(st.st_uid)}), mode {stat.S_IMODE(st.st_mode):04o}"


def _uids_text(uids: AbstractSet[int]) -> str:
    return " or ".join(f"uid {u} ({user_name(u)})" for u in sorted(uids))


def resolve_uid(value: Union[int, str], what: str = "writer uid") -> int:
    """A uid from an int, a decimal string or a user name; InvalidSettingError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidSettingError(f"{what} must be a uid or a user name, not {type(value).__name__}")
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit():
            value = int(v)
        else:
            try:
                return pwd.getpwnam(v).pw_uid
            except KeyError:
                raise InvalidSettingError(f"{what}: no such user {value!r}") from None
    if not 0 <= value < 2**32 - 1:
        raise InvalidSettingError(f"{what}: uid {value} out of range")
    return value


def writer_uid_from_env() -> Optional[int]:
    """The uid named by ``$SHMKEYSPACE_WRITER_UID``, or None when it is unset or empty."""
    v = os.environ.get(WRITER_UID_ENV, "").strip()
    return resolve_uid(v, WRITER_UID_ENV) if v else None


def trusted_writer_uids(writer_uid: Union[int, str, None] = None) -> FrozenSet[int]:
    """Owners a reader accepts for a control segment: root, its euid, and ``writer_uid``.

    ``writer_uid=None`` falls back to ``$SHMKEYSPACE_WRITER_UID``. A few
    microseconds (one getenv, maybe one passwd lookup); called once per attach.
    """
    uid = resolve_uid(writer_uid) if writer_uid is not None else writer_uid_from_env()
    uids = {0, os.geteuid()}
    if uid is not None:
        uids.add(uid)
    return frozenset(uids)


def check_mode(mode: int) -> int:
    """Return ``mode`` if readers would accept files created with it (nobody but the owner writes)."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
        raise InvalidSettingError(f"mode must be an int in 0..0o777, got {mode!r}")
    if mode & _OTHERS_WRITE:
        raise InvalidSettingError(
            f"mode {mode:04o} lets users other than the owner write the snapshot, and readers refuse "
            "such segments: use 0600, or 0640 with a group"
        )
    return mode


def check_owned(
    st: os.stat_result,
    path: str,
    uids: AbstractSet[int],
    *,
    what: str,
    remedy: str,
    owner_hint: str = "",
    kind: str = "file",
) -> None:
    """Raise UntrustedSegmentError unless ``st`` (an fstat of an open fd) is trustworthy.

    Trustworthy: a regular file (``kind="dir"``: a directory) owned by one of
    ``uids`` and not writable by group or others. ``what`` names the object in
    the message (``"snapshot 'x': control segment"``), ``remedy`` says what to do;
    ``owner_hint`` (``{uid}`` is replaced by the owner's uid) leads into ``remedy`` when
    only the owner is wrong. One comparison per rule: no syscalls.
    """
    ok_kind = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not ok_kind:
        raise UntrustedSegmentError(
            f"{what} {path} is not a {'directory' if kind == 'dir' else 'regular file'} "
            f"({describe(st)}): refusing it; {remedy}"
        )
    if st.st_uid not in uids:
        raise UntrustedSegmentError(
            f"{what} {path} is {describe(st)}, not by {_uids_text(uids)}: refusing it; "
            + (owner_hint.format(uid=st.st_uid) + " " if owner_hint else "")
            + remedy
        )
    if st.st_mode & _OTHERS_WRITE:
        raise UntrustedSegmentError(
            f"{what} {path} is {describe(st)}: writable by users other than its owner, who could "
            f"rewrite it at any time; refusing it; {remedy}"
        )


def _lstat_text(path: str) -> str:
    """How ``path`` looks now, for an error message only (never used to decide)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be inspected ({os.strerror(exc.errno or 0)})"
    kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "a file"
    return f"{kind} {describe(st)}"


def open_nofollow(path: str, flags: int, *, what: str, remedy: str) -> int:
    """``os.open(path, flags)`` that refuses a symlink (UntrustedSegmentError) and never blocks on a FIFO.

    Other errors (FileNotFoundError, PermissionError) propagate for the caller to word.
    """
    try:
        return os.open(path, flags | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedSegmentError(
                f"{what} {path} is {_lstat_text(path)}: refusing to follow it; {remedy}"
            ) from None
        raise


def open_owned(path: str, mode: int, uid: int, *, what: str, remedy: str) -> Tuple[int, bool]:
    """Open ``path`` read-write, creating it exclusively; returns ``(fd, created)``.

    A pre-existing file is used only if it is a regular file owned by ``uid`` and
    writable by nobody else (checked on the fstat of the opened fd); otherwise
    UntrustedSegmentError names it, its owner and mode, and ``remedy``. Never
    follows a symlink. The mode of a new file is filtered by the umask: set it
    again with fchmod if it matters.
    """
    for _ in range(_REPLACE_TRIES):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode), True
        except FileExistsError:
            pass
        try:
            fd = open_nofollow(path, os.O_RDWR, what=what, remedy=remedy)
        except FileNotFoundError:
            continue  # removed between the two opens: create it
        except UntrustedSegmentError:  # a PermissionError too: not to be reworded below
            raise
        except PermissionError:
            # Not ours to write, so not ours: say whose it is (lstat only words the message).
            raise UntrustedSegmentError(
                f"{what} {path} already exists and is {_lstat_text(path)}, not owned by uid {uid} "
                f"({user_name(uid)}): refusing it; {remedy}"
            ) from None
        try:
            check_owned(os.fstat(fd), path, {uid}, what=what, remedy=remedy)
        except BaseException:
            os.close(fd)
            raise
        return fd, False
    raise UntrustedSegmentError(f"{what} {path} keeps appearing and disappearing: refusing it; {remedy}")


def create_fresh(path: str, mode: int, *, what: str, remedy: str) -> int:
    """Create ``path`` exclusively (read-write fd), replacing a leftover; never opens an existing file.

    A leftover under the name is unlinked and the exclusive create retried (up to
    3 times, so a racing squatter ends in an error, not in our data in its file).
    In a sticky directory only the owner (or root) can unlink: a file that cannot
    be removed raises UntrustedSegmentError naming it, its owner and mode.
    """
    for _ in range(_REPLACE_TRIES):
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, mode)
        except FileExistsError:
            pass
        seen = _lstat_text(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except PermissionError:
            raise UntrustedSegmentError(
                f"{what} {path} already exists and is {seen}, and cannot be removed: refusing it; {remedy}"
            ) from None
        log.info("removed leftover %s %s (%s)", what, path, seen)
    raise UntrustedSegmentError(
        f"{what} {path} was created again by someone else each time it was removed: refusing it; {remedy}"
    )
